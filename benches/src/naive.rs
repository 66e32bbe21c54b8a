//! The naive relay baseline: a tokio `UdpSocket` `recv_from` / `send_to`
//! loop on a current-thread runtime on its own thread, forwarding every
//! datagram unchanged to each subscriber (1:1 or 1→N). No parsing, no
//! state: what any relay costs before it does any work. Its socket keeps the
//! kernel's default buffer sizes, as the node's media socket does today.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::thread::JoinHandle;

use anyhow::{Context, Result, anyhow};
use tokio::sync::oneshot;

use crate::placement::Placement;

/// A running naive relay.
#[derive(Debug)]
pub struct NaiveRelay {
    /// Where to send the stream.
    pub addr: SocketAddr,
    /// `/proc/self/task/<tid>/stat` of the relay thread (its CPU time).
    pub stat_path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<u64>>>,
}

impl NaiveRelay {
    /// Starts the relay thread, forwarding to `subscribers`.
    /// The thread runs on `placement`'s node CPUs, as the node would.
    pub fn start(subscribers: Vec<SocketAddr>, placement: Placement) -> Result<NaiveRelay> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(SocketAddr, PathBuf)>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("naive-relay".into())
            .spawn(move || -> Result<u64> {
                placement.enter_node()?;
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(relay(subscribers, ready_tx, stop_rx))
            })
            .context("spawning the naive relay thread")?;
        let (addr, stat_path) = ready_rx
            .recv()
            .map_err(|_| anyhow!("the naive relay thread exited before it was ready"))??;
        Ok(NaiveRelay {
            addr,
            stat_path,
            stop: Some(stop_tx),
            handle: Some(handle),
        })
    }

    /// Stops the relay; returns how many datagrams it received.
    pub fn stop(mut self) -> Result<u64> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<u64> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.handle.take() {
            Some(h) => h
                .join()
                .map_err(|_| anyhow!("the naive relay thread panicked"))?,
            None => Ok(0),
        }
    }
}

impl Drop for NaiveRelay {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

async fn relay(
    subscribers: Vec<SocketAddr>,
    ready: std::sync::mpsc::Sender<Result<(SocketAddr, PathBuf)>>,
    mut stop: oneshot::Receiver<()>,
) -> Result<u64> {
    // Default socket buffers, like the node's media socket: the baseline
    // gets no tuning the node does not have.
    let std_sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    std_sock.set_nonblocking(true)?;
    let sock = tokio::net::UdpSocket::from_std(std_sock)?;
    let addr = sock.local_addr()?;
    // "<pid>/task/<tid>" for the calling thread.
    let task = std::fs::read_link("/proc/thread-self").context("reading /proc/thread-self")?;
    let stat_path = PathBuf::from("/proc").join(task).join("stat");
    let _ = ready.send(Ok((addr, stat_path)));
    let mut buf = vec![0u8; 2048];
    let mut received = 0u64;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            r = sock.recv_from(&mut buf) => {
                let (n, _from) = match r {
                    Ok(x) => x,
                    // ICMP port unreachable from an earlier send_to.
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => continue,
                    Err(e) => return Err(e.into()),
                };
                received += 1;
                for dest in &subscribers {
                    // A full socket buffer or a refused port is loss, not an error.
                    let _ = sock.send_to(&buf[..n], dest).await;
                }
            }
        }
    }
    Ok(received)
}
