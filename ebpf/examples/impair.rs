//! Random packet loss on an interface, for shell scripts (the kernel has no
//! netem): attaches `ridge_impair`, prints its counters every second, and
//! detaches on SIGINT or SIGTERM. Needs root.
//!
//! ```sh
//! cargo run -p ridge-ebpf --example impair -- --iface veth0 --loss 20%
//! target/debug/examples/impair --netns ns1 --iface eth0 --loss 0.5% --ingress
//! ```
#![allow(clippy::print_stdout, reason = "a command-line tool")]

use std::fs::File;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use ridge_ebpf::{Impairment, TcDirection, parse_loss};

const USAGE: &str = "\
Usage: impair --iface IFACE --loss LOSS [--ingress] [--all] [--netns NAME]

Drops packets on IFACE at random (a TC BPF program; TCX, else clsact) until
SIGINT or SIGTERM, printing the counters every second. Needs root.

  --iface IFACE   the interface
  --loss LOSS     drop probability: 20%, 0.5% or 2500ppm
  --ingress       impair packets IFACE receives (default: those it sends)
  --all           impair every packet; by default only UDP over IPv4/IPv6,
                  so ARP, ICMP and neighbour discovery keep working
  --netns NAME    enter the network namespace /run/netns/NAME first
  -h, --help      this text";

#[derive(Debug)]
struct Args {
    iface: String,
    loss_ppm: u32,
    direction: TcDirection,
    udp_only: bool,
    netns: Option<String>,
}

fn parse_args() -> Result<Option<Args>, String> {
    let mut iface = None;
    let mut loss_ppm = None;
    let mut direction = TcDirection::Egress;
    let mut udp_only = true;
    let mut netns = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--iface" => iface = Some(value("--iface")?),
            "--loss" => {
                loss_ppm = Some(parse_loss(&value("--loss")?).map_err(|e| e.to_string())?);
            }
            "--ingress" => direction = TcDirection::Ingress,
            "--all" => udp_only = false,
            "--netns" => netns = Some(value("--netns")?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Some(Args {
        iface: iface.ok_or("--iface is required")?,
        loss_ppm: loss_ppm.ok_or("--loss is required")?,
        direction,
        udp_only,
        netns,
    }))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("impair: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("impair: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    // Signals are taken by a waiting thread; block them before any thread
    // starts so that every thread inherits the mask.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block()?;

    if let Some(name) = &args.netns {
        let path = format!("/run/netns/{name}");
        let ns = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering {path}: {e}"))?;
    }
    let mut imp = Impairment::attach(&args.iface, args.direction, args.loss_ppm)?;
    imp.set_udp_only(args.udp_only)?;
    let hook = match args.direction {
        TcDirection::Egress => "egress",
        TcDirection::Ingress => "ingress",
    };
    println!(
        "impair: {} {hook}: {}% loss on {} ({:?}); Ctrl-C to stop",
        args.iface,
        f64::from(args.loss_ppm) / 1e4,
        if args.udp_only { "UDP" } else { "every packet" },
        imp.attach_kind().expect("attached"),
    );

    let (stop_tx, stop_rx) = mpsc::channel();
    std::thread::spawn(move || {
        if let Ok(signal) = signals.wait() {
            let _ = stop_tx.send(signal);
        }
    });
    let report = |imp: &Impairment| -> Result<(), ridge_ebpf::Error> {
        let c = imp.counters()?;
        println!(
            "{} {hook}: passed {} dropped {} ({:.2}%) exempt {}",
            args.iface,
            c.passed,
            c.dropped,
            100.0 * c.loss_ratio(),
            c.exempt
        );
        Ok(())
    };
    let signal = loop {
        match stop_rx.recv_timeout(Duration::from_secs(1)) {
            Ok(signal) => break signal,
            Err(mpsc::RecvTimeoutError::Timeout) => report(&imp)?,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err("the signal-waiting thread stopped".into());
            }
        }
    };
    report(&imp)?;
    imp.detach()?;
    println!("impair: {signal}: detached");
    Ok(())
}
