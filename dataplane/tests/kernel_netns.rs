//! The kernel fast path end to end, with the real `ridge-dataplane` binary
//! in a network namespace (B) and plain-RTP clients in another (A), joined
//! by a veth pair: a0 10.77.1.1 (+ 10.77.1.3 for the flood) ↔ b0 10.77.1.2.
//!
//! - `plain_rtp_is_forwarded_in_the_kernel`: a publisher and a subscriber
//!   (both in A, so B sends back out of b0: XDP_TX) created over HTTP;
//!   after the first packets the node installs the flow; 1,000 packets
//!   then arrive intact, rewritten (SSRC, seq, ts), with no checksum
//!   error, while the node's userspace sees only the sampled share. A flood
//!   from another source is cut by the guard while the stream flows.
//!   Deleting the subscriber removes the entry. Two new subscribers then
//!   share one two-destination entry, sent by the TC fan-out's clones.
//! - `xdp_off_relays_in_userspace`, `a_missing_media_interface_relays_in_userspace`:
//!   the fallbacks report mode none and still relay every packet.
//!
//! Needs root, `ip` and `ethtool`; otherwise each test prints `SKIP` (and fails with
//! RIDGE_REQUIRE_ALL=1). The A side runs in a child process (this test
//! binary re-run under `ip netns exec` with RIDGE_KERNEL_HELPER set).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SECRET: &str = "kernel-netns-test-secret-0123456789";
const HTTP: &str = "10.77.1.2:8080";
const MEDIA: &str = "10.77.1.2:5004";
const PUB: &str = "10.77.1.1:4000";
const SUB: &str = "10.77.1.1:6000";
const FLOODER: &str = "10.77.1.3:4100";
const PUB_SSRC: u32 = 0x5eed_0001;
const SUB_SSRC: u32 = 0xb0b0_0002;
const SUB2: &str = "10.77.1.1:6002";
const SUB2_SSRC: u32 = 0xc0c0_0003;
const PT: u8 = 96;
const HELPER_ENV: &str = "RIDGE_KERNEL_HELPER";
/// The codec of the helper's stream: "vp8" (the default) or "h264".
const CODEC_ENV: &str = "RIDGE_KERNEL_CODEC";

/// Whether the helper's stream is H.264 (else VP8).
fn h264() -> bool {
    static H264: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *H264.get_or_init(|| std::env::var(CODEC_ENV).is_ok_and(|c| c == "h264"))
}

/// The shard address the room landed on (from the endpoint answer).
static ROOM_MEDIA: std::sync::OnceLock<SocketAddr> = std::sync::OnceLock::new();

fn room_media() -> SocketAddr {
    *ROOM_MEDIA.get().expect("endpoints created")
}

// ----- prerequisites and namespaces ----------------------------------------

