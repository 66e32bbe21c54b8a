//! `webrtc-fanout`: one str0m publisher (WHIP) and N str0m subscribers
//! (WHEP) against a real node. Every leg is ICE + DTLS-SRTP, so the node
//! decrypts each packet once and encrypts it once per subscriber.
//!
//! All clients run on one thread of this process: each has its own
//! non-blocking UDP socket and str0m `Rtc`, driven in turn. The publisher
//! writes RTP at the paced rate with the same payload stamp as the plain
//! scenarios (run, sequence, send time), and each subscriber parses it back
//! for loss and latency.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use str0m::change::SdpAnswer;
use str0m::format::Codec;
use str0m::media::{Direction, MediaKind, Mid, Pt};
use str0m::net::{Protocol, Receive};
use str0m::rtp::{RtpWrite, SeqNo};
use str0m::{Candidate, Event, Input, Output, Rtc, RtcConfig};

use crate::node::{NodeProcess, http_request_with};
use crate::packet::{self, Stamp};
use crate::traffic;

/// The room the scenario's sessions join.
const ROOM: &str = "bench";

/// One str0m endpoint on its own socket.
struct Client {
    rtc: Rtc,
    sock: UdpSocket,
    local: SocketAddr,
    next_timeout: Instant,
    connected: bool,
    /// Publisher: the node asked for a keyframe.
    keyframe_requested: bool,
    /// Subscribers: the video m-line once str0m reports it.
    media: Option<Mid>,
    /// This run's packets received, and sampled latencies.
    received: u64,
    latencies_ns: Vec<u64>,
    foreign: u64,
}

/// What a [`WebrtcFanout::run`] measured, before CPU accounting.
#[derive(Debug, Clone)]
pub struct WebrtcRun {
    pub sent: u64,
    pub elapsed: Duration,
    pub per_subscriber: Vec<u64>,
    pub latencies_ns: Vec<u64>,
    pub foreign: u64,
    pub generator_cpu_seconds: Option<f64>,
}

impl Client {
    fn new(now: Instant) -> Result<Client> {
        let sock = traffic::bind_loopback().context("binding a WebRTC client socket")?;
        sock.set_nonblocking(true)?;
        let local = sock.local_addr()?;
        let mut rtc = RtcConfig::new()
            .set_rtp_mode(true)
            .clear_codecs()
            .enable_vp8(true)
            .build(now);
        rtc.add_local_candidate(Candidate::host(local, "udp").context("host candidate")?);
        Ok(Client {
            rtc,
            sock,
            local,
            next_timeout: now,
            connected: false,
            keyframe_requested: false,
            media: None,
            received: 0,
            latencies_ns: Vec::new(),
            foreign: 0,
        })
    }

    /// Offers one video m-line in `direction` to `path` (WHIP or WHEP) and
    /// applies the node's answer.
    fn negotiate(&mut self, node: &NodeProcess, path: &str, direction: Direction) -> Result<Mid> {
        let mut change = self.rtc.sdp_api();
        let mid = change.add_media(MediaKind::Video, direction, None, None, None);
        let (offer, pending) = change.apply().context("no offer to make")?;
        let r = http_request_with(
            node.http(),
            "POST",
            path,
            Some(node.token()),
            "application/sdp",
            &offer.to_sdp_string(),
        )?;
        ensure!(
            r.status == 201,
            "POST {path} answered {}: {}",
            r.status,
            r.body
        );
        let answer = SdpAnswer::from_sdp_string(&r.body).context("parsing the SDP answer")?;
        self.rtc
            .sdp_api()
            .accept_answer(pending, answer)
            .context("applying the SDP answer")?;
        Ok(mid)
    }

    fn vp8(&self) -> Option<Pt> {
        self.rtc
            .codec_config()
            .params()
            .iter()
            .find(|p| p.spec().codec == Codec::Vp8)
            .map(|p| p.pt())
    }

