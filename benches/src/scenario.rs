//! Scenarios: what sends where, one measured run, and the rate search.

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::mmsg;
use crate::naive::NaiveRelay;
use crate::node::{NodeOptions, NodeProcess};
#[cfg(test)]
use crate::placement::Placement;
use crate::stats::{self, Latency};
use crate::traffic::{self, Publisher, Receiver};
use crate::webrtc::WebrtcFanout;

/// Time the receiver keeps listening after the sender stops.
const GRACE: Duration = Duration::from_millis(300);
/// How stale the node's shard counters on /metrics may be (each shard
/// publishes them every 500 ms), so a run waits this long after its
/// packets before reading them.
const COUNTERS_LAG: Duration = Duration::from_millis(550);
/// Latency samples kept per run (packets are sampled by sequence number).
const MAX_SAMPLES: f64 = 2_000_000.0;
/// webrtc-fanout's ramp ([`Target::ramp`]): window, loss that ends it, and
/// the longest it goes on.
const RAMP_WINDOW: Duration = Duration::from_secs(1);
const RAMP_LOSS_PCT: f64 = 0.1;
const RAMP_MAX: Duration = Duration::from_secs(20);
/// Loss below which a rate passes the search, in percent.
pub const SEARCH_MAX_LOSS_PCT: f64 = 0.1;
/// The search's first rate.
const SEARCH_START_PPS: f64 = 20_000.0;
/// The search stops doubling here.
const SEARCH_MAX_PPS: f64 = 20_000_000.0;
/// Bisection steps after the doubling phase.
const SEARCH_BISECT_STEPS: u32 = 5;

/// Which system is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Sender → receiver directly: the machine's loopback ceiling.
    Ceiling,
    /// Through the naive tokio relay.
    Naive,
    /// Through a real node (1:1 `relay` or 1→N `fanout`).
    Node,
    /// Through a real node, with str0m WebRTC clients (SRTP on every leg).
    WebRtc,
}

/// Settings shared by every run of a scenario.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Target packets/s (`None`: unpaced).
    pub rate: Option<f64>,
    pub size: usize,
    pub duration: Duration,
}

/// Node CPU cost of one run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Cpu {
    /// CPU seconds (user + system) the relay used during the run.
    pub cpu_seconds: f64,
    /// Cores busy on average during the run (cpu_seconds / wall seconds).
    pub cores_busy: f64,
    pub cpu_us_per_packet_in: f64,
    pub cpu_us_per_packet_out: f64,
    /// Packets out per second of relay CPU time.
    pub pps_out_per_core_second: f64,
}

/// Everything measured in one run.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub scenario: String,
    pub subscribers: usize,
    pub size_bytes: usize,
    pub target_pps: Option<f64>,
    /// Wall time the sender ran.
    pub duration_s: f64,
    pub sent: u64,
    pub sent_pps: f64,
    /// Packets received on all subscriber sockets together.
    pub received: u64,
    pub received_pps: f64,
    pub received_pps_per_subscriber: f64,
    pub received_min_subscriber: u64,
    pub received_max_subscriber: u64,
    /// 100 * (1 - received / (sent * subscribers)).
    pub loss_pct: f64,
    pub latency: Latency,
    /// The relay's CPU (naive: the relay thread; node: the whole process;
    /// ceiling: the generator and receiver threads).
    pub cpu: Option<Cpu>,
    /// CPU seconds of the generator thread (it shares the machine with the
    /// relay and the receiver).
    pub generator_cpu_seconds: Option<f64>,
    /// CPU seconds of the receiver thread.
    pub receiver_cpu_seconds: Option<f64>,
    /// `sendmmsg` calls that failed with ENOBUFS.
    pub send_errors: u64,
    /// Datagrams on the subscriber sockets that were not this run's packets
    /// (RTCP from the node, stragglers of an earlier run).
    pub foreign_datagrams: u64,
    /// Rooms (one publisher each; the subscribers are split evenly).
    pub rooms: usize,
    /// Node media shards (`None` for the ceiling and the naive relay).
    pub shards: Option<usize>,
    /// Heap allocations the node's shards made during the run (from
    /// `/metrics`; `None` when not readable).
    pub node_allocations: Option<u64>,
    /// `node_allocations` per packet the node sent.
    pub allocations_per_packet_out: Option<f64>,
    /// Of the packets the node sent, the share that left in UDP GSO runs
    /// (several datagrams to one destination in one send).
    pub gso_share: Option<f64>,
    /// Datagrams per GSO send, on average.
    pub gso_datagrams_per_send: Option<f64>,
    /// webrtc-fanout: seconds sent at the run's rate before it, until the
    /// subscribers' bandwidth estimates carried it (see [`Target::ramp`]).
    pub ramp_s: Option<f64>,
}

