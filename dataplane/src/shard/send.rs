//! The shard's outgoing side: transmits the core produced, queued until the
//! socket takes them, handed over in large batches with each destination's
//! datagrams next to each other (so one UDP GSO send carries a run).

use std::collections::VecDeque;
use std::net::SocketAddr;

use ridge_io::DatagramIo;
use ridge_sfu::{Sfu, Transmit};

use super::stats::ShardCounters;

/// Transmits handed to the socket per send call: a whole received batch
/// of a 1→32 fan-out (64 × 32), so that after [`group_by_destination`] each
/// subscriber's packets of that batch form one GSO run. Measured with
/// `ridge-bench fanout` (1→50): 512 gave runs of 9.5 datagrams and 0.82 µs
/// of node CPU per packet out, 2048 runs of 31 and 0.69 µs
/// (docs/benchmarks.md). A window this large is batched on the shard
/// thread's stack (about 150 KiB; see the thread's `SHARD_STACK`); its
/// grouping keys live in a per-shard scratch ([`GroupKeys`]).
pub(super) const SEND_WINDOW: usize = 2048;

/// A cheap key equal for equal destinations (collisions only cost a GSO
/// run, never order: runs also end where the address changes).
fn destination_key(a: &SocketAddr) -> u64 {
    match a {
        SocketAddr::V4(v4) => (u64::from(v4.ip().to_bits()) << 16) | u64::from(v4.port()),
        SocketAddr::V6(v6) => {
            let b = v6.ip().to_bits();
            ((b as u64) ^ ((b >> 64) as u64)).rotate_left(16) ^ u64::from(v6.port())
        }
    }
}

/// Scratch for [`group_by_destination`]: one `(key, index)` pair per
/// transmit of a window, allocated once per shard so that a flush does not
/// clear a [`SEND_WINDOW`]-sized array on its stack each time.
type GroupKeys = Box<[(u64, u16); SEND_WINDOW]>;

/// Reorders `window` so that transmits to one destination are adjacent,
/// keeping each destination's own order (and so each stream's). Order
/// across destinations carries no meaning. In place, without allocating:
/// sorts `(key, index)` pairs in `keys` and applies the permutation by
/// following its cycles. Windows that are already grouped (a 1:1 relay)
/// are left alone.
fn group_by_destination(window: &mut [Transmit], keys: &mut [(u64, u16); SEND_WINDOW]) {
    let n = window.len().min(SEND_WINDOW);
    for (i, (k, t)) in keys.iter_mut().zip(window.iter()).enumerate() {
        *k = (destination_key(&t.destination), i as u16);
    }
    let keys = &mut keys[..n];
    if keys.windows(2).all(|w| w[0].0 == w[1].0) {
        return;
    }
    keys.sort_unstable();
    // Position k must receive the transmit now at keys[k].1.
    for i in 0..n {
        let mut k = i;
        loop {
            let src = usize::from(keys[k].1);
            keys[k].1 = k as u16;
            if src == i {
                break;
            }
            window.swap(k, src);
            k = src;
        }
    }
}

/// Transmits of a flush up to which the send batch is a small stack array:
/// a 1:1 relay's received batch, or a fan-out of it to a couple of
/// subscribers. Larger windows use a [`SEND_WINDOW`] array. Each array is
/// built whole on every flush (about 70 bytes per entry), so sizing it to
/// the window keeps a relay's flush from writing ~140 KiB of stack for 32
/// datagrams (it removes work; no gain was measurable above the 2-core
/// VM's noise, see docs/benchmarks.md).
const SMALL_WINDOW: usize = 64;

/// Hands the first `window` pending transmits to the socket as one batch
/// of at most `N`; returns how many it accepted.
fn send_window<const N: usize>(
    io: &mut (dyn DatagramIo + Send),
    pending: &VecDeque<Transmit>,
    window: usize,
) -> Result<usize, ridge_io::IoError> {
    let empty = ridge_io::Transmit::new(io.local_addr(), &[]);
    let mut batch = [empty; N];
    let k = window.min(N);
    for (slot, t) in batch.iter_mut().zip(pending.iter()).take(k) {
        *slot = match &t.payload {
            Some(p) => ridge_io::Transmit {
                destination: t.destination,
                prefix: &t.contents,
                contents: p.as_slice(),
                suffix: t.trailer.as_slice(),
                segment_size: None,
            },
            None => ridge_io::Transmit::new(t.destination, &t.contents),
        };
    }
    io.send(&batch[..k])
}

/// Transmits taken from the core, not yet accepted by the socket.
pub(super) struct SendQueue {
    pending: VecDeque<Transmit>,
    group_keys: GroupKeys,
}

impl SendQueue {
    pub(super) fn new() -> Self {
        SendQueue {
            pending: VecDeque::with_capacity(4096),
            group_keys: Box::new([(0, 0); SEND_WINDOW]),
        }
    }