fn require(test: &str) -> bool {
    let why = if !Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
    {
        Some("needs root (network namespaces, BPF)".to_owned())
    } else if !["ip", "ethtool"].iter().all(|t| {
        Command::new(t)
            .arg(if *t == "ip" { "-V" } else { "--version" })
            .output()
            .is_ok_and(|o| o.status.success())
    }) {
        Some("needs iproute2 (`ip`) and `ethtool`".to_owned())
    } else {
        None
    };
    let Some(why) = why else { return true };
    if std::env::var("RIDGE_REQUIRE_ALL").is_ok_and(|v| v == "1") {
        panic!("required test prerequisite missing: {why}");
    }
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
    false
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .env("RIDGE_JWT_SECRET", SECRET)
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Namespaces A and B joined by a0 ↔ b0; removed on drop (with the node).
struct Net {
    a: String,
    b: String,
    node: Option<Child>,
    log: std::path::PathBuf,
}

impl Net {
    fn new(tag: &str) -> Net {
        let id = std::process::id();
        let net = Net {
            a: format!("rk-{tag}-a-{id}"),
            b: format!("rk-{tag}-b-{id}"),
            node: None,
            log: std::env::temp_dir().join(format!("ridge-kernel-{tag}-{id}.log")),
        };
        run(&["ip", "netns", "add", &net.a]);
        run(&["ip", "netns", "add", &net.b]);
        run(&[
            "ip", "-n", &net.a, "link", "add", "a0", "type", "veth", "peer", "name", "b0", "netns",
            &net.b,
        ]);
        for (ns, dev, addrs) in [
            (&net.a, "a0", &["10.77.1.1/24", "10.77.1.3/24"][..]),
            (&net.b, "b0", &["10.77.1.2/24"][..]),
        ] {
            for addr in addrs {
                run(&["ip", "-n", ns, "addr", "add", addr, "dev", dev]);
            }
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            // A veth hands over locally sent datagrams with a partial UDP
            // checksum (TX offload); frames from a real wire carry a full
            // one, which is what XDP updates. Make the veth a wire.
            run(&["ip", "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off"]);
        }
        net
    }

    fn start_node(&mut self, extra: &[&str]) {
        self.start_node_with_guard("1000", extra);
    }

    fn start_node_with_guard(&mut self, rate_pps: &str, extra: &[&str]) {
        let log = std::fs::File::create(&self.log).unwrap();
        let mut args = vec![
            "netns",
            "exec",
            &self.b,
            env!("CARGO_BIN_EXE_ridge-dataplane"),
            "--http",
            HTTP,
            "--udp",
            MEDIA,
            "--insecure-http",
            // The lab's remotes receive at once (no consent packet first).
            "--rtp-trusted-network",
            "0.0.0.0/0",
            "--shards",
            "2",
            "--no-pin-cores",
            "--guard-rate-pps",
            rate_pps,
            "--guard-burst",
            "500",
            "--log",
            "ridge_dataplane=debug,ridge_ebpf=info,info",
        ];
        args.extend_from_slice(extra);
        let child = Command::new("ip")
            .args(&args)
            .env("RIDGE_JWT_SECRET", SECRET)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the node");
        self.node = Some(child);
    }

    /// Runs the A-side scenario; panics with both sides' output on failure.
    fn run_helper(&self, scenario: &str) {
        self.run_helper_in(scenario, "vp8");
    }

    /// [`Net::run_helper`] with a stream in `codec` ("vp8" or "h264").
    fn run_helper_in(&self, scenario: &str, codec: &str) {
        let token = run(&[
            env!("CARGO_BIN_EXE_ridge-dataplane"),
            "token",
            "--room",
            "kroom",
            "--identity",
            "tester",
            "--publish",
            "--subscribe",
            "--admin",
        ]);
        let out = Command::new("ip")
            .args(["netns", "exec", &self.a])
            .arg(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "helper_in_a",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(HELPER_ENV, scenario)
            .env(CODEC_ENV, codec)
            .env("RIDGE_TEST_TOKEN", token.trim())
            .env(
                "RIDGE_TEST_NODE_PID",
                self.node.as_ref().map_or(0, Child::id).to_string(),
            )
            .env("RIDGE_JWT_SECRET", SECRET)
            .output()
            .expect("run the helper");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        eprint!("{text}");
        if !out.status.success() {
            let node_log = std::fs::read_to_string(&self.log).unwrap_or_default();
            panic!("the A-side scenario {scenario} failed; node log:\n{node_log}");
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Some(mut node) = self.node.take() {
            let _ = node.kill();
            let _ = node.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.a]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).output();
        let _ = std::fs::remove_file(&self.log);
    }
}

#[test]
fn plain_rtp_is_forwarded_in_the_kernel() {
    if !require("plain_rtp_is_forwarded_in_the_kernel") {
        return;
    }
    let mut net = Net::new("fwd");
    net.start_node(&[]);
    net.run_helper("kernel");
}

/// The kernel forwards H.264 exactly as VP8: it rewrites headers and never
/// reads the payload (the node parses it in userspace before offloading).
#[test]
fn h264_plain_rtp_is_forwarded_in_the_kernel_as_vp8_is() {
    if !require("h264_plain_rtp_is_forwarded_in_the_kernel_as_vp8_is") {
        return;
    }
    let mut net = Net::new("h264");
    net.start_node(&[]);
    net.run_helper_in("kernel", "h264");
}

#[test]
fn xdp_off_relays_in_userspace() {
    if !require("xdp_off_relays_in_userspace") {
        return;
    }
    let mut net = Net::new("off");
    net.start_node(&["--xdp", "off"]);
    net.run_helper("userspace");
}

#[test]
fn a_missing_media_interface_relays_in_userspace() {
    if !require("a_missing_media_interface_relays_in_userspace") {
        return;
    }
    let mut net = Net::new("noif");
    net.start_node(&["--media-interface", "nosuch0"]);
    net.run_helper("userspace");
}

/// Node CPU with and without kernel forwarding for the same stream (run
/// with `--ignored`, best with `--release`; prints `BENCH` lines). The XDP
/// work itself runs in softirq context, not in the node process: its cost
/// per packet is measured by ridge-ebpf's `kernel_path` example.
#[test]
#[ignore = "benchmark"]
fn offload_node_cpu() {
    if !require("offload_node_cpu") {
        return;
    }
    for mode in ["auto", "off"] {
        let mut net = Net::new(&format!("bench{mode}"));
        net.start_node_with_guard("0", &["--xdp", mode]);
        net.run_helper("bench");
    }
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `after` starts at field 3.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

// ----- the A side (run in namespace A by the tests above) -------------------

struct Api {
    token: String,
}

impl Api {
    fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let mut s = TcpStream::connect_timeout(&HTTP.parse().unwrap(), Duration::from_secs(2))
            .map_err(|e| format!("connect {HTTP}: {e}"))
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {HTTP}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.token,
            body.len()
        );
        s.write_all(req.as_bytes()).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = resp
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_owned());
        (status, body)
    }

    fn wait_ready(&self) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) =
                TcpStream::connect_timeout(&HTTP.parse().unwrap(), Duration::from_millis(200))
            {
                drop(s.flush());
                let (status, body) = self.request("GET", "/healthz", "");
                if status == 200 {
                    return serde_json::from_str(&body).unwrap();
                }
            }
            assert!(Instant::now() < deadline, "the node never became ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn endpoint(&self, direction: &str, remote: &str, ssrc: u32) -> serde_json::Value {
        let body = format!(
            r#"{{"direction":"{direction}","kind":"video","codec":"{}","remote":"{remote}","payload_type":{PT},"ssrc":{ssrc}}}"#,
            if h264() { "h264" } else { "vp8" }
        );
        let (status, body) = self.request("POST", "/v1/rooms/kroom/rtp", &body);
        assert_eq!(status, 201, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    fn metrics(&self) -> String {
        let (status, body) = self.request("GET", "/metrics", "");
        assert_eq!(status, 200, "{body}");
        body
    }
}

/// Sum of the samples of `name` whose labels contain `labels`.
fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (n, rest) = key.split_once('{').unwrap_or((key, ""));
            (n == name && rest.contains(labels))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

fn rtp(seq: u16, keyframe: bool) -> Vec<u8> {
    let mut p = vec![0x80, PT];
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&(90_000 + u32::from(seq) * 3000).to_be_bytes());
    p.extend_from_slice(&PUB_SSRC.to_be_bytes());
    // Five bytes of payload header: VP8's descriptor and frame tag, or an
    // H.264 IDR or non-IDR slice as a single NAL unit.
    let header: [u8; 5] = match (h264(), keyframe) {
        (false, key) => [0x10, if key { 0x00 } else { 0x01 }, 0x9d, 0x01, 0x2a],
        (true, true) => [0x65, 0x88, 0x84, 0x21, 0xa0],
        (true, false) => [0x41, 0x9a, 0x02, 0x21, 0xa0],
    };
    p.extend_from_slice(&header);
    p.extend_from_slice(&seq.to_be_bytes());
    for i in 0..180u16 {
        p.push((seq.wrapping_mul(31).wrapping_add(i)) as u8);
    }
    p
}

