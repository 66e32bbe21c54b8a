//! Running the packet programs on crafted packets (`BPF_PROG_TEST_RUN`,
//! through aya), for tests and per-packet cost benchmarks.

use std::time::Duration;

use aya::programs::{SchedClassifier, TestRun, TestRunAttrs, TestRunOptions, Xdp};

use crate::error::{Error, Result};
use crate::{PROG_FANOUT, PROG_GUARD, PROG_XDP, RidgeBpf, XdpProgram};

/// A program that can be test-run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TestProgram {
    /// `ridge_guard` (XDP).
    Guard,
    /// `ridge_xdp` (XDP): guard and forwarding.
    Xdp,
    /// `ridge_fanout` (TC). Its clones are really sent.
    Fanout,
}

/// The outcome of a test run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestRunOutput {
    /// The program's return value (`XDP_*` or `TC_ACT_*`).
    pub verdict: u32,
    /// The packet as the program left it.
    pub data: Vec<u8>,
    /// Kernel-measured time per run (averaged over `repeat`).
    pub per_run: Duration,
}

/// XDP verdicts, as the programs return them.
pub mod xdp {
    /// `XDP_ABORTED`.
    pub const ABORTED: u32 = 0;
    /// `XDP_DROP`.
    pub const DROP: u32 = 1;
    /// `XDP_PASS`.
    pub const PASS: u32 = 2;
    /// `XDP_TX`.
    pub const TX: u32 = 3;
    /// `XDP_REDIRECT`.
    pub const REDIRECT: u32 = 4;
}

/// TC verdicts, as the programs return them.
pub mod tc {
    /// `TC_ACT_UNSPEC` (-1): no verdict; the next TCX program or `clsact`
    /// filter decides, and without one the packet continues.
    pub const UNSPEC: u32 = u32::MAX;
    /// `TC_ACT_OK`: continue up the stack.
    pub const OK: u32 = 0;
    /// `TC_ACT_SHOT`: drop.
    pub const SHOT: u32 = 2;
    /// `TC_ACT_REDIRECT`.
    pub const REDIRECT: u32 = 7;
}

impl RidgeBpf {
    /// Runs `program` once per `repeat` on `packet` (an Ethernet frame) and
    /// returns the verdict, the packet as left by the last run, and the time
    /// per run. For XDP, `ingress_ifindex` sets `ctx->ingress_ifindex` (it
    /// must name an interface in the calling thread's network namespace).
    ///
    /// The programs see real maps, so counters move and a rewrite done by
    /// one repetition is the input of the next.
    pub fn test_run(
        &self,
        program: TestProgram,
        packet: &[u8],
        ingress_ifindex: Option<u32>,
        repeat: u32,
    ) -> Result<TestRunOutput> {
        let mut out = vec![0u8; packet.len() + 512];
        let ctx = ingress_ifindex.map(|ifindex| xdp_md(packet.len(), ifindex));
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ctx_in: ctx.as_deref(),
            repeat: repeat.max(1),
            ..TestRunOptions::default()
        };
        let (name, result) = match program {
            TestProgram::Guard | TestProgram::Xdp => {
                let name = if program == TestProgram::Guard {
                    PROG_GUARD
                } else {
                    PROG_XDP
                };
                let prog: &Xdp = self.program(name)?;
                (name, prog.test_run(opts))
            }
            TestProgram::Fanout => {
                if ctx.is_some() {
                    return Err(Error::InvalidArgument(
                        "ingress_ifindex applies to XDP programs only".to_owned(),
                    ));
                }
                let prog: &SchedClassifier = self.program(PROG_FANOUT)?;
                (PROG_FANOUT, prog.test_run(opts))
            }
        };
        let result = result.map_err(|e| Error::program(name, e))?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutput {
            verdict: result.return_value,
            data: out,
            per_run: result.duration,
        })
    }

    /// Runs an XDP program on `repeat` copies of `packet` in live-frames
    /// mode (`BPF_F_TEST_XDP_LIVE_FRAMES`), `batch` at a time, as if they
    /// arrived on `ingress_ifindex` (in the calling thread's namespace):
    /// frames it passes go up that interface's stack, frames it redirects
    /// or transmits are really sent. A packet generator for benchmarks;
    /// returns the kernel-measured time per packet.
    pub fn inject_live(
        &self,
        program: XdpProgram,
        packet: &[u8],
        ingress_ifindex: u32,
        repeat: u32,
        batch: u32,
    ) -> Result<Duration> {
        let name = match program {
            XdpProgram::Guard => PROG_GUARD,
            XdpProgram::GuardAndForward => PROG_XDP,
        };
        let ctx = xdp_md(packet.len(), ingress_ifindex);
        let opts = TestRunOptions {
            data_in: Some(packet),
            ctx_in: Some(&ctx),
            repeat: repeat.max(1),
            attrs: TestRunAttrs::new().xdp_live_frames(batch.clamp(1, 256)),
            ..TestRunOptions::default()
        };
        let prog: &Xdp = self.program(name)?;
        let result = prog.test_run(opts).map_err(|e| Error::program(name, e))?;
        Ok(result.duration)
    }

    fn program<'a, T>(&'a self, name: &'static str) -> Result<&'a T>
    where
        &'a T: TryFrom<&'a aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        self.ebpf
            .program(name)
            .ok_or(Error::Missing {
                kind: "program",
                name,
            })?
            .try_into()
            .map_err(|e| Error::program(name, e))
    }
}

/// `struct xdp_md` for `ctx_in`: no metadata, `data_end` = packet length.
fn xdp_md(len: usize, ingress_ifindex: u32) -> Vec<u8> {
    let fields = [
        0,
        u32::try_from(len).unwrap_or(u32::MAX),
        0,
        ingress_ifindex,
        0,
        0,
    ];
    fields.iter().flat_map(|f| f.to_ne_bytes()).collect()
}
