//! Desired state per node, derived from the route plan. Pure: the same
//! inputs give byte-identical JSON, so the leader detects changes by
//! comparing serialized states.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io;

use crate::api::{DesiredLink, DesiredRoute, DesiredState};
use crate::crypto::LinkKeys;
use crate::route::{LinkInput, RoutePlan};

/// What desired-state derivation needs to know about a node.
#[derive(Debug, Clone)]
pub struct NodeFacts<'a> {
    pub id: &'a str,
    pub drain: bool,
    pub dataplane_secret: &'a str,
    /// `addresses.mesh`, else `addresses.media`.
    pub mesh_address: Option<&'a str>,
    /// The node's `trust_domain` label, if any.
    pub trust_domain: Option<&'a str>,
    /// Up and not draining: worth measuring a link to.
    pub up: bool,
}

/// Peers a node probes besides its links, at most: enough for a PoP's
/// neighbourhood, bounded so a large mesh does not probe all pairs.
pub const MAX_PROBES: usize = 32;

/// Desired states of all `nodes` (version 0; the caller assigns versions),
/// built on all cores: with 1,000 nodes this is tens of thousands of link
/// keys (HMACs), most of them for probes.
pub fn derive(nodes: &[NodeFacts<'_>], plan: &RoutePlan, mesh_key: &str) -> Vec<DesiredState> {
    let keys = LinkKeys::new(mesh_key);
    let by_id: HashMap<&str, &NodeFacts<'_>> = nodes.iter().map(|n| (n.id, n)).collect();
    // node -> (room, source) -> (upstream, downstream), borrowed from the plan.
    type Entry<'p> = (Option<&'p str>, BTreeSet<&'p str>);
    let mut per_node: HashMap<&str, BTreeMap<(&str, &str), Entry<'_>>> = HashMap::new();
    for r in &plan.routes {
        let key = (r.room.as_str(), r.source.as_str());
        per_node
            .entry(r.source.as_str())
            .or_default()
            .entry(key)
            .or_default();
        for e in &r.edges {
            let (from, to) = (e.from.as_str(), e.to.as_str());
            per_node
                .entry(from)
                .or_default()
                .entry(key)
                .or_default()
                .1
                .insert(to);
            per_node.entry(to).or_default().entry(key).or_default().0 = Some(from);
        }
    }
    // Every other up node with a mesh address is a link candidate: measure
    // it (nearest ids first is arbitrary but stable).
    let candidates: Vec<&NodeFacts<'_>> = nodes
        .iter()
        .filter(|p| p.up && p.mesh_address.is_some())
        .collect();
    par_map(nodes, |n| {
        let mut peers: BTreeSet<&str> = BTreeSet::new();
        let routes: Vec<DesiredRoute> = per_node
            .get(n.id)
            .map(|m| {
                m.iter()
                    .map(|(&(room, source), (up, down))| {
                        peers.extend(up.iter().copied());
                        peers.extend(down.iter().copied());
                        DesiredRoute {
                            room: room.to_owned(),
                            source: source.to_owned(),
                            upstream: up.map(str::to_owned),
                            downstream: down.iter().map(|d| (*d).to_owned()).collect(),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let probes: Vec<DesiredLink> = candidates
            .iter()
            .filter(|p| p.id != n.id && !peers.contains(p.id))
            .take(MAX_PROBES)
            .map(|p| DesiredLink {
                peer: p.id.to_owned(),
                address: p.mesh_address.map(str::to_owned),
                key: keys.key(n.id, p.id),
                trusted: false,
                fec: false,
            })
            .collect();
        let links = peers
            .into_iter()
            .map(|peer| {
                let p = by_id.get(peer);
                let trusted = matches!(
                    (n.trust_domain, p.and_then(|p| p.trust_domain)),
                    (Some(a), Some(b)) if !a.is_empty() && a == b
                );
                DesiredLink {
                    address: p.and_then(|p| p.mesh_address).map(str::to_owned),
                    key: keys.key(n.id, peer),
                    trusted,
                    fec: false,
                    peer: peer.to_owned(),
                }
            })
            .collect();
        DesiredState {
            node_id: n.id.to_owned(),
            version: 0,
            drain: n.drain,
            dataplane_secret: Some(n.dataplane_secret.to_owned()),
            links,
            routes,
            probes,
        }
    })
}

/// Whether `state` serializes to exactly `stored` (how the leader finds the
/// states that changed): compares while serializing, so it builds no new
/// JSON and stops at the first byte that differs.
pub fn same_json(state: &DesiredState, stored: &str) -> bool {
    /// Accepts only the bytes of `rest`, in order.
    struct Compare<'a> {
        rest: &'a [u8],
    }
    impl io::Write for Compare<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            match self.rest.strip_prefix(buf) {
                Some(rest) => {
                    self.rest = rest;
                    Ok(buf.len())
                }
                None => Err(io::ErrorKind::InvalidData.into()),
            }
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut w = Compare {
        rest: stored.as_bytes(),
    };
    serde_json::to_writer(&mut w, state).is_ok() && w.rest.is_empty()
}

/// `f` over `items`, in order, split over the available cores when there
/// are enough items to be worth a thread.
fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = crate::worker_threads(items.len(), 64);
    if threads == 1 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        crate::join_all(
            items
                .chunks(chunk)
                .map(|c| scope.spawn(move || c.iter().map(f).collect::<Vec<_>>()))
                .collect(),
        )
    })
}

/// Measured loss at or above which a mesh link starts carrying FEC.
pub const FEC_LOSS_THRESHOLD: f64 = 0.02;
/// Measured loss below which a link that carries FEC stops: the gap to
/// [`FEC_LOSS_THRESHOLD`] keeps a link whose loss hovers around 2 % from
/// switching at every computation.
pub const FEC_OFF_THRESHOLD: f64 = 0.01;

/// Turns FEC on for the links of `states` whose measured loss (the worse
/// of what either end reports, `links` as the heartbeats give them) is at
/// least [`FEC_LOSS_THRESHOLD`], or at least [`FEC_OFF_THRESHOLD`] when
/// `previous` (the last computation's result) had it on; off for the
/// others. Both ends of a link get the same flag. Apply to [`derive`]'s
/// output; returns the links with FEC on, as (lower id, higher id).
pub fn mark_lossy_links(
    states: &mut [DesiredState],
    links: &[LinkInput],
    previous: Option<&BTreeSet<(String, String)>>,
) -> BTreeSet<(String, String)> {
    fn pair<'a>(a: &'a str, b: &'a str) -> (&'a str, &'a str) {
        if a <= b { (a, b) } else { (b, a) }
    }
    // The worse direction per unordered pair: one pass over the links, so
    // a 1,000-node mesh costs a hash lookup per desired link.
    let mut worst: HashMap<(&str, &str), f64> = HashMap::with_capacity(links.len());
    for l in links {
        let w = worst.entry(pair(&l.from, &l.to)).or_insert(0.0);
        *w = w.max(l.loss);
    }
    let was_on: HashSet<(&str, &str)> = previous
        .into_iter()
        .flatten()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let mut on = BTreeSet::new();
    for st in states {
        for l in &mut st.links {
            let (a, b) = pair(&st.node_id, &l.peer);
            let loss = worst.get(&(a, b)).copied().unwrap_or(0.0);
            let threshold = if was_on.contains(&(a, b)) {
                FEC_OFF_THRESHOLD
            } else {
                FEC_LOSS_THRESHOLD
            };
            l.fec = loss >= threshold;
            if l.fec {
                on.insert((a.to_owned(), b.to_owned()));
            }
        }
    }
    on
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{Edge, RoomRoute};

    fn facts<'a>(id: &'a str, td: Option<&'a str>) -> NodeFacts<'a> {
        NodeFacts {
            id,
            drain: false,
            dataplane_secret: "s",
            mesh_address: Some("10.0.0.1:5006"),
            trust_domain: td,
            up: true,
        }
    }

    #[test]
    fn routes_and_links_per_node() {
        let plan = RoutePlan {
            fec_links: BTreeSet::new(),
            routes: vec![RoomRoute {
                room: "r".into(),
                source: "a".into(),
                edges: vec![
                    Edge {
                        from: "a".into(),
                        to: "b".into(),
                    },
                    Edge {
                        from: "b".into(),
                        to: "c".into(),
                    },
                ],
                unreachable: vec![],
            }],
        };
        let nodes = [
            facts("a", Some("x")),
            facts("b", Some("x")),
            facts("c", None),
            facts("d", None),
        ];
        let d = derive(&nodes, &plan, "mk");
        assert_eq!(d[0].routes[0].upstream, None);
        assert_eq!(d[0].routes[0].downstream, vec!["b".to_owned()]);
        assert_eq!(d[1].routes[0].upstream.as_deref(), Some("a"));
        assert_eq!(d[1].routes[0].downstream, vec!["c".to_owned()]);
        assert_eq!(d[2].routes[0].downstream, Vec::<String>::new());
        assert!(d[3].routes.is_empty() && d[3].links.is_empty());
        let b_links: Vec<_> = d[1]
            .links
            .iter()
            .map(|l| (l.peer.as_str(), l.trusted))
            .collect();
        assert_eq!(b_links, vec![("a", true), ("c", false)]);
        // Both ends of a link get the same key.
        assert_eq!(d[0].links[0].key, d[1].links[0].key);
        // No FEC unless a measured loss asks for it, and then on both
        // ends of the link only.
        assert!(d.iter().flat_map(|s| &s.links).all(|l| !l.fec));
        assert!(!serde_json::to_string(&d).unwrap().contains("fec"));
        let mut lossy = d.clone();
        let link = |from: &str, to: &str, loss: f64| LinkInput {
            from: from.into(),
            to: to.into(),
            rtt_ms: 5.0,
            loss,
            jitter_ms: 0.0,
        };
        let on = mark_lossy_links(
            &mut lossy,
            &[
                link("a", "b", 0.001),
                link("c", "b", 0.03),
                link("b", "c", 0.0),
            ],
            None,
        );
        assert_eq!(on, BTreeSet::from([("b".to_owned(), "c".to_owned())]));
        // Hysteresis: at 1.5 % a link stays on if it was on, and does not
        // come on if it was off; below 1 % it goes off.
        let hovering = [link("b", "c", 0.015)];
        let fec_bc = |states: &[DesiredState]| states[1].links[1].fec;
        let mut again = d.clone();
        assert_eq!(mark_lossy_links(&mut again, &hovering, Some(&on)), on);
        assert!(fec_bc(&again));
        let mut fresh = d.clone();
        assert!(mark_lossy_links(&mut fresh, &hovering, None).is_empty());
        assert!(!fec_bc(&fresh));
        let mut off = d.clone();
        assert!(mark_lossy_links(&mut off, &[link("b", "c", 0.009)], Some(&on)).is_empty());
        assert!(!fec_bc(&off));
        let fec: Vec<(&str, &str, bool)> = lossy
            .iter()
            .flat_map(|s| {
                s.links
                    .iter()
                    .map(|l| (s.node_id.as_str(), l.peer.as_str(), l.fec))
            })
            .collect();
        assert_eq!(
            fec,
            [
                ("a", "b", false),
                ("b", "a", false),
                ("b", "c", true),
                ("c", "b", true)
            ]
        );
        assert!(
            serde_json::to_string(&lossy[1])
                .unwrap()
                .contains(r#""fec":true"#)
        );
        // Deterministic.
        assert_eq!(
            serde_json::to_string(&d).unwrap(),
            serde_json::to_string(&derive(&nodes, &plan, "mk")).unwrap()
        );
    }

    /// [`derive`] as it was before it borrowed the plan's ids and used threads.
    fn derive_reference(
        nodes: &[NodeFacts<'_>],
        plan: &RoutePlan,
        mesh_key: &str,
    ) -> Vec<DesiredState> {
        let keys = LinkKeys::new(mesh_key);
        let by_id: HashMap<&str, &NodeFacts<'_>> = nodes.iter().map(|n| (n.id, n)).collect();
        // node -> (room, source) -> (upstream, downstream)
        type Entry = (Option<String>, BTreeSet<String>);
        let mut per_node: HashMap<&str, BTreeMap<(String, String), Entry>> = HashMap::new();
        for r in &plan.routes {
            let key = (r.room.clone(), r.source.clone());
            per_node
                .entry(r.source.as_str())
                .or_default()
                .entry(key.clone())
                .or_default();
            for e in &r.edges {
                per_node
                    .entry(e.from.as_str())
                    .or_default()
                    .entry(key.clone())
                    .or_default()
                    .1
                    .insert(e.to.clone());
                per_node
                    .entry(e.to.as_str())
                    .or_default()
                    .entry(key.clone())
                    .or_default()
                    .0 = Some(e.from.clone());
            }
        }
        nodes
            .iter()
            .map(|n| {
                let mut peers = BTreeSet::new();
                let routes: Vec<DesiredRoute> = per_node
                    .get(n.id)
                    .map(|m| {
                        m.iter()
                            .map(|((room, source), (up, down))| {
                                peers.extend(up.iter().cloned());
                                peers.extend(down.iter().cloned());
                                DesiredRoute {
                                    room: room.clone(),
                                    source: source.clone(),
                                    upstream: up.clone(),
                                    downstream: down.iter().cloned().collect(),
                                }
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                // Every other up node with a mesh address is a link candidate:
                // measure it (nearest ids first is arbitrary but stable).
                let probes: Vec<DesiredLink> = nodes
                    .iter()
                    .filter(|p| {
                        p.id != n.id && p.up && p.mesh_address.is_some() && !peers.contains(p.id)
                    })
                    .take(MAX_PROBES)
                    .map(|p| DesiredLink {
                        peer: p.id.to_owned(),
                        address: p.mesh_address.map(str::to_owned),
                        key: keys.key(n.id, p.id),
                        trusted: false,
                        fec: false,
                    })
                    .collect();
                let links = peers
                    .into_iter()
                    .map(|peer| {
                        let p = by_id.get(peer.as_str());
                        let trusted = matches!(
                            (n.trust_domain, p.and_then(|p| p.trust_domain)),
                            (Some(a), Some(b)) if !a.is_empty() && a == b
                        );
                        DesiredLink {
                            address: p.and_then(|p| p.mesh_address).map(str::to_owned),
                            key: keys.key(n.id, &peer),
                            trusted,
                            fec: false,
                            peer,
                        }
                    })
                    .collect();
                DesiredState {
                    node_id: n.id.to_owned(),
                    version: 0,
                    drain: n.drain,
                    dataplane_secret: Some(n.dataplane_secret.to_owned()),
                    links,
                    routes,
                    probes,
                }
            })
            .collect()
    }

    #[test]
    fn derive_matches_reference_on_a_random_plan() {
        let mut rnd = crate::test_rng(0x2545_f491_4f6c_dd1d);
        // 150 nodes (enough for the threaded path), a plan that also names
        // nodes without facts and repeats a (room, source).
        let ids: Vec<String> = (0..160).map(|i| format!("n{i:03}")).collect();
        let domains = [None, Some("x"), Some("y"), Some("")];
        let nodes: Vec<NodeFacts<'_>> = ids[..150]
            .iter()
            .map(|id| NodeFacts {
                id,
                drain: rnd().is_multiple_of(10),
                dataplane_secret: "s",
                mesh_address: (!rnd().is_multiple_of(5)).then_some("10.0.0.1:5006"),
                trust_domain: domains[(rnd() % 4) as usize],
                up: !rnd().is_multiple_of(6),
            })
            .collect();
        let mut routes = Vec::new();
        for r in 0..80 {
            let source = ids[(rnd() % 160) as usize].clone();
            let edges = (0..rnd() % 12)
                .map(|_| Edge {
                    from: ids[(rnd() % 160) as usize].clone(),
                    to: ids[(rnd() % 160) as usize].clone(),
                })
                .collect();
            routes.push(RoomRoute {
                room: format!("r{}", r % 70),
                source,
                edges,
                unreachable: vec![],
            });
        }
        routes.push(routes[3].clone());
        let plan = RoutePlan {
            routes,
            fec_links: BTreeSet::new(),
        };
        assert_eq!(
            derive(&nodes, &plan, "mk"),
            derive_reference(&nodes, &plan, "mk")
        );
    }

    #[test]
    fn same_json_is_equality_of_the_serialization() {
        let plan = RoutePlan::default();
        let nodes = [facts("a", None), facts("b", Some("x"))];
        let d = derive(&nodes, &plan, "mk");
        let json = serde_json::to_string(&d[0]).unwrap();
        assert!(same_json(&d[0], &json));
        assert!(!same_json(&d[1], &json));
        assert!(!same_json(&d[0], &json[..json.len() - 1]));
        assert!(!same_json(&d[0], &format!("{json} ")));
        assert!(!same_json(&d[0], ""));
    }
}
