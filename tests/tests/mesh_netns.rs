//! The mesh end to end in network namespaces: the real `ridge-scheduler`,
//! and per node a real `ridge-dataplane` and `ridge-agent` enrolled with a
//! bootstrap token from `ridgectl` (tests/src/mesh.rs, `MeshLab`). The lab
//! is a square A–B, B–C, A–D, D–C with no A–C link: A can reach B's and D's
//! mesh addresses but not C's.
//!
//! - `the_lab_reaches_mesh_neighbours_only`: the topology itself.
//! - `nodes_enroll_and_bad_tokens_are_refused`: four nodes enroll and are
//!   up with the addresses their agents report; a bad, an expired and a
//!   reused single-use token are refused (the agent exits 77 naming the
//!   scheduler's code); dispatch hands out tokens the chosen node accepts.
//! - `route_forms_through_a_transit_node_and_moves_when_it_dies`: a plain-RTP
//!   publisher on A and a subscriber on C in room `demo`: every node
//!   measures its topology neighbours, the plan holds a two-hop path A→B→C
//!   or A→D→C and every node's dataplane holds the matching links and
//!   routes; when the transit node is killed the route moves through the
//!   other one. Media sent to A reaches C through the transit node, and
//!   after the kill resumes within 3 s.
//! - `a_transit_node_forwards_the_mesh_in_the_kernel`: a chain A–B–C whose
//!   nodes attach XDP to their mesh veths (B's media socket bound to its
//!   mesh IP): B's kernel checks, re-signs and forwards the stream A sends
//!   C (`ridge_kernel_mesh_packets_total{outcome="forwarded"}`), and C gets
//!   every packet.
//! - `scheduler_restart_loses_no_nodes`.
//! - `chromium_publishes_on_a_and_watches_on_c_through_the_mesh`: WHIP on A,
//!   WHEP on C, the viewer decodes 640×480 video and audio relayed by B or D.
//!
//! Needs root (namespaces, veths) and iproute2: otherwise each test prints
//! `SKIP` (and fails with RIDGE_REQUIRE_ALL=1).

use std::collections::BTreeSet;
use std::net::UdpSocket;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use ridge_tests::mesh::{MeshLab, PlainRtpPair, eventually};
use ridge_tests::skip::require;
use serde_json::Value;

const UP: Duration = Duration::from_secs(30);
/// How long the scheduler may take to form or move a route: a few
/// heartbeats (500 ms) and lease expiries (1.5 s) with room to spare on a
/// loaded machine.
const ROUTE: Duration = Duration::from_secs(20);

