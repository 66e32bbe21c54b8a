//! Connection limits against a real `ridge-scheduler` on loopback: idle and
//! half-sent connections are capped per source and closed on time, the
//! accept loop survives running out of descriptors, and a node's long
//! polls are capped.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The DER of the first certificate in `pem`.
fn der(pem: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(pem).unwrap();
    let b64: String = text
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

fn tls_connector(ca: &[u8]) -> tokio_rustls::TlsConnector {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(der(ca)))
        .unwrap();
    let cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

async fn connect_from(src: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(src.into(), 0))?;
    s.connect(to).await
}

/// Waits until the peer closes (EOF or reset); returns when, or `None`
/// after `limit`.
async fn closed_within<R: AsyncReadExt + Unpin>(mut r: R, limit: Duration) -> Option<Instant> {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match r.read(&mut buf).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// The value of one sample in OpenMetrics text (`name{labels}` exactly).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .map(|v| v.trim().parse::<f64>().unwrap())
        })
        .unwrap_or(0.0)
}

/// A bounded GET that must be answered.
async fn answered(c: &ridge_scheduler::client::Client, path: &str, limit: Duration) -> Option<u16> {
    match tokio::time::timeout(limit, c.get(path, Some(ADMIN))).await {
        Ok(Ok(r)) => Some(r.status.as_u16()),
        _ => None,
    }
}