    /// Feeds every datagram waiting on the socket to str0m, driving it after
    /// each one: str0m wants its output polled (until it asks for a
    /// timeout) between two inputs, and two datagrams fed back to back lost
    /// the first one's packet event (every other packet of a burst).
    fn receive(
        &mut self,
        now: Instant,
        buf: &mut [u8],
        run: u32,
        base: Instant,
        stride: u64,
    ) -> Result<bool> {
        let mut any = false;
        loop {
            match self.sock.recv_from(buf) {
                Ok((n, source)) => {
                    any = true;
                    let Ok(recv) = Receive::new(Protocol::Udp, source, self.local, &buf[..n])
                    else {
                        self.foreign += 1;
                        continue;
                    };
                    self.rtc
                        .handle_input(Input::Receive(now, recv))
                        .context("str0m rejected a datagram")?;
                    self.drive(now, run, base, stride)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(any),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e).context("receiving"),
            }
        }
    }

    /// Runs str0m until it asks for a timeout: sends what it transmits and
    /// records what it reports.
    fn drive(&mut self, now: Instant, run: u32, base: Instant, stride: u64) -> Result<()> {
        if now >= self.next_timeout {
            self.rtc
                .handle_input(Input::Timeout(now))
                .context("str0m timeout")?;
        }
        loop {
            match self.rtc.poll_output().context("str0m")? {
                Output::Timeout(t) => {
                    self.next_timeout = t;
                    return Ok(());
                }
                Output::Transmit(t) => {
                    // A full socket loses the datagram, as a network would.
                    let _ = self.sock.send_to(&t.contents, t.destination);
                }
                Output::Event(Event::Connected) => self.connected = true,
                Output::Event(Event::MediaAdded(m)) => self.media = Some(m.mid),
                Output::Event(Event::KeyframeRequest(_)) => self.keyframe_requested = true,
                Output::Event(Event::RtpPacket(p)) => match packet::parse_payload(&p.payload) {
                    Some(Stamp {
                        run: r,
                        seq,
                        sent_ns,
                    }) if r == run => {
                        self.received += 1;
                        if seq.is_multiple_of(stride) {
                            let now_ns = traffic::now_ns(base);
                            self.latencies_ns.push(now_ns.saturating_sub(sent_ns));
                        }
                    }
                    _ => self.foreign += 1,
                },
                Output::Event(_) => {}
            }
        }
    }
}

/// The publisher and subscribers, connected through one node.
pub struct WebrtcFanout {
    publisher: Client,
    publisher_mid: Mid,
    pt: Pt,
    subscribers: Vec<Client>,
    base: Instant,
    rtp_seq: u64,
    buf: Vec<u8>,
}

impl std::fmt::Debug for WebrtcFanout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebrtcFanout")
            .field("subscribers", &self.subscribers.len())
            .finish_non_exhaustive()
    }
}

