//! End-to-end tests with a real browser: headless Chromium with a fake
//! camera and microphone publishes to and subscribes from a node started by
//! the test, through the demo page's client library (dataplane/static/ridge.js).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use ridge_tests::node::TestNode;
use ridge_tests::skip::{chromium_present, require};
use ridge_tests::{Chromium, Page};
use serde_json::Value;

async fn open_demo(browser: &Chromium, node: &TestNode, token: &str) -> Result<Page> {
    let page = browser
        .open(&format!("{}/?token={token}", node.base_url()))
        .await?;
    page.wait_for("typeof window.Ridge === 'object'", Duration::from_secs(10))
        .await
        .context("the demo page did not load ridge.js")?;
    Ok(page)
}

fn num(v: &Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_f64().unwrap_or(0.0)
}

async fn stats(page: &Page, id: &str) -> Result<Value> {
    page.eval(&format!("Ridge.stats({id:?})")).await
}

/// Polls a subscriber's stats until `pred` holds.
async fn wait_stats(
    page: &Page,
    id: &str,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let start = std::time::Instant::now();
    loop {
        let s = stats(page, id).await?;
        if pred(&s) {
            return Ok(s);
        }
        if start.elapsed() > timeout {
            bail!("timed out waiting for {what}; last stats: {s}; console: {:?}", page.console());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn run(name: &str, f: impl std::future::Future<Output = Result<()>>) {
    if require(name, chromium_present()).is_err() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = rt.block_on(f) {
        panic!("{name}: {e:?}");
    }
}

#[test]
fn whip_publish_whep_subscribe_decodes_video_and_audio() {
    run("whip_publish_whep_subscribe_decodes_video_and_audio", async {
        let node = TestNode::start().await?;
        let browser = Chromium::launch().await?;
        let room = "e2e-whip";
        let pub_token = node.token(room, "camera", true, false);
        let sub_token = node.token(room, "viewer", false, true);

        let publisher = open_demo(&browser, &node, &pub_token).await?;
        let published = publisher
            .eval(&format!(
                "(async () => {{ const s = await Ridge.fakeStream({{width: 640, height: 480}});
                   return await Ridge.whipPublish({{room: {room:?}, token: {pub_token:?}, stream: s}}); }})()"
            ))
            .await?;
        let location = published["location"].as_str().context("WHIP Location")?;
        assert!(location.starts_with(&format!("/whip/{room}/s-")), "{location}");

        let viewer = open_demo(&browser, &node, &sub_token).await?;
        let sub = viewer
            .eval(&format!(
                "(() => {{ const v = document.createElement('video'); v.id = 'e2e-remote';
                   document.body.appendChild(v);
                   return Ridge.whepSubscribe({{room: {room:?}, token: {sub_token:?}, videoElement: v}}); }})()"
            ))
            .await?;
        let id = sub["id"].as_str().context("WHEP session id")?.to_string();

        let first = wait_stats(&viewer, &id, Duration::from_secs(20), "decoded video", |s| {
            num(s, &["video", "framesDecoded"]) > 20.0 && num(s, &["audio", "packetsReceived"]) > 20.0
        })
        .await?;
        // Keep watching: media must keep flowing for several seconds.
        tokio::time::sleep(Duration::from_secs(4)).await;
        let later = stats(&viewer, &id).await?;
        let frames = num(&later, &["video", "framesDecoded"]) - num(&first, &["video", "framesDecoded"]);
        let audio = num(&later, &["audio", "packetsReceived"]) - num(&first, &["audio", "packetsReceived"]);
        let samples = num(&later, &["audio", "totalSamplesReceived"]) - num(&first, &["audio", "totalSamplesReceived"]);
        assert!(frames >= 40.0, "only {frames} frames decoded in 4 s: {later}");
        assert!(audio >= 150.0, "only {audio} audio packets in 4 s: {later}");
        assert!(samples > 100_000.0, "only {samples} audio samples in 4 s: {later}");
        assert_eq!(num(&later, &["video", "frameWidth"]), 640.0, "{later}");

        let metrics = node.metrics().await?;
        for sample in [
            "ridge_packets_received_total",
            "ridge_packets_sent_total",
            "ridge_sessions_created_total",
        ] {
            assert!(
                ridge_tests::node::metric_value(&metrics, sample) > 0.0,
                "{sample} is zero:\n{metrics}"
            );
        }
        assert_eq!(
            ridge_tests::node::metric_value(&metrics, "ridge_sessions{transport=\"webrtc\"}"),
            2.0
        );

        // DELETE on the Location ends both sessions.
        let stopped = viewer.eval(&format!("Ridge.stop({id:?})")).await?;
        assert_eq!(stopped["status"], 200, "{stopped}");
        let pub_id = published["id"].as_str().context("publisher id")?;
        let stopped = publisher.eval(&format!("Ridge.stop({pub_id:?})")).await?;
        assert_eq!(stopped["status"], 200, "{stopped}");
        let closed = node.metric("ridge_sessions_closed_total").await?;
        assert_eq!(closed, 2.0);
        Ok(())
    });
}
