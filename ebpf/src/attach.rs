//! Attaching the XDP and TC programs to interfaces, with graceful
//! degradation.

use std::fmt;

use aya::programs::links::LinkOrder;
use aya::programs::tc::{self, NlOptions, TcAttachOptions};
use aya::programs::xdp::XdpLinkId;
use aya::programs::{SchedClassifier, TcAttachType, Xdp, XdpMode};

use crate::error::{Error, Result};
use crate::{PROG_FANOUT, PROG_GUARD, PROG_XDP, RidgeBpf, program_mut};

/// Which XDP program to attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum XdpProgram {
    /// `ridge_guard`: the ingress guard only.
    Guard,
    /// `ridge_xdp`: the guard, then kernel forwarding of installed flows.
    GuardAndForward,
}

impl XdpProgram {
    fn name(self) -> &'static str {
        match self {
            Self::Guard => PROG_GUARD,
            Self::GuardAndForward => PROG_XDP,
        }
    }
}

/// How an XDP program ended up attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttachMode {
    /// In the driver (`XDP_FLAGS_DRV_MODE`): the fast path.
    Native,
    /// In the kernel's generic receive path (`XDP_FLAGS_SKB_MODE`): same
    /// verdicts, after the skb is built, so much of the speed-up is lost.
    Generic,
    /// Not attached: every packet takes the userspace path.
    None,
}

impl AttachMode {
    /// `native`, `generic` or `none`: for a metrics label or `/healthz`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Generic => "generic",
            Self::None => "none",
        }
    }
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a TC program is hooked to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TcAttachKind {
    /// A TCX link (kernel 6.6 and later); goes away with the program.
    Tcx,
    /// A `clsact` qdisc filter (older kernels).
    Clsact,
}

#[derive(Debug)]
struct XdpAttachment {
    iface: String,
    program: XdpProgram,
    link: XdpLinkId,
    mode: AttachMode,
}

#[derive(Debug)]
struct TcAttachment {
    iface: String,
    link: tc::SchedClassifierLinkId,
}

/// What this `RidgeBpf` attached where.
#[derive(Debug, Default)]
pub(crate) struct Attachments {
    xdp: Vec<XdpAttachment>,
    tc: Vec<TcAttachment>,
}

impl RidgeBpf {
    /// Attaches `program` to `iface` (a name in the calling thread's network
    /// namespace): native mode, else generic mode, else not at all. Never
    /// fails and never panics; logs one line saying which mode it got and,
    /// if not native, why. Replaces an XDP program this `RidgeBpf` attached
    /// there before.
    pub fn attach_xdp(&mut self, iface: &str, program: XdpProgram) -> AttachMode {
        self.attach_xdp_with(iface, program, &[AttachMode::Native, AttachMode::Generic])
    }

    /// [`attach_xdp`](Self::attach_xdp) trying only `modes`, in order
    /// (e.g. `&[AttachMode::Generic]` where the driver's XDP is known bad).
    pub fn attach_xdp_with(
        &mut self,
        iface: &str,
        program: XdpProgram,
        modes: &[AttachMode],
    ) -> AttachMode {
        if let Err(e) = self.detach_xdp(iface) {
            tracing::warn!("ridge-ebpf: detaching the previous XDP program from {iface}: {e}");
        }
        let name = program.name();
        if iface.contains('\0') {
            // aya would panic turning this into a C string.
            tracing::error!(
                "ridge-ebpf: XDP {name} on {iface:?}: mode none (interface name contains NUL)"
            );
            return AttachMode::None;
        }
        let prog: &mut Xdp = match program_mut(&mut self.ebpf, name) {
            Ok(prog) => prog,
            Err(e) => {
                tracing::error!(
                    "ridge-ebpf: XDP on {iface}: mode none ({e}); packets take the userspace path"
                );
                return AttachMode::None;
            }
        };
        let mut failures = Vec::new();
        for &mode in modes {
            let flags = match mode {
                AttachMode::Native => XdpMode::Driver,
                AttachMode::Generic => XdpMode::Skb,
                AttachMode::None => continue,
            };
            match prog.attach(iface, flags) {
                Ok(link) => {
                    if failures.is_empty() {
                        tracing::info!("ridge-ebpf: XDP {name} on {iface}: mode {mode}");
                    } else {
                        tracing::warn!(
                            "ridge-ebpf: XDP {name} on {iface}: mode {mode} ({})",
                            failures.join("; ")
                        );
                    }
                    self.attachments.xdp.push(XdpAttachment {
                        iface: iface.to_owned(),
                        program,
                        link,
                        mode,
                    });
                    return mode;
                }
                Err(e) => failures.push(format!("{mode} failed: {}", error_chain(&e))),
            }
        }
        tracing::error!(
            "ridge-ebpf: XDP {name} on {iface}: mode none ({}); packets take the userspace path",
            if failures.is_empty() {
                "no mode tried".to_owned()
            } else {
                failures.join("; ")
            }
        );
        AttachMode::None
    }

    /// The mode of the XDP program this `RidgeBpf` attached to `iface`.
    pub fn xdp_mode(&self, iface: &str) -> AttachMode {
        self.attachments
            .xdp
            .iter()
            .find(|a| a.iface == iface)
            .map_or(AttachMode::None, |a| a.mode)
    }

