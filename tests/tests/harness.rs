//! Self-tests of the headless-Chromium driver.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use ridge_tests::Chromium;
use ridge_tests::skip::{chromium_present, require};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_works() {
    if require("eval_works", chromium_present()).is_err() {
        return;
    }
    init_tracing();
    eval_works_inner().await.unwrap_or_else(|e| panic!("{e:#}"));
}

async fn eval_works_inner() -> Result<()> {
    let started = Instant::now();
    let browser = Chromium::launch().await?;
    eprintln!("chromium launched in {:?}", started.elapsed());
    let page = browser.open("data:text/html,<title>x</title>").await?;
    eprintln!("page opened after {:?}", started.elapsed());

    assert_eq!(page.eval("document.title").await?, json!("x"));
    assert_eq!(page.eval("1+2").await?, json!(3));
    assert_eq!(page.eval("Promise.resolve({a:1})").await?, json!({"a": 1}));
    assert_eq!(page.eval("undefined").await?, json!(null));

    let err = page
        .eval("throw new Error('boom')")
        .await
        .expect_err("throw must be an error");
    let msg = format!("{err:#}");
    assert!(msg.contains("boom"), "unexpected error: {msg}");

    let err = page
        .eval("Promise.reject(new Error('rejected-boom'))")
        .await
        .expect_err("rejection must be an error");
    assert!(format!("{err:#}").contains("rejected-boom"), "{err:#}");

    page.eval("console.log('hello', 42); setTimeout(() => { throw new Error('late') }, 0)")
        .await?;
    page.wait_for(
        "new Promise(r => setTimeout(() => r(true), 50))",
        Duration::from_secs(5),
    )
    .await?;
    let console = page.console();
    ensure!(
        console.iter().any(|l| l == "console.log: hello 42"),
        "console: {console:?}"
    );
    ensure!(
        console.iter().any(|l| l.contains("late")),
        "console: {console:?}"
    );

    let err = page
        .wait_for("false", Duration::from_millis(500))
        .await
        .expect_err("wait_for(false) must time out");
    assert!(format!("{err:#}").contains("last value: false"), "{err:#}");

    page.close().await?;

    // Navigation failures surface as errors instead of a load timeout.
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let err = browser
        .open(&format!("http://127.0.0.1:{closed_port}/"))
        .await
        .expect_err("refused connection must fail");
    assert!(
        format!("{err:#}").contains("ERR_CONNECTION_REFUSED"),
        "{err:#}"
    );
    Ok(())
}

const LOOPBACK_PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>loopback</title></head>
<body><video id="v" autoplay muted playsinline></video>
<script>
// pc1 sends the fake camera + microphone to pc2, all inside this page.
function relayCandidates(from, to, name) {
  const queued = [];
  from.onicecandidate = (e) => {
    if (!e.candidate) return;
    if (to.remoteDescription) {
      to.addIceCandidate(e.candidate).catch((err) => console.error(name, 'addIceCandidate', String(err)));
    } else {
      queued.push(e.candidate);
    }
  };
  return async () => { for (const c of queued.splice(0)) await to.addIceCandidate(c); };
}

window.startLoopback = async function () {
  const stream = await navigator.mediaDevices.getUserMedia({
    video: { width: 640, height: 480 },
    audio: true,
  });
  const pc1 = new RTCPeerConnection();
  const pc2 = new RTCPeerConnection();
  window.pcs = [pc1, pc2];
  const flushTo2 = relayCandidates(pc1, pc2, 'pc2');
  const flushTo1 = relayCandidates(pc2, pc1, 'pc1');
  pc2.ontrack = (e) => {
    const v = document.getElementById('v');
    if (!v.srcObject) v.srcObject = e.streams[0];
  };
  for (const t of stream.getTracks()) pc1.addTrack(t, stream);
  const offer = await pc1.createOffer();
  await pc1.setLocalDescription(offer);
  await pc2.setRemoteDescription(offer);
  await flushTo2();
  const answer = await pc2.createAnswer();
  await pc2.setLocalDescription(answer);
  await pc1.setRemoteDescription(answer);
  await flushTo1();
  const video = stream.getVideoTracks();
  return {
    video: video.length,
    audio: stream.getAudioTracks().length,
    settings: video.length ? video[0].getSettings() : null,
  };
};

window.inboundVideo = async function () {
  const stats = await window.pcs[1].getStats();
  let out = null;
  stats.forEach((r) => {
    if (r.type === 'inbound-rtp' && r.kind === 'video') {
      out = { framesDecoded: r.framesDecoded || 0, frameWidth: r.frameWidth, frameHeight: r.frameHeight };
    }
  });
  return out;
};
</script></body></html>
"#;

/// Serves `page` at `/` (404 elsewhere) on 127.0.0.1; returns the base URL.
async fn serve_page(page: &'static str) -> Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let request = String::from_utf8_lossy(&buf);
                let path = request.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = if path == "/" {
                    ("200 OK", page)
                } else {
                    ("404 Not Found", "not found")
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/html; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(response.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    Ok(format!("http://{addr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_camera_and_loopback_webrtc() {
    if require("fake_camera_and_loopback_webrtc", chromium_present()).is_err() {
        return;
    }
    init_tracing();
    fake_camera_and_loopback_webrtc_inner()
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
}

async fn fake_camera_and_loopback_webrtc_inner() -> Result<()> {
    let base = serve_page(LOOPBACK_PAGE).await?;
    let browser = Chromium::launch().await?;
    let page = browser.open(&format!("{base}/")).await?;
    ensure!(
        page.eval("window.isSecureContext").await? == json!(true),
        "http://127.0.0.1 must be a secure context"
    );

    let started = Instant::now();
    let tracks = page
        .eval("startLoopback()")
        .await
        .with_context(|| format!("startLoopback; console: {:#?}", page.console()))?;
    eprintln!(
        "getUserMedia + negotiation: {tracks} in {:?}",
        started.elapsed()
    );
    ensure!(tracks["video"] == json!(1), "video tracks: {tracks}");
    ensure!(tracks["audio"] == json!(1), "audio tracks: {tracks}");

    if let Err(e) = page
        .wait_for(
            "inboundVideo().then(s => s !== null && s.framesDecoded > 30)",
            Duration::from_secs(20),
        )
        .await
    {
        let states = page
            .eval("pcs.map(pc => pc.connectionState + '/' + pc.iceConnectionState)")
            .await;
        bail!(
            "{e:#}\npeer connection states: {states:?}\nconsole: {:#?}",
            page.console()
        );
    }
    let stats = page.eval("inboundVideo()").await?;
    eprintln!("inbound video after {:?}: {stats}", started.elapsed());
    page.close().await?;
    Ok(())
}