/// What is wired up: subscribers in total, rooms, and the node's shards.
#[derive(Debug, Clone)]
pub struct Topology {
    pub subscribers: usize,
    pub rooms: usize,
    pub node: NodeOptions,
    /// `UDP_GRO` on the subscriber sockets (`--gro-receivers`).
    pub gro_receivers: bool,
    /// What the publisher's payloads look like (`--codec`).
    pub codec: crate::packet::Codec,
}

/// `count` room names spread evenly over `shards` (shard of room `i` is
/// `i % shards`), using the node's own placement function.
fn room_names(count: usize, shards: usize) -> Vec<String> {
    let mut names = Vec::with_capacity(count);
    let mut n = 0u32;
    for i in 0..count {
        let want = i % shards.max(1);
        loop {
            let name = format!("bench-{n}");
            n += 1;
            if ridge_dataplane::shard::shard_for_room(&name, shards.max(1)) == want {
                names.push(name);
                break;
            }
        }
    }
    names
}

/// A system under test, wired up and ready for runs.
#[derive(Debug)]
pub struct Target {
    name: String,
    kind: Kind,
    publisher: Publisher,
    receivers: Vec<UdpSocket>,
    cpu_stat: Option<PathBuf>,
    base: Instant,
    next_run: u32,
    naive: Option<NaiveRelay>,
    node: Option<NodeProcess>,
    webrtc: Option<WebrtcFanout>,
    rooms: usize,
    shards: Option<usize>,
}

fn bind_receivers(n: usize, gro: bool) -> Result<(Vec<UdpSocket>, Vec<SocketAddr>)> {
    let socks = (0..n)
        .map(|_| traffic::bind_loopback())
        .collect::<std::io::Result<Vec<_>>>()
        .context("binding subscriber sockets")?;
    if gro {
        for s in &socks {
            mmsg::enable_gro(s).context("turning UDP_GRO on for a subscriber socket")?;
        }
    }
    let addrs = socks
        .iter()
        .map(|s| s.local_addr())
        .collect::<std::io::Result<Vec<_>>>()?;
    Ok((socks, addrs))
}

impl Target {
    /// Sets up `kind` with `subscribers` receiving sockets (`ceiling` always
    /// has one). `name` is what the tables call it.
    pub fn setup(
        name: &str,
        kind: Kind,
        topology: &Topology,
        node_bin: &Path,
        base: Instant,
        external: Option<&(SocketAddr, String)>,
    ) -> Result<Target> {
        let rooms = if matches!(kind, Kind::Node | Kind::WebRtc) {
            topology.rooms.max(1)
        } else {
            1
        };
        let subscribers = if kind == Kind::Ceiling {
            1
        } else {
            topology.subscribers.max(rooms).div_ceil(rooms) * rooms
        };
        let (receivers, addrs) = bind_receivers(subscribers, topology.gro_receivers)?;
        let send_sock = traffic::bind_loopback().context("binding the sender socket")?;
        let mut t = Target {
            name: name.to_string(),
            kind,
            publisher: Publisher::new(send_sock.try_clone()?, addrs[0])?,
            receivers,
            cpu_stat: None,
            base,
            next_run: 1,
            naive: None,
            node: None,
            webrtc: None,
            rooms,
            shards: None,
        };
        match kind {
            Kind::Ceiling => {}
            Kind::WebRtc => {
                let node = match external {
                    Some((http, token)) => NodeProcess::attach(*http, token.clone()),
                    None => NodeProcess::start(node_bin, &topology.node)?,
                };
                t.receivers.clear();
                t.webrtc = Some(WebrtcFanout::connect(&node, subscribers, base)?);
                t.cpu_stat = node.stat_path();
                t.shards = Some(topology.node.shards);
                t.node = Some(node);
            }
            Kind::Naive => {
                let relay = NaiveRelay::start(addrs, topology.node.placement.clone())?;
                t.publisher = Publisher::new(send_sock, relay.addr)?;
                t.cpu_stat = Some(relay.stat_path.clone());
                t.naive = Some(relay);
            }
            Kind::Node => {
                let node = match external {
                    Some((http, token)) => NodeProcess::attach(*http, token.clone()),
                    None => NodeProcess::start(node_bin, &topology.node)?,
                };
                let per_room = subscribers / rooms;
                let mut streams = Vec::with_capacity(rooms);
                for (r, room) in room_names(rooms, topology.node.shards).iter().enumerate() {
                    let sock = if r == 0 {
                        send_sock.try_clone()?
                    } else {
                        traffic::bind_loopback().context("binding a sender socket")?
                    };
                    let media =
                        node.create_endpoint(room, "publish", sock.local_addr()?, topology.codec)?;
                    for a in &addrs[r * per_room..(r + 1) * per_room] {
                        node.create_endpoint(room, "subscribe", *a, topology.codec)?;
                    }
                    streams.push((sock, media));
                }
                t.publisher = Publisher::many(streams)?.with_codec(topology.codec);
                t.shards = Some(topology.node.shards);
                t.cpu_stat = node.stat_path();
                t.node = Some(node);
                t.warm_up()?;
            }
        }
        Ok(t)
    }

