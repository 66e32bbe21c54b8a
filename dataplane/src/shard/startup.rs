//! Starting the shards: binds every shard's socket, attaches shared-port
//! steering if asked, and starts one thread per shard.

use std::net::SocketAddr;
use std::sync::Arc;

use ridge_io::{BackendChoice, DatagramIo, IoError, SocketOptions};
use ridge_sfu::SfuConfig;
use tokio::sync::{broadcast, mpsc};

use super::command::Command;
use super::handle::{MediaHandle, ShardLink};
use super::stats::{ShardCounters, ShardStats};
use super::steering::{SharedPort, SteeringError};
use super::thread::{self, ShardStart};

/// Errors starting the shards.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MediaError {
    #[error("cannot bind the media socket: {0}")]
    Bind(#[from] IoError),
    #[error("cannot start a shard thread: {0}")]
    Thread(std::io::Error),
    #[error(transparent)]
    Steering(#[from] SteeringError),
}

/// How to start the shards.
#[derive(Debug, Clone)]
pub struct ShardOptions {
    /// Shard 0's address; shard `i` binds port + `i` (or an ephemeral port
    /// when the port is 0), or this address too when `shared_port`.
    pub udp: SocketAddr,
    pub shards: usize,
    pub pin_cores: bool,
    pub backend: BackendChoice,
    /// UDP GSO: runs of datagrams to one destination leave in one send.
    pub gso: bool,
    /// Every shard on `udp` (with port 0: the port shard 0 got), steered by
    /// BPF. Start-up fails if the steering program cannot be attached.
    pub shared_port: bool,
}

/// Binds every shard's socket and starts the shard threads. `config` is the
/// template for each shard's core; its candidates' ports are replaced by
/// each shard's port. The shards bump `counters` (the node's socket error
/// counters).
pub fn spawn(
    opts: &ShardOptions,
    config: SfuConfig,
    counters: ShardCounters,
) -> Result<(MediaHandle, Vec<std::thread::JoinHandle<()>>), MediaError> {
    let socket_opts = SocketOptions {
        reuse_port: true,
        recv_buffer_size: Some(4 << 20),
        send_buffer_size: Some(4 << 20),
        gso: opts.gso,
        ..SocketOptions::default()
    };
    let mut ios: Vec<Box<dyn DatagramIo + Send>> = Vec::with_capacity(opts.shards);
    for i in 0..opts.shards {
        let addr = match (opts.shared_port, ios.first(), opts.udp.port()) {
            // Shared: every shard on shard 0's address (its port, if 0 was asked).
            (true, Some(first), _) => first.local_addr(),
            (_, _, 0) => opts.udp,
            (_, _, p) => SocketAddr::new(opts.udp.ip(), p + i as u16),
        };
        ios.push(ridge_io::bind(addr, opts.backend, &socket_opts)?);
    }
    let backend = ios[0].backend();
    tracing::info!(shards = opts.shards, ?backend, first = %ios[0].local_addr(), "media shards bound");
    // Every socket of the group exists before the program attaches.
    let shared = if opts.shared_port {
        let fds = ios
            .iter()
            .map(|io| ridge_io::dup_socket(io.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SteeringError::new(format!("duplicating a shard socket: {e}")))?;
        Some(SharedPort::attach(&fds, ios[0].local_addr())?)
    } else {
        None
    };
    let cores = if opts.pin_cores {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
    let (events, _) = broadcast::channel(4096);
    let (senders, mut receivers): (Vec<_>, Vec<_>) =
        (0..opts.shards).map(|_| mpsc::channel(1024)).unzip();
    // Weak: a shard stops when every handle's sender is gone, so the
    // shards must not keep each other's (or their own) queues open.
    let siblings: Arc<[mpsc::WeakSender<Command>]> =
        senders.iter().map(mpsc::Sender::downgrade).collect();
    let mut links = Vec::with_capacity(opts.shards);
    let mut joins = Vec::with_capacity(opts.shards);
    for (i, io) in ios.into_iter().enumerate() {
        let local_addr = io.local_addr();
        let mut config = config.clone();
        config.local_addr = local_addr;
        config.shard = i as u8;
        config.shards = opts.shards.min(255) as u8;
        // Each shard its own stream: its index mixed into the seed.
        config.seed[0] ^= i as u8;
        config.seed[1] ^= (i >> 8) as u8;
        for c in &mut config.candidates {
            c.set_port(local_addr.port());
        }
        let recv_dest = if local_addr.ip().is_unspecified() {
            config
                .candidates
                .iter()
                .find(|c| c.is_ipv4() == local_addr.is_ipv4())
                .copied()
                .unwrap_or(local_addr)
        } else {
            local_addr
        };
        let tx = senders[i].clone();
        let rx = receivers.remove(0);
        let siblings = siblings.clone();
        let stats = Arc::new(ShardStats::default());
        links.push(ShardLink {
            tx,
            local_addr,
            backend,
            stats: stats.clone(),
        });
        let core = (!cores.is_empty()).then(|| cores[i % cores.len()]);
        let join = thread::start(ShardStart {
            index: i,
            core,
            io,
            recv_dest,
            config,
            commands: rx,
            siblings,
            events: events.clone(),
            counters: counters.clone(),
            stats,
        })
        .map_err(MediaError::Thread)?;
        joins.push(join);
    }
    Ok((
        MediaHandle {
            shards: links.into(),
            events,
            shared,
            ledger: config.ledger.clone(),
            quotas: config.quotas,
        },
        joins,
    ))
}
