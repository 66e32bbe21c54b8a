//! Do zero-copy sends pay for the node's datagrams? One thread sends
//! batches of 32 datagrams to a loopback receiver and drains it, for each
//! way of sending, alternating the ways over rounds:
//!
//! - `sendmmsg-gso`: ridge-io's mmsg backend as the shards use it: the 32
//!   equal-sized datagrams to one destination leave as one `UDP_SEGMENT`
//!   send, gathered from their buffers;
//! - `sendmmsg`: the same with GSO off, one datagram per message;
//! - `uring-sendmsg`: 32 unlinked io_uring `SendMsg`s per submit;
//! - `uring-send-zc`: 32 `SEND_ZC`s per submit; each buffer is reusable at
//!   its notification, which the batch waits for;
//! - `uring-send-zc-fixed`: the same from registered (fixed) buffers;
//! - `uring-sendmsg-zc-gso`: one `SENDMSG_ZC` of the 32 slots as one
//!   `UDP_SEGMENT` run, the zero-copy twin of `sendmmsg-gso`.
//!
//! It prints datagrams/s, the thread's CPU µs per datagram (send and
//! receive together: the receive side is the same for every way) and, for
//! `SEND_ZC`, how many sends the kernel reported as copied after all
//! (`IORING_SEND_ZC_REPORT_USAGE`).
//!
//! `cargo run --release -p ridge-io --example zerocopy_send [-- --seconds S --rounds R]`

#![allow(clippy::print_stdout)]

use std::net::{SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, types};
use ridge_io::{BackendChoice, DatagramIo, RecvMeta, SocketOptions, Transmit, bind, probe_uring};

