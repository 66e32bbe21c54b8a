//! Percentiles, latency summaries and CPU time from `/proc`.

use serde::Serialize;

/// Nearest-rank percentile `p` (0..=100) of an ascending slice; 0 for an
/// empty one.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let p = p.clamp(0.0, 100.0);
    // The epsilon keeps float noise (99.9 / 100 * 1000 = 999.0000000000001)
    // from bumping the rank.
    let rank = (p * sorted.len() as f64 / 100.0 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub samples: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Latency {
    /// Summarises latencies given in nanoseconds (sorts them in place).
    pub fn from_ns(samples: &mut [u64]) -> Latency {
        samples.sort_unstable();
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            samples: samples.len(),
            p50_us: us(percentile(samples, 50.0)),
            p99_us: us(percentile(samples, 99.0)),
            p999_us: us(percentile(samples, 99.9)),
            max_us: us(samples.last().copied().unwrap_or(0)),
        }
    }
}

/// `utime + stime` in clock ticks from the text of a `/proc/<pid>/stat`
/// (or `/proc/thread-self/stat`) file. The command name in parentheses may
/// itself contain spaces and parentheses, so fields are counted from the
/// last `)`.
pub fn parse_proc_stat_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    // After the comm field: state(3) ppid(4) ... utime(14) stime(15).
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// CPU seconds (user + system) the calling thread has used so far.
pub fn thread_cpu_seconds() -> Option<f64> {
    stat_file_cpu_seconds(std::path::Path::new("/proc/thread-self/stat"))
}

/// CPU seconds (user + system) from a `/proc/.../stat` file.
/// [`stat_file_cpu_seconds`] of an optional path.
pub fn stat_file_cpu_seconds_opt(path: Option<&std::path::Path>) -> Option<f64> {
    stat_file_cpu_seconds(path?)
}

pub fn stat_file_cpu_seconds(path: &std::path::Path) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    let ticks = parse_proc_stat_ticks(&text)?;
    Some(ticks as f64 / crate::mmsg::clock_ticks_per_second() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 50.0), 500);
        assert_eq!(percentile(&v, 99.0), 990);
        assert_eq!(percentile(&v, 99.9), 999);
        assert_eq!(percentile(&v, 100.0), 1000);
        assert_eq!(percentile(&v, 0.0), 1);
        assert_eq!(percentile(&[], 50.0), 0);
        assert_eq!(percentile(&[7], 99.9), 7);
        assert_eq!(percentile(&[1, 2], 50.0), 1);
        assert_eq!(percentile(&[1, 2], 51.0), 2);
    }

    #[test]
    fn latency_summary_sorts() {
        let mut v = vec![3000, 1000, 2000, 4000];
        let l = Latency::from_ns(&mut v);
        assert_eq!(l.samples, 4);
        assert_eq!(l.p50_us, 2.0);
        assert_eq!(l.p99_us, 4.0);
        assert_eq!(l.max_us, 4.0);
        assert_eq!(Latency::from_ns(&mut []).samples, 0);
    }

    #[test]
    fn proc_stat_fields() {
        let line = "1234 (ridge (data) plane) S 1 1234 1234 0 -1 4194560 100 0 0 0 \
                    250 37 0 0 20 0 3 0 12345 1000000 100 18446744073709551615";
        assert_eq!(parse_proc_stat_ticks(line), Some(287));
        assert_eq!(parse_proc_stat_ticks("garbage"), None);
        let own = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
        assert!(parse_proc_stat_ticks(&own).is_some());
    }
}