fn udp(addr: &str) -> UdpSocket {
    let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    s
}

/// A's interface and protocol counters, for failure messages.
fn diag() -> String {
    std::fs::read_to_string("/proc/net/dev").unwrap_or_default()
        + &std::fs::read_to_string("/proc/net/snmp").unwrap_or_default()
}

fn udp_in_csum_errors() -> u64 {
    udp_counter("InCsumErrors")
}

/// A's `a0` receive drops (/proc/net/dev).
fn a0_rx_dropped() -> u64 {
    let dev = std::fs::read_to_string("/proc/net/dev").unwrap();
    dev.lines()
        .find_map(|l| l.trim().strip_prefix("a0:"))
        .and_then(|rest| rest.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(0)
}

fn udp_counter(name: &str) -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap();
    let rows: Vec<&str> = snmp.lines().filter(|l| l.starts_with("Udp:")).collect();
    let names: Vec<&str> = rows[0].split_whitespace().collect();
    let values: Vec<&str> = rows[1].split_whitespace().collect();
    let i = names.iter().position(|n| *n == name).unwrap();
    values[i].parse().unwrap()
}

/// Every 200th packet is a keyframe (subscribers start on one).
fn is_key(seq: u16) -> bool {
    seq.is_multiple_of(200)
}

/// Sends `seqs` from `publisher` every `gap` while `sub` collects what
/// arrives; returns the received datagrams.
fn stream(
    publisher: &UdpSocket,
    sub: &UdpSocket,
    seqs: std::ops::Range<u16>,
    gap: Duration,
) -> Vec<Vec<u8>> {
    stream_to(publisher, &[sub], seqs, gap).remove(0)
}

