//! One shard's thread: a current-thread runtime pinned to a core, whose
//! loop is the only code that touches the shard's socket and core, so the
//! packet path takes no lock. Each turn it flushes what the core queued,
//! then takes a control call, a timer or one receive batch.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ridge_io::{DatagramIo, RecvMeta};
use ridge_sfu::{MAX_BATCH, Output, PacketBuf, Sfu, SfuConfig, SfuEvent};
use tokio::io::unix::AsyncFd;
use tokio::sync::{broadcast, mpsc};

use super::command::Command;
use super::local::LocalSinks;
use super::send::SendQueue;
use super::stats::{ShardCounters, ShardStats};

/// Stack of each shard thread: a large flush's send batch (the send queue's
/// `SEND_WINDOW`) takes about 150 KiB of it, the rest is headroom for the
/// core and the runtime.
const SHARD_STACK: usize = 4 << 20;

/// How long a flush waits, in total, for a full socket before it gives up on
/// the rest of its datagrams.
const SEND_PATIENCE: Duration = Duration::from_millis(20);

/// Everything one shard thread starts with.
pub(super) struct ShardStart {
    pub index: usize,
    /// The core to pin the thread to, if any.
    pub core: Option<core_affinity::CoreId>,
    pub io: Box<dyn DatagramIo + Send>,
    /// The destination the core sees for received datagrams (see
    /// [`Shard::recv_dest`]).
    pub recv_dest: SocketAddr,
    pub config: SfuConfig,
    pub commands: mpsc::Receiver<Command>,
    /// Every shard's command queue, by index (mesh control messages cross
    /// here). Weak: a shard stops when every handle's sender is gone, so
    /// the shards must not keep each other's (or their own) queues open.
    pub siblings: Arc<[mpsc::WeakSender<Command>]>,
    pub events: broadcast::Sender<SfuEvent>,
    pub counters: ShardCounters,
    pub stats: Arc<ShardStats>,
}

/// Starts the shard's thread; it runs until every sender of its command
/// queue is gone.
pub(super) fn start(s: ShardStart) -> std::io::Result<std::thread::JoinHandle<()>> {
    let i = s.index;
    std::thread::Builder::new()
        .stack_size(SHARD_STACK)
        .name(format!("ridge-shard-{i}"))
        .spawn(move || {
            if let Some(core) = s.core
                && !core_affinity::set_for_current(core)
            {
                tracing::warn!(shard = i, ?core, "cannot pin the shard thread to its core");
            }
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(shard = i, error = %e, "cannot start the shard runtime");
                    return;
                }
            };
            // Unconstrained: tokio's cooperative budget would make the
            // socket's readiness return Pending after 128 polls and
            // defer the shard's waker (into a list that allocates as it
            // grows). The shard paces itself: one receive batch per
            // turn, timers and commands first.
            rt.block_on(tokio::task::unconstrained(async move {
                let fd = match ridge_io::register_readiness(s.io.as_ref()) {
                    Ok(fd) => fd,
                    Err(e) => {
                        tracing::error!(shard = i, error = %e, "cannot register the media socket");
                        return;
                    }
                };
                Shard {
                    recv_dest: s.recv_dest,
                    io: s.io,
                    sfu: Sfu::new(s.config, Instant::now()),
                    sends: SendQueue::new(),
                    local: LocalSinks::default(),
                    events: s.events,
                    counters: s.counters,
                    stats: s.stats,
                    siblings: s.siblings,
                }
                .run(&fd, s.commands)
                .await;
            }));
        })
}

struct Shard {
    /// The destination the core sees for received datagrams: the socket's
    /// address, or for a wildcard bind (`0.0.0.0`) the first advertised
    /// candidate, since WebRTC's ICE matches checks to a candidate address.
    recv_dest: SocketAddr,
    io: Box<dyn DatagramIo + Send>,
    sfu: Sfu,
    sends: SendQueue,
    /// The output queues of the shard's local endpoints.
    local: LocalSinks,
    events: broadcast::Sender<SfuEvent>,
    counters: ShardCounters,
    stats: Arc<ShardStats>,
    siblings: Arc<[mpsc::WeakSender<Command>]>,
}

impl Shard {
    async fn run(mut self, fd: &AsyncFd<OwnedFd>, mut commands: mpsc::Receiver<Command>) {
        let mut next_report = Instant::now();
        // Allocations made while executing control commands, which are
        // not part of the packet path.
        let mut control_allocations = 0u64;
        // The first receive arms io_uring's multishot request: until then
        // the ring has nothing to complete and never polls readable.
        self.receive();
        loop {
            self.flush().await;
            self.stats.allocations.store(
                ridge_io::alloc::thread_allocations() - control_allocations,
                Ordering::Relaxed,
            );
            let now = Instant::now();
            if now >= next_report {
                self.report();
                next_report = now + Duration::from_millis(500);
            }
            let deadline = self.sfu.poll_timeout().min(next_report);
            let sleep = tokio::time::sleep_until(deadline.into());
            tokio::select! {
                biased;
                cmd = commands.recv() => {
                    let Some(cmd) = cmd else {
                        // Every handle is gone: the node is shutting down.
                        self.sfu.close_all(Instant::now());
                        self.flush().await;
                        return;
                    };
                    let before = ridge_io::alloc::thread_allocations();
                    self.command(cmd, Instant::now());
                    control_allocations += ridge_io::alloc::thread_allocations() - before;
                }
                // Timers before more input, or a busy socket starves them.
                _ = sleep => self.sfu.handle_timeout(Instant::now()),
                guard = fd.readable() => {
                    let Ok(mut guard) = guard else {
                        tracing::error!("media socket readiness failed; shard stops");
                        return;
                    };
                    if self.receive() {
                        guard.clear_ready();
                    }
                }
            }
        }
    }