/// The square lab, or `None` (after a `SKIP` line) without root.
fn square(test: &str) -> Option<MeshLab> {
    require(test, MeshLab::prerequisites()).ok()?;
    Some(MeshLab::square().expect("the mesh lab starts"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[test]
fn the_lab_reaches_mesh_neighbours_only() -> Result<()> {
    let Some(lab) = square("the_lab_reaches_mesh_neighbours_only") else {
        return Ok(());
    };
    // One listener per node on its mesh IP; A sends to each.
    let listeners: Vec<(String, UdpSocket)> = ["b", "c", "d"]
        .into_iter()
        .map(|n| {
            let addr = lab.node_mesh(n)?;
            let s = lab.in_ns(n, move || UdpSocket::bind((addr.ip(), 7000)))??;
            s.set_read_timeout(Some(Duration::from_millis(500)))?;
            Ok((n.to_owned(), s))
        })
        .collect::<Result<_>>()?;
    let a_mesh = lab.node_mesh("a")?.ip();
    let from_a = lab.in_ns("a", move || UdpSocket::bind((a_mesh, 0)))??;
    for (name, sock) in &listeners {
        let to = std::net::SocketAddr::new(lab.node_mesh(name)?.ip(), 7000);
        let sent = from_a.send_to(b"hello", to);
        let mut buf = [0u8; 16];
        let got = sock.recv_from(&mut buf).map(|(n, from)| (n, from.ip()));
        if lab.neighbours("a").contains(&name.as_str()) {
            sent.with_context(|| format!("a → {name}'s mesh IP"))?;
            ensure!(
                got.as_ref().ok() == Some(&(5, a_mesh)),
                "{name} got {got:?} from a (expected a's mesh IP as the source)"
            );
        } else {
            let e = sent.expect_err("a has no route to a non-neighbour's mesh IP");
            ensure!(
                e.kind() == std::io::ErrorKind::NetworkUnreachable,
                "a → {name}: {e}"
            );
            ensure!(got.is_err(), "{name} got {got:?}");
        }
    }
    // Each link's interfaces exist on both sides, named for the peer.
    for l in lab.links() {
        for (node, iface) in [(&l.a, &l.a_iface), (&l.b, &l.b_iface)] {
            let ns = lab.ns(node)?.to_owned();
            let out = std::process::Command::new("ip")
                .args(["-n", &ns, "-br", "link", "show", "dev", iface])
                .output()?;
            ensure!(
                out.status.success() && String::from_utf8_lossy(&out.stdout).contains("UP"),
                "{node}: {iface}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        ensure!(l.iface_of(&l.a) == Some(format!("m-{}", l.b).as_str()));
    }
    ensure!(lab.link("a", "c").is_none() && lab.link("c", "b").is_some());
    // Clients in the hub reach every node's HTTP API.
    for n in lab.node_names() {
        let (status, _) = lab.node_request(n, "GET", "/healthz", None, None)?;
        ensure!(
            status == 401,
            "{n}: /healthz without a token answered {status}"
        );
    }
    Ok(())
}

#[test]
fn nodes_enroll_and_bad_tokens_are_refused() -> Result<()> {
    let Some(lab) = square("nodes_enroll_and_bad_tokens_are_refused") else {
        return Ok(());
    };
    let nodes = lab.wait_until_up(4, UP)?;
    ensure!(nodes.len() == 4, "{nodes:?}");
    let ids: BTreeSet<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
    ensure!(ids.len() == 4);
    for name in lab.node_names() {
        let id = lab.node_id(name)?;
        let n = nodes.iter().find(|n| n.id == id).context("enrolled node")?;
        ensure!(n.state == "up", "{name}: {}", n.state);
        ensure!(n.region == format!("lab-{name}"), "{name}: {}", n.region);
        ensure!(n.labels.get("trust_domain").map(String::as_str) == Some("lab"));
        ensure!(n.addresses.media == Some(lab.node_media(name)?.to_string()));
        ensure!(n.addresses.mesh == Some(lab.node_mesh(name)?.to_string()));
        ensure!(n.addresses.http == Some(lab.node_http(name)?));
        // The agent applied the node's first desired state.
        eventually(
            &format!("{name}'s dataplane to hold a desired state"),
            Duration::from_secs(10),
            || {
                Ok(lab
                    .held_desired(name)?
                    .filter(|d| d["dataplane_secret_set"] == true && d["node_id"] == id.as_str()))
            },
        )?;
    }
    // ridgectl sees them as up too.
    let table = lab.ridgectl(&["nodes", "list"])?;
    for id in &ids {
        ensure!(
            table
                .lines()
                .any(|l| l.starts_with(id) && l.contains(" up ")),
            "{table}"
        );
    }

    // Refused tokens: the agent exits 77 and names the scheduler's code.
    let expired = lab.create_bootstrap_token("lab-x", "1s", 1, "expires at once")?;
    std::thread::sleep(Duration::from_millis(2100));
    let cases = [
        (
            "rbt_bt-0000000000000000.nope".to_owned(),
            "bootstrap_token_invalid",
        ),
        (expired, "bootstrap_token_expired"),
        (
            lab.bootstrap_token("a")?.to_owned(),
            "bootstrap_token_exhausted",
        ),
    ];
    for (token, code) in cases {
        let run = lab.enroll_agent_once(&token, Duration::from_secs(30))?;
        ensure!(
            run.code == Some(77),
            "{code}: exit {:?}\n{}",
            run.code,
            run.output
        );
        ensure!(
            run.output.contains("enrollment refused") && run.output.contains(code),
            "{code}: {}",
            run.output
        );
    }
    // Nothing enrolled: still four nodes, and the tokens say why.
    ensure!(lab.nodes()?.len() == 4);
    let tokens: Value = serde_json::from_str(&lab.ridgectl(&["--json", "tokens", "list"])?)?;
    let states: Vec<(String, String)> = tokens["tokens"]
        .as_array()
        .context("tokens")?
        .iter()
        .map(|t| {
            (
                t["region"].as_str().unwrap_or_default().to_owned(),
                t["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    for name in lab.node_names() {
        ensure!(
            states.contains(&(format!("lab-{name}"), "exhausted".into())),
            "{states:?}"
        );
    }
    ensure!(
        states.contains(&("lab-x".into(), "expired".into())),
        "{states:?}"
    );

    // Dispatch signs a token that the node it picked accepts.
    let d = lab.dispatch("demo", "alice", true, true, Some("lab-b"))?;
    let name = lab
        .node_name(&d.node_id)
        .context("dispatch picked a lab node")?
        .to_owned();
    ensure!(d.media_address == lab.node_media(&name)?.to_string());
    ensure!(d.url == Some(lab.node_http(&name)?));
    let remote = "10.250.255.1:40000".parse()?;
    let ep = lab.rtp_endpoint(
        &name,
        "demo",
        &d.token,
        "publish",
        "audio",
        remote,
        111,
        Some(7),
    )?;
    ensure!(ep["id"].is_string(), "{ep}");
    // ... and another node refuses it (each node has its own key).
    let other = lab
        .node_names()
        .into_iter()
        .find(|n| *n != name)
        .context("a second node")?;
    let body = serde_json::json!({"direction": "publish", "kind": "audio",
        "remote": "10.250.255.1:40002", "payload_type": 111, "ssrc": 8});
    let (status, text) = lab.node_request(
        other,
        "POST",
        "/v1/rooms/demo/rtp",
        Some(&d.token),
        Some(&body),
    )?;
    ensure!(
        status == 401,
        "{other} accepted {name}'s token: {status} {text}"
    );
    Ok(())
}

/// Waits until the dataplanes on `path` (lab names, source first) hold
/// `room`'s route along it, with links to their path neighbours at their
/// mesh addresses, and `bystanders` hold no route for it.
fn expect_held_routes(
    lab: &MeshLab,
    room: &str,
    path: &[String],
    bystanders: &[&str],
) -> Result<()> {
    let id = |n: &str| lab.node_id(n);
    let source = id(&path[0])?;
    let mut last = String::new();
    let held = eventually(
        &format!("the dataplanes on {path:?} to hold the route"),
        Duration::from_secs(10),
        || {
            for (i, node) in path.iter().enumerate() {
                let Some(d) = lab.held_desired(node)? else {
                    last = format!("{node}: nothing held");
                    return Ok(None);
                };
                last = lab.names_for_ids(&format!("{node}: {d}"));
                let Some(r) = d["routes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|r| r["room"] == room && r["source"] == source.as_str())
                else {
                    return Ok(None);
                };
                let up = if i == 0 {
                    Value::Null
                } else {
                    Value::from(id(&path[i - 1])?)
                };
                let down: Vec<Value> = match path.get(i + 1) {
                    Some(n) => vec![Value::from(id(n)?)],
                    None => vec![],
                };
                if r["upstream"] != up || r["downstream"] != Value::from(down) {
                    return Ok(None);
                }
                let mut want = Vec::new();
                for n in [i.checked_sub(1).map(|j| &path[j]), path.get(i + 1)]
                    .into_iter()
                    .flatten()
                {
                    want.push((id(n)?, lab.node_mesh(n)?.to_string()));
                }
                want.sort();
                let mut links: Vec<(String, String)> = d["links"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|l| {
                        (
                            l["peer"].as_str().unwrap_or_default().to_owned(),
                            l["address"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect();
                links.sort();
                if links != want
                    || d["links"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|l| l["trusted"] != true)
                {
                    return Ok(None);
                }
            }
            for node in bystanders {
                let d = lab.held_desired(node)?.unwrap_or_default();
                last = lab.names_for_ids(&format!("{node}: {d}"));
                if d["routes"]
                    .as_array()
                    .is_some_and(|rs| rs.iter().any(|r| r["room"] == room))
                {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        },
    );
    held.with_context(|| format!("last held: {last}"))
}

#[test]
fn route_forms_through_a_transit_node_and_moves_when_it_dies() -> Result<()> {
    let Some(mut lab) = square("route_forms_through_a_transit_node_and_moves_when_it_dies") else {
        return Ok(());
    };
    lab.wait_until_up(4, UP)?;
    // A publisher on A, a subscriber on C: their heartbeats carry the room.
    let pair = lab.plain_rtp_pair("demo", "a", "c")?;
    let (a, c) = (lab.node_id("a")?, lab.node_id("c")?);
    eventually("room demo in the scheduler", ROUTE, || {
        let rooms = lab.rooms()?;
        Ok(rooms["rooms"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| {
                r["room"] == "demo"
                    && r["publishers"] == serde_json::json!([a])
                    && r["subscribers"] == serde_json::json!([c])
            })
            .map(drop))
    })
    .with_context(|| lab.mesh_report())?;

    // Routes are computed over measured links only: every node must report
    // its topology neighbours as reachable.
    eventually(
        "every node to report its mesh neighbours as measured links",
        ROUTE,
        || {
            for name in lab.node_names() {
                let links = lab.node_detail(name)?["links"].clone();
                for peer in lab.neighbours(name) {
                    let id = lab.node_id(peer)?;
                    let measured = links.as_array().into_iter().flatten().any(|l| {
                        l["peer"] == id.as_str() && l["loss"].as_f64().is_some_and(|x| x < 0.5)
                    });
                    if !measured {
                        return Ok(None);
                    }
                }
            }
            Ok(Some(()))
        },
    )
    .with_context(|| lab.mesh_report())?;

    // Two hops through B or D: there is no A–C link.
    let path = lab.wait_route("demo", "a", "c", ROUTE, |p| {
        p.len() == 3 && (p[1] == "b" || p[1] == "d")
    })?;
    let transit = path[1].clone();
    let other = if transit == "b" { "d" } else { "b" };
    expect_held_routes(&lab, "demo", &path, &[other])?;
    // Media crosses the mesh: A → transit → C. The nodes' subscriptions and
    // announcements settle within a few 500 ms rounds of the routes being
    // held (the nodes get their desired states at slightly different
    // times), so warm up until media arrives; from then on every packet
    // arrives (the links are clean).
    let mut pair = pair;
    let warm = Instant::now();
    warm_up(&lab, &mut pair)?;
    // The links are clean. Route switches are make-before-break, but the
    // veths still drop the odd packet on a loaded machine, so 2 % slack.
    let (got, arrived) = send_and_count(&mut pair, 300)?;
    ensure!(
        arrived >= 294,
        "C received {arrived} ({} datagrams) of 300 packets sent to A once media flowed (warm-up {:?})\n{}",
        got.len(),
        warm.elapsed(),
        lab.mesh_report()
    );

    // The transit node dies while the publisher keeps sending: the route
    // moves through the other one and the subscriber's stream resumes
    // within 3 s. Routes may also move while every node lives (a probe
    // lost on a loaded machine makes a link costlier), so the node killed
    // is the plan's transit of that moment, and a kill after which media
    // never stopped (the route had left that node just before) is not a
    // failover: that node is started again and the current transit is
    // killed instead, up to 3 times.
    for attempt in 1..=3 {
        let path = lab.wait_route("demo", "a", "c", ROUTE, |p| {
            p.len() == 3 && (p[1] == "b" || p[1] == "d")
        })?;
        let other = if path[1] == "b" { "d" } else { "b" };
        expect_held_routes(&lab, "demo", &path, &[other])?;
        pair.receiver.clear();
        let outcome = kill_transit_while_streaming(&mut lab, &mut pair)?;
        let Some(resumed_after) = outcome.resumed_after else {
            lab.start_node(&outcome.killed)?;
            lab.wait_until_up(4, UP)?;
            ensure!(
                attempt < 3,
                "3 times, the route left the node about to be killed just before the kill"
            );
            continue;
        };
        ensure!(
            resumed_after <= Duration::from_secs(3),
            "the subscriber recovered {resumed_after:?} after the kill (limit 3 s)\n{}\n{}",
            lab.mesh_report(),
            lab.log_tails(30)
        );
        expect_held_routes(&lab, "demo", &outcome.moved, &[])?;
        return Ok(());
    }
    unreachable!("every attempt returns or continues")
}

/// What [`kill_transit_while_streaming`] saw.
struct KillOutcome {
    /// The node killed.
    killed: String,
    /// The route after the kill.
    moved: Vec<String>,
    /// When media resumed after the kill: the end of the longest silence
    /// after it. `None` when media never stopped for 300 ms or more: the
    /// node killed carried none of it.
    resumed_after: Option<Duration>,
}

/// Streams 1,000 packets to A, 8 ms apart; 2 s in, kills the plan's transit
/// of that moment between A and C and waits for the route to move through
/// the other node.
fn kill_transit_while_streaming(lab: &mut MeshLab, pair: &mut PlainRtpPair) -> Result<KillOutcome> {
    std::thread::scope(|scope| -> Result<_> {
        let (target, tx, receiver) = (pair.target, &mut pair.sender, &pair.receiver);
        let sender = scope.spawn(move || tx.send(target, 1000, Duration::from_millis(8)));
        std::thread::sleep(Duration::from_secs(2));
        let transit = lab.wait_route("demo", "a", "c", ROUTE, |p| {
            p.len() == 3 && (p[1] == "b" || p[1] == "d")
        })?[1]
            .clone();
        let other = if transit == "b" { "d" } else { "b" };
        let killed = Instant::now();
        lab.kill(&transit)?;
        let moved = lab.wait_route("demo", "a", "c", ROUTE, |p| p == ["a", other, "c"])?;
        sender
            .join()
            .map_err(|_| anyhow::anyhow!("sender thread panicked"))??;
        let got = receiver.wait_for(usize::MAX, Duration::from_millis(500));
        let mut arrivals: Vec<Instant> = got.iter().map(|r| r.at).filter(|t| *t > killed).collect();
        arrivals.sort();
        // Every gap between arrivals after the kill, as (start, length)
        // from the kill. Media resumed at the end of the longest (the
        // first, on a tie); those over 100 ms are printed, so that a
        // failure says whether media stopped once or came back and
        // stopped again.
        let mut gaps = Vec::with_capacity(arrivals.len());
        let mut prev = killed;
        for t in &arrivals {
            gaps.push((prev.duration_since(killed), t.duration_since(prev)));
            prev = *t;
        }
        let longest = gaps
            .iter()
            .fold(None::<(Duration, Duration)>, |best, &g| match best {
                Some(b) if b.1 >= g.1 => Some(b),
                _ => Some(g),
            });
        let silences: Vec<_> = gaps
            .iter()
            .filter(|(_, len)| *len > Duration::from_millis(100))
            .collect();
        eprintln!(
            "killed {transit}; route moved to {moved:?}; silences after the kill (from, length): {silences:?}"
        );
        let resumed_after = match longest {
            None => bail!(
                "no media reached C after {transit} was killed\n{}",
                lab.mesh_report()
            ),
            // Failure detection alone takes longer than this.
            Some((_, len)) if len < Duration::from_millis(300) => {
                eprintln!(
                    "media never stopped: the route had left {transit} before it was killed; trying again"
                );
                None
            }
            Some((from, len)) => Some(from + len),
        };
        Ok(KillOutcome {
            killed: transit,
            moved,
            resumed_after,
        })
    })
}

/// A counter's value in Prometheus text, 0 when absent.
fn prom(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// A chain A–B–C whose nodes attach XDP to their mesh veths, B's media
/// socket bound to its mesh IP (node 1: 10.251.0.2), which the kernel's
/// flow key needs; `b_extra` adds flags to B.
fn transit_chain(b_extra: &[&str]) -> Result<MeshLab> {
    let mut cfg = ridge_tests::mesh::LabConfig::new(&["a", "b", "c"], &[("a", "b"), ("b", "c")]);
    let xdp = |ifaces: &[&str]| -> Vec<String> {
        let mut args = vec!["--xdp".to_owned(), "auto".to_owned()];
        for i in ifaces {
            args.extend(["--media-interface".to_owned(), (*i).to_owned()]);
        }
        args
    };
    // Every mesh veth gets XDP: a veth delivers an XDP_REDIRECT only to a
    // peer with XDP.
    cfg.node_args.insert("a".into(), xdp(&["m-b"]));
    let mut b = xdp(&["m-a", "m-c"]);
    b.extend(["--udp", "10.251.0.2:5004"].map(str::to_owned));
    b.extend(b_extra.iter().map(|s| (*s).to_owned()));
    cfg.node_args.insert("b".into(), b);
    cfg.node_args.insert("c".into(), xdp(&["m-b"]));
    let lab = MeshLab::start(cfg)?;
    lab.wait_until_up(3, UP)?;
    Ok(lab)
}

/// A publisher on A and a subscriber on C, the route A→B→C held and media
/// reaching C.
fn transit_pair(lab: &MeshLab) -> Result<ridge_tests::mesh::PlainRtpPair> {
    let mut pair = lab.plain_rtp_pair("demo", "a", "c")?;
    lab.wait_route("demo", "a", "c", ROUTE, |p| p == ["a", "b", "c"])?;
    warm_up(lab, &mut pair)?;
    Ok(pair)
}

/// After a settle, sends `n` packets 5 ms apart and waits up to 5 s for
/// them: what arrived, and how many of those `n` did.
fn send_and_count(
    pair: &mut ridge_tests::mesh::PlainRtpPair,
    n: u32,
) -> Result<(Vec<ridge_tests::mesh::Received>, usize)> {
    std::thread::sleep(Duration::from_millis(200));
    pair.receiver.clear();
    let start = pair.sender.sent();
    pair.send(n, Duration::from_millis(5))?;
    let got = pair.receiver.wait_for(n as usize, Duration::from_secs(5));
    let indices = pair.received_indices();
    let arrived = (start..start + n)
        .filter(|i| indices.binary_search(i).is_ok())
        .count();
    Ok((got, arrived))
}

/// Sends bursts to the publisher until media reaches C: the nodes'
/// subscriptions and announcements settle within a few 500 ms rounds of
/// the route being held.
fn warm_up(lab: &MeshLab, pair: &mut ridge_tests::mesh::PlainRtpPair) -> Result<()> {
    let warm = Instant::now();
    while pair.receiver.received().is_empty() {
        ensure!(
            warm.elapsed() < ROUTE,
            "no media reached C within {ROUTE:?} of the route being held\n{}",
            lab.mesh_report()
        );
        pair.send(30, Duration::from_millis(5))?;
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// B's kernel forwarded packets of mesh transit streams, per its metrics.
fn kernel_forwarded(lab: &MeshLab) -> Result<f64> {
    Ok(prom(
        &lab.node_metrics("b")?,
        "ridge_kernel_mesh_packets_total{outcome=\"forwarded\"}",
    ))
}

/// Waits until B's kernel forwards the transit stream (B offers it once it
/// relayed it cleanly; a reconcile pass, 500 ms, installs it).
fn wait_kernel_transit(lab: &MeshLab, pair: &mut ridge_tests::mesh::PlainRtpPair) -> Result<()> {
    eventually("B's kernel to forward the transit stream", ROUTE, || {
        pair.send(20, Duration::from_millis(5))?;
        let m = lab.node_metrics("b")?;
        Ok((prom(&m, "ridge_bpf_mesh_flows") >= 1.0 && kernel_forwarded(lab)? > 0.0).then_some(()))
    })
    .with_context(|| {
        format!(
            "{}\n{}",
            lab.node_metrics("b").unwrap_or_default(),
            lab.mesh_report()
        )
    })
}

#[test]
fn a_transit_node_forwards_the_mesh_in_the_kernel() -> Result<()> {
    let test = "a_transit_node_forwards_the_mesh_in_the_kernel";
    if require(test, MeshLab::prerequisites()).is_err() {
        return Ok(());
    }
    let lab = transit_chain(&[])?;
    let mut pair = transit_pair(&lab)?;
    // The stream goes back to B's core whenever its link stops qualifying:
    // on a loaded machine the scheduler may turn FEC on for a while when
    // the agents' probes see loss. Then it waits for the kernel again, up
    // to three times.
    let mut by_kernel = 0.0;
    for attempt in 0..3 {
        wait_kernel_transit(&lab, &mut pair)?;
        std::thread::sleep(Duration::from_millis(200));
        pair.receiver.clear();
        let before = kernel_forwarded(&lab)?;
        let start = pair.sender.sent();
        pair.send(500, Duration::from_millis(2))?;
        let got = pair.receiver.wait_for(500, Duration::from_secs(5));
        let indices = pair.received_indices();
        let arrived = (start..start + 500)
            .filter(|i| indices.binary_search(i).is_ok())
            .count();
        by_kernel = kernel_forwarded(&lab)? - before;
        let m = lab.node_metrics("b")?;
        eprintln!(
            "attempt {attempt}: C got {arrived}/500 ({} datagrams); B's kernel forwarded {by_kernel}, bad tags {}, too old {}, FEC packets from A {}",
            got.len(),
            prom(&m, "ridge_kernel_mesh_packets_total{outcome=\"bad_tag\"}"),
            prom(&m, "ridge_kernel_mesh_packets_total{outcome=\"too_old\"}"),
            m.lines()
                .filter(|l| l.starts_with("ridge_mesh_fec_received_total"))
                .collect::<Vec<_>>()
                .join(", "),
        );
        ensure!(
            arrived == 500,
            "C received {arrived} of 500\n{}",
            lab.mesh_report()
        );
        if by_kernel >= 490.0 {
            break;
        }
    }
    ensure!(
        by_kernel >= 490.0,
        "B's kernel forwarded {by_kernel} of 500 (the rest went through its core)\n{}",
        lab.node_metrics("b")?
    );
    Ok(())
}

/// H.264 crosses the 4-node lab as VP8 does: a plain publisher on A and a
/// plain subscriber on C, both naming the codec; the packets arrive with
/// their NAL headers intact.
#[test]
fn h264_crosses_the_mesh_lab() -> Result<()> {
    let Some(lab) = square("h264_crosses_the_mesh_lab") else {
        return Ok(());
    };
    lab.wait_until_up(4, UP)?;
    let mut pair = lab.plain_rtp_pair_in("h264-room", "a", "c", "h264")?;
    lab.wait_route("h264-room", "a", "c", ROUTE, |p| p.len() >= 2)?;
    warm_up(&lab, &mut pair)?;
    // As in the VP8 route test: clean links, but the veths drop the odd
    // packet on a loaded machine, so 2 % slack.
    let (got, arrived) = send_and_count(&mut pair, 300)?;
    ensure!(
        arrived >= 294,
        "C received {arrived} of 300 H.264 packets\n{}",
        lab.mesh_report()
    );
    for r in &got {
        let idr = r.index.is_some_and(|i| i.is_multiple_of(30));
        ensure!(
            r.payload_head == Some(if idr { 0x65 } else { 0x41 }),
            "packet {:?}: NAL header {:02x?}",
            r.index,
            r.payload_head
        );
    }
    let c = lab.node_metrics("c")?;
    ensure!(
        prom(
            &c,
            "ridge_packets_dropped_total{reason=\"malformed_payload\"}"
        ) == 0.0,
        "C dropped H.264 as malformed"
    );
    Ok(())
}

/// Busy CPU time of the whole machine so far (all CPUs, /proc/stat), in
/// clock ticks.
fn busy_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("/proc/stat is empty")?;
    let f: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    ensure!(f.len() >= 8, "unexpected /proc/stat: {cpu}");
    Ok(f[0] + f[1] + f[2] + f[5] + f[6] + f[7])
}

/// CPU time of process `pid` so far (utime + stime), in clock ticks.
fn process_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces) start at ") ".
    let rest = stat
        .rsplit_once(") ")
        .context("unexpected /proc/pid/stat")?
        .1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    ensure!(f.len() > 12, "unexpected /proc/{pid}/stat");
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

/// Opt-in benchmark (`cargo test -p ridge-tests --test mesh_netns --
/// --ignored transit_cpu`): the machine's CPU per packet relayed A→B→C
/// with B's transit in the kernel and in B's core, alternating, on the
/// same traffic (1,200-byte packets in bursts of 20 every 1 ms, about
/// 15,000 packets/s here). Everything else (A, C, the clients) is the
/// same in both, so the difference is B's cost; B's own process CPU is
/// printed too (the XDP work runs in softirq and is not in it). Run with
/// release binaries (`RIDGE_MESH_BIN_DIR`). Prints the figures for
/// docs/benchmarks.md; asserts only that every run delivered.
#[test]
#[ignore = "benchmark: run on demand"]
fn transit_cpu_kernel_vs_core() -> Result<()> {
    if require("transit_cpu_kernel_vs_core", MeshLab::prerequisites()).is_err() {
        return Ok(());
    }
    const N: u32 = 60_000;
    let hz = 100.0; // USER_HZ on Linux
    for round in 0..3 {
        for kernel in [true, false] {
            let extra: &[&str] = if kernel {
                &[]
            } else {
                &["--no-kernel-forwarding"]
            };
            let lab = transit_chain(extra)?;
            let mut pair = transit_pair(&lab)?;
            if kernel {
                wait_kernel_transit(&lab, &mut pair)?;
            }
            std::thread::sleep(Duration::from_millis(500));
            pair.receiver.clear();
            let before_k = kernel_forwarded(&lab)?;
            let start = pair.sender.sent();
            let t0 = Instant::now();
            let b0 = busy_ticks()?;
            let b_pid = lab.dataplane_pid("b")?;
            let p0 = process_ticks(b_pid)?;
            let target = pair.target;
            for _ in 0..N / 20 {
                pair.sender.send_sized(target, 20, Duration::ZERO, 1200)?;
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = pair.receiver.wait_for(N as usize, Duration::from_secs(2));
            let b1 = busy_ticks()?;
            let p1 = process_ticks(b_pid)?;
            let secs = t0.elapsed().as_secs_f64();
            let indices = pair.received_indices();
            let arrived = (start..start + N)
                .filter(|i| indices.binary_search(i).is_ok())
                .count();
            let by_kernel = kernel_forwarded(&lab)? - before_k;
            let cpu_s = (b1 - b0) as f64 / hz;
            eprintln!(
                "BENCH transit round {round} kernel={kernel}: {arrived}/{N} delivered in {secs:.2} s \
                 ({:.0} pps), B's kernel forwarded {by_kernel}; machine CPU {cpu_s:.2} s = {:.2} us \
                 per packet; B's process {:.2} s = {:.2} us per packet",
                f64::from(N) / secs,
                cpu_s * 1e6 / f64::from(N),
                (p1 - p0) as f64 / hz,
                (p1 - p0) as f64 / hz * 1e6 / f64::from(N)
            );
            let drops = |node: &str| -> String {
                lab.node_metrics(node)
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| {
                        (l.starts_with("ridge_bpf_dropped")
                            || l.starts_with("ridge_packets_dropped")
                            || l.starts_with("ridge_kernel_mesh_packets")
                            || l.starts_with("ridge_bpf_mesh_flows")
                            || l.starts_with("ridge_mesh_"))
                            && !l.ends_with(" 0")
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            ensure!(
                arrived as f64 >= f64::from(N) * 0.99,
                "kernel={kernel}: {arrived}/{N}; drops on a: {}; b: {}; c: {}",
                drops("a"),
                drops("b"),
                drops("c")
            );
        }
    }
    Ok(())
}

#[test]
fn scheduler_restart_loses_no_nodes() -> Result<()> {
    let Some(mut lab) = square("scheduler_restart_loses_no_nodes") else {
        return Ok(());
    };
    let before = lab.wait_until_up(4, UP)?;
    let ids: BTreeSet<String> = before.iter().map(|n| n.id.clone()).collect();
    lab.restart_scheduler()?;
    let restarted = now_ms();
    // Every agent heartbeats the new process (not just the stored state).
    let after = eventually(
        "every node to heartbeat the restarted scheduler",
        UP,
        || {
            let nodes = lab.nodes()?;
            Ok((nodes.len() == 4
                && nodes.iter().all(|n| {
                    n.state == "up" && n.last_heartbeat_ms.is_some_and(|t| t > restarted)
                }))
            .then_some(nodes))
        },
    )
    .with_context(|| lab.mesh_report())?;
    let ids_after: BTreeSet<String> = after.iter().map(|n| n.id.clone()).collect();
    ensure!(ids == ids_after, "{ids:?} became {ids_after:?}");
    for name in lab.node_names() {
        let log = lab.agent_log(name);
        ensure!(
            log.matches("ridge-agent running:").count() == 1
                && !log.contains("enrollment refused")
                && !log.contains("fatal"),
            "{name}'s agent:\n{log}"
        );
        // The desired-state watch resumed: the dataplane holds the
        // scheduler's current version.
        let id = lab.node_id(name)?;
        eventually(
            &format!("{name} to hold its current desired state"),
            Duration::from_secs(15),
            || {
                let v = lab
                    .nodes()?
                    .into_iter()
                    .find(|n| n.id == id)
                    .map(|n| n.desired_version);
                let held = lab.held_desired(name)?.and_then(|d| d["version"].as_u64());
                Ok((v.is_some() && v == held).then_some(()))
            },
        )?;
    }
    // The lease still works after the restart.
    lab.kill("d")?;
    let d = lab.node_id("d")?;
    eventually("d to go down", UP, || {
        Ok(lab
            .nodes()?
            .iter()
            .any(|n| n.id == d && n.state == "down")
            .then_some(()))
    })?;
    Ok(())
}

/// Chromium (in the hub) publishes camera and microphone to A over WHIP and
/// watches on C over WHEP: the scheduler routes the room through B or D,
/// and the viewer decodes the publisher's video and audio.
#[test]
fn chromium_publishes_on_a_and_watches_on_c_through_the_mesh() -> Result<()> {
    chromium_through_the_mesh(
        "chromium_publishes_on_a_and_watches_on_c_through_the_mesh",
        "e2e-mesh",
        None,
    )
}

/// The same in H.264: the codec travels in the mesh's announcements and
/// C's viewer decodes H.264.
#[test]
fn chromium_h264_publishes_on_a_and_watches_on_c_through_the_mesh() -> Result<()> {
    chromium_through_the_mesh(
        "chromium_h264_publishes_on_a_and_watches_on_c_through_the_mesh",
        "e2e-mesh-h264",
        Some("H264"),
    )
}

/// Chromium publishes on A (in `codec`, or the browser's choice) and
/// watches on C through the mesh.
fn chromium_through_the_mesh(
    name: &str,
    room: &'static str,
    codec: Option<&'static str>,
) -> Result<()> {
    if require(name, ridge_tests::skip::chromium_present()).is_err() {
        return Ok(());
    }
    let Some(lab) = square(name) else {
        return Ok(());
    };
    lab.wait_until_up(4, UP)?;
    let video_codec = codec.map_or("undefined".to_owned(), |c| format!("{c:?}"));
    let (a_url, c_url) = (lab.node_http("a")?, lab.node_http("c")?);
    let pub_token = lab.dispatch_token("a", room, "camera", true, false)?;
    let sub_token = lab.dispatch_token("c", room, "viewer", false, true)?;
    // getUserMedia (the fake camera) needs a secure context.
    let secure = format!("--unsafely-treat-insecure-origin-as-secure={a_url},{c_url}");
    let (pub_url, sub_url) = (
        format!("{a_url}/?token={pub_token}"),
        format!("{c_url}/?token={sub_token}"),
    );
    let run = async move {
        let browser = ridge_tests::Chromium::launch_with(&[secure.as_str()]).await?;
        let publisher = browser.open(&pub_url).await?;
        publisher
            .wait_for("typeof window.Ridge === 'object'", Duration::from_secs(10))
            .await
            .context("the demo page on A did not load ridge.js")?;
        publisher
            .eval(&format!(
                "(async () => {{ const s = await Ridge.fakeStream({{width: 640, height: 480}});
                   return await Ridge.whipPublish({{room: {room:?}, token: {pub_token:?}, stream: s,
                     videoCodec: {video_codec}}}); }})()"
            ))
            .await
            .context("WHIP publish on A")?;
        let viewer = browser.open(&sub_url).await?;
        viewer
            .wait_for("typeof window.Ridge === 'object'", Duration::from_secs(10))
            .await
            .context("the demo page on C did not load ridge.js")?;
        let sub = viewer
            .eval(&format!(
                "(() => {{ const v = document.createElement('video'); v.id = 'mesh-remote';
                   document.body.appendChild(v);
                   return Ridge.whepSubscribe({{room: {room:?}, token: {sub_token:?}, videoElement: v}}); }})()"
            ))
            .await
            .context("WHEP subscribe on C")?;
        let id = sub["id"].as_str().context("WHEP session id")?.to_string();
        let start = Instant::now();
        loop {
            let s = viewer.eval(&format!("Ridge.stats({id:?})")).await?;
            let frames = s["video"]["framesDecoded"].as_f64().unwrap_or(0.0);
            let audio = s["audio"]["packetsReceived"].as_f64().unwrap_or(0.0);
            if frames > 60.0 && audio > 60.0 && s["video"]["frameWidth"].as_f64() == Some(640.0) {
                return Ok::<_, anyhow::Error>((start.elapsed(), s));
            }
            ensure!(
                start.elapsed() < Duration::from_secs(60),
                "C's viewer decoded no video from A; last stats: {s}; console: {:?}",
                viewer.console()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let (took, stats) = lab
        .block_on(run)
        .with_context(|| format!("{}\n{}", lab.mesh_report(), lab.log_tails(40)))?;
    eprintln!("C decoded A's camera {took:?} after subscribing: {stats}");
    if let Some(c) = codec {
        ensure!(
            stats["video"]["codec"] == format!("video/{c}"),
            "C decoded another codec: {stats}"
        );
    }
    // The media went through a transit node: there is no A–C link.
    let path = lab
        .route_path(room, "a", "c")?
        .context("no route A → C for the room")?;
    ensure!(
        path.len() == 3 && (path[1] == "b" || path[1] == "d"),
        "route {path:?}"
    );
    let transit = lab.dataplane_status(&path[1])?;
    let relayed: u64 = transit["mesh_links"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| l["packets_out"].as_u64().unwrap_or(0))
        .sum();
    ensure!(
        relayed > 200,
        "{} relayed {relayed} packets: {transit}",
        path[1]
    );
    Ok(())
}