impl WebrtcFanout {
    /// Publishes over WHIP, waits for the session to connect, then adds
    /// `subscribers` WHEP sessions and waits until each receives media.
    pub fn connect(node: &NodeProcess, subscribers: usize, base: Instant) -> Result<WebrtcFanout> {
        let now = Instant::now();
        let mut publisher = Client::new(now)?;
        let publisher_mid =
            publisher.negotiate(node, &format!("/whip/{ROOM}"), Direction::SendOnly)?;
        let pt = publisher.vp8().context("the node did not accept VP8")?;
        let mut s = WebrtcFanout {
            publisher,
            publisher_mid,
            pt,
            subscribers: Vec::new(),
            base,
            rtp_seq: 1,
            buf: vec![0u8; 2048],
        };
        s.pump_until(Duration::from_secs(10), "the publisher to connect", |s| {
            s.publisher.connected
        })?;
        for _ in 0..subscribers {
            let mut c = Client::new(Instant::now())?;
            c.negotiate(node, &format!("/whep/{ROOM}"), Direction::RecvOnly)?;
            s.subscribers.push(c);
        }
        // Keep media flowing while the subscribers connect, so each sees a
        // keyframe and its first packets.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            s.write(0, 20, packet::MIN_SIZE.max(200))?;
            s.pump(0, 1)?;
            if s.subscribers.iter().all(|c| c.connected && c.received > 0) {
                break;
            }
            if Instant::now() >= deadline {
                let connected = s.subscribers.iter().filter(|c| c.connected).count();
                let receiving = s.subscribers.iter().filter(|c| c.received > 0).count();
                bail!(
                    "after 20 s only {connected} of {} WebRTC subscribers connected and \
                     {receiving} received media",
                    s.subscribers.len()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(s)
    }

    fn pump_until(
        &mut self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&WebrtcFanout) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            if Instant::now() >= deadline {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            if !self.pump(0, 1)? {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(())
    }

    /// Receives and drives every client once; true if anything arrived.
    fn pump(&mut self, run: u32, stride: u64) -> Result<bool> {
        let now = Instant::now();
        let base = self.base;
        let mut any = self
            .publisher
            .receive(now, &mut self.buf, run, base, stride)?;
        self.publisher.drive(now, run, base, stride)?;
        for c in &mut self.subscribers {
            any |= c.receive(now, &mut self.buf, run, base, stride)?;
            c.drive(now, run, base, stride)?;
        }
        Ok(any)
    }

    /// Writes `count` packets of `size` bytes (RTP header included) for run
    /// `run`, numbered from `first`.
    fn write(&mut self, run: u32, count: u64, size: usize) -> Result<u64> {
        let now = Instant::now();
        let mut pkt = vec![0u8; size.clamp(packet::MIN_SIZE, packet::MAX_SIZE)];
        let mut api = self.publisher.rtc.direct_api();
        let tx = api
            .stream_tx_by_mid(self.publisher_mid, None)
            .context("the publisher has no send stream")?;
        for _ in 0..count {
            let seq = self.rtp_seq;
            self.rtp_seq += 1;
            let stamp = Stamp {
                run,
                seq,
                sent_ns: traffic::now_ns(self.base),
            };
            let key = packet::is_keyframe(seq - 1) || self.publisher.keyframe_requested;
            self.publisher.keyframe_requested = false;
            packet::build(&mut pkt, packet::Codec::Vp8, seq as u16, key, stamp);
            let payload = pkt[packet::RTP_HEADER..].to_vec();
            tx.write_rtp(
                RtpWrite::new(self.pt, SeqNo::from(seq), (seq * 300) as u32, now, payload)
                    .marker(seq.is_multiple_of(10))
                    .nackable(true),
            );
        }
        // str0m sends what was written when it is next driven.
        self.publisher.next_timeout = now;
        Ok(count)
    }

    pub fn subscriber_count(&self) -> usize {
        self.subscribers.len()
    }

    /// One paced run: `rate` packets/s (unpaced: as fast as the loop goes)
    /// for `duration`, then `grace` to collect stragglers.
    pub fn run(
        &mut self,
        run: u32,
        rate: Option<f64>,
        size: usize,
        duration: Duration,
        grace: Duration,
        stride: u64,
    ) -> Result<WebrtcRun> {
        for c in &mut self.subscribers {
            c.received = 0;
            c.latencies_ns.clear();
            c.foreign = 0;
        }
        let cpu_before = crate::stats::thread_cpu_seconds();
        let start = Instant::now();
        let mut sent = 0u64;
        loop {
            let elapsed = start.elapsed();
            if elapsed >= duration {
                break;
            }
            let due = match rate {
                Some(r) => ((elapsed.as_secs_f64() * r) as u64).saturating_sub(sent),
                None => 32,
            };
            if due > 0 {
                sent += self.write(run, due.min(64), size)?;
            }
            if !self.pump(run, stride)? && due == 0 {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        let elapsed = start.elapsed();
        let generator_cpu_seconds = cpu_before
            .zip(crate::stats::thread_cpu_seconds())
            .map(|(a, b)| b - a);
        let grace_end = Instant::now() + grace;
        while Instant::now() < grace_end {
            if !self.pump(run, stride)? {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        let mut latencies_ns = Vec::new();
        for c in &mut self.subscribers {
            latencies_ns.append(&mut c.latencies_ns);
        }
        Ok(WebrtcRun {
            sent,
            elapsed,
            per_subscriber: self.subscribers.iter().map(|c| c.received).collect(),
            latencies_ns,
            foreign: self.subscribers.iter().map(|c| c.foreign).sum(),
            generator_cpu_seconds,
        })
    }
}