    /// A short slow run so the node has seen a keyframe and every
    /// subscriber path is known to work before anything is measured.
    fn warm_up(&mut self) -> Result<()> {
        let settings = Settings {
            rate: Some(2_000.0),
            size: 200,
            duration: Duration::from_millis(500),
        };
        let r = self.run(&settings)?;
        if r.received_min_subscriber == 0 {
            bail!(
                "warm-up: the node forwarded nothing to at least one of {} subscribers \
                 ({} of {} packets arrived in total)",
                r.subscribers,
                r.received,
                r.sent * r.subscribers as u64
            );
        }
        Ok(())
    }

    /// WebRTC only: sends at the run's rate in 1 s windows until one loses
    /// less than [`RAMP_LOSS_PCT`], at most [`RAMP_MAX`]. Each subscriber
    /// session starts its bandwidth estimate low (the node's
    /// `initial_bwe_bps`) and its pacer holds back, then drops, what does
    /// not fit yet; real sessions last long past that ramp, so it is not
    /// measured. Returns the seconds it took, and whether it got there.
    fn ramp(&mut self, s: &Settings) -> Result<(f64, bool)> {
        let start = Instant::now();
        let window = Settings {
            duration: RAMP_WINDOW,
            ..s.clone()
        };
        while start.elapsed() < RAMP_MAX {
            let run = self.next_run;
            self.next_run += 1;
            let Some(w) = self.webrtc.as_mut() else {
                break;
            };
            let r = w
                .run(
                    run,
                    window.rate,
                    window.size,
                    window.duration,
                    GRACE,
                    u64::MAX,
                )
                .context("ramping the WebRTC clients up")?;
            let expected = r.sent * r.per_subscriber.len() as u64;
            let got: u64 = r.per_subscriber.iter().sum();
            if expected > 0
                && (expected.saturating_sub(got)) as f64 * 100.0 < RAMP_LOSS_PCT * expected as f64
            {
                return Ok((start.elapsed().as_secs_f64(), true));
            }
        }
        Ok((start.elapsed().as_secs_f64(), false))
    }