    pub(super) fn push(&mut self, t: Transmit) {
        self.pending.push_back(t);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Hands the next window of pending transmits to the socket as one
    /// batch and returns their buffers to the core's pool; returns how many
    /// the socket accepted (0: it is full). A failed send gives up on the
    /// whole window and counts it in `udp_send_errors`.
    pub(super) fn send_window(
        &mut self,
        io: &mut (dyn DatagramIo + Send),
        sfu: &mut Sfu,
        counters: &ShardCounters,
    ) -> usize {
        // Datagrams to one destination next to each other, so that the I/O
        // layer sends each run with one GSO send (pointless when GSO is off
        // or the kernel refused it).
        let window = self.pending.len().min(SEND_WINDOW);
        if io.max_gso_segments() > 1 {
            group_by_destination(
                &mut self.pending.make_contiguous()[..window],
                &mut self.group_keys,
            );
        }
        let result = if window <= SMALL_WINDOW {
            send_window::<SMALL_WINDOW>(io, &self.pending, window)
        } else {
            send_window::<SEND_WINDOW>(io, &self.pending, window)
        };
        let sent = match result {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "media socket send failed");
                counters.udp_send_errors.inc_by(window as u64);
                window
            }
        };
        for _ in 0..sent {
            if let Some(t) = self.pending.pop_front() {
                sfu.recycle(t.contents);
            }
        }
        sent
    }

    /// Gives up on every pending transmit, returning its buffer to the
    /// pool; returns how many there were.
    pub(super) fn discard(&mut self, sfu: &mut Sfu) -> u64 {
        let n = self.pending.len() as u64;
        while let Some(t) = self.pending.pop_front() {
            sfu.recycle(t.contents);
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(port: u16, tag: u16) -> Transmit {
        Transmit {
            source: SocketAddr::from(([127, 0, 0, 1], 1)),
            destination: SocketAddr::from(([127, 0, 0, 1], port)),
            contents: tag.to_be_bytes().to_vec(),
            payload: None,
            trailer: ridge_sfu::Trailer::default(),
        }
    }

    fn tags(w: &[Transmit]) -> Vec<(u16, u16)> {
        w.iter()
            .map(|t| {
                let tag = u16::from_be_bytes([t.contents[0], t.contents[1]]);
                (t.destination.port(), tag)
            })
            .collect()
    }

    #[test]
    fn grouping_keeps_each_destinations_order() {
        // A 1→50 fan-out of 10 packets: packet-major order in, destination
        // runs out, each run in packet order.
        let mut w: Vec<Transmit> = (0..10)
            .flat_map(|p| (0..50).map(move |d| to(1000 + d, p)))
            .collect();
        group_by_destination(&mut w, &mut Box::new([(0, 0); SEND_WINDOW]));
        let got = tags(&w);
        for (run, chunk) in got.chunks(10).enumerate() {
            let port = chunk[0].0;
            assert!(
                chunk.iter().all(|&(d, _)| d == port),
                "run {run}: {chunk:?}"
            );
            let order: Vec<u16> = chunk.iter().map(|&(_, p)| p).collect();
            assert_eq!(order, (0..10).collect::<Vec<_>>(), "run {run}");
        }
        let mut ports: Vec<u16> = got.iter().map(|&(d, _)| d).collect();
        ports.dedup();
        assert_eq!(ports.len(), 50, "each destination in exactly one run");
    }

    #[test]
    fn grouping_is_a_permutation_on_random_windows() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for len in [0usize, 1, 2, 3, 17, 64, 300, SEND_WINDOW] {
            let mut w: Vec<Transmit> = (0..len)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    to(1000 + (x % 7) as u16, i as u16)
                })
                .collect();
            let before = tags(&w);
            group_by_destination(&mut w, &mut Box::new([(0, 0); SEND_WINDOW]));
            let after = tags(&w);
            let mut a = after.clone();
            let mut b = before.clone();
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b, "len {len}: not a permutation");
            for port in 1000..1007 {
                let seq = |v: &[(u16, u16)]| -> Vec<u16> {
                    v.iter().filter(|e| e.0 == port).map(|e| e.1).collect()
                };
                assert_eq!(seq(&after), seq(&before), "len {len}, port {port}");
            }
            let mut ports: Vec<u16> = after.iter().map(|&(d, _)| d).collect();
            ports.dedup();
            let mut distinct = ports.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(ports.len(), distinct.len(), "len {len}: split runs");
        }
    }

    #[test]
    fn destination_keys_tell_addresses_apart() {
        let a: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let b: SocketAddr = "10.0.0.1:5001".parse().unwrap();
        let c: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        let d: SocketAddr = "[2001:db8::1]:5000".parse().unwrap();
        let e: SocketAddr = "[2001:db8::2]:5000".parse().unwrap();
        let keys = [a, b, c, d, e].map(|x| destination_key(&x));
        let mut distinct = keys.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), keys.len());
    }
}
