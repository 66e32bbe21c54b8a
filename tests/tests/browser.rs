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

/// Publishes a fake camera (`width`×`height`, with a microphone when
/// `audio`) over WHIP from `page`; `opts` are more `Ridge.whipPublish`
/// options, as JavaScript (`"videoCodec: 'H264'"`).
async fn whip_fake_camera(
    page: &Page,
    room: &str,
    token: &str,
    (width, height, audio): (u32, u32, bool),
    opts: &str,
) -> Result<Value> {
    page.eval(&format!(
        "(async () => {{ const s = await Ridge.fakeStream({{width: {width}, height: {height}, audio: {audio}}});
           return await Ridge.whipPublish({{room: {room:?}, token: {token:?}, stream: s, {opts}}}); }})()"
    ))
    .await
}

/// Watches `room` over WHEP from `page` into a new video element; `opts`
/// are more `Ridge.whepSubscribe` options, as JavaScript (`"audio: 0"`).
/// Returns the session's id.
async fn whep_watch(page: &Page, room: &str, token: &str, opts: &str) -> Result<String> {
    let sub = page
        .eval(&format!(
            "(() => {{ const v = document.createElement('video'); document.body.appendChild(v);
               return Ridge.whepSubscribe({{room: {room:?}, token: {token:?}, videoElement: v, {opts}}}); }})()"
        ))
        .await?;
    Ok(sub["id"].as_str().context("WHEP session id")?.to_string())
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
            bail!(
                "timed out waiting for {what}; last stats: {s}; console: {:?}",
                page.console()
            );
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
    run(
        "whip_publish_whep_subscribe_decodes_video_and_audio",
        async {
            let node = TestNode::start().await?;
            let browser = Chromium::launch().await?;
            let room = "e2e-whip";
            let pub_token = node.token(room, "camera", true, false);
            let sub_token = node.token(room, "viewer", false, true);

            let publisher = open_demo(&browser, &node, &pub_token).await?;
            let published =
                whip_fake_camera(&publisher, room, &pub_token, (640, 480, true), "").await?;
            let location = published["location"].as_str().context("WHIP Location")?;
            assert!(
                location.starts_with(&format!("/whip/{room}/s-")),
                "{location}"
            );

            let viewer = open_demo(&browser, &node, &sub_token).await?;
            let id = whep_watch(&viewer, room, &sub_token, "").await?;

            let first = wait_stats(
                &viewer,
                &id,
                Duration::from_secs(20),
                "decoded video",
                |s| {
                    num(s, &["video", "framesDecoded"]) > 20.0
                        && num(s, &["audio", "packetsReceived"]) > 20.0
                },
            )
            .await?;
            // Keep watching: media must keep flowing for several seconds.
            tokio::time::sleep(Duration::from_secs(4)).await;
            let later = stats(&viewer, &id).await?;
            let frames =
                num(&later, &["video", "framesDecoded"]) - num(&first, &["video", "framesDecoded"]);
            let audio = num(&later, &["audio", "packetsReceived"])
                - num(&first, &["audio", "packetsReceived"]);
            let samples = num(&later, &["audio", "totalSamplesReceived"])
                - num(&first, &["audio", "totalSamplesReceived"]);
            assert!(
                frames >= 40.0,
                "only {frames} frames decoded in 4 s: {later}"
            );
            assert!(audio >= 150.0, "only {audio} audio packets in 4 s: {later}");
            assert!(
                samples > 100_000.0,
                "only {samples} audio samples in 4 s: {later}"
            );
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
        },
    );
}