    /// One measured run.
    pub fn run(&mut self, s: &Settings) -> Result<RunResult> {
        let ramp_s = if self.webrtc.is_some() {
            let (secs, carried) = self.ramp(s)?;
            if carried {
                eprintln!(
                    "ridge-bench: {}: the subscribers' estimates carried the rate after {secs:.1} s of ramp",
                    self.name
                );
            } else {
                eprintln!(
                    "ridge-bench: {}: still losing ≥ {RAMP_LOSS_PCT}% after {secs:.1} s of ramp at this rate; measuring anyway",
                    self.name
                );
            }
            Some(secs)
        } else {
            None
        };
        let run = self.next_run;
        self.next_run += 1;
        let subs = match &self.webrtc {
            Some(w) => w.subscriber_count(),
            None => self.receivers.len(),
        };
        let expected = s.rate.unwrap_or(2_000_000.0) * s.duration.as_secs_f64() * subs as f64;
        let stride = (expected / MAX_SAMPLES).ceil().max(1.0) as u64;
        let counters_before = self.node.as_ref().and_then(NodeProcess::shard_counters);
        let cpu_before = self.cpu_seconds();
        let (sent, mut rep, cpu_after) = match self.webrtc.as_mut() {
            Some(w) => {
                let r = w
                    .run(run, s.rate, s.size, s.duration, GRACE, stride)
                    .context("running the WebRTC clients")?;
                let cpu_after = stats::stat_file_cpu_seconds_opt(self.cpu_stat.as_deref());
                let sent = traffic::SendReport {
                    sent: r.sent,
                    elapsed: r.elapsed,
                    errors: 0,
                    cpu_seconds: r.generator_cpu_seconds,
                };
                let rep = traffic::RecvReport {
                    per_socket: r.per_subscriber,
                    latencies_ns: r.latencies_ns,
                    foreign: r.foreign,
                    arrivals: Vec::new(),
                    // The clients receive on the generator's thread.
                    cpu_seconds: None,
                };
                (sent, rep, cpu_after)
            }
            None => {
                let socks = std::mem::take(&mut self.receivers);
                let receiver = Receiver::start(socks, self.base, run, stride);
                let sent = self
                    .publisher
                    .send(self.base, run, s.rate, s.size, s.duration)
                    .context("sending");
                std::thread::sleep(GRACE);
                let cpu_after = self.cpu_seconds();
                let (socks, rep) = receiver.finish().context("receiving")?;
                self.receivers = socks;
                (sent?, rep, cpu_after)
            }
        };
        if counters_before.is_some() {
            std::thread::sleep(COUNTERS_LAG.saturating_sub(GRACE));
        }
        let counters = self
            .node
            .as_ref()
            .and_then(NodeProcess::shard_counters)
            .zip(counters_before)
            .map(|(after, before)| after.since(&before));
        let secs = sent.elapsed.as_secs_f64().max(1e-9);
        let received: u64 = rep.per_socket.iter().sum();
        // Each packet goes to one room, whose subscribers all get it.
        let expected = sent.sent * (subs / self.rooms) as u64;
        let loss_pct = if expected == 0 {
            0.0
        } else {
            100.0 * (1.0 - received as f64 / expected as f64)
        };
        // The ceiling has no relay: its CPU is the sender's and the
        // receiver's (on loopback the sender also pays for delivery), so
        // its packets per core-second are what one core moves through the
        // kernel with no relay in between, the per-core ceiling.
        let span = match (self.kind, cpu_before, cpu_after) {
            (Kind::Ceiling, _, _) => sent
                .cpu_seconds
                .zip(rep.cpu_seconds)
                .map(|(g, r)| (0.0, g + r)),
            (_, Some(a), Some(b)) => Some((a, b)),
            _ => None,
        };
        let cpu = match span {
            Some((a, b)) => {
                let c = (b - a).max(0.0);
                let per = |n: u64| {
                    if n == 0 { 0.0 } else { c * 1e6 / n as f64 }
                };
                Some(Cpu {
                    cpu_seconds: c,
                    cores_busy: c / (secs + GRACE.as_secs_f64()),
                    cpu_us_per_packet_in: per(sent.sent),
                    cpu_us_per_packet_out: per(received),
                    pps_out_per_core_second: if c > 0.0 { received as f64 / c } else { 0.0 },
                })
            }
            None => None,
        };
        Ok(RunResult {
            scenario: self.name.clone(),
            subscribers: subs,
            size_bytes: s
                .size
                .clamp(crate::packet::MIN_SIZE, crate::packet::MAX_SIZE),
            target_pps: s.rate,
            duration_s: secs,
            sent: sent.sent,
            sent_pps: sent.sent as f64 / secs,
            received,
            received_pps: received as f64 / secs,
            received_pps_per_subscriber: received as f64 / secs / subs as f64,
            received_min_subscriber: rep.per_socket.iter().copied().min().unwrap_or(0),
            received_max_subscriber: rep.per_socket.iter().copied().max().unwrap_or(0),
            loss_pct,
            latency: Latency::from_ns(&mut rep.latencies_ns),
            cpu,
            generator_cpu_seconds: sent.cpu_seconds,
            receiver_cpu_seconds: rep.cpu_seconds,
            send_errors: sent.errors,
            foreign_datagrams: rep.foreign,
            rooms: self.rooms,
            shards: self.shards,
            node_allocations: counters.map(|c| c.allocations),
            allocations_per_packet_out: counters
                .map(|c| c.allocations as f64 / received.max(1) as f64),
            gso_share: counters.map(|c| c.gso_datagrams as f64 / received.max(1) as f64),
            gso_datagrams_per_send: counters
                .filter(|c| c.gso_sends > 0)
                .map(|c| c.gso_datagrams as f64 / c.gso_sends as f64),
            ramp_s,
        })
    }

    fn cpu_seconds(&self) -> Option<f64> {
        stats::stat_file_cpu_seconds_opt(self.cpu_stat.as_deref())
    }

    /// Stops the relay (naive thread or node process).
    pub fn close(mut self) -> Result<()> {
        if let Some(n) = self.naive.take() {
            n.stop()?;
        }
        // Clients first, so the node sees them go before it is stopped.
        drop(self.webrtc.take());
        if let Some(n) = self.node.take() {
            n.stop()?;
        }
        Ok(())
    }

    /// What kind of system this is.
    pub fn kind(&self) -> Kind {
        self.kind
    }
}

