//! Random packet loss on a TC hook (`ridge_impair` in `bpf/impair.bpf.c`),
//! for integration tests and benchmarks on kernels without the netem qdisc.
//! The relay itself never loads it.
//!
//! An [`Impairment`] is one loaded copy of the program with its own
//! configuration and counters, attached to one interface and direction:
//! attach one per link end to impair several links at once. The program
//! lives in its own object (`impair.bpf.o`), so an `Impairment` creates two
//! one-element maps and none of the dataplane's.

use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::unix::fs::MetadataExt;

use aya::maps::{Array, MapData, PerCpuArray};
use aya::programs::links::Link;
use aya::programs::tc::SchedClassifierLink;
use aya::programs::{SchedClassifier, TcAttachType, TestRun, TestRunOptions};
use aya::{Ebpf, EbpfLoader};

use crate::attach::{TcxPlace, attach_tc, error_chain};
use crate::error::{Error, Result};
use crate::types::{IMPAIR_PPM, ImpairCfg, ImpairStats};
use crate::{TcAttachKind, TestRunOutput, program_mut};

/// The compiled impairment object.
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/impair.bpf.o"));

pub(crate) const PROG_IMPAIR: &str = "ridge_impair";
const CFG_MAP: &str = "ridge_impair_cfg";
const STATS_MAP: &str = "ridge_impair_stats";

/// The `loss_ppm` that drops every packet (loss is in parts per million).
pub const LOSS_ALL_PPM: u32 = IMPAIR_PPM;

/// Which way through an interface the impairment applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TcDirection {
    /// Packets the interface sends. The program runs after the other TCX
    /// programs on the hook, like a lossy wire after the host.
    Egress,
    /// Packets the interface receives, after XDP (packets an XDP program
    /// redirects or drops never get here: impair the peer's egress instead)
    /// and before the other TCX programs on the hook.
    Ingress,
}

impl TcDirection {
    fn attach_type(self) -> TcAttachType {
        match self {
            Self::Egress => TcAttachType::Egress,
            Self::Ingress => TcAttachType::Ingress,
        }
    }

    fn place(self) -> TcxPlace {
        match self {
            Self::Egress => TcxPlace::Last,
            Self::Ingress => TcxPlace::First,
        }
    }
}

/// An impairment's counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImpairCounters {
    /// Packets subject to loss that were let through.
    pub passed: u64,
    /// Packets subject to loss that were dropped.
    pub dropped: u64,
    /// Packets let through untouched because they are not UDP over IPv4 or
    /// IPv6 while [`Impairment::udp_only`] is set (ARP, ICMP, neighbour
    /// discovery, TCP, …).
    pub exempt: u64,
}

impl ImpairCounters {
    /// Packets subject to loss: `passed + dropped`.
    pub fn impaired(&self) -> u64 {
        self.passed + self.dropped
    }

    /// `dropped / impaired` (0 when nothing was subject to loss).
    pub fn loss_ratio(&self) -> f64 {
        match self.impaired() {
            0 => 0.0,
            n => self.dropped as f64 / n as f64,
        }
    }
}

/// Where an [`Impairment`] is attached.
#[derive(Debug)]
struct Attached {
    iface: String,
    direction: TcDirection,
    kind: TcAttachKind,
    /// Taken out of aya's keeping, so that dropping the program does not
    /// detach a `clsact` filter by ifindex in whatever namespace the
    /// dropping thread is in.
    link: SchedClassifierLink,
    /// For a `clsact` filter: the network namespace the interface is in,
    /// entered to detach it (the filter is named by ifindex over netlink).
    /// Holding it keeps the namespace, and its interfaces, alive until the
    /// impairment is dropped.
    netns: Option<File>,
}

/// Random packet loss on one interface and direction.
///
/// The program drops each packet with probability `loss_ppm / 1e6`
/// (`bpf_get_prandom_u32`, independently per packet) with `TC_ACT_SHOT`,
/// and returns `TC_ACT_UNSPEC` for the rest, so other programs on the same
/// hook still see them. By default only UDP over IPv4/IPv6 is impaired
/// ([`set_udp_only`](Self::set_udp_only)), so ARP, ICMP and neighbour
/// discovery keep working.
///
/// Dropping it detaches the program. Needs root (`CAP_BPF` +
/// `CAP_NET_ADMIN`). Changes to the loss take effect from the next packet.
pub struct Impairment {
    ebpf: Ebpf,
    cfg_map: Array<MapData, ImpairCfg>,
    stats: PerCpuArray<MapData, ImpairStats>,
    cfg: ImpairCfg,
    attached: Option<Attached>,
}

