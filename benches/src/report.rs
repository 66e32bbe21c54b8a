//! The result tables (stdout) and the JSON document (`--json`).

use std::fmt::Write as _;

use serde::Serialize;

use crate::mesh_loss::{self, MeshRun};
use crate::scenario::{RunResult, SearchResult};

/// The machine the numbers come from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub cpu_model: String,
    /// `/proc/loadavg` when the tool started: other load on a shared machine
    /// skews every number.
    pub loadavg_at_start: String,
}

impl Machine {
    fn probe() -> Machine {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_default();
        let loadavg_at_start = std::fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        Machine {
            loadavg_at_start,
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel,
            cpu_model,
        }
    }
}

/// One node scenario compared with a baseline.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// e.g. "relay / naive".
    pub comparison: String,
    /// Received packets/s, node / baseline.
    pub received_pps: f64,
    /// p99 latency, node / baseline.
    pub latency_p99: f64,
    /// CPU µs per packet out, node / baseline (naive baselines only).
    pub cpu_us_per_packet_out: Option<f64>,
    /// Packets out per core-second, node / baseline (naive baselines only).
    pub pps_out_per_core_second: Option<f64>,
}

/// Everything one invocation measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub command: String,
    pub machine: Machine,
    pub rate_pps: Option<f64>,
    pub size_bytes: usize,
    pub duration_s: f64,
    pub search: bool,
    /// The headline run of each scenario (with --search: its best step).
    pub runs: Vec<RunResult>,
    pub searches: Vec<SearchResult>,
    pub ratios: Vec<Ratio>,
}

impl Report {
    pub fn new(
        rate: Option<f64>,
        size: usize,
        duration: f64,
        search: bool,
        command: String,
    ) -> Report {
        Report {
            command,
            machine: Machine::probe(),
            rate_pps: rate,
            size_bytes: size,
            duration_s: duration,
            search,
            runs: Vec::new(),
            searches: Vec::new(),
            ratios: Vec::new(),
        }
    }

    pub fn add_run(&mut self, r: RunResult) {
        self.runs.push(r);
    }

    pub fn add_search(&mut self, s: SearchResult) {
        if let Some(b) = &s.best {
            self.runs.push(b.clone());
        }
        self.searches.push(s);
    }

    fn run(&self, name: &str) -> Option<&RunResult> {
        self.runs.iter().find(|r| r.scenario == name)
    }

    /// Computes the ratio table from the runs present.
    pub fn finish(&mut self) {
        let pairs = [
            ("relay", "ceiling"),
            ("relay", "ceiling-max"),
            ("relay", "naive"),
            ("fanout", "ceiling"),
            ("fanout", "ceiling-max"),
            ("fanout", "naive-fanout"),
            ("rooms-2shard", "rooms-1shard"),
            ("relay", "relay-nogso"),
            ("fanout", "fanout-nogso"),
        ];
        let mut ratios = Vec::new();
        for (node, base) in pairs {
            let (Some(n), Some(b)) = (self.run(node), self.run(base)) else {
                continue;
            };
            let div = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
            let cpu = n.cpu.zip(b.cpu);
            ratios.push(Ratio {
                comparison: format!("{node} / {base}"),
                received_pps: div(n.received_pps, b.received_pps),
                latency_p99: div(n.latency.p99_us, b.latency.p99_us),
                cpu_us_per_packet_out: cpu
                    .map(|(n, b)| div(n.cpu_us_per_packet_out, b.cpu_us_per_packet_out)),
                pps_out_per_core_second: cpu
                    .map(|(n, b)| div(n.pps_out_per_core_second, b.pps_out_per_core_second)),
            });
        }
        self.ratios = ratios;
    }