#[test]
fn h264_through_whip_and_whep_decodes_and_a_vp8_only_viewer_is_told_why_not() {
    run(
        "h264_through_whip_and_whep_decodes_and_a_vp8_only_viewer_is_told_why_not",
        async {
            let node = TestNode::start().await?;
            let browser = Chromium::launch().await?;
            let room = "e2e-h264";
            let pub_token = node.token(room, "encoder", true, false);
            let sub_token = node.token(room, "viewer", false, true);

            let publisher = open_demo(&browser, &node, &pub_token).await?;
            let published = whip_fake_camera(
                &publisher,
                room,
                &pub_token,
                (640, 480, true),
                "videoCodec: 'H264'",
            )
            .await?;
            let pub_id = published["id"]
                .as_str()
                .context("publisher id")?
                .to_string();

            let viewer = open_demo(&browser, &node, &sub_token).await?;
            let id = whep_watch(&viewer, room, &sub_token, "").await?;
            let got = wait_stats(
                &viewer,
                &id,
                Duration::from_secs(20),
                "decoded H.264",
                |s| num(s, &["video", "framesDecoded"]) > 30.0,
            )
            .await?;
            assert_eq!(got["video"]["codec"], "video/H264", "{got}");
            assert_eq!(num(&got, &["video", "frameWidth"]), 640.0, "{got}");
            let sent = stats(&publisher, &pub_id).await?;
            let codecs: Vec<&Value> = sent["outbound"]
                .as_array()
                .context("outbound stats")?
                .iter()
                .filter(|o| o["kind"] == "video")
                .map(|o| &o["codec"])
                .collect();
            assert!(
                !codecs.is_empty() && codecs.iter().all(|c| *c == "video/H264"),
                "the publisher sends H.264: {sent}"
            );

            // A viewer that offers only VP8 is refused, with the reason.
            let refused = viewer
                .eval(&format!(
                    "Ridge.whepSubscribe({{room: {room:?}, token: {sub_token:?}, videoCodec: 'VP8'}})
                       .then((r) => ({{ok: r}}), (e) => ({{error: String(e && e.message || e)}}))"
                ))
                .await?;
            let why = refused["error"]
                .as_str()
                .with_context(|| format!("not refused: {refused}"))?;
            assert!(
                why.contains("400") && why.contains("h264") && why.contains("hwcodec"),
                "{why}"
            );
            Ok(())
        },
    );
}

#[test]
fn av1_through_whip_and_whep_decodes() {
    run("av1_through_whip_and_whep_decodes", async {
        let node = TestNode::start().await?;
        let browser = Chromium::launch().await?;
        let room = "e2e-av1";
        let pub_token = node.token(room, "av1-camera", true, false);
        let sub_token = node.token(room, "av1-viewer", false, true);
        let publisher = open_demo(&browser, &node, &pub_token).await?;
        whip_fake_camera(
            &publisher,
            room,
            &pub_token,
            (640, 360, false),
            "videoCodec: 'AV1'",
        )
        .await?;
        let viewer = open_demo(&browser, &node, &sub_token).await?;
        let id = whep_watch(&viewer, room, &sub_token, "audio: 0").await?;
        let got = wait_stats(&viewer, &id, Duration::from_secs(30), "decoded AV1", |s| {
            num(s, &["video", "framesDecoded"]) > 30.0
        })
        .await?;
        assert_eq!(got["video"]["codec"], "video/AV1", "{got}");
        // Every packet parsed: none was dropped as malformed.
        let metrics = node.metrics().await?;
        assert!(
            metrics.contains("ridge_packets_dropped_total{reason=\"malformed_payload\"}"),
            "the malformed-payload counter is exported: {metrics}"
        );
        assert_eq!(
            ridge_tests::node::metric_value(
                &metrics,
                "ridge_packets_dropped_total{reason=\"malformed_payload\"}"
            ),
            0.0,
            "{metrics}"
        );
        Ok(())
    });
}