/// [`stream`] with several subscriber sockets.
fn stream_to(
    publisher: &UdpSocket,
    subs: &[&UdpSocket],
    seqs: std::ops::Range<u16>,
    gap: Duration,
) -> Vec<Vec<Vec<u8>>> {
    let expected = seqs.len();
    let collectors: Vec<_> = subs
        .iter()
        .map(|sub| {
            let rx = sub.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut got = Vec::new();
                let mut buf = [0u8; 2048];
                while got.len() < expected {
                    match rx.recv_from(&mut buf) {
                        Ok((n, _)) => got.push(buf[..n].to_vec()),
                        Err(_) => break,
                    }
                }
                got
            })
        })
        .collect();
    let media = room_media();
    let mut next = Instant::now();
    for seq in seqs {
        publisher.send_to(&rtp(seq, is_key(seq)), media).unwrap();
        next += gap;
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    collectors.into_iter().map(|c| c.join().unwrap()).collect()
}

/// Checks every received packet against what was sent: the subscriber's
/// SSRC, the publisher's seq/ts plus one constant offset each, same PT,
/// same payload. Returns (seq offset, ts offset).
fn check_stream(got: &[Vec<u8>], offsets: Option<(u16, u32)>) -> (u16, u32) {
    check_stream_of(got, offsets, SUB_SSRC)
}