    /// The tables as text.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let m = &self.machine;
        let rate = match self.rate_pps {
            _ if self.search => "searched".to_string(),
            Some(r) => format!("{r:.0} pps"),
            None => "unpaced".to_string(),
        };
        let _ = writeln!(
            o,
            "ridge-bench: {} cores, {}, kernel {}, load {}; rate {rate}, {} B packets, {} s per run{}",
            m.nproc,
            m.cpu_model,
            m.kernel,
            m.loadavg_at_start,
            self.size_bytes,
            self.duration_s,
            if self.search {
                " (--search: best passing step shown)"
            } else {
                ""
            }
        );
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "| scenario | rooms | shards | subs | target pps | sent pps | recv pps | recv pps/sub | loss % | p50 µs | p99 µs | p99.9 µs | relay CPU s | CPU µs/pkt in | CPU µs/pkt out | pkts out/core-s | allocs/pkt out | GSO share / run | gen/recv CPU s |"
        );
        let _ = writeln!(
            o,
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        for r in &self.runs {
            let cpu = |f: &dyn Fn(&crate::scenario::Cpu) -> String| {
                r.cpu.as_ref().map_or("-".to_string(), f)
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.3} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {} | {} | {}/{} |",
                r.scenario,
                r.rooms,
                r.shards.map_or("-".to_string(), |s| s.to_string()),
                r.subscribers,
                r.target_pps
                    .map_or("max".to_string(), |t| format!("{t:.0}")),
                r.sent_pps,
                r.received_pps,
                r.received_pps_per_subscriber,
                r.loss_pct,
                r.latency.p50_us,
                r.latency.p99_us,
                r.latency.p999_us,
                cpu(&|c| format!("{:.2}", c.cpu_seconds)),
                cpu(&|c| format!("{:.2}", c.cpu_us_per_packet_in)),
                cpu(&|c| format!("{:.3}", c.cpu_us_per_packet_out)),
                cpu(&|c| format!("{:.0}", c.pps_out_per_core_second)),
                r.allocations_per_packet_out
                    .map_or("-".to_string(), |a| format!("{a:.4}")),
                match (r.gso_share, r.gso_datagrams_per_send) {
                    (Some(s), Some(d)) => format!("{:.0}% / {d:.1}", 100.0 * s.min(1.0)),
                    (Some(_), None) => "0%".to_string(),
                    _ => "-".to_string(),
                },
                opt(r.generator_cpu_seconds),
                opt(r.receiver_cpu_seconds),
            );
        }
        for s in &self.searches {
            let _ = writeln!(
                o,
                "\nsearch {}: highest rate with loss < 0.1%: {} (stopped by: {}; {} steps)",
                s.scenario,
                s.best_pps
                    .map_or("none (20000 pps already failed)".to_string(), |p| format!(
                        "{p:.0} pps"
                    )),
                s.limit,
                s.steps.len()
            );
        }
        if !self.ratios.is_empty() {
            let _ = writeln!(o);
            let _ = writeln!(
                o,
                "| ratio | recv pps | p99 latency | CPU µs/pkt out | pkts out/core-s |"
            );
            let _ = writeln!(o, "|---|---:|---:|---:|---:|");
            let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
            for r in &self.ratios {
                let _ = writeln!(
                    o,
                    "| {} | {:.2} | {:.2} | {} | {} |",
                    r.comparison,
                    r.received_pps,
                    r.latency_p99,
                    f(r.cpu_us_per_packet_out),
                    f(r.pps_out_per_core_second)
                );
            }
        }
        o
    }
}