    /// Runs one command: a control call on the core, a mesh control
    /// message from another shard, or a local-endpoint request.
    fn command(&mut self, cmd: Command, now: Instant) {
        match cmd {
            Command::Call(call) => call(&mut self.sfu, now),
            Command::MeshControl(m) => {
                self.sfu
                    .handle_mesh_control(now, &m.link, m.source, &m.rtcp);
            }
            Command::Local(l) => self.local.run(l, &mut self.sfu, now, &self.stats),
        }
    }

    /// Receives one batch straight into the core's packet pool and routes
    /// it; the loop flushes the resulting sends before the next batch, so a
    /// fan-out burst stays bounded. Returns true once the socket is empty.
    fn receive(&mut self) -> bool {
        let local = self.recv_dest;
        let mut meta = [RecvMeta::default(); MAX_BATCH];
        let io = &mut self.io;
        let got = self
            .sfu
            .packet_pool()
            .recv_slots(MAX_BATCH, |bufs| io.recv(bufs, &mut meta));
        let n = match got {
            Ok(0) => return true,
            Ok(n) => n,
            Err(e) => {
                self.counters.udp_recv_errors.inc();
                tracing::error!(error = %e, "media socket receive failed");
                return true;
            }
        };
        // Freeze the whole batch before routing: routing may take further
        // slots from the pool.
        let pool = self.sfu.packet_pool();
        let packets: [Option<PacketBuf>; MAX_BATCH] =
            std::array::from_fn(|i| (i < n).then(|| pool.freeze(i, meta[i].len)));
        let now = Instant::now();
        for (packet, m) in packets.into_iter().zip(&meta).take(n) {
            let Some(packet) = packet else { continue };
            if m.truncated {
                self.stats.truncated.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            self.sfu.handle_packet(now, m.source, local, packet);
        }
        false
    }

    /// Takes what the core has queued: transmits into the send queue, events to
    /// the node's subscribers, mesh control messages to the shard that owns
    /// their room.
    fn take_outputs(&mut self) {
        while let Some(out) = self.sfu.poll_output() {
            match out {
                Output::Transmit(t) => self.sends.push(t),
                Output::Event(e) => {
                    tracing::debug!(event = ?e, "core event");
                    let _ = self.events.send(e);
                }
                Output::Local(o) => self.local.deliver(o, &self.stats),
                Output::MeshControl(m) => {
                    // Control traffic (a few per second per room), not
                    // media: a full queue drops it and the sender retries.
                    if let Some(tx) = self
                        .siblings
                        .get(usize::from(m.shard))
                        .and_then(mpsc::WeakSender::upgrade)
                        && tx.try_send(Command::MeshControl(m)).is_err()
                    {
                        tracing::debug!("a shard's command queue is full; mesh message dropped");
                    }
                }
            }
        }
    }

    /// Sends everything the core has queued, in batches; waits (bounded) on
    /// a full socket, then gives up on what is left and counts it.
    async fn flush(&mut self) {
        let mut waited = Duration::ZERO;
        loop {
            self.take_outputs();
            if self.sends.is_empty() {
                return;
            }
            let sent = self
                .sends
                .send_window(self.io.as_mut(), &mut self.sfu, &self.counters);
            if sent == 0 {
                // The socket is full: give the kernel a moment, bounded.
                self.stats.send_blocked.fetch_add(1, Ordering::Relaxed);
                if waited >= SEND_PATIENCE {
                    let n = self.sends.discard(&mut self.sfu);
                    self.stats.send_dropped.fetch_add(n, Ordering::Relaxed);
                    self.counters.udp_send_errors.inc_by(n);
                    return;
                }
                let pause = Duration::from_micros(200);
                tokio::time::sleep(pause).await;
                waited += pause;
            }
        }
    }

    /// Publishes the shard's counters for `/metrics`.
    fn report(&mut self) {
        self.local.prune(&self.sfu);
        let s = &self.stats;
        let pool = self.sfu.packet_pool().stats();
        s.pool_slots.store(pool.slots as u64, Ordering::Relaxed);
        s.pool_grown.store(pool.grown, Ordering::Relaxed);
        let io = self.io.stats();
        s.ring_exhausted.store(io.ring_exhausted, Ordering::Relaxed);
        s.socket_errors.store(io.socket_errors, Ordering::Relaxed);
        s.gso_sends.store(io.gso_sends, Ordering::Relaxed);
        s.gso_datagrams.store(io.gso_datagrams, Ordering::Relaxed);
    }
}