fn check_stream_of(got: &[Vec<u8>], offsets: Option<(u16, u32)>, sub_ssrc: u32) -> (u16, u32) {
    let mut offsets = offsets;
    let mut seen = std::collections::BTreeSet::new();
    for p in got {
        assert!(p.len() >= 12 + 7, "short packet {p:02x?}");
        assert_eq!(p[0], 0x80);
        assert_eq!(p[1] & 0x7f, PT, "payload type");
        let seq = u16::from_be_bytes([p[2], p[3]]);
        let ts = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
        let ssrc = u32::from_be_bytes([p[8], p[9], p[10], p[11]]);
        assert_eq!(ssrc, sub_ssrc, "subscriber SSRC");
        let in_seq = u16::from_be_bytes([p[17], p[18]]);
        let want = rtp(in_seq, is_key(in_seq));
        assert_eq!(&p[12..], &want[12..], "payload of input {in_seq}");
        let in_ts = 90_000 + u32::from(in_seq) * 3000;
        let (so, to) = *offsets.get_or_insert((seq.wrapping_sub(in_seq), ts.wrapping_sub(in_ts)));
        assert_eq!(seq, in_seq.wrapping_add(so), "seq of input {in_seq}");
        assert_eq!(ts, in_ts.wrapping_add(to), "ts of input {in_seq}");
        assert!(seen.insert(in_seq), "duplicate {in_seq}");
    }
    offsets.unwrap_or((0, 0))
}

