//! CPU placement (`--node-cpus`, `--bench-cpus`): which CPUs the measured
//! relay (the started ridge-dataplane, or the naive relay thread) may run
//! on, and which the benchmark's own generator and receiver threads may.
//!
//! On a box with cores to spare, separating the two keeps the load
//! generator from competing with the relay it measures (for tail latency,
//! and for shard scaling on ≥ 4 cores). The node pins shard `i` to the
//! `i`-th CPU of the mask it starts with, so `--node-cpus 2-3 --shards 2`
//! puts one shard on each of CPUs 2 and 3.

use std::fmt;
use std::process::{Child, Command};

use anyhow::{Context, Result, bail};
use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

/// A set of CPUs, kept as the sorted list it was given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cpus(Vec<usize>);

impl Cpus {
    /// Parses a CPU list as `taskset -c` and /sys take it: `0`, `0-3`,
    /// `0,2,4-5`.
    pub fn parse(s: &str) -> Result<Cpus, String> {
        let mut cpus = Vec::new();
        for part in s.split(',') {
            let part = part.trim();
            let (lo, hi) = match part.split_once('-') {
                Some((lo, hi)) => (lo.trim(), hi.trim()),
                None => (part, part),
            };
            let num = |t: &str| {
                t.parse::<usize>().map_err(|_| {
                    format!("`{part}` in `{s}` is not a CPU number or range (e.g. 0,2-3)")
                })
            };
            let (lo, hi) = (num(lo)?, num(hi)?);
            if lo > hi {
                return Err(format!("`{part}` in `{s}`: the range is backwards"));
            }
            if hi >= CpuSet::count() {
                return Err(format!(
                    "CPU {hi} is beyond the {} this system can name",
                    CpuSet::count()
                ));
            }
            cpus.extend(lo..=hi);
        }
        cpus.sort_unstable();
        cpus.dedup();
        Ok(Cpus(cpus))
    }

    fn set(&self) -> Result<CpuSet> {
        let mut set = CpuSet::new();
        for &c in &self.0 {
            set.set(c).with_context(|| format!("CPU {c}"))?;
        }
        Ok(set)
    }

    fn overlaps(&self, other: &Cpus) -> bool {
        self.0.iter().any(|c| other.0.contains(c))
    }
}

impl fmt::Display for Cpus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut i = 0;
        while i < self.0.len() {
            let start = self.0[i];
            let mut end = start;
            while i + 1 < self.0.len() && self.0[i + 1] == end + 1 {
                i += 1;
                end = self.0[i];
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
            i += 1;
        }
        Ok(())
    }
}

/// Where the relay and the benchmark's threads run.
#[derive(Clone, Debug, Default)]
pub struct Placement {
    node: Option<CpuSet>,
    bench: Option<CpuSet>,
    /// The mask this process started with: what a child gets when no
    /// `--node-cpus` is given.
    original: Option<CpuSet>,
}

impl Placement {
    /// Checks both lists against the CPUs this process may use, then
    /// confines the calling thread (and so every thread it starts later) to
    /// `bench`. Call it on the main thread before any benchmark thread
    /// starts.
    pub fn apply(node: Option<&Cpus>, bench: Option<&Cpus>) -> Result<Placement> {
        let allowed =
            sched_getaffinity(Pid::from_raw(0)).context("reading this process's CPU mask")?;
        let allowed_list = Cpus(
            (0..CpuSet::count())
                .filter(|&c| allowed.is_set(c).unwrap_or(false))
                .collect(),
        );
        for (flag, cpus) in [("--node-cpus", node), ("--bench-cpus", bench)] {
            let Some(cpus) = cpus else { continue };
            if cpus.0.is_empty() {
                bail!("{flag} names no CPU");
            }
            if let Some(c) = cpus
                .0
                .iter()
                .find(|&&c| !allowed.is_set(c).unwrap_or(false))
            {
                bail!("{flag}: CPU {c} is not available to this process (allowed: {allowed_list})");
            }
        }
        if let (Some(n), Some(b)) = (node, bench)
            && n.overlaps(b)
        {
            eprintln!(
                "ridge-bench: warning: --node-cpus {n} and --bench-cpus {b} overlap; the \
                 generator and receiver will compete with the relay there"
            );
        }
        let placement = Placement {
            node: node.map(Cpus::set).transpose()?,
            bench: bench.map(Cpus::set).transpose()?,
            original: Some(allowed),
        };
        if let Some(set) = &placement.bench {
            sched_setaffinity(Pid::from_raw(0), set)
                .context("confining ridge-bench to --bench-cpus")?;
        }
        Ok(placement)
    }