#[test]
fn a_room_codec_list_from_the_admin_api_refuses_h264_with_the_reason() {
    run(
        "a_room_codec_list_from_the_admin_api_refuses_h264_with_the_reason",
        async {
            let node = TestNode::start().await?;
            let browser = Chromium::launch().await?;
            let room = "e2e-room-codecs";
            let admin = format!("Bearer {}", node.admin_token());
            let user = format!("Bearer {}", node.token(room, "encoder", true, false));
            let path = format!("/v1/rooms/{room}/codecs");
            let put = |auth: String, body: &'static str| {
                let (base, path) = (node.base_url(), path.clone());
                async move {
                    let h = [
                        ("Authorization", auth.as_str()),
                        ("Content-Type", "application/json"),
                    ];
                    ridge_tests::node::http(&base, "PUT", &path, &h, body).await
                }
            };
            // Only an admin sets it, only to codecs the node knows.
            let r = put(user.clone(), r#"{"codecs":["vp8"]}"#).await?;
            assert_eq!(r.status, 403, "{}", r.body);
            let r = put(admin.clone(), r#"{"codecs":["h265"]}"#).await?;
            assert_eq!(r.status, 400, "{}", r.body);
            let r = put(admin.clone(), r#"{"codecs":[]}"#).await?;
            assert!(
                r.status == 400 && r.body.contains("at least one"),
                "{}",
                r.body
            );
            let r = put(admin.clone(), r#"{"codecs":["opus","vp8"]}"#).await?;
            assert_eq!(r.status, 204, "{}", r.body);
            let got = ridge_tests::node::http(
                &node.base_url(),
                "GET",
                &path,
                &[("Authorization", admin.as_str())],
                "",
            )
            .await?;
            assert_eq!(got.status, 200, "{}", got.body);
            let v: Value = serde_json::from_str(&got.body)?;
            assert_eq!(v["codecs"], serde_json::json!(["opus", "vp8"]), "{v}");

            let pub_token = node.token(room, "encoder", true, false);
            let publisher = open_demo(&browser, &node, &pub_token).await?;
            let publish = format!(
                "(async () => {{ const s = await Ridge.fakeStream({{width: 320, height: 240}});
                   return await Ridge.whipPublish({{room: {room:?}, token: {pub_token:?}, stream: s,
                     videoCodec: 'H264'}}); }})()
                   .then((r) => ({{ok: r}}), (e) => ({{error: String(e && e.message || e)}}))"
            );
            let refused = publisher.eval(&publish).await?;
            let why = refused["error"]
                .as_str()
                .with_context(|| format!("not refused: {refused}"))?;
            assert!(
                why.contains("400") && why.contains("H264") && why.contains("allows only vp8"),
                "{why}"
            );
            // Cleared: the node's list again, and H.264 is accepted.
            let r = put(admin.clone(), r#"{"codecs":null}"#).await?;
            assert_eq!(r.status, 204, "{}", r.body);
            let accepted = publisher.eval(&publish).await?;
            assert!(accepted["ok"]["id"].is_string(), "{accepted}");
            Ok(())
        },
    );
}

#[test]
fn ws_room_vp9_svc_subscriber_pinned_to_each_spatial_layer_and_to_t0() {
    run(
        "ws_room_vp9_svc_subscriber_pinned_to_each_spatial_layer_and_to_t0",
        async {
            let node = TestNode::start().await?;
            let browser = Chromium::launch().await?;
            let room = "e2e-ws-svc";
            let ann = node.token(room, "ann", true, true);
            let bob = node.token(room, "bob", true, true);
            let publisher = open_demo(&browser, &node, &ann).await?;
            let welcome = publisher
                .eval(&format!(
                    "(async () => {{
                        const s = await Ridge.fakeStream({{width: 1280, height: 720, audio: false}});
                        const room = new Ridge.Room({{room: {room:?}, token: {ann:?}}});
                        window.e2eRoom = room;
                        const welcome = await room.join();
                        await room.publish(s, {{videoCodec: 'VP9', scalabilityMode: 'L3T3'}});
                        return welcome;
                     }})()"
                ))
                .await?;
            let ann_id = welcome["participant"]
                .as_str()
                .context("ann's participant id")?
                .to_string();
            let viewer = open_demo(&browser, &node, &bob).await?;
            viewer
                .eval(&format!(
                    "(async () => {{
                        const room = new Ridge.Room({{room: {room:?}, token: {bob:?}}});
                        window.e2eRoom = room;
                        return await room.join();
                     }})()"
                ))
                .await?;
            let of_ann = |s: &Value| s[ann_id.as_str()].clone();
            let frames = |s: &Value| num(s, &["videoFramesDecoded"]);
            let room_stats = || viewer.eval("window.e2eRoom.stats()");
            let wait = |what: String, pred: Box<dyn Fn(&Value) -> bool>| {
                let room_stats = &room_stats;
                let of_ann = &of_ann;
                async move {
                    let start = std::time::Instant::now();
                    loop {
                        let s = of_ann(&room_stats().await?);
                        if pred(&s) {
                            return Ok::<Value, anyhow::Error>(s);
                        }
                        if start.elapsed() > Duration::from_secs(20) {
                            bail!("timed out waiting for {what}; last stats {s}");
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            };
            let all = wait("ann's VP9".into(), Box::new(move |s| frames(s) > 30.0)).await?;
            assert_eq!(all["videoCodec"], "video/VP9", "{all}");
            let mut widths: Vec<f64> = Vec::new();
            for spatial in [0u8, 1, 2] {
                viewer
                    .eval(&format!(
                        "window.e2eRoom.setSvcLayers({ann_id:?}, {{spatial: {spatial}}})"
                    ))
                    .await?;
                let before = frames(&of_ann(&room_stats().await?));
                let above = widths.last().copied().unwrap_or(0.0);
                let got = wait(
                    format!("spatial layer {spatial}"),
                    Box::new(move |s| frames(s) > before + 20.0 && num(s, &["frameWidth"]) > above),
                )
                .await?;
                widths.push(num(&got, &["frameWidth"]));
            }
            assert!(
                widths[0] * 2.0 == widths[1] && widths[1] * 2.0 == widths[2],
                "each spatial layer doubles the width: {widths:?}"
            );
            let rate = |over: Duration| async move {
                let a = frames(&of_ann(&room_stats().await?));
                tokio::time::sleep(over).await;
                let b = frames(&of_ann(&room_stats().await?));
                Ok::<f64, anyhow::Error>((b - a) / over.as_secs_f64())
            };
            let full = rate(Duration::from_secs(3)).await?;
            viewer
                .eval(&format!(
                    "window.e2eRoom.setSvcLayers({ann_id:?}, {{spatial: 2, temporal: 0}})"
                ))
                .await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let t0 = rate(Duration::from_secs(3)).await?;
            eprintln!("WS room VP9 L3T3: widths {widths:?}; {full:.1} fps, {t0:.1} fps at T0");
            assert!(
                full > 10.0 && t0 > 0.5 && t0 / full < 0.4 && t0 / full > 0.12,
                "T0 is about a quarter of the frame rate: {t0:.1} of {full:.1} fps"
            );
            Ok(())
        },
    );
}