impl Report {
    /// An SVG bar chart: packets/s received and packets out per core-second
    /// of relay CPU, one pair of bars per run.
    pub fn chart_svg(&self) -> String {
        let rows: Vec<(&str, f64, Option<f64>)> = self
            .runs
            .iter()
            .map(|r| {
                (
                    r.scenario.as_str(),
                    r.received_pps,
                    r.cpu.map(|c| c.pps_out_per_core_second),
                )
            })
            .collect();
        let max = rows
            .iter()
            .flat_map(|(_, a, b)| [Some(*a), *b])
            .flatten()
            .fold(1.0f64, f64::max);
        let (label_w, bar_w, row_h) = (150.0, 560.0, 44.0);
        let height = 76.0 + row_h * rows.len() as f64;
        let mut o = String::new();
        let _ = writeln!(
            o,
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="12">"##,
            w = label_w + bar_w + 120.0
        );
        let command: String = self.command.chars().take(110).collect();
        let _ = writeln!(
            o,
            r##"<text x="10" y="18" font-size="14">ridge-bench, {} B packets</text><text x="10" y="30" font-size="10" fill="#555">{}</text>"##,
            self.size_bytes,
            escape(&command)
        );
        let _ = writeln!(
            o,
            r##"<rect x="10" y="38" width="12" height="10" fill="#4a7bd0"/><text x="26" y="47">packets/s received</text><rect x="170" y="38" width="12" height="10" fill="#e08a2c"/><text x="186" y="47">packets out per core-second of relay CPU</text>"##
        );
        for (i, (name, recv, per_core)) in rows.iter().enumerate() {
            let y = 62.0 + row_h * i as f64;
            let _ = writeln!(
                o,
                r##"<text x="10" y="{}">{}</text>"##,
                y + 16.0,
                escape(name)
            );
            for (k, (v, color)) in [(Some(*recv), "#4a7bd0"), (*per_core, "#e08a2c")]
                .into_iter()
                .enumerate()
            {
                let Some(v) = v else { continue };
                let w = (v / max * bar_w).max(1.0);
                let by = y + k as f64 * 16.0 + 2.0;
                let _ = writeln!(
                    o,
                    r##"<rect x="{label_w}" y="{by}" width="{w:.1}" height="14" fill="{color}"/><text x="{}" y="{}">{:.0}</text>"##,
                    label_w + w + 4.0,
                    by + 11.0,
                    v
                );
            }
        }
        o.push_str("</svg>\n");
        o
    }
}

/// Everything one `mesh-loss` invocation measured.
#[derive(Debug, Clone, Serialize)]
pub struct MeshLossReport {
    pub command: String,
    pub machine: Machine,
    pub rate_pps: f64,
    pub size_bytes: usize,
    pub duration_s: f64,
    /// Loss per mesh link and direction (the control run has 0).
    pub loss_ppm: u32,
    pub hops: usize,
    pub deadline_ms: u64,
    pub keyframe_interval: u64,
    /// Target share of packets on time at 20% loss per link, in percent.
    pub target_on_time_pct: f64,
    pub runs: Vec<MeshRun>,
    /// Runs left out, and why.
    pub skipped: Vec<String>,
}

/// The issue's target: at 20% random loss on every link, at least 99.5% of
/// packets arrive end to end within 200 ms over 3 hops.
const MESH_TARGET_LOSS_PPM: u32 = 200_000;
const MESH_TARGET_PCT: f64 = 99.5;

impl MeshLossReport {
    pub fn new(opts: &mesh_loss::Options, command: String, skipped: Vec<String>) -> Self {
        MeshLossReport {
            command,
            machine: Machine::probe(),
            rate_pps: opts.rate,
            size_bytes: opts.size,
            duration_s: opts.duration.as_secs_f64(),
            loss_ppm: opts.loss_ppm,
            hops: mesh_loss::HOPS,
            deadline_ms: mesh_loss::DEADLINE.as_millis() as u64,
            keyframe_interval: mesh_loss::KEYFRAME_INTERVAL,
            target_on_time_pct: MESH_TARGET_PCT,
            runs: Vec::new(),
            skipped,
        }
    }