    /// Detaches the XDP program this `RidgeBpf` attached to `iface`, if any.
    pub fn detach_xdp(&mut self, iface: &str) -> Result<()> {
        let Some(pos) = self.attachments.xdp.iter().position(|a| a.iface == iface) else {
            return Ok(());
        };
        let attachment = self.attachments.xdp.swap_remove(pos);
        let name = attachment.program.name();
        let prog: &mut Xdp = program_mut(&mut self.ebpf, name)?;
        prog.detach(attachment.link)
            .map_err(|e| Error::program(name, e))
    }

    /// Attaches the fan-out program to `iface`'s ingress: TCX where the
    /// kernel has it, else a filter on a `clsact` qdisc (added if missing).
    /// Needed on the ingress interface of flows with several destinations.
    pub fn attach_tc_fanout(&mut self, iface: &str) -> Result<TcAttachKind> {
        self.attach_tc_fanout_with(iface, &[TcAttachKind::Tcx, TcAttachKind::Clsact])
    }

    /// [`attach_tc_fanout`](Self::attach_tc_fanout) trying only `kinds`, in
    /// order. A `clsact` qdisc this adds stays when the program is detached
    /// (it is empty then, and other filters may have joined it).
    pub fn attach_tc_fanout_with(
        &mut self,
        iface: &str,
        kinds: &[TcAttachKind],
    ) -> Result<TcAttachKind> {
        if iface.contains('\0') {
            return Err(Error::InvalidArgument(format!(
                "interface name {iface:?} contains NUL"
            )));
        }
        self.detach_tc_fanout(iface)?;
        let prog: &mut SchedClassifier = program_mut(&mut self.ebpf, PROG_FANOUT)?;
        let (link, kind) = attach_tc(
            prog,
            PROG_FANOUT,
            iface,
            TcAttachType::Ingress,
            TcxPlace::Last,
            kinds,
        )?;
        self.attachments.tc.push(TcAttachment {
            iface: iface.to_owned(),
            link,
        });
        Ok(kind)
    }

    /// Detaches the fan-out program from `iface`, if this `RidgeBpf`
    /// attached it there.
    pub fn detach_tc_fanout(&mut self, iface: &str) -> Result<()> {
        let Some(pos) = self.attachments.tc.iter().position(|a| a.iface == iface) else {
            return Ok(());
        };
        let attachment = self.attachments.tc.swap_remove(pos);
        let prog: &mut SchedClassifier = program_mut(&mut self.ebpf, PROG_FANOUT)?;
        prog.detach(attachment.link)
            .map_err(|e| Error::program(PROG_FANOUT, e))
    }
}

/// Where a TCX link goes among the other programs on its hook (a `clsact`
/// filter gets the priority the kernel picks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TcxPlace {
    First,
    Last,
}

/// Attaches the loaded TC program `prog` (named `name`) to `iface` (in the
/// calling thread's network namespace) at `attach_type`, trying `kinds` in
/// order: TCX, or a filter on a `clsact` qdisc (added if missing). Logs one
/// line saying which it got.
pub(crate) fn attach_tc(
    prog: &mut SchedClassifier,
    name: &'static str,
    iface: &str,
    attach_type: TcAttachType,
    place: TcxPlace,
    kinds: &[TcAttachKind],
) -> Result<(tc::SchedClassifierLinkId, TcAttachKind)> {
    if iface.contains('\0') {
        // aya would panic turning this into a C string.
        return Err(Error::InvalidArgument(format!(
            "interface name {iface:?} contains NUL"
        )));
    }
    let hook = match attach_type {
        TcAttachType::Ingress => "ingress",
        TcAttachType::Egress => "egress",
        TcAttachType::Custom(_) => "custom parent",
    };
    let mut failures = Vec::new();
    for &kind in kinds {
        let options = match kind {
            TcAttachKind::Tcx => TcAttachOptions::TcxOrder(match place {
                TcxPlace::First => LinkOrder::first(),
                TcxPlace::Last => LinkOrder::default(),
            }),
            TcAttachKind::Clsact => {
                // EEXIST (a clsact qdisc is already there) is fine.
                if let Err(e) = tc::qdisc_add_clsact(iface) {
                    tracing::debug!("ridge-ebpf: adding clsact to {iface}: {e}");
                }
                TcAttachOptions::Netlink(NlOptions::default())
            }
        };
        match prog.attach_with_options(iface, attach_type, options) {
            Ok(link) => {
                tracing::info!("ridge-ebpf: TC {name} on {iface} {hook} ({kind:?})");
                return Ok((link, kind));
            }
            Err(e) => failures.push((kind, e)),
        }
    }
    let target = format!(
        "{iface} {hook} ({})",
        failures
            .iter()
            .map(|(kind, e)| format!("{kind:?}: {}", error_chain(e)))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let source = match failures.pop() {
        Some((_, e)) => e,
        None => {
            return Err(Error::InvalidArgument(
                "no TC attach kind to try".to_owned(),
            ));
        }
    };
    Err(Error::Attach {
        program: name,
        target,
        source: Box::new(source),
    })
}

/// An error with its sources, on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