/// Frames decoded per second by a WHEP session over `over`.
async fn decode_rate(page: &Page, id: &str, over: Duration) -> Result<f64> {
    let a = stats(page, id).await?;
    tokio::time::sleep(over).await;
    let b = stats(page, id).await?;
    Ok(
        (num(&b, &["video", "framesDecoded"]) - num(&a, &["video", "framesDecoded"]))
            / over.as_secs_f64(),
    )
}

#[test]
fn vp9_svc_l3t3_viewer_pinned_to_each_spatial_layer_and_to_t0() {
    run(
        "vp9_svc_l3t3_viewer_pinned_to_each_spatial_layer_and_to_t0",
        async {
            let node = TestNode::start().await?;
            let browser = Chromium::launch().await?;
            let room = "e2e-vp9-svc";
            let pub_token = node.token(room, "svc-camera", true, false);
            let sub_token = node.token(room, "svc-viewer", false, true);
            let publisher = open_demo(&browser, &node, &pub_token).await?;
            whip_fake_camera(
                &publisher,
                room,
                &pub_token,
                (1280, 720, false),
                "videoCodec: 'VP9', scalabilityMode: 'L3T3'",
            )
            .await?;
            let viewer = open_demo(&browser, &node, &sub_token).await?;
            let id = whep_watch(&viewer, room, &sub_token, "audio: 0").await?;
            let all = wait_stats(&viewer, &id, Duration::from_secs(20), "decoded VP9", |s| {
                num(s, &["video", "framesDecoded"]) > 30.0
            })
            .await?;
            assert_eq!(all["video"]["codec"], "video/VP9", "{all}");
            // The top layer, as the encoder sends it now (it may scale the
            // whole stream down under load; each layer is half the next).
            let width_of = |s: &Value| num(s, &["video", "frameWidth"]);
            let mut widths = Vec::new();
            for spatial in [0u8, 1, 2] {
                viewer
                    .eval(&format!(
                        "Ridge.setSvcLayers({id:?}, {{spatial: {spatial}}})"
                    ))
                    .await?;
                // A lower layer at once; a higher one at the next keyframe
                // or switch point, which the node asks for.
                let before = num(&stats(&viewer, &id).await?, &["video", "framesDecoded"]);
                let got = wait_stats(
                    &viewer,
                    &id,
                    Duration::from_secs(15),
                    &format!("spatial layer {spatial}"),
                    |s| {
                        num(s, &["video", "framesDecoded"]) > before + 20.0
                            && widths.last().is_none_or(|w| width_of(s) > *w)
                    },
                )
                .await?;
                widths.push(width_of(&got));
            }
            assert!(
                widths[0] * 2.0 == widths[1] && widths[1] * 2.0 == widths[2],
                "each spatial layer doubles the width: {widths:?}"
            );
            let full = decode_rate(&viewer, &id, Duration::from_secs(3)).await?;
            viewer
                .eval(&format!(
                    "Ridge.setSvcLayers({id:?}, {{spatial: 2, temporal: 0}})"
                ))
                .await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let t0 = decode_rate(&viewer, &id, Duration::from_secs(3)).await?;
            eprintln!("VP9 L3T3: widths {widths:?}; {full:.1} fps, {t0:.1} fps at T0");
            assert!(
                full > 10.0 && t0 > 0.5 && t0 / full < 0.4 && t0 / full > 0.12,
                "T0 is about a quarter of the frame rate: {t0:.1} of {full:.1} fps"
            );
            Ok(())
        },
    );
}