/// The outcome of `--search`.
#[derive(Debug, Clone, Serialize)]
pub struct SearchResult {
    pub scenario: String,
    /// Highest rate that passed (loss < 0.1% and the generator kept up).
    pub best_pps: Option<f64>,
    pub best: Option<RunResult>,
    /// Why the search stopped climbing at the first failing rate.
    pub limit: String,
    pub steps: Vec<RunResult>,
}

fn passes(r: &RunResult, rate: f64) -> (bool, &'static str) {
    if r.sent_pps < 0.9 * rate {
        (false, "generator could not reach the rate")
    } else if r.loss_pct >= SEARCH_MAX_LOSS_PCT {
        (false, "loss >= 0.1%")
    } else {
        (true, "")
    }
}

/// Finds the highest rate with loss < 0.1%: doubles from 20k pps until a
/// rate fails, then bisects 5 steps. Every step runs `s.duration`.
/// `progress` is called after each step.
pub fn search(
    t: &mut Target,
    s: &Settings,
    mut progress: impl FnMut(&RunResult, bool),
) -> Result<SearchResult> {
    let mut steps = Vec::new();
    let mut best: Option<RunResult> = None;
    let mut lo = 0.0f64;
    let mut hi: Option<f64> = None;
    let mut limit = String::from("no rate failed below the search cap");
    let mut rate = SEARCH_START_PPS;
    let mut step = |rate: f64, steps: &mut Vec<RunResult>| -> Result<(bool, &'static str)> {
        let r = t.run(&Settings {
            rate: Some(rate),
            ..s.clone()
        })?;
        let (ok, why) = passes(&r, rate);
        progress(&r, ok);
        if ok && best.as_ref().is_none_or(|b| b.target_pps < Some(rate)) {
            best = Some(r.clone());
        }
        steps.push(r);
        Ok((ok, why))
    };
    while rate <= SEARCH_MAX_PPS {
        let (ok, why) = step(rate, &mut steps)?;
        if ok {
            lo = rate;
            rate *= 2.0;
        } else {
            hi = Some(rate);
            limit = why.to_string();
            break;
        }
    }
    if let Some(mut h) = hi {
        for _ in 0..SEARCH_BISECT_STEPS {
            let mid = ((lo + h) / 2.0).round();
            let (ok, why) = step(mid, &mut steps)?;
            if ok {
                lo = mid;
            } else {
                h = mid;
                limit = why.to_string();
            }
        }
    }
    Ok(SearchResult {
        scenario: t.name.clone(),
        best_pps: best.as_ref().and_then(|b| b.target_pps),
        best,
        limit,
        steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick(kind: Kind, subscribers: usize) -> RunResult {
        let base = Instant::now();
        let topology = Topology {
            subscribers,
            rooms: 1,
            node: NodeOptions {
                shards: 1,
                io_backend: "auto".into(),
                gso: true,
                placement: Placement::default(),
            },
            gro_receivers: false,
            codec: crate::packet::Codec::Vp8,
        };
        let mut t = Target::setup(
            "test",
            kind,
            &topology,
            Path::new("/nonexistent"),
            base,
            None,
        )
        .expect("setup");
        let r = t
            .run(&Settings {
                rate: Some(10_000.0),
                size: 200,
                duration: Duration::from_secs(1),
            })
            .expect("run");
        t.close().expect("close");
        r
    }

    #[test]
    fn room_names_spread_evenly_over_shards() {
        for shards in 1..=4 {
            let names = room_names(8, shards);
            assert_eq!(names.len(), 8);
            for (i, n) in names.iter().enumerate() {
                assert_eq!(
                    ridge_dataplane::shard::shard_for_room(n, shards),
                    i % shards
                );
            }
            let mut unique = names.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), 8, "distinct rooms");
        }
    }

    /// Functional check only: packets flow and are counted. Never asserts
    /// throughput (the machine may be busy).
    #[test]
    fn ceiling_and_naive_deliver() {
        for (kind, subs) in [(Kind::Ceiling, 1), (Kind::Naive, 1), (Kind::Naive, 3)] {
            let r = quick(kind, subs);
            assert!(r.sent > 0, "{kind:?}: nothing sent: {r:?}");
            assert!(r.received > 0, "{kind:?}: nothing received: {r:?}");
            assert!(
                r.loss_pct < 5.0,
                "{kind:?}x{subs}: loss {}%: {r:?}",
                r.loss_pct
            );
            assert_eq!(r.subscribers, subs);
            assert!(r.latency.samples > 0, "{kind:?}: no latency samples");
            if kind == Kind::Naive {
                assert!(r.cpu.is_some(), "naive relay CPU not measured");
            }
        }
    }
}