    /// Spawns `cmd` confined to the node's CPUs: the calling thread takes
    /// that mask for the spawn (a child inherits its parent thread's) and
    /// returns to the benchmark's mask afterwards.
    pub fn spawn_node(&self, cmd: &mut Command) -> Result<Child> {
        let Some(node) = &self.node else {
            return cmd.spawn().map_err(Into::into);
        };
        sched_setaffinity(Pid::from_raw(0), node)
            .context("taking --node-cpus for the node's spawn")?;
        let child = cmd.spawn();
        if let Some(back) = self.bench.as_ref().or(self.original.as_ref()) {
            sched_setaffinity(Pid::from_raw(0), back)
                .context("returning to --bench-cpus after the node's spawn")?;
        }
        child.map_err(Into::into)
    }

    /// Confines the calling thread to the node's CPUs (the naive relay's
    /// thread calls this first, as it stands in for the node).
    pub fn enter_node(&self) -> Result<()> {
        if let Some(node) = &self.node {
            sched_setaffinity(Pid::from_raw(0), node)
                .context("confining the relay thread to --node-cpus")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_like_taskset() {
        assert_eq!(Cpus::parse("0").unwrap().0, [0]);
        assert_eq!(Cpus::parse("0-3").unwrap().0, [0, 1, 2, 3]);
        assert_eq!(Cpus::parse("4-5, 0,2 ,2").unwrap().0, [0, 2, 4, 5]);
        assert_eq!(Cpus::parse("0,2-3,5").unwrap().to_string(), "0,2-3,5");
        assert_eq!(Cpus::parse("3,1,2").unwrap().to_string(), "1-3");
        for bad in ["", "a", "1-", "-1", "3-1", "1,,2", "99999"] {
            assert!(Cpus::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    /// `Cpus_allowed_list` of a process's main thread (`pid`), or of the
    /// calling thread (`None`).
    fn allowed_list(pid: Option<u32>) -> String {
        let path = match pid {
            Some(pid) => format!("/proc/{pid}/status"),
            None => format!("/proc/self/task/{}/status", nix::unistd::gettid()),
        };
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// A spawned node gets `--node-cpus`, the spawning thread keeps (or
    /// returns to) its own mask, and a CPU outside the mask is refused.
    /// Runs in a thread of its own so that the test harness's thread keeps
    /// its mask.
    #[test]
    fn the_node_is_spawned_on_its_cpus() {
        std::thread::spawn(|| {
            let allowed = sched_getaffinity(Pid::from_raw(0)).unwrap();
            let first = (0..CpuSet::count())
                .find(|&c| allowed.is_set(c).unwrap())
                .unwrap();
            let cpus = Cpus::parse(&first.to_string()).unwrap();
            let before = allowed_list(None);
            let placement = Placement::apply(Some(&cpus), None).unwrap();
            let mut child = placement
                .spawn_node(Command::new("sleep").arg("5"))
                .unwrap();
            let got = allowed_list(Some(child.id()));
            child.kill().unwrap();
            child.wait().unwrap();
            assert_eq!(got, first.to_string(), "the child's CPU mask");
            assert_eq!(
                allowed_list(None),
                before,
                "the spawning thread's mask is restored"
            );

            let beyond = Cpus(vec![CpuSet::count() - 1]);
            if !allowed.is_set(CpuSet::count() - 1).unwrap() {
                let err = Placement::apply(Some(&beyond), None)
                    .unwrap_err()
                    .to_string();
                assert!(err.contains("not available"), "{err}");
            }
            assert!(Placement::apply(None, Some(&Cpus(Vec::new()))).is_err());
        })
        .join()
        .unwrap();
    }
}