/// ffmpeg encodes H.264 (libx264, Constrained Baseline) and sends it as
/// RTP from a fixed local port, like a hardware encoder or gateway would.
fn spawn_ffmpeg_h264(
    to: std::net::SocketAddr,
    from_port: u16,
    ssrc: u32,
) -> Result<std::process::Child> {
    std::process::Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-re",
            "-f",
            "lavfi",
            "-i",
        ])
        .arg("testsrc=size=640x360:rate=30")
        .args([
            "-c:v",
            "libx264",
            "-profile:v",
            "baseline",
            "-pix_fmt",
            "yuv420p",
        ])
        .args([
            "-tune",
            "zerolatency",
            "-preset",
            "ultrafast",
            "-g",
            "30",
            "-bf",
            "0",
        ])
        // SPS and PPS before every IDR, in band, as RTP encoders send them.
        .args(["-bsf:v", "dump_extra", "-payload_type", "102"])
        .args(["-ssrc", &ssrc.to_string(), "-f", "rtp"])
        .arg(format!("rtp://{to}?localrtpport={from_port}&pkt_size=1200"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("start ffmpeg")
}

/// Kills ffmpeg when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn plain_rtp_h264_from_ffmpeg_is_watched_by_chromium_through_whep() {
    if ridge_tests::skip::require(
        "plain_rtp_h264_from_ffmpeg_is_watched_by_chromium_through_whep",
        ridge_tests::skip::ffmpeg_with_x264(),
    )
    .is_err()
    {
        return;
    }
    run(
        "plain_rtp_h264_from_ffmpeg_is_watched_by_chromium_through_whep",
        async {
            let node = TestNode::start().await?;
            let browser = Chromium::launch().await?;
            let room = "e2e-ffmpeg-h264";
            let pub_token = node.token(room, "encoder", true, false);
            let sub_token = node.token(room, "viewer", false, true);
            // A free local port for ffmpeg to send from: the endpoint names
            // its remote exactly.
            let from_port = std::net::UdpSocket::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let ssrc = 0x2640_0001u32;
            let spec = serde_json::json!({
                "direction": "publish", "kind": "video", "codec": "h264",
                "fmtp": "profile-level-id=42e01f;packetization-mode=1",
                "remote": format!("127.0.0.1:{from_port}"), "payload_type": 102, "ssrc": ssrc,
            });
            let r = node
                .json_request("POST", &format!("/v1/rooms/{room}/rtp"), &pub_token, &spec)
                .await?;
            anyhow::ensure!(r.status == 201, "POST rtp: {} {}", r.status, r.body);
            let created: Value = serde_json::from_str(&r.body)?;
            let local: std::net::SocketAddr =
                created["local"].as_str().context("local")?.parse()?;
            let _ffmpeg = KillOnDrop(spawn_ffmpeg_h264(local, from_port, ssrc)?);

            let viewer = open_demo(&browser, &node, &sub_token).await?;
            let id = whep_watch(&viewer, room, &sub_token, "audio: 0").await?;
            let got = wait_stats(
                &viewer,
                &id,
                Duration::from_secs(20),
                "decoded H.264 from ffmpeg",
                |s| num(s, &["video", "framesDecoded"]) > 30.0,
            )
            .await?;
            assert_eq!(got["video"]["codec"], "video/H264", "{got}");
            assert_eq!(num(&got, &["video", "frameWidth"]), 640.0, "{got}");
            assert_eq!(num(&got, &["video", "frameHeight"]), 360.0, "{got}");
            Ok(())
        },
    );
}