const BATCH: usize = 32;
const SLOT: usize = 2048;
/// `IORING_SEND_ZC_REPORT_USAGE`: the notification says whether the kernel
/// copied after all.
const ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED`, in a notification's `res`.
const ZC_COPIED: i32 = i32::MIN;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Way {
    SendmmsgGso,
    Sendmmsg,
    UringSendmsg,
    UringSendZc,
    UringSendZcFixed,
    UringSendmsgZcGso,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Way::SendmmsgGso => "sendmmsg-gso",
            Way::Sendmmsg => "sendmmsg",
            Way::UringSendmsg => "uring-sendmsg",
            Way::UringSendZc => "uring-send-zc",
            Way::UringSendZcFixed => "uring-send-zc-fixed",
            Way::UringSendmsgZcGso => "uring-sendmsg-zc-gso",
        }
    }
}

struct Outcome {
    sent: u64,
    received: u64,
    secs: f64,
    cpu_secs: f64,
    zc_sends: u64,
    zc_copied: u64,
}

fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into `ts`, a live local.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn drain(rx: &mut (dyn DatagramIo + Send), storage: &mut [Vec<u8>], meta: &mut [RecvMeta]) -> u64 {
    let mut got = 0;
    loop {
        let mut bufs: Vec<&mut [u8]> = storage.iter_mut().map(|b| b.as_mut_slice()).collect();
        let n = rx.recv(&mut bufs, meta).expect("recv");
        got += n as u64;
        if n == 0 {
            return got;
        }
    }
}

fn sockaddr(a: SocketAddr) -> libc::sockaddr_in {
    let SocketAddr::V4(v4): SocketAddr = a else {
        panic!("IPv4 only");
    };
    let v4: SocketAddrV4 = v4;
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn run(way: Way, size: usize, seconds: f64) -> Outcome {
    let opts = SocketOptions {
        recv_buffer_size: Some(8 << 20),
        send_buffer_size: Some(8 << 20),
        ..SocketOptions::default()
    };
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let mut rx = bind(any, BackendChoice::Mmsg, &opts).expect("bind the receiver");
    let tx_opts = SocketOptions {
        gso: way == Way::SendmmsgGso,
        ..opts.clone()
    };
    let mut tx = bind(any, BackendChoice::Mmsg, &tx_opts).expect("bind the sender");
    let dest = rx.local_addr();
    let dest_sa = sockaddr(dest);
    // One slot per datagram of a batch, in one region (registered for the
    // fixed way).
    let mut region = vec![0x5au8; BATCH * SLOT];
    let mut ring = IoUring::new(4 * BATCH as u32).expect("io_uring");
    if way == Way::UringSendZcFixed {
        let iov = libc::iovec {
            iov_base: region.as_mut_ptr().cast(),
            iov_len: region.len(),
        };
        // SAFETY: `region` outlives the ring (declared before it, dropped
        // after it) and is neither moved nor resized while registered.
        unsafe { ring.submitter().register_buffers(&[iov]) }.expect("register buffers");
    }
    let mut iovs: Vec<libc::iovec> = (0..BATCH)
        .map(|i| libc::iovec {
            // SAFETY: i * SLOT + size stays inside `region`.
            iov_base: unsafe { region.as_mut_ptr().add(i * SLOT) }.cast(),
            iov_len: size,
        })
        .collect();
    let hdrs: Vec<libc::msghdr> = iovs
        .iter_mut()
        .map(|iov| {
            // SAFETY: msghdr is plain data; all-zero is valid.
            let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
            h.msg_name = (&dest_sa as *const libc::sockaddr_in).cast_mut().cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = iov;
            h.msg_iovlen = 1;
            h
        })
        .collect();
    // One message of 32 datagrams as a UDP_SEGMENT run, from one contiguous
    // buffer: gathered from 32 iovecs (as the shards' sends are), SENDMSG_ZC
    // fails with EMSGSIZE (`--gathered` shows it): a zero-copy skb takes at
    // most MAX_SKB_FRAGS (17) iovecs.
    let gathered = std::env::args().any(|a| a == "--gathered");
    let mut run_buf = vec![0x5au8; BATCH * size];
    let mut run_iov = libc::iovec {
        iov_base: run_buf.as_mut_ptr().cast(),
        iov_len: run_buf.len(),
    };
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data; all-zero is valid.
    let mut gso_hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    gso_hdr.msg_name = (&dest_sa as *const libc::sockaddr_in).cast_mut().cast();
    gso_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    if gathered {
        gso_hdr.msg_iov = iovs.as_mut_ptr();
        gso_hdr.msg_iovlen = BATCH as _;
    } else {
        gso_hdr.msg_iov = &mut run_iov;
        gso_hdr.msg_iovlen = 1;
    }
    gso_hdr.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE computes a size.
    gso_hdr.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
    // SAFETY: `control` holds CMSG_SPACE(2) bytes, aligned for cmsghdr; the
    // first header and its 2 data bytes lie inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&gso_hdr);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(2) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), size as u16);
    }
    let payload = vec![0x5au8; size];
    let batch = vec![
        Transmit {
            prefix: &[],
            suffix: &[],
            destination: dest,
            contents: &payload,
            segment_size: None,
        };
        BATCH
    ];
    // The mmsg backend's `raw_fd()` is its socket.
    let fd = types::Fd(tx.raw_fd());
    let mut storage = vec![vec![0u8; SLOT]; 64];
    let mut meta = vec![RecvMeta::default(); 64];
    let (mut sent, mut received, mut zc_sends, mut zc_copied) = (0u64, 0u64, 0u64, 0u64);
    let mut errors = 0u32;
    let (start, cpu0) = (Instant::now(), thread_cpu());
    while start.elapsed() < Duration::from_secs_f64(seconds) {
        match way {
            Way::SendmmsgGso | Way::Sendmmsg => sent += tx.send(&batch).expect("send") as u64,
            Way::UringSendmsgZcGso => {
                let e = opcode::SendMsgZc::new(fd, &gso_hdr)
                    .flags(libc::MSG_DONTWAIT as u32)
                    .build()
                    .user_data(0);
                // SAFETY: the msghdr, its iovecs, control data, name and
                // slots live until the send's notification is reaped below.
                unsafe { ring.submission().push(&e) }.expect("submission queue room");
                let (mut result, mut notif_due) = (false, false);
                while !result || notif_due {
                    ring.submit_and_wait(1).expect("io_uring_enter");
                    for c in ring.completion() {
                        if cqueue::notif(c.flags()) {
                            notif_due = false;
                            zc_sends += 1;
                            if c.result() & ZC_COPIED != 0 {
                                zc_copied += 1;
                            }
                            continue;
                        }
                        result = true;
                        if c.result() >= 0 {
                            sent += BATCH as u64;
                        } else if errors == 0 {
                            errors += 1;
                            println!(
                                "SENDMSG_ZC with UDP_SEGMENT failed: {}",
                                std::io::Error::from_raw_os_error(-c.result())
                            );
                        }
                        notif_due = cqueue::more(c.flags());
                    }
                }
            }
            Way::UringSendmsg => {
                for (i, h) in hdrs.iter().enumerate() {
                    let e = opcode::SendMsg::new(fd, h)
                        .flags(libc::MSG_DONTWAIT as u32)
                        .build()
                        .user_data(i as u64);
                    // SAFETY: the msghdr, its iovec, name and slot live until
                    // the batch's completions are reaped below.
                    unsafe { ring.submission().push(&e) }.expect("submission queue room");
                }
                ring.submit_and_wait(BATCH).expect("io_uring_enter");
                for c in ring.completion() {
                    if c.result() >= 0 {
                        sent += 1;
                    }
                }
            }
            Way::UringSendZc | Way::UringSendZcFixed => {
                for (i, iov) in iovs.iter().enumerate() {
                    let mut e = opcode::SendZc::new(fd, iov.iov_base.cast(), size as u32)
                        .dest_addr((&dest_sa as *const libc::sockaddr_in).cast())
                        .dest_addr_len(std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
                        .flags(libc::MSG_DONTWAIT)
                        .zc_flags(ZC_REPORT_USAGE);
                    if way == Way::UringSendZcFixed {
                        e = e.buf_index(Some(0));
                    }
                    // SAFETY: the slot and the address live until the
                    // send's notification is reaped below.
                    unsafe { ring.submission().push(&e.build().user_data(i as u64)) }
                        .expect("submission queue room");
                }
                // Every send's result, then a notification for each that
                // asked for one: only then may the slots be written again.
                let (mut results, mut notifs_due) = (0, 0);
                while results < BATCH || notifs_due > 0 {
                    ring.submit_and_wait(1).expect("io_uring_enter");
                    for c in ring.completion() {
                        if cqueue::notif(c.flags()) {
                            notifs_due -= 1;
                            zc_sends += 1;
                            if c.result() & ZC_COPIED != 0 {
                                zc_copied += 1;
                            }
                            continue;
                        }
                        results += 1;
                        if c.result() >= 0 {
                            sent += 1;
                        }
                        if cqueue::more(c.flags()) {
                            notifs_due += 1;
                        }
                    }
                }
            }
        }
        received += drain(&mut *rx, &mut storage, &mut meta);
    }
    received += drain(&mut *rx, &mut storage, &mut meta);
    let result = Outcome {
        sent,
        received,
        secs: start.elapsed().as_secs_f64(),
        cpu_secs: thread_cpu() - cpu0,
        zc_sends,
        zc_copied,
    };
    drop(ring);
    drop(region);
    drop(run_buf);
    result
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!(
            "usage: zerocopy_send [--seconds S] [--rounds R] [--gathered]\n  S seconds per run (default 2), R rounds of every way and size (default 3)\n  --gathered: uring-sendmsg-zc-gso from 32 iovecs instead of one buffer"
        );
        return;
    }
    let value = |name: &str, default: f64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |v| v.parse().expect("a number"))
    };
    let (seconds, rounds) = (value("--seconds", 2.0), value("--rounds", 3.0) as usize);
    if let Err(e) = probe_uring() {
        println!("io_uring unavailable ({e}): only sendmmsg can run here");
        return;
    }
    println!(
        "| round | way | size B | datagrams/s sent | received | CPU µs/datagram | SEND_ZC copied |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for round in 1..=rounds {
        for size in [200, 1200] {
            for way in [
                Way::SendmmsgGso,
                Way::Sendmmsg,
                Way::UringSendmsg,
                Way::UringSendZc,
                Way::UringSendZcFixed,
                Way::UringSendmsgZcGso,
            ] {
                let r = run(way, size, seconds);
                let copied = if r.zc_sends > 0 {
                    format!("{} of {}", r.zc_copied, r.zc_sends)
                } else {
                    "-".into()
                };
                println!(
                    "| {round} | {} | {size} | {:.0} | {:.0} | {:.2} | {copied} |",
                    way.name(),
                    r.sent as f64 / r.secs,
                    r.received as f64 / r.secs,
                    r.cpu_secs * 1e6 / r.sent.max(1) as f64,
                );
            }
        }
    }
}