    /// The tables as text: one row per run, then per link of each run.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let m = &self.machine;
        let _ = writeln!(
            o,
            "ridge-bench mesh-loss: {} cores, {}, kernel {}, load {}; {:.0} pps, {} B packets, \
             {} s per run, keyframe every {} packets, {} hops",
            m.nproc,
            m.cpu_model,
            m.kernel,
            m.loadavg_at_start,
            self.rate_pps,
            self.size_bytes,
            self.duration_s,
            self.keyframe_interval,
            self.hops,
        );
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "| run | recovery | loss/link | hops | sent | counted | delivered % | <= {} ms % | p50 ms | p99 ms | p99.9 ms | max ms | NACKs sent | retransmits | recovered | unrecovered | rtx misses | dup |",
            self.deadline_ms
        );
        let _ = writeln!(
            o,
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        );
        let ms = |us: f64| us / 1000.0;
        for r in &self.runs {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} | {} | {:.3} | {:.3} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} |",
                r.name,
                r.recovery.as_str(),
                loss_text(r.loss_ppm),
                r.hops,
                r.sent,
                r.counted,
                r.delivered_pct,
                r.on_time_pct,
                ms(r.latency.p50_us),
                ms(r.latency.p99_us),
                ms(r.latency.p999_us),
                ms(r.latency.max_us),
                r.totals.nacks_sent,
                r.totals.retransmits,
                r.totals.recovered,
                r.totals.unrecovered,
                r.totals.retransmit_misses,
                r.duplicates,
            );
        }
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "Per link (U = upstream, D = downstream; UDP dropped/passed by the impairment; NACKs the downstream sent and the upstream received; retransmits and rtx misses at the upstream; recovered/unrecovered at the downstream):"
        );
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "| run | link U-D | dropped/passed U->D | dropped/passed D->U | NACKs sent by D | NACKs recv by U | retransmits by U | rtx misses at U | recovered at D | unrecovered at D | NACK RTT ms |"
        );
        let _ = writeln!(o, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &self.runs {
            for hop in 0..r.hops {
                let (Some(up), Some(down)) = (r.nodes.get(hop), r.nodes.get(hop + 1)) else {
                    continue;
                };
                let loss = |from: &str, to: &str| {
                    r.impairment
                        .iter()
                        .find(|l| l.from == from && l.to == to)
                        .map_or("-".to_string(), |l| format!("{}/{}", l.dropped, l.passed))
                };
                let up_link = up.link(&down.node).cloned().unwrap_or_default();
                let down_link = down.link(&up.node).cloned().unwrap_or_default();
                let _ = writeln!(
                    o,
                    "| {} | {}-{} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    r.name,
                    up.node,
                    down.node,
                    loss(&up.node, &down.node),
                    loss(&down.node, &up.node),
                    down_link.nacks_sent,
                    up_link.nacks_received,
                    up_link.retransmits,
                    up.retransmit_misses,
                    down_link.recovered,
                    down_link.unrecovered,
                    down_link
                        .nack_rtt_ms
                        .map_or("-".to_string(), |v| format!("{v:.2}")),
                );
            }
        }
        let drops: Vec<String> = self
            .runs
            .iter()
            .flat_map(|r| {
                r.nodes.iter().filter(|n| !n.dropped.is_empty()).map(|n| {
                    let list: Vec<String> =
                        n.dropped.iter().map(|(k, v)| format!("{k} {v}")).collect();
                    format!("{} {}: {}", r.name, n.node, list.join(", "))
                })
            })
            .collect();
        if !drops.is_empty() {
            let _ = writeln!(o);
            let _ = writeln!(o, "Datagrams the nodes dropped (ridge_packets_dropped):");
            for d in drops {
                let _ = writeln!(o, "  {d}");
            }
        }
        let _ = writeln!(o);
        for r in self.runs.iter().filter(|r| r.loss_ppm > 0) {
            let verdict = if r.loss_ppm != MESH_TARGET_LOSS_PPM {
                "(the target is stated at 20% loss)"
            } else if r.on_time_pct >= MESH_TARGET_PCT {
                "target met"
            } else {
                "target MISSED"
            };
            let _ = writeln!(
                o,
                "{}: {:.3}% of packets within {} ms over {} hops at {} loss per link; target >= {}% at 20%: {verdict}",
                r.name,
                r.on_time_pct,
                self.deadline_ms,
                r.hops,
                loss_text(r.loss_ppm),
                MESH_TARGET_PCT,
            );
        }
        for r in self
            .runs
            .iter()
            .filter(|r| !r.killed_after_sigterm.is_empty())
        {
            let _ = writeln!(
                o,
                "{}: node(s) {} did not exit within 5 s of SIGTERM and were killed",
                r.name,
                r.killed_after_sigterm.join(", ")
            );
        }
        for s in &self.skipped {
            let _ = writeln!(o, "skipped {s}");
        }
        o
    }
}

/// A loss in ppm as a percentage.
fn loss_text(ppm: u32) -> String {
    let pct = f64::from(ppm) / 1e4;
    if pct.fract() == 0.0 {
        format!("{pct:.0}%")
    } else {
        format!("{pct}%")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Writes the tables to stdout.
#[allow(clippy::print_stdout, reason = "the tables are the tool's output")]
pub fn print(text: &str) {
    print!("{text}");
}