#[test]
fn simulcast_subscriber_moves_between_layers() {
    run(
        "simulcast_subscriber_moves_between_layers",
        simulcast_layer_switch(None),
    );
}

#[test]
fn h264_simulcast_subscriber_moves_between_layers() {
    run(
        "h264_simulcast_subscriber_moves_between_layers",
        simulcast_layer_switch(Some("H264")),
    );
}

/// A simulcast publisher (the browser's choice of codec, or `codec`), and
/// a viewer pinned to the lowest layer, then the highest, then automatic.
async fn simulcast_layer_switch(codec: Option<&str>) -> Result<()> {
    let node = TestNode::start().await?;
    let browser = Chromium::launch().await?;
    let room = "e2e-simulcast";
    let video_codec = codec.map_or("undefined".to_owned(), |c| format!("{c:?}"));
    let pub_token = node.token(room, "camera", true, false);
    let sub_token = node.token(room, "viewer", false, true);

    let publisher = open_demo(&browser, &node, &pub_token).await?;
    let published = publisher
        .eval(&format!(
            "(async () => {{ const s = await Ridge.fakeStream({{width: 1280, height: 720}});
               return await Ridge.whipPublish({{room: {room:?}, token: {pub_token:?}, stream: s, simulcast: true,
                 videoCodec: {video_codec}}}); }})()"
        ))
        .await?;
    let viewer = open_demo(&browser, &node, &sub_token).await?;
    let id = whep_watch(&viewer, room, &sub_token, "").await?;
    wait_stats(&viewer, &id, Duration::from_secs(20), "first frames", |s| {
        num(s, &["video", "framesDecoded"]) > 10.0
    })
    .await?;

    // Pin the lowest layer: a quarter of the camera's height.
    let r = viewer.eval(&format!("Ridge.setLayer({id:?}, 'q')")).await?;
    assert_eq!(r["status"], 204, "{r}");
    let low = wait_stats(
        &viewer,
        &id,
        Duration::from_secs(20),
        "the q layer (180p)",
        |s| num(s, &["video", "frameHeight"]) == 180.0,
    )
    .await?;
    // Then the full-resolution layer.
    let r = viewer.eval(&format!("Ridge.setLayer({id:?}, 'f')")).await?;
    assert_eq!(r["status"], 204, "{r}");
    let high = match wait_stats(
        &viewer,
        &id,
        Duration::from_secs(30),
        "the f layer (720p)",
        |s| num(s, &["video", "frameHeight"]) == 720.0,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            let pub_id = published["id"].as_str().unwrap_or_default();
            let p = stats(&publisher, pub_id).await?;
            let m = node.metrics().await?;
            let m: Vec<&str> = m
                .lines()
                .filter(|l| {
                    l.contains("dropped")
                        || l.contains("plis")
                        || l.contains("switch")
                        || l.contains("layer")
                })
                .collect();
            bail!("{e}\npublisher: {p}\nmetrics: {m:#?}");
        }
    };
    assert!(
        num(&high, &["video", "framesDecoded"]) > num(&low, &["video", "framesDecoded"]),
        "decoding continued across the switch"
    );
    let switches = node.metric("ridge_layer_switches_total").await?;
    assert!(switches >= 2.0, "ridge_layer_switches_total = {switches}");
    // And back to automatic selection by bandwidth estimate.
    viewer
        .eval(&format!("Ridge.setLayer({id:?}, null)"))
        .await?;
    let before = num(&stats(&viewer, &id).await?, &["video", "framesDecoded"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = num(&stats(&viewer, &id).await?, &["video", "framesDecoded"]);
    assert!(
        after > before + 10.0,
        "video stalled after returning to automatic layers"
    );
    if let Some(c) = codec {
        assert_eq!(high["video"]["codec"], format!("video/{c}"), "{high}");
    }
    Ok(())
}

#[test]
fn websocket_room_with_three_participants() {
    run("websocket_room_with_three_participants", async {
        let node = TestNode::start().await?;
        let browser = Chromium::launch().await?;
        let room = "e2e-room";
        let names = ["ann", "bob", "cyd"];
        let mut pages = Vec::new();
        for name in names {
            let token = node.token(room, name, true, true);
            let page = open_demo(&browser, &node, &token).await?;
            page.eval(&format!(
                "(async () => {{
                    const s = await Ridge.fakeStream({{width: 320, height: 240}});
                    const room = new Ridge.Room({{room: {room:?}, token: {token:?}}});
                    window.e2eRoom = room;
                    const welcome = await room.join();
                    await room.publish(s, {{simulcast: false}});
                    return welcome;
                 }})()"
            ))
            .await?;
            pages.push(page);
        }
        // Everyone sees and hears the two others.
        for (i, page) in pages.iter().enumerate() {
            let ok = "(async () => { const s = await window.e2eRoom.stats();
                        const v = Object.values(s);
                        return v.length === 2 && v.every(p => p.videoFramesDecoded > 10 && p.audioPackets > 10); })()";
            if let Err(e) = page.wait_for(ok, Duration::from_secs(30)).await {
                let s = page.eval("window.e2eRoom.stats()").await?;
                bail!(
                    "{} does not receive both others: {e}; stats {s}; console {:?}",
                    names[i],
                    page.console()
                );
            }
        }
        // Chat is relayed to the whole room, in order, with the sender.
        pages[0]
            .eval("window.e2eRoom.chat('hello from ann')")
            .await?;
        pages[1].eval("window.e2eRoom.send({ping: 42})").await?;
        for page in &pages {
            page.wait_for(
                "window.e2eRoom.events.some(e => e.type === 'chat' && e.text === 'hello from ann')
                 && window.e2eRoom.events.some(e => e.type === 'data' && e.payload && e.payload.ping === 42)",
                Duration::from_secs(10),
            )
            .await?;
        }
        let events = pages[2].eval("window.e2eRoom.events").await?;
        let chat = events
            .as_array()
            .and_then(|a| a.iter().find(|e| e["type"] == "chat"))
            .context("chat event")?;
        assert_eq!(chat["identity"], "ann");
        // Sequence numbers are strictly increasing by one.
        let seqs: Vec<u64> = events
            .as_array()
            .context("events")?
            .iter()
            .filter_map(|e| e["seq"].as_u64())
            .filter(|s| *s > 0)
            .collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
        // Someone is the active speaker (the fake microphone beeps).
        pages[0]
            .wait_for(
                "window.e2eRoom.events.some(e => e.type === 'active_speaker' && e.participant)",
                Duration::from_secs(20),
            )
            .await?;
        // Leaving is announced to the others.
        pages[2].eval("window.e2eRoom.leave()").await?;
        for page in &pages[..2] {
            page.wait_for(
                "window.e2eRoom.events.some(e => e.type === 'participant_left' && e.identity === 'cyd')",
                Duration::from_secs(10),
            )
            .await?;
        }
        Ok(())
    });
}