impl std::fmt::Debug for Impairment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Impairment")
            .field("loss_ppm", &self.cfg.loss_ppm)
            .field("udp_only", &(self.cfg.udp_only != 0))
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

impl Impairment {
    /// Loads the program with `loss_ppm` and UDP-only impairment, and
    /// attaches it to `iface` (a name in the calling thread's network
    /// namespace) in `direction`: TCX where the kernel has it, else a
    /// filter on a `clsact` qdisc (added if missing).
    ///
    /// To impair a link inside a network namespace, call this on a thread
    /// that has entered it (`setns`); the `Impairment` may then be used and
    /// dropped from any thread.
    pub fn attach(iface: &str, direction: TcDirection, loss_ppm: u32) -> Result<Self> {
        Self::attach_with(
            iface,
            direction,
            loss_ppm,
            &[TcAttachKind::Tcx, TcAttachKind::Clsact],
        )
    }

    /// [`attach`](Self::attach) trying only `kinds`, in order. A `clsact`
    /// qdisc this adds stays when the program is detached.
    pub fn attach_with(
        iface: &str,
        direction: TcDirection,
        loss_ppm: u32,
        kinds: &[TcAttachKind],
    ) -> Result<Self> {
        let mut this = Self::load(loss_ppm)?;
        let netns = if kinds.contains(&TcAttachKind::Clsact) {
            Some(
                File::open("/proc/thread-self/ns/net").map_err(|e| Error::Io {
                    context: "opening the calling thread's network namespace",
                    source: e,
                })?,
            )
        } else {
            None
        };
        let prog: &mut SchedClassifier = program_mut(&mut this.ebpf, PROG_IMPAIR)?;
        let (id, kind) = attach_tc(
            prog,
            PROG_IMPAIR,
            iface,
            direction.attach_type(),
            direction.place(),
            kinds,
        )?;
        let link = prog
            .take_link(id)
            .map_err(|e| Error::program(PROG_IMPAIR, e))?;
        this.attached = Some(Attached {
            iface: iface.to_owned(),
            direction,
            kind,
            link,
            netns: netns.filter(|_| kind == TcAttachKind::Clsact),
        });
        Ok(this)
    }

    /// Loads the program with `loss_ppm` and UDP-only impairment without
    /// attaching it: for [`test_run`](Self::test_run).
    pub fn load(loss_ppm: u32) -> Result<Self> {
        let cfg = ImpairCfg {
            loss_ppm: check_ppm(loss_ppm)?,
            udp_only: 1,
        };
        let mut ebpf = EbpfLoader::new()
            .load(OBJECT)
            .map_err(|e| Error::Load(Box::new(e)))?;
        let prog: &mut SchedClassifier = program_mut(&mut ebpf, PROG_IMPAIR)?;
        prog.load().map_err(|e| Error::program(PROG_IMPAIR, e))?;
        let cfg_map: Array<MapData, ImpairCfg> = typed_map(&mut ebpf, CFG_MAP)?;
        let stats: PerCpuArray<MapData, ImpairStats> = typed_map(&mut ebpf, STATS_MAP)?;
        let mut this = Self {
            ebpf,
            cfg_map,
            stats,
            cfg,
            attached: None,
        };
        this.write_cfg(cfg)?;
        Ok(this)
    }

    /// Sets the drop probability in parts per million: 0 passes everything,
    /// [`LOSS_ALL_PPM`] drops every packet subject to loss.
    pub fn set_loss_ppm(&mut self, ppm: u32) -> Result<()> {
        let cfg = ImpairCfg {
            loss_ppm: check_ppm(ppm)?,
            ..self.cfg
        };
        self.write_cfg(cfg)
    }

    /// The drop probability in parts per million.
    pub fn loss_ppm(&self) -> u32 {
        self.cfg.loss_ppm
    }