fn bench(api: &Api, health: &serde_json::Value, publisher: &UdpSocket, sub: &UdpSocket) {
    let pid = std::env::var("RIDGE_TEST_NODE_PID").unwrap();
    let offload = health["xdp"] != "none";
    if offload {
        let deadline = Instant::now() + Duration::from_secs(5);
        while metric(&api.metrics(), "ridge_bpf_flows", "") < 1.0 {
            assert!(Instant::now() < deadline, "no flow installed");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    const PACKETS: u16 = 50_000;
    let rate = 25_000.0;
    let before = cpu_ticks(&pid);
    let (rcvbuf0, drop0) = (udp_counter("RcvbufErrors"), a0_rx_dropped());
    let t = Instant::now();
    let rx = sub.try_clone().unwrap();
    let counter = std::thread::spawn(move || {
        let mut n = 0u32;
        let mut buf = [0u8; 2048];
        while rx.recv_from(&mut buf).is_ok() {
            n += 1;
        }
        n
    });
    let media = room_media();
    let mut next = Instant::now();
    for i in 0..PACKETS {
        let seq = 10 + i;
        let _ = publisher.send_to(&rtp(seq, is_key(seq)), media);
        next += Duration::from_secs_f64(1.0 / rate);
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    let elapsed = t.elapsed();
    let received = counter.join().unwrap();
    let ticks = cpu_ticks(&pid) - before;
    let rcvbuf = udp_counter("RcvbufErrors") - rcvbuf0;
    let dropped = a0_rx_dropped() - drop0;
    let cpu_ms = ticks as f64 * 1000.0 / clock_ticks_per_second() as f64;
    eprintln!(
        "BENCH xdp={} sent={PACKETS} in {elapsed:.2?} received={received} (A: {rcvbuf} socket-buffer drops, {dropped} a0 rx drops) node_cpu_ms={cpu_ms:.0} \
         node_cpu_ns_per_packet={:.0} (incl. 1.5 s idle tail)",
        health["xdp"],
        cpu_ms * 1e6 / f64::from(PACKETS)
    );
}

#[test]
fn helper_in_a() {
    let Ok(scenario) = std::env::var(HELPER_ENV) else {
        return; // Only meaningful when re-run by the tests above.
    };
    let api = Api {
        token: std::env::var("RIDGE_TEST_TOKEN").unwrap(),
    };
    let health = api.wait_ready();
    eprintln!("healthz: {health}");
    // A veth delivers frames its peer sends with XDP_TX only while it runs
    // an XDP program itself (the kernel flushes its XDP ring only then): a
    // pass-everything guard on a0 stands in for a real next hop's NIC.
    let _peer_xdp = (scenario != "userspace").then(|| {
        let mut bpf = ridge_ebpf::RidgeBpf::load().expect("load BPF in A");
        let mode = bpf.attach_xdp("a0", ridge_ebpf::XdpProgram::Guard);
        assert_eq!(mode, ridge_ebpf::AttachMode::Native, "XDP on a0");
        bpf
    });
    let publisher = udp(PUB);
    let sub = udp(SUB);
    let pub_ep = api.endpoint("publish", PUB, PUB_SSRC);
    let local: SocketAddr = pub_ep["local"].as_str().unwrap().parse().unwrap();
    assert_eq!(local.ip(), MEDIA.parse::<SocketAddr>().unwrap().ip());
    ROOM_MEDIA.set(local).unwrap();
    eprintln!("room on shard address {local}");
    let sub_ep = api.endpoint("subscribe", SUB, SUB_SSRC);
    let csum_before = udp_in_csum_errors();
    let started = Instant::now();

    // Learning: the first packets (a keyframe first) go through userspace.
    let got = stream(&publisher, &sub, 0..10, Duration::from_millis(5));
    assert_eq!(got.len(), 10, "the first packets arrive\n{}", diag());
    let offsets = check_stream(&got, None);

    let m = api.metrics();
    if scenario == "bench" {
        bench(&api, &health, &publisher, &sub);
        return;
    }
    let kernel = scenario == "kernel";
    if !kernel {
        assert_eq!(health["xdp"], "none", "{health}");
        assert_eq!(metric(&m, "ridge_xdp_mode", "mode=\"none\""), 1.0, "{m}");
        let before = metric(&m, "ridge_packets_received_total", "");
        let got = stream(&publisher, &sub, 10..510, Duration::from_millis(2));
        assert_eq!(got.len(), 500, "every packet relayed in userspace");
        check_stream(&got, Some(offsets));
        let m = api.metrics();
        assert_eq!(metric(&m, "ridge_bpf_flows", ""), 0.0);
        let after = metric(&m, "ridge_packets_received_total", "");
        assert!(after - before >= 500.0, "{before} -> {after}");
        eprintln!("userspace relay OK: 500/500 packets, xdp none");
        return;
    }

    // Offload: the reconcile installs the flow within a second or so.
    let mode_ok = |m: &str| {
        metric(m, "ridge_xdp_mode", "mode=\"native\"") == 1.0
            || metric(m, "ridge_xdp_mode", "mode=\"generic\"") == 1.0
    };
    assert!(mode_ok(&m), "xdp mode: {m}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let m = loop {
        let m = api.metrics();
        if metric(&m, "ridge_bpf_flows", "") >= 1.0 {
            break m;
        }
        assert!(Instant::now() < deadline, "no flow installed: {m}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let (_, h) = api.request("GET", "/healthz", "");
    let h: serde_json::Value = serde_json::from_str(&h).unwrap();
    assert_eq!(h["kernel_flows"], 1, "{h}");
    assert!(h["xdp"] == "native" || h["xdp"] == "generic", "{h}");
    let user_before = metric(&m, "ridge_packets_received_total", "");

    const N: u16 = 1000;
    let got = stream(&publisher, &sub, 10..10 + N, Duration::from_millis(2));
    assert_eq!(
        got.len(),
        usize::from(N),
        "every packet arrives; metrics:\n{}\na0: {}",
        api.metrics(),
        diag()
    );
    check_stream(&got, Some(offsets));
    assert_eq!(
        udp_in_csum_errors(),
        csum_before,
        "UDP checksum errors in A"
    );
    let m = api.metrics();
    let user = metric(&m, "ridge_packets_received_total", "") - user_before;
    let kernel_pkts = metric(&m, "ridge_bpf_flow_packets_total", "");
    let sampled = metric(&m, "ridge_bpf_flow_sampled_total", "");
    eprintln!(
        "kernel forwarding: {N} sent, {} received intact; kernel forwarded {kernel_pkts}, \
         sampled {sampled}, userspace received {user} (in {:?})",
        got.len(),
        started.elapsed()
    );
    assert!(
        kernel_pkts >= f64::from(N) * 0.9,
        "most packets forwarded in the kernel: {kernel_pkts}"
    );
    assert!(
        user <= f64::from(N) / 10.0,
        "userspace saw only about the sampled share: {user} of {N}"
    );
    assert!(metric(&m, "ridge_bpf_forwarded_total", "how=\"xdp_tx\"") >= f64::from(N) * 0.9);

    // The guard: a flood from another source is cut to its rate while the
    // stream keeps flowing.
    let dropped_before = metric(&m, "ridge_bpf_dropped_total", "reason=\"rate_limited\"");
    let flood = std::thread::spawn(|| {
        let s = udp(FLOODER);
        let media = room_media();
        let junk = rtp(7, false);
        let t = Instant::now();
        for _ in 0..30_000 {
            let _ = s.send_to(&junk, media);
        }
        t.elapsed()
    });
    let got = stream(
        &publisher,
        &sub,
        10 + N..10 + 2 * N,
        Duration::from_millis(2),
    );
    let flood_time = flood.join().unwrap();
    assert_eq!(
        got.len(),
        usize::from(N),
        "the stream flows during the flood"
    );
    check_stream(&got, Some(offsets));
    let m = api.metrics();
    let dropped = metric(&m, "ridge_bpf_dropped_total", "reason=\"rate_limited\"") - dropped_before;
    eprintln!(
        "guard: 30000 flood packets in {flood_time:?}, {dropped} dropped as rate_limited; stream {}/{N}",
        got.len()
    );
    assert!(dropped >= 10_000.0, "flood dropped: {dropped}\n{m}");

    // Teardown: deleting the subscriber removes the entry.
    let id = sub_ep["id"].as_str().unwrap();
    let (status, body) = api.request("DELETE", &format!("/v1/rooms/kroom/rtp/{id}"), "");
    assert!(status == 200 || status == 204, "{status} {body}");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let m = api.metrics();
        if metric(&m, "ridge_bpf_flows", "") == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "entry not removed: {m}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = stream(
        &publisher,
        &sub,
        10 + 2 * N..10 + 2 * N + 50,
        Duration::from_millis(2),
    );
    assert!(got.is_empty(), "nothing reaches a deleted subscriber");
    eprintln!("teardown: entry removed, deleted subscriber receives nothing");

    // Fan-out: two subscribers, one entry with two destinations, sent by
    // the TC program's clones.
    let sub2 = udp(SUB2);
    api.endpoint("subscribe", SUB, SUB_SSRC);
    api.endpoint("subscribe", SUB2, SUB2_SSRC);
    let got = stream_to(
        &publisher,
        &[&sub, &sub2],
        2200..2220,
        Duration::from_millis(5),
    );
    assert!(
        got.iter().all(|g| g.len() == 20),
        "both start on the keyframe: {} {}",
        got[0].len(),
        got[1].len()
    );
    let off1 = check_stream_of(&got[0], None, SUB_SSRC);
    let off2 = check_stream_of(&got[1], None, SUB2_SSRC);
    let deadline = Instant::now() + Duration::from_secs(5);
    let m = loop {
        let m = api.metrics();
        if metric(&m, "ridge_bpf_flow_destinations", "") == 2.0 {
            break m;
        }
        assert!(Instant::now() < deadline, "no 2-destination entry: {m}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let tc_before = metric(&m, "ridge_bpf_forwarded_total", "how=\"tc_copy\"");
    let got = stream_to(
        &publisher,
        &[&sub, &sub2],
        2220..2720,
        Duration::from_millis(2),
    );
    assert_eq!((got[0].len(), got[1].len()), (500, 500), "{}", diag());
    check_stream_of(&got[0], Some(off1), SUB_SSRC);
    check_stream_of(&got[1], Some(off2), SUB2_SSRC);
    let m = api.metrics();
    let copies = metric(&m, "ridge_bpf_forwarded_total", "how=\"tc_copy\"") - tc_before;
    eprintln!("fan-out: 500 packets to 2 subscribers, all intact; {copies} TC copies");
    assert!(
        copies >= 2.0 * 500.0 * 0.9,
        "TC sent the copies: {copies}\n{m}"
    );
    assert_eq!(
        udp_in_csum_errors(),
        csum_before,
        "UDP checksum errors in A"
    );
}