/// What an attacking connection does after connecting.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// Nothing: no TLS handshake.
    SilentTcp,
    /// A TLS handshake, then nothing.
    SilentTls,
    /// A TLS handshake and half a request head.
    HalfHead,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_and_half_sent_connections_are_capped_and_closed() {
    let dir = TempDir::new("limits");
    let ca = write_cert(dir.path());
    let db = format!("sqlite:{}", dir.path().join("s.db").display());
    // 256 descriptors: the total cap defaults to 256 - 64 = 192; 10 sources
    // at 16 each can hold 160 of them.
    let sched = Sched::start_limited(
        dir.path(),
        &db,
        &[
            "--tls-handshake-timeout",
            "2s",
            "--header-read-timeout",
            "2s",
            "--idle-timeout",
            "3s",
            "--max-connections-per-source",
            "16",
        ],
        Some(256),
    );
    let addr: SocketAddr = sched.url.strip_prefix("https://").unwrap().parse().unwrap();
    let tls = tls_connector(&ca);
    let server_name = rustls::pki_types::ServerName::try_from("localhost").unwrap();

    // 500 connections from 127.0.0.2 ..= 127.0.0.11, each watched until
    // the scheduler closes it.
    let mut watchers = Vec::new();
    for i in 0..500u32 {
        let src = Ipv4Addr::new(127, 0, 0, 2 + u8::try_from(i % 10).unwrap());
        let kind = [Kind::SilentTcp, Kind::SilentTls, Kind::HalfHead][(i % 3) as usize];
        let tls = tls.clone();
        let server_name = server_name.clone();
        watchers.push(tokio::spawn(async move {
            let opened = Instant::now();
            let Ok(tcp) = connect_from(src, addr).await else {
                return (kind, opened, Some(Instant::now()));
            };
            let limit = Duration::from_secs(30);
            let closed = match kind {
                Kind::SilentTcp => closed_within(tcp, limit).await,
                Kind::SilentTls | Kind::HalfHead => match tls.connect(server_name, tcp).await {
                    // Refused at accept: closed before the handshake.
                    Err(_) => Some(Instant::now()),
                    Ok(mut s) => {
                        if matches!(kind, Kind::HalfHead) {
                            let _ = s
                                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthor")
                                .await;
                            let _ = s.flush().await;
                        }
                        closed_within(s, limit).await
                    }
                },
            };
            (kind, opened, closed)
        }));
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // While they are held, requests from another source are answered.
    let c = client(&sched.url, &ca);
    let t = Instant::now();
    for _ in 0..5 {
        assert_eq!(
            answered(&c, "/healthz", Duration::from_secs(5)).await,
            Some(200),
            "a request while 500 connections are held; log:\n{}",
            sched.log()
        );
    }
    assert!(t.elapsed() < Duration::from_secs(10));

    let mut held_long = 0;
    for w in watchers {
        let (kind, opened, closed) = w.await.unwrap();
        let closed = closed.unwrap_or_else(|| {
            panic!(
                "a {kind:?} connection was still open 30 s after it was opened; log:\n{}",
                sched.log()
            )
        });
        let held = closed.duration_since(opened);
        // 2 s timeouts, checked every 0.5 s, plus 1 s to close cleanly and
        // slack for a loaded machine.
        assert!(held < Duration::from_secs(8), "{kind:?} held for {held:?}");
        if held >= Duration::from_millis(1500) {
            held_long += 1;
        }
    }
    // The admitted ones (16 per source) lasted until their timeout.
    assert!(
        (100..=192).contains(&held_long),
        "{held_long} connections lasted until a timeout"
    );
    let m = c.get("/metrics", Some(ADMIN)).await.unwrap().body;
    assert!(
        sample(
            &m,
            "ridge_scheduler_connections_refused_total{reason=\"per_source\"}"
        ) >= 300.0,
        "{m}"
    );
    for phase in ["tls_handshake", "header"] {
        assert!(
            sample(
                &m,
                &format!("ridge_scheduler_connection_timeouts_total{{phase=\"{phase}\"}}")
            ) >= 30.0,
            "{phase}: {m}"
        );
    }
    // Still serving afterwards.
    assert_eq!(
        answered(&c, "/healthz", Duration::from_secs(5)).await,
        Some(200)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn accept_loop_survives_descriptor_exhaustion() {
    let dir = TempDir::new("emfile");
    let ca = write_cert(dir.path());
    let db = format!("sqlite:{}", dir.path().join("s.db").display());
    // Caps far above the 64 descriptors: accept runs out of them.
    let sched = Sched::start_limited(
        dir.path(),
        &db,
        &[
            "--tls-handshake-timeout",
            "1s",
            "--header-read-timeout",
            "1s",
            "--max-connections",
            "1000",
            "--max-connections-per-source",
            "1000",
        ],
        Some(64),
    );
    let addr: SocketAddr = sched.url.strip_prefix("https://").unwrap().parse().unwrap();
    let mut held = Vec::new();
    for _ in 0..150 {
        held.push(
            connect_from(Ipv4Addr::new(127, 0, 0, 2), addr)
                .await
                .unwrap(),
        );
    }
    let watchers: Vec<_> = held
        .into_iter()
        .map(|s| tokio::spawn(closed_within(s, Duration::from_secs(40))))
        .collect();
    // Requests are answered again once the timeouts free descriptors.
    let c = client(&sched.url, &ca);
    let ok = eventually(Duration::from_secs(30), || async {
        (answered(&c, "/healthz", Duration::from_secs(3)).await == Some(200)).then_some(())
    })
    .await;
    assert!(ok.is_some(), "never answered again; log:\n{}", sched.log());
    for w in watchers {
        assert!(
            w.await.unwrap().is_some(),
            "a silent connection was never closed; log:\n{}",
            sched.log()
        );
    }
    assert_eq!(
        answered(&c, "/healthz", Duration::from_secs(5)).await,
        Some(200)
    );
    let m = c.get("/metrics", Some(ADMIN)).await.unwrap().body;
    assert!(
        sample(&m, "ridge_scheduler_accept_errors_total{kind=\"emfile\"}") >= 1.0,
        "{m}"
    );
    let log = sched.log();
    assert!(log.contains("accept failed"), "{log}");
    // Rate-limited: far fewer lines than failed accepts.
    assert!(log.matches("accept failed").count() <= 5, "{log}");
}

/// Reads from `s` until a full response head has arrived; returns it.
async fn read_head<R: AsyncReadExt + Unpin>(s: &mut R) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed before a response: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_get_408_and_idle_keep_alive_connections_close() {
    let dir = TempDir::new("slow");
    let ca = write_cert(dir.path());
    let db = format!("sqlite:{}", dir.path().join("s.db").display());
    let sched = Sched::start(
        dir.path(),
        &db,
        &[
            "--request-body-timeout",
            "1s",
            "--idle-timeout",
            "2s",
            "--header-read-timeout",
            "20s",
        ],
    );
    let addr: SocketAddr = sched.url.strip_prefix("https://").unwrap().parse().unwrap();
    let tls = tls_connector(&ca);
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();

    // A body that never finishes: 408, and the connection closes.
    let tcp = connect_from(Ipv4Addr::LOCALHOST, addr).await.unwrap();
    let mut s = tls.connect(name.clone(), tcp).await.unwrap();
    s.write_all(
        b"POST /v1/enroll HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100\r\n\r\n{\"bootstrap",
    )
    .await
    .unwrap();
    let t = Instant::now();
    let head = tokio::time::timeout(Duration::from_secs(10), read_head(&mut s))
        .await
        .expect("no answer to a stalled body");
    assert!(head.starts_with("HTTP/1.1 408"), "{head}");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert!(
        closed_within(s, Duration::from_secs(5)).await.is_some(),
        "still open after a 408"
    );

    // A keep-alive connection after its request: closed by the idle
    // timeout, long before the header timeout.
    let tcp = connect_from(Ipv4Addr::LOCALHOST, addr).await.unwrap();
    let mut s = tls.connect(name, tcp).await.unwrap();
    s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let t = Instant::now();
    assert!(
        closed_within(s, Duration::from_secs(10)).await.is_some(),
        "an idle keep-alive connection stayed open"
    );
    let held = t.elapsed();
    assert!(
        held >= Duration::from_millis(1500) && held < Duration::from_secs(6),
        "{held:?}"
    );
    let c = client(&sched.url, &ca);
    let m = c.get("/metrics", Some(ADMIN)).await.unwrap().body;
    assert!(
        sample(
            &m,
            "ridge_scheduler_connection_timeouts_total{phase=\"body\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(
        sample(
            &m,
            "ridge_scheduler_connection_timeouts_total{phase=\"idle\"}"
        ) >= 1.0,
        "{m}"
    );
    assert!(
        sample(&m, "ridge_scheduler_errors_total{code=\"request_timeout\"}") >= 1.0,
        "{m}"
    );
}