    /// `true` (the default): only UDP over IPv4/IPv6 is subject to loss;
    /// other packets pass and count as [`ImpairCounters::exempt`].
    /// `false`: every packet is, ARP and neighbour discovery included.
    pub fn set_udp_only(&mut self, udp_only: bool) -> Result<()> {
        let cfg = ImpairCfg {
            udp_only: u32::from(udp_only),
            ..self.cfg
        };
        self.write_cfg(cfg)
    }

    /// Whether only UDP is subject to loss.
    pub fn udp_only(&self) -> bool {
        self.cfg.udp_only != 0
    }

    /// The counters, summed over CPUs.
    pub fn counters(&self) -> Result<ImpairCounters> {
        let per_cpu = self
            .stats
            .get(&0, 0)
            .map_err(|e| Error::map(STATS_MAP, e))?;
        Ok(per_cpu
            .iter()
            .fold(ImpairCounters::default(), |sum, s| ImpairCounters {
                passed: sum.passed + s.passed,
                dropped: sum.dropped + s.dropped,
                exempt: sum.exempt + s.exempt,
            }))
    }

    /// The interface this is attached to (`None` after [`load`](Self::load)).
    pub fn iface(&self) -> Option<&str> {
        self.attached.as_ref().map(|a| a.iface.as_str())
    }

    /// The direction it is attached in.
    pub fn direction(&self) -> Option<TcDirection> {
        self.attached.as_ref().map(|a| a.direction)
    }

    /// How it is attached: TCX or a `clsact` filter.
    pub fn attach_kind(&self) -> Option<TcAttachKind> {
        self.attached.as_ref().map(|a| a.kind)
    }

    /// Runs the program once per `repeat` on `packet` (an Ethernet frame)
    /// with `BPF_PROG_TEST_RUN` and returns the verdict of the last run
    /// (`tc_verdict::SHOT` or `tc_verdict::UNSPEC`). Counters move.
    pub fn test_run(&self, packet: &[u8], repeat: u32) -> Result<TestRunOutput> {
        let mut out = vec![0u8; packet.len() + 512];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            repeat: repeat.max(1),
            ..TestRunOptions::default()
        };
        let prog: &SchedClassifier = self
            .ebpf
            .program(PROG_IMPAIR)
            .ok_or(Error::Missing {
                kind: "program",
                name: PROG_IMPAIR,
            })?
            .try_into()
            .map_err(|e| Error::program(PROG_IMPAIR, e))?;
        let result = prog
            .test_run(opts)
            .map_err(|e| Error::program(PROG_IMPAIR, e))?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutput {
            verdict: result.return_value,
            data: out,
            per_run: result.duration,
        })
    }

    /// Detaches the program now, reporting a failure that dropping would
    /// only log.
    pub fn detach(mut self) -> Result<()> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> Result<()> {
        let Some(attached) = self.attached.take() else {
            return Ok(());
        };
        let Attached { link, netns, .. } = attached;
        let Some(netns) = netns else {
            // A TCX link: closing it detaches, in whatever namespace.
            return link.detach().map_err(|e| Error::program(PROG_IMPAIR, e));
        };
        if same_netns(&netns) {
            return link.detach().map_err(|e| Error::program(PROG_IMPAIR, e));
        }
        // Detach from a thread in the interface's namespace. If the link
        // never gets there it is leaked, never detached elsewhere: the same
        // ifindex, priority and handle may name another filter here.
        let link = ManuallyDrop::new(link);
        std::thread::scope(|s| {
            std::thread::Builder::new()
                .name("ridge-impair-detach".to_owned())
                .spawn_scoped(s, move || {
                    nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                        |e| Error::Io {
                            context: "entering the impaired interface's network namespace",
                            source: e.into(),
                        },
                    )?;
                    ManuallyDrop::into_inner(link)
                        .detach()
                        .map_err(|e| Error::program(PROG_IMPAIR, e))
                })
                .map_err(|e| Error::Io {
                    context: "starting a thread to detach the impairment",
                    source: e,
                })
                .and_then(|thread| {
                    thread.join().unwrap_or_else(|_| {
                        Err(Error::Io {
                            context: "detaching the impairment",
                            source: std::io::Error::other("the detaching thread panicked"),
                        })
                    })
                })
        })
    }

    fn write_cfg(&mut self, cfg: ImpairCfg) -> Result<()> {
        self.cfg_map
            .set(0, cfg, 0)
            .map_err(|e| Error::map(CFG_MAP, e))?;
        self.cfg = cfg;
        Ok(())
    }
}

impl Drop for Impairment {
    fn drop(&mut self) {
        let iface = self.iface().unwrap_or_default().to_owned();
        if let Err(e) = self.detach_inner() {
            tracing::warn!(
                "ridge-ebpf: detaching {PROG_IMPAIR} from {iface} on drop failed, it may stay attached: {}",
                error_chain(&e)
            );
        }
    }
}

/// Parses a loss rate for a command line or a scenario file: `20%`,
/// `0.5%` (percent, at most 4 decimals) or `2500ppm`. Returns parts per
/// million.
pub fn parse_loss(s: &str) -> Result<u32> {
    let bad = |why: &str| {
        Error::InvalidArgument(format!(
            "loss {s:?}: {why} (expected a percentage like 20% or 0.5%, or parts per million like 2500ppm)"
        ))
    };
    let t = s.trim();
    let ppm = if let Some(n) = t.strip_suffix("ppm") {
        n.trim().parse::<u32>().map_err(|_| bad("not a number"))?
    } else if let Some(n) = t.strip_suffix('%') {
        let n = n.trim();
        let (whole, frac) = n.split_once('.').unwrap_or((n, ""));
        let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
        if !digits(whole) || !(frac.is_empty() || digits(frac)) || n.ends_with('.') {
            return Err(bad("not a number"));
        }
        if frac.len() > 4 {
            return Err(bad("finer than 1 ppm"));
        }
        let whole: u32 = whole.parse().map_err(|_| bad("over 100%"))?;
        let frac: u32 = format!("{frac:0<4}")
            .parse()
            .map_err(|_| bad("not a number"))?;
        whole
            .checked_mul(10_000)
            .and_then(|w| w.checked_add(frac))
            .ok_or_else(|| bad("over 100%"))?
    } else {
        return Err(bad("no unit"));
    };
    if ppm > LOSS_ALL_PPM {
        return Err(bad("over 100%"));
    }
    Ok(ppm)
}

fn check_ppm(ppm: u32) -> Result<u32> {
    if ppm > LOSS_ALL_PPM {
        return Err(Error::InvalidArgument(format!(
            "loss of {ppm} ppm is over {LOSS_ALL_PPM} (100%)"
        )));
    }
    Ok(ppm)
}

fn typed_map<V>(ebpf: &mut Ebpf, name: &'static str) -> Result<V>
where
    V: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    ebpf.take_map(name)
        .ok_or(Error::Missing { kind: "map", name })?
        .try_into()
        .map_err(|e| Error::map(name, e))
}

/// Whether the calling thread is in the network namespace `ns`.
fn same_netns(ns: &File) -> bool {
    match (ns.metadata(), std::fs::metadata("/proc/thread-self/ns/net")) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_parses_percent_and_ppm() {
        for (s, ppm) in [
            ("20%", 200_000),
            ("0%", 0),
            ("100%", 1_000_000),
            ("0.5%", 5_000),
            ("1.25 %", 12_500),
            ("0.0001%", 1),
            ("2500ppm", 2_500),
            (" 1000000ppm ", 1_000_000),
        ] {
            assert_eq!(parse_loss(s).unwrap(), ppm, "{s}");
        }
        for s in [
            "",
            "20",
            "%",
            "ppm",
            "-1%",
            "100.01%",
            "1000001ppm",
            "0.00001%",
            "1.%",
            ".5%",
            "1e3ppm",
            "x%",
            "99999999999%",
        ] {
            assert!(
                matches!(parse_loss(s), Err(Error::InvalidArgument(_))),
                "{s:?} should be refused"
            );
        }
    }

    #[test]
    fn counters_ratio() {
        let c = ImpairCounters {
            passed: 3,
            dropped: 1,
            exempt: 9,
        };
        assert_eq!(c.impaired(), 4);
        assert!((c.loss_ratio() - 0.25).abs() < 1e-12);
        assert_eq!(ImpairCounters::default().loss_ratio(), 0.0);
        assert!(check_ppm(LOSS_ALL_PPM + 1).is_err());
    }
}
