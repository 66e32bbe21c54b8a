//! Route computation: pure, no I/O, no clock.
//!
//! Input is a snapshot of the mesh ([`MeshView`]): which nodes are up and
//! may relay, their load, the measured links, and which nodes publish or
//! subscribe to which room. Output is a [`RoutePlan`]: one distribution tree
//! per (room, source node).
//!
//! Paths are minimum cost with at most `max_hops` links, found with a
//! hop-bounded Bellman-Ford (exact for the hop bound, unlike Dijkstra, which
//! can find a cheaper but longer path and then has to give up), one search
//! per source node that publishes, on all cores. A search only finishes the
//! work its subscriber nodes need: the last levels pull the few nodes that
//! can still reach one instead of pushing the whole frontier (see
//! [`Graph::reach`]), with the same paths to the last tie. The cost of
//! entering node `v` over link `u→v` is
//! `rtt + jitter + loss_weight·loss% + load_weight·overload(v) + hop_cost`,
//! where `overload` is 0 up to `load_knee` and rises linearly to 1 at full
//! load: a node at 20 % CPU relays as well as one at 5 %, so only load that
//! threatens the node's media moves routes.
//! A subscriber's previous path is kept while it stays valid and costs at
//! most `stickiness` × best + `stickiness_ms` (both, added), so routes do not
//! flap as load or sub-millisecond RTTs move: every switch costs the
//! subscriber a keyframe.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

/// Tunables of the cost model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CostModel {
    /// Most links a path may have.
    pub max_hops: usize,
    /// Milliseconds of cost per percent of loss.
    pub loss_weight: f64,
    /// Milliseconds of cost for a fully loaded node (load 1.0).
    pub load_weight: f64,
    /// Load up to which a node costs nothing extra (0.0 – 1.0).
    pub load_knee: f64,
    /// Fixed cost per link, so that equal paths prefer fewer hops.
    pub hop_cost: f64,
    /// Keep the previous path while it costs at most
    /// `(1 + stickiness) × best + stickiness_ms`.
    pub stickiness: f64,
    /// The absolute part of the hysteresis, in milliseconds of cost.
    pub stickiness_ms: f64,
}

impl CostModel {
    /// The cost of relaying through a node at `load` (0.0 – 1.0).
    pub fn load_cost(&self, load: f64) -> f64 {
        let knee = self.load_knee.clamp(0.0, 0.99);
        self.load_weight * ((load - knee).max(0.0) / (1.0 - knee))
    }

    /// Whether a previous path at `old` cost is kept against the best at
    /// `best`.
    pub fn keeps(&self, old: f64, best: f64) -> bool {
        old <= best * (1.0 + self.stickiness) + self.stickiness_ms
    }
}

impl Default for CostModel {
    fn default() -> Self {
        Self {
            max_hops: 4,
            loss_weight: 10.0,
            load_weight: 50.0,
            load_knee: 0.5,
            hop_cost: 1.0,
            stickiness: 0.2,
            stickiness_ms: 10.0,
        }
    }
}

/// One node as routing sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeInput {
    pub id: String,
    /// Heartbeat lease current.
    pub up: bool,
    /// May forward for others (up and not draining).
    pub transit: bool,
    /// 0.0 – 1.0.
    pub load: f64,
}

/// One link measurement, as reported by `from` about `to`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkInput {
    pub from: String,
    pub to: String,
    pub rtt_ms: f64,
    /// Fraction 0.0 – 1.0.
    pub loss: f64,
    pub jitter_ms: f64,
}

/// Where a room lives: nodes with publishers and nodes with subscribers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RoomInput {
    pub room: String,
    pub publishers: BTreeSet<String>,
    pub subscribers: BTreeSet<String>,
}

/// Everything route computation looks at.
#[derive(Debug, Clone, Default)]
pub struct MeshView {
    pub nodes: Vec<NodeInput>,
    pub links: Vec<LinkInput>,
    pub rooms: Vec<RoomInput>,
}

/// A directed tree edge: media flows `from` → `to`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Edge {
    pub from: String,
    pub to: String,
}

/// The distribution tree of one room from one source node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomRoute {
    pub room: String,
    pub source: String,
    /// Sorted.
    pub edges: Vec<Edge>,
    /// Subscriber nodes with no path within the hop limit (sorted).
    pub unreachable: Vec<String>,
}

impl RoomRoute {
    /// The upstream of `node` in this tree (`None` for the source or a node
    /// not in the tree).
    pub fn upstream_of(&self, node: &str) -> Option<&str> {
        self.edges
            .iter()
            .find(|e| e.to == node)
            .map(|e| e.from.as_str())
    }

    /// Whether `node` is on this tree.
    pub fn contains(&self, node: &str) -> bool {
        self.source == node || self.edges.iter().any(|e| e.to == node)
    }
}

/// All trees, sorted by (room, source).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RoutePlan {
    pub routes: Vec<RoomRoute>,
    /// Links that carry FEC, each as (lower id, higher id); set by
    /// [`crate::desired::mark_lossy_links`] after the routes, kept here so
    /// the next computation can apply hysteresis.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub fec_links: BTreeSet<(String, String)>,
}

/// The mesh as an adjacency list over dense indices.
#[derive(Debug)]
pub struct Graph {
    ids: Vec<String>,
    index: HashMap<String, usize>,
    transit: Vec<bool>,
    /// `adj[u]` = (v, cost of u→v).
    adj: Vec<Vec<(usize, f64)>>,
    /// The same adjacency, flattened (CSR) for the hot loop: the edges of
    /// `u` are `targets[offsets[u]..offsets[u + 1]]` with `costs` alongside,
    /// in increasing target order.
    offsets: Vec<usize>,
    targets: Vec<u32>,
    costs: Vec<f64>,
    /// `rcosts[e]`: the cost of the reverse edge, `targets[e]` → `u` (links
    /// are symmetric, their cost is not: it includes the entered node's
    /// load). What [`Graph::reach`] reads when it pulls.
    rcosts: Vec<f64>,
    /// The cheapest edge into each node (a lower bound [`Graph::reach`]
    /// prunes with).
    min_in: Vec<f64>,
}

impl Graph {
    /// Builds the graph of the up nodes. A link exists when either end
    /// reported it; if both did, each metric takes the worse value. Links to
    /// unknown or down nodes, and measurements that are not finite, are
    /// ignored.
    pub fn build(view: &MeshView, model: &CostModel) -> Self {
        let mut ids = Vec::new();
        let mut index = HashMap::new();
        let mut transit = Vec::new();
        let mut load = Vec::new();
        for n in view.nodes.iter().filter(|n| n.up) {
            if index.contains_key(&n.id) {
                continue;
            }
            index.insert(n.id.clone(), ids.len());
            ids.push(n.id.clone());
            transit.push(n.transit);
            load.push(if n.load.is_finite() {
                n.load.clamp(0.0, 1.0)
            } else {
                1.0
            });
        }
        // Undirected measurement per unordered pair: (rtt, loss, jitter), worst of both reports.
        let mut pairs: HashMap<(usize, usize), (f64, f64, f64)> = HashMap::new();
        for l in &view.links {
            let (Some(&a), Some(&b)) = (index.get(&l.from), index.get(&l.to)) else {
                continue;
            };
            if a == b || !l.rtt_ms.is_finite() || !l.loss.is_finite() || !l.jitter_ms.is_finite() {
                continue;
            }
            let m = (
                l.rtt_ms.max(0.0),
                l.loss.clamp(0.0, 1.0),
                l.jitter_ms.max(0.0),
            );
            let key = (a.min(b), a.max(b));
            pairs
                .entry(key)
                .and_modify(|e| *e = (e.0.max(m.0), e.1.max(m.1), e.2.max(m.2)))
                .or_insert(m);
        }
        // (v, cost of u→v, cost of v→u)
        let mut both: Vec<Vec<(usize, f64, f64)>> = vec![Vec::new(); ids.len()];
        let mut sorted: Vec<_> = pairs.into_iter().collect();
        sorted.sort_by_key(|(k, _)| *k);
        for ((a, b), (rtt, loss, jitter)) in sorted {
            // A link either end finds dead (every probe lost) carries
            // nothing, whatever its other numbers say.
            if loss >= 1.0 {
                continue;
            }
            let base = rtt + jitter + model.loss_weight * loss * 100.0 + model.hop_cost;
            let (ab, ba) = (
                base + model.load_cost(load[b]),
                base + model.load_cost(load[a]),
            );
            // Pairs come sorted, so every list is in increasing node order
            // (the order the searches' tie-breaking relies on).
            both[a].push((b, ab, ba));
            both[b].push((a, ba, ab));
        }
        let mut offsets = Vec::with_capacity(ids.len() + 1);
        let mut targets = Vec::new();
        let mut costs = Vec::new();
        let mut rcosts = Vec::new();
        offsets.push(0);
        for edges in &both {
            for &(v, c, r) in edges {
                targets.push(u32::try_from(v).unwrap_or(u32::MAX));
                costs.push(c);
                rcosts.push(r);
            }
            offsets.push(targets.len());
        }
        let min_in = (0..ids.len())
            .map(|v| {
                rcosts[offsets[v]..offsets[v + 1]]
                    .iter()
                    .copied()
                    .fold(f64::INFINITY, f64::min)
            })
            .collect();
        let adj = both
            .into_iter()
            .map(|l| l.into_iter().map(|(v, c, _)| (v, c)).collect())
            .collect();
        Self {
            ids,
            index,
            transit,
            adj,
            offsets,
            targets,
            costs,
            rcosts,
            min_in,
        }
    }

    /// Number of (up) nodes.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the graph has no nodes.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn cost(&self, u: usize, v: usize) -> Option<f64> {
        self.adj[u].iter().find(|(w, _)| *w == v).map(|(_, c)| *c)
    }

    /// Minimum-cost paths from `source` with at most `max_hops` links, to
    /// every node: the plain hop-bounded Bellman-Ford that [`Graph::reach`]
    /// must match exactly (kept as the tests' reference).
    #[cfg(test)]
    fn paths_from(&self, source: &str, max_hops: usize) -> Option<PathTable> {
        let s = *self.index.get(source)?;
        let n = self.ids.len();
        let levels = max_hops + 1;
        // Level h: best cost with at most h links, its exact hop count, and
        // the predecessor when that path has exactly h links.
        let mut dist = vec![vec![f64::INFINITY; n]; levels];
        let mut hops = vec![vec![usize::MAX; n]; levels];
        let mut pred = vec![vec![usize::MAX; n]; levels];
        dist[0][s] = 0.0;
        hops[0][s] = 0;
        // Nodes whose best cost improved at the previous level: only their
        // out-edges can improve anything at this one.
        let mut frontier = vec![s];
        let mut next = Vec::new();
        let mut in_next = vec![false; n];
        for h in 1..levels {
            let (done, rest) = dist.split_at_mut(h);
            let prev = &done[h - 1];
            let cur = &mut rest[0];
            cur.copy_from_slice(prev);
            let (hdone, hrest) = hops.split_at_mut(h);
            hrest[0].copy_from_slice(&hdone[h - 1]);
            for &u in &frontier {
                if u != s && !self.transit[u] {
                    continue;
                }
                let du = prev[u];
                for e in self.offsets[u]..self.offsets[u + 1] {
                    let v = self.targets[e] as usize;
                    let d = du + self.costs[e];
                    if d < cur[v] {
                        cur[v] = d;
                        hrest[0][v] = h;
                        pred[h][v] = u;
                        if !in_next[v] {
                            in_next[v] = true;
                            next.push(v);
                        }
                    }
                }
            }
            if next.is_empty() {
                dist.truncate(h + 1);
                hops.truncate(h + 1);
                pred.truncate(h + 1);
                break;
            }
            for &v in &next {
                in_next[v] = false;
            }
            std::mem::swap(&mut frontier, &mut next);
            next.clear();
        }
        Some(PathTable {
            source: s,
            dist,
            hops,
            pred,
        })
    }

    /// The best paths from `s` to each of `targets` (node indices, sorted,
    /// without `s`) with at most `max_hops` links, aligned with `targets`.
    ///
    /// The same search as [`Graph::paths_from`], with the same results to
    /// the last tie (`reach_matches_paths_from` checks it), that skips work
    /// no target needs: at level `h` only nodes within `max_hops - h` links
    /// of a target can still be on a path to one, so once those are few, a
    /// level *pulls* their values from the frontier instead of pushing the
    /// whole frontier's edges. Pull keeps push's choices: the earliest
    /// frontier node wins a tie, and the next frontier is ordered as push
    /// would have filled it (by the first frontier node that improved each
    /// node, then by node index, the adjacency order). `scratch` is reused
    /// across sources.
    fn reach(
        &self,
        s: usize,
        targets: &[usize],
        max_hops: usize,
        scratch: &mut Scratch,
    ) -> Vec<Reach> {
        let n = self.ids.len();
        let levels = max_hops + 1;
        scratch.prepare(n, levels);
        let Scratch {
            dist,
            hops,
            pred,
            frontier,
            next,
            in_next,
            pos,
            from,
            near,
            relevant,
            layer_end,
            layer_work,
            improved,
        } = scratch;
        dist[..n].fill(f64::INFINITY);
        hops[..n].fill(NONE);
        dist[s] = 0.0;
        hops[s] = 0;
        // relevant[..layer_end[k]]: the nodes within k links of a target;
        // layer_work[k]: their edges.
        relevant.clear();
        layer_end.clear();
        layer_work.clear();
        let degree = |v: usize| self.offsets[v + 1] - self.offsets[v];
        let mut work = 0;
        for &t in targets {
            if near[t] == NONE {
                near[t] = 0;
                relevant.push(t as u32);
                work += degree(t);
            }
        }
        layer_end.push(relevant.len());
        layer_work.push(work);
        // Widen while the set is small: a level pulls only while its set is
        // cheaper than the frontier's edges, which a large set is not.
        while layer_end.len() < max_hops && relevant.len() <= n / 8 {
            let k = layer_end.len();
            let from = if k >= 2 { layer_end[k - 2] } else { 0 };
            for i in from..layer_end[k - 1] {
                let v = relevant[i] as usize;
                for e in self.offsets[v]..self.offsets[v + 1] {
                    let w = self.targets[e] as usize;
                    if near[w] == NONE {
                        near[w] = k as u32;
                        relevant.push(w as u32);
                        work += degree(w);
                    }
                }
            }
            layer_end.push(relevant.len());
            layer_work.push(work);
        }
        frontier.clear();
        frontier.push(s as u32);
        next.clear();
        let mut top = max_hops;
        for h in 1..levels {
            let (done, rest) = dist.split_at_mut(h * n);
            let prev = &done[(h - 1) * n..];
            let cur = &mut rest[..n];
            cur.copy_from_slice(prev);
            let (hdone, hrest) = hops.split_at_mut(h * n);
            let cur_hops = &mut hrest[..n];
            cur_hops.copy_from_slice(&hdone[(h - 1) * n..]);
            let pred = &mut pred[h * n..(h + 1) * n];
            let left = max_hops - h;
            let push_work: usize = frontier.iter().map(|&u| degree(u as usize)).sum();
            if layer_work.get(left).is_some_and(|&w| w < push_work) {
                // Pull: each node that can still reach a target in `left`
                // links takes its best in-edge from the frontier. `from[u]`
                // is u's cost when u is on the frontier and may relay, else
                // infinite, so the inner loop has one test.
                let mut min_from = f64::INFINITY;
                for (i, &u) in frontier.iter().enumerate() {
                    let u = u as usize;
                    if u == s || self.transit[u] {
                        from[u] = prev[u];
                        pos[u] = i as u32;
                        min_from = min_from.min(prev[u]);
                    }
                }
                let mut settle = |v: usize, cur: &mut [f64]| {
                    if let Some((d, winner, first)) = pull(self, v, prev[v], from, pos) {
                        cur[v] = d;
                        cur_hops[v] = h as u32;
                        pred[v] = frontier[winner as usize];
                        improved.push((first, v as u32));
                    }
                };
                #[cfg(test)]
                count_level(if left == 1 { 2 } else { 1 });
                if left == 1 {
                    // The last level but one: the targets first, then only
                    // the neighbours that could still improve one over its
                    // new cost. A neighbour v ends this level at no less
                    // than `bound` (float addition is monotonic), so where
                    // `bound + cost(v→t)` does not beat t, v cannot be
                    // chosen or tie at the last level.
                    for &t in &relevant[..layer_end[0]] {
                        settle(t as usize, cur);
                    }
                    let mut needed = Vec::new();
                    for &t in &relevant[..layer_end[0]] {
                        let t = t as usize;
                        for e in self.offsets[t]..self.offsets[t + 1] {
                            let v = self.targets[e] as usize;
                            if near[v] != 1 || in_next[v] || (v != s && !self.transit[v]) {
                                continue;
                            }
                            let bound = prev[v].min(min_from + self.min_in[v]);
                            if bound + self.rcosts[e] < cur[t] {
                                in_next[v] = true;
                                needed.push(v);
                            }
                        }
                    }
                    for &v in &needed {
                        in_next[v] = false;
                        settle(v, cur);
                    }
                } else {
                    for &v in &relevant[..layer_end[left]] {
                        settle(v as usize, cur);
                    }
                }
                for &u in frontier.iter() {
                    from[u as usize] = f64::INFINITY;
                    pos[u as usize] = NONE;
                }
                improved.sort_unstable();
                next.extend(improved.drain(..).map(|(_, v)| v));
            } else {
                #[cfg(test)]
                count_level(0);
                // Push, as paths_from.
                for &u in frontier.iter() {
                    let u = u as usize;
                    if u != s && !self.transit[u] {
                        continue;
                    }
                    let du = prev[u];
                    for e in self.offsets[u]..self.offsets[u + 1] {
                        let v = self.targets[e] as usize;
                        let d = du + self.costs[e];
                        if d < cur[v] {
                            cur[v] = d;
                            cur_hops[v] = h as u32;
                            pred[v] = u as u32;
                            if !in_next[v] {
                                in_next[v] = true;
                                next.push(v as u32);
                            }
                        }
                    }
                }
                for &v in next.iter() {
                    in_next[v as usize] = false;
                }
            }
            if next.is_empty() {
                top = h;
                break;
            }
            std::mem::swap(frontier, next);
            next.clear();
        }
        for &v in relevant.iter() {
            near[v as usize] = NONE;
        }
        let dist_top = &dist[top * n..(top + 1) * n];
        targets
            .iter()
            .map(|&t| {
                let c = dist_top[t];
                if !c.is_finite() {
                    return Reach::default();
                }
                // Walk the predecessors down the levels, as PathTable::path.
                let mut path = vec![t];
                let mut cur = t;
                let mut level = hops[top * n + t] as usize;
                while cur != s {
                    let u = pred[level * n + cur];
                    if u == NONE || level == 0 {
                        return Reach {
                            cost: Some(c),
                            path: None,
                        };
                    }
                    cur = u as usize;
                    path.push(cur);
                    level = hops[(level - 1) * n + cur] as usize;
                }
                path.reverse();
                Reach {
                    cost: Some(c),
                    path: Some(path),
                }
            })
            .collect()
    }

    fn path_cost(&self, path: &[usize]) -> Option<f64> {
        path.windows(2)
            .map(|w| self.cost(w[0], w[1]))
            .sum::<Option<f64>>()
    }
}

/// One node's pull at one level of [`Graph::reach`]: its best in-edge from
/// the frontier (`from`, `pos`) where that beats `pv`, as (cost, frontier
/// position of the winner, frontier position of the first node that beats
/// `pv`). Ties go to the earlier position, as push's strict `<` in frontier
/// order does.
#[inline]
fn pull(graph: &Graph, v: usize, pv: f64, from: &[f64], pos: &[u32]) -> Option<(f64, u32, u32)> {
    let mut best = pv;
    let mut best_pos = NONE;
    let mut first = NONE;
    let edges = graph.offsets[v]..graph.offsets[v + 1];
    for (&u, &c) in graph.targets[edges.clone()]
        .iter()
        .zip(&graph.rcosts[edges])
    {
        let d = from[u as usize] + c;
        let p = pos[u as usize];
        let improves = d < pv;
        first = if improves { first.min(p) } else { first };
        let better = improves & ((d < best) | ((d == best) & (p < best_pos)));
        best = if better { d } else { best };
        best_pos = if better { p } else { best_pos };
    }
    (best_pos != NONE).then_some((best, best_pos, first))
}

/// Levels [`Graph::reach`] pushed, pulled, and pulled with the last-but-one
/// pruning: the tests check that each way was exercised.
#[cfg(test)]
static LEVEL_KINDS: [AtomicUsize; 3] = [const { AtomicUsize::new(0) }; 3];

#[cfg(test)]
fn count_level(kind: usize) {
    LEVEL_KINDS[kind].fetch_add(1, Ordering::Relaxed);
}

/// "None" in the searches' u32 arrays.
const NONE: u32 = u32::MAX;

/// The best path to one target: its cost and nodes, source first (what a
/// tree needs of a search).
#[derive(Debug, Clone, Default, PartialEq)]
struct Reach {
    cost: Option<f64>,
    path: Option<Vec<usize>>,
}

#[cfg(test)]
impl PathTable {
    fn reach(&self, t: usize) -> Reach {
        Reach {
            cost: self.cost(t),
            path: self.path(t),
        }
    }
}

/// Buffers of [`Graph::reach`], one set per thread, reused across sources.
#[derive(Debug, Default)]
struct Scratch {
    /// Level-major: `dist[h * n + v]`, best cost with at most `h` links.
    dist: Vec<f64>,
    /// The hop count of that path.
    hops: Vec<u32>,
    /// The predecessor, when the path has exactly `h` links.
    pred: Vec<u32>,
    frontier: Vec<u32>,
    next: Vec<u32>,
    in_next: Vec<bool>,
    /// Position in the frontier (`NONE` when not in it or not relaying);
    /// all `NONE` between levels.
    pos: Vec<u32>,
    /// The frontier's costs (infinite where `pos` is `NONE`).
    from: Vec<f64>,
    /// Links to the nearest target (`NONE` when not known); all `NONE` between searches.
    near: Vec<u32>,
    relevant: Vec<u32>,
    layer_end: Vec<usize>,
    layer_work: Vec<usize>,
    /// (first improving frontier position, node) of a pull level.
    improved: Vec<(u32, u32)>,
}

impl Scratch {
    fn prepare(&mut self, n: usize, levels: usize) {
        self.dist.resize(n * levels, f64::INFINITY);
        self.hops.resize(n * levels, NONE);
        self.pred.resize(n * levels, NONE);
        self.in_next.resize(n, false);
        self.pos.resize(n, NONE);
        self.from.resize(n, f64::INFINITY);
        self.near.resize(n, NONE);
    }
}

/// Shortest paths from one source (see [`Graph::paths_from`]).
#[cfg(test)]
#[derive(Debug)]
struct PathTable {
    source: usize,
    dist: Vec<Vec<f64>>,
    hops: Vec<Vec<usize>>,
    pred: Vec<Vec<usize>>,
}

#[cfg(test)]
impl PathTable {
    fn top(&self) -> usize {
        self.dist.len() - 1
    }

    /// The best cost to node index `v`, if reachable within the hop limit.
    fn cost(&self, v: usize) -> Option<f64> {
        let c = self.dist[self.top()][v];
        c.is_finite().then_some(c)
    }

    /// The best path to `v` as node indices, source first.
    fn path(&self, v: usize) -> Option<Vec<usize>> {
        self.cost(v)?;
        let mut out = vec![v];
        let mut cur = v;
        let mut level = self.hops[self.top()][v];
        while cur != self.source {
            let u = self.pred[level][cur];
            if u == usize::MAX || level == 0 {
                return None;
            }
            out.push(u);
            cur = u;
            level = self.hops[level - 1][cur];
        }
        out.reverse();
        Some(out)
    }
}

/// Computes all room trees. `previous` is the last plan (for stickiness).
pub fn compute(view: &MeshView, model: &CostModel, previous: Option<&RoutePlan>) -> RoutePlan {
    let graph = Graph::build(view, model);
    let mut rooms: Vec<&RoomInput> = view.rooms.iter().collect();
    rooms.sort_by(|a, b| a.room.cmp(&b.room));
    let previous = previous_index(previous);
    // One job per distinct up source: its trees, in plan order (`slot`),
    // and the subscriber nodes they need paths to.
    let mut jobs: BTreeMap<usize, Job<'_>> = BTreeMap::new();
    let mut slots = 0;
    for room in &rooms {
        for source in &room.publishers {
            let Some(&s) = graph.index.get(source) else {
                continue; // source down: no tree
            };
            let job = jobs.entry(s).or_insert_with(|| Job {
                source: s,
                trees: Vec::new(),
                targets: Vec::new(),
            });
            job.trees.push((slots, room));
            slots += 1;
            job.targets.extend(
                room.subscribers
                    .iter()
                    .filter_map(|t| graph.index.get(t).copied())
                    .filter(|&t| t != s),
            );
        }
    }
    let mut jobs: Vec<Job<'_>> = jobs.into_values().collect();
    for job in &mut jobs {
        job.targets.sort_unstable();
        job.targets.dedup();
    }
    let mut routes: Vec<Option<RoomRoute>> = vec![None; slots];
    for (slot, route) in run_jobs(&graph, model, &jobs, &previous) {
        routes[slot] = Some(route);
    }
    RoutePlan {
        fec_links: BTreeSet::new(),
        routes: routes.into_iter().flatten().collect(),
    }
}

/// The trees of one source.
#[derive(Debug)]
struct Job<'a> {
    source: usize,
    /// (position in the plan, room).
    trees: Vec<(usize, &'a RoomInput)>,
    /// Subscriber nodes of those rooms, sorted, without the source.
    targets: Vec<usize>,
}

type PreviousIndex<'a> = HashMap<(&'a str, &'a str), &'a RoomRoute>;

fn previous_index(previous: Option<&RoutePlan>) -> PreviousIndex<'_> {
    previous
        .map(|p| {
            p.routes
                .iter()
                .map(|r| ((r.room.as_str(), r.source.as_str()), r))
                .collect()
        })
        .unwrap_or_default()
}

/// One search per job and its trees, on all cores (each search is
/// independent): the threads take the next job until none is left.
fn run_jobs(
    graph: &Graph,
    model: &CostModel,
    jobs: &[Job<'_>],
    previous: &PreviousIndex<'_>,
) -> Vec<(usize, RoomRoute)> {
    let next = AtomicUsize::new(0);
    let run = || {
        let mut scratch = Scratch::default();
        let mut out = Vec::new();
        loop {
            let Some(job) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) else {
                return out;
            };
            let s = job.source;
            let reach = graph.reach(s, &job.targets, model.max_hops, &mut scratch);
            let best = |t: usize| {
                job.targets
                    .binary_search(&t)
                    .ok()
                    .and_then(|i| reach.get(i).cloned())
                    .unwrap_or_default()
            };
            for &(slot, room) in &job.trees {
                let prev = previous
                    .get(&(room.room.as_str(), graph.ids[s].as_str()))
                    .copied();
                out.push((
                    slot,
                    build_tree(graph, &best, model, &room.room, s, &room.subscribers, prev),
                ));
            }
        }
    };
    let threads = crate::worker_threads(jobs.len(), 32);
    if threads == 1 {
        return run();
    }
    std::thread::scope(|scope| crate::join_all((0..threads).map(|_| scope.spawn(run)).collect()))
}

fn build_tree(
    graph: &Graph,
    best: &dyn Fn(usize) -> Reach,
    model: &CostModel,
    room: &str,
    s: usize,
    subscribers: &BTreeSet<String>,
    previous: Option<&RoomRoute>,
) -> RoomRoute {
    // upstream[v] = u for every node on the tree except the source.
    let mut upstream: BTreeMap<usize, usize> = BTreeMap::new();
    let mut unreachable = Vec::new();
    for sub in subscribers {
        let Some(&t) = graph.index.get(sub) else {
            continue; // subscriber node down: nothing to deliver to
        };
        if t == s {
            continue;
        }
        let Reach { cost, path: best } = best(t);
        let kept = previous
            .and_then(|p| previous_path(graph, p, s, t, model.max_hops))
            .filter(|old| match (graph.path_cost(old), cost) {
                (Some(old_cost), Some(best_cost)) => model.keeps(old_cost, best_cost),
                _ => false,
            });
        let Some(path) = kept.or(best) else {
            unreachable.push(sub.clone());
            continue;
        };
        // Attach from the subscriber backwards until reaching the tree.
        for w in path.windows(2).rev() {
            let (u, v) = (w[0], w[1]);
            if v == s || upstream.contains_key(&v) {
                break;
            }
            upstream.insert(v, u);
        }
    }
    let mut edges: Vec<Edge> = upstream
        .iter()
        .map(|(&v, &u)| Edge {
            from: graph.ids[u].clone(),
            to: graph.ids[v].clone(),
        })
        .collect();
    edges.sort();
    RoomRoute {
        room: room.to_owned(),
        source: graph.ids[s].clone(),
        edges,
        unreachable,
    }
}

/// The path to `t` in the previous tree, if every node on it is still up,
/// every intermediate may relay, every link still exists and the hop limit
/// holds.
fn previous_path(
    graph: &Graph,
    prev: &RoomRoute,
    s: usize,
    t: usize,
    max_hops: usize,
) -> Option<Vec<usize>> {
    let mut path = vec![t];
    let mut cur = graph.ids[t].as_str();
    while cur != graph.ids[s] {
        let up = prev.upstream_of(cur)?;
        let u = *graph.index.get(up)?;
        if u != s && !graph.transit[u] {
            return None;
        }
        graph.cost(u, *path.last()?)?;
        path.push(u);
        if path.len() > max_hops + 1 {
            return None;
        }
        cur = up;
    }
    path.reverse();
    Some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> NodeInput {
        NodeInput {
            id: id.into(),
            up: true,
            transit: true,
            load: 0.0,
        }
    }

    fn link(a: &str, b: &str, rtt: f64) -> LinkInput {
        LinkInput {
            from: a.into(),
            to: b.into(),
            rtt_ms: rtt,
            loss: 0.0,
            jitter_ms: 0.0,
        }
    }

    fn room(name: &str, pubs: &[&str], subs: &[&str]) -> RoomInput {
        RoomInput {
            room: name.into(),
            publishers: pubs.iter().map(|s| (*s).to_owned()).collect(),
            subscribers: subs.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn edges(r: &RoomRoute) -> Vec<(String, String)> {
        r.edges
            .iter()
            .map(|e| (e.from.clone(), e.to.clone()))
            .collect()
    }

    fn e(a: &str, b: &str) -> (String, String) {
        (a.to_owned(), b.to_owned())
    }

    /// A—B—C—D chain plus a slow direct A—D link.
    fn chain() -> MeshView {
        MeshView {
            nodes: ["a", "b", "c", "d"].into_iter().map(node).collect(),
            links: vec![
                link("a", "b", 10.0),
                link("b", "c", 10.0),
                link("c", "d", 10.0),
                link("a", "d", 100.0),
            ],
            rooms: vec![room("r", &["a"], &["d"])],
        }
    }

    #[test]
    fn picks_minimum_cost_path() {
        let plan = compute(&chain(), &CostModel::default(), None);
        assert_eq!(plan.routes.len(), 1);
        assert_eq!(
            edges(&plan.routes[0]),
            vec![e("a", "b"), e("b", "c"), e("c", "d")]
        );
        assert!(plan.routes[0].unreachable.is_empty());
    }

    #[test]
    fn hop_limit_forces_shorter_path() {
        let model = CostModel {
            max_hops: 2,
            ..CostModel::default()
        };
        let plan = compute(&chain(), &model, None);
        assert_eq!(edges(&plan.routes[0]), vec![e("a", "d")]);

        // Without the direct link, d is out of reach in 2 hops.
        let mut view = chain();
        view.links.pop();
        let plan = compute(&view, &model, None);
        assert!(plan.routes[0].edges.is_empty());
        assert_eq!(plan.routes[0].unreachable, vec!["d".to_owned()]);
    }

    #[test]
    fn loss_and_load_raise_cost() {
        // a→b→d vs a→c→d, equal rtt; loss on b→d makes c the way.
        let mut view = MeshView {
            nodes: ["a", "b", "c", "d"].into_iter().map(node).collect(),
            links: vec![
                link("a", "b", 10.0),
                link("b", "d", 10.0),
                link("a", "c", 10.0),
                link("c", "d", 11.0),
            ],
            rooms: vec![room("r", &["a"], &["d"])],
        };
        let plan = compute(&view, &CostModel::default(), None);
        assert_eq!(edges(&plan.routes[0]), vec![e("a", "b"), e("b", "d")]);
        view.links[1].loss = 0.02; // 2 % = +20 ms
        let plan = compute(&view, &CostModel::default(), None);
        assert_eq!(edges(&plan.routes[0]), vec![e("a", "c"), e("c", "d")]);
        // Reset loss; load c fully is worse than b at 0.5.
        view.links[1].loss = 0.0;
        view.links[3].rtt_ms = 10.0;
        view.nodes[1].load = 0.5;
        view.nodes[2].load = 1.0;
        let plan = compute(&view, &CostModel::default(), None);
        assert_eq!(edges(&plan.routes[0]), vec![e("a", "b"), e("b", "d")]);
    }

    #[test]
    fn node_down_reroutes_and_drain_avoids_transit() {
        let mut view = MeshView {
            nodes: ["a", "b", "c", "d"].into_iter().map(node).collect(),
            links: vec![
                link("a", "b", 5.0),
                link("b", "d", 5.0),
                link("a", "c", 20.0),
                link("c", "d", 20.0),
            ],
            rooms: vec![room("r", &["a"], &["d"])],
        };
        let first = compute(&view, &CostModel::default(), None);
        assert_eq!(edges(&first.routes[0]), vec![e("a", "b"), e("b", "d")]);
        view.nodes[1].up = false;
        let second = compute(&view, &CostModel::default(), Some(&first));
        assert_eq!(edges(&second.routes[0]), vec![e("a", "c"), e("c", "d")]);
        // Back up but draining: still not used for transit.
        view.nodes[1].up = true;
        view.nodes[1].transit = false;
        let third = compute(&view, &CostModel::default(), Some(&second));
        assert_eq!(edges(&third.routes[0]), vec![e("a", "c"), e("c", "d")]);
        // A draining node can still be an endpoint.
        view.rooms[0].subscribers.insert("b".into());
        let fourth = compute(&view, &CostModel::default(), Some(&third));
        assert!(fourth.routes[0].contains("b"));
        assert_eq!(fourth.routes[0].upstream_of("b"), Some("a"));
    }

    #[test]
    fn sticky_within_tolerance_then_moves() {
        let mut view = MeshView {
            nodes: ["a", "b", "c", "d"].into_iter().map(node).collect(),
            links: vec![
                link("a", "b", 10.0),
                link("b", "d", 10.0),
                link("a", "c", 10.0),
                link("c", "d", 12.0),
            ],
            rooms: vec![room("r", &["a"], &["d"])],
        };
        let first = compute(&view, &CostModel::default(), None);
        assert_eq!(edges(&first.routes[0]), vec![e("a", "b"), e("b", "d")]);
        // b→d gets 3 ms worse: c is now cheaper but by less than 20 %.
        view.links[1].rtt_ms = 13.0;
        let second = compute(&view, &CostModel::default(), Some(&first));
        assert_eq!(second, first);
        // Much worse: move.
        view.links[1].rtt_ms = 40.0;
        let third = compute(&view, &CostModel::default(), Some(&second));
        assert_eq!(edges(&third.routes[0]), vec![e("a", "c"), e("c", "d")]);
    }

    #[test]
    fn sub_millisecond_links_and_moderate_load_do_not_flap() {
        // A LAN-like square: every link well under a millisecond.
        let mut view = MeshView {
            nodes: ["a", "b", "c", "d"].into_iter().map(node).collect(),
            links: vec![
                link("a", "b", 0.3),
                link("b", "c", 0.3),
                link("a", "d", 0.5),
                link("d", "c", 0.5),
            ],
            rooms: vec![room("r", &["a"], &["c"])],
        };
        let first = compute(&view, &CostModel::default(), None);
        assert_eq!(edges(&first.routes[0]), vec![e("a", "b"), e("b", "c")]);
        // b's CPU swings up to the knee and d's RTTs halve: nothing moves,
        // though d is now the cheaper path by more than 20 %.
        view.nodes[1].load = 0.5;
        view.links[2].rtt_ms = 0.1;
        view.links[3].rtt_ms = 0.1;
        let second = compute(&view, &CostModel::default(), Some(&first));
        assert_eq!(second, first);
        // Load below the knee costs nothing even for a fresh computation.
        let fresh = compute(&view, &CostModel::default(), None);
        assert_eq!(edges(&fresh.routes[0]), vec![e("a", "d"), e("d", "c")]);
        view.links[2].rtt_ms = 0.5;
        view.links[3].rtt_ms = 0.5;
        let fresh = compute(&view, &CostModel::default(), None);
        assert_eq!(edges(&fresh.routes[0]), vec![e("a", "b"), e("b", "c")]);
        // b near saturation (0.9 → 40 ms) is worth a switch.
        view.nodes[1].load = 0.9;
        let third = compute(&view, &CostModel::default(), Some(&second));
        assert_eq!(edges(&third.routes[0]), vec![e("a", "d"), e("d", "c")]);
        let m = CostModel::default();
        assert_eq!(m.load_cost(0.3), 0.0);
        assert!((m.load_cost(0.75) - 25.0).abs() < 1e-9);
        assert!((m.load_cost(1.0) - 50.0).abs() < 1e-9);
    }

    #[test]
    fn tree_shares_common_prefix_and_worst_report_counts() {
        // a→b→{c,d}: one tree, b forwards to both.
        let mut view = MeshView {
            nodes: ["a", "b", "c", "d"].into_iter().map(node).collect(),
            links: vec![
                link("a", "b", 5.0),
                link("b", "c", 5.0),
                link("b", "d", 5.0),
                link("a", "c", 30.0),
            ],
            rooms: vec![room("r", &["a"], &["c", "d", "a"])],
        };
        let plan = compute(&view, &CostModel::default(), None);
        assert_eq!(
            edges(&plan.routes[0]),
            vec![e("a", "b"), e("b", "c"), e("b", "d")]
        );
        // c reports the b–c link as much worse than b does: the worse value wins.
        view.links.push(link("c", "b", 50.0));
        let plan = compute(&view, &CostModel::default(), None);
        assert_eq!(
            edges(&plan.routes[0]),
            vec![e("a", "b"), e("a", "c"), e("b", "d")]
        );
    }

    #[test]
    fn several_sources_and_rooms_are_separate_trees() {
        let view = MeshView {
            nodes: ["a", "b", "c"].into_iter().map(node).collect(),
            links: vec![link("a", "b", 1.0), link("b", "c", 1.0)],
            rooms: vec![room("y", &["c"], &["a"]), room("x", &["a", "c"], &["b"])],
        };
        let plan = compute(&view, &CostModel::default(), None);
        let keys: Vec<_> = plan
            .routes
            .iter()
            .map(|r| (r.room.as_str(), r.source.as_str()))
            .collect();
        assert_eq!(keys, vec![("x", "a"), ("x", "c"), ("y", "c")]);
        assert_eq!(edges(&plan.routes[2]), vec![e("b", "a"), e("c", "b")]);
    }

    #[test]
    fn down_source_has_no_tree_and_bad_measurements_are_ignored() {
        let mut view = chain();
        view.links.push(LinkInput {
            from: "a".into(),
            to: "c".into(),
            rtt_ms: f64::NAN,
            loss: 0.0,
            jitter_ms: 0.0,
        });
        let plan = compute(&view, &CostModel::default(), None);
        assert_eq!(plan.routes[0].edges.len(), 3);
        view.nodes[0].up = false;
        assert!(
            compute(&view, &CostModel::default(), None)
                .routes
                .is_empty()
        );
    }

    #[test]
    fn bellman_ford_matches_brute_force_on_random_graphs() {
        // Deterministic pseudo-random graphs; compare with exhaustive search.
        let mut rnd = crate::test_rng(0x2545_f491_4f6c_dd1d);
        for _ in 0..200 {
            let n = 6;
            let ids: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
            let mut view = MeshView {
                nodes: ids.iter().map(|i| node(i)).collect(),
                ..MeshView::default()
            };
            for a in 0..n {
                for b in a + 1..n {
                    if rnd().is_multiple_of(2) {
                        view.links
                            .push(link(&ids[a], &ids[b], (rnd() % 50) as f64 + 1.0));
                    }
                }
            }
            let max_hops = (rnd() % 4 + 1) as usize;
            let model = CostModel {
                max_hops,
                ..CostModel::default()
            };
            let g = Graph::build(&view, &model);
            let table = g.paths_from("n0", max_hops).unwrap();
            for t in 1..n {
                let brute = brute_force(&g, 0, t, max_hops);
                let got = table.cost(t);
                match (brute, got) {
                    (None, None) => {}
                    (Some(b), Some(c)) => {
                        assert!((b - c).abs() < 1e-9, "{b} vs {c}");
                        let p = table.path(t).unwrap();
                        assert!(p.len() - 1 <= max_hops);
                        assert!((g.path_cost(&p).unwrap() - c).abs() < 1e-9);
                    }
                    other => panic!("mismatch {other:?}"),
                }
            }
        }
    }

    use crate::test_rng as rng;

    /// A random mesh with integer costs (so many exactly equal paths, where
    /// only tie-breaking decides), nodes down or draining, loads on both
    /// sides of the knee, and rooms with one or two publishers.
    fn random_view(
        rnd: &mut impl FnMut() -> u64,
        n: usize,
        degree: usize,
        rooms: usize,
    ) -> MeshView {
        let ids: Vec<String> = (0..n).map(|i| format!("n{i:03}")).collect();
        let loads = [0.0, 0.3, 0.75, 1.0];
        let mut view = MeshView {
            nodes: ids
                .iter()
                .map(|id| NodeInput {
                    id: id.clone(),
                    up: !rnd().is_multiple_of(20),
                    transit: !rnd().is_multiple_of(8),
                    load: loads[(rnd() % 4) as usize],
                })
                .collect(),
            ..MeshView::default()
        };
        for a in 0..n {
            for _ in 0..degree {
                let b = (rnd() % n as u64) as usize;
                view.links
                    .push(link(&ids[a], &ids[b], (rnd() % 6) as f64 * 5.0));
            }
        }
        for r in 0..rooms {
            let pick = |rnd: &mut dyn FnMut() -> u64, k: u64| -> Vec<&str> {
                (0..k)
                    .map(|_| ids[(rnd() % n as u64) as usize].as_str())
                    .collect()
            };
            let (np, ns) = (1 + rnd() % 2, 1 + rnd() % 6);
            let pubs = pick(&mut *rnd, np);
            let subs = pick(&mut *rnd, ns);
            view.rooms.push(room(&format!("r{r}"), &pubs, &subs));
        }
        view
    }

    #[test]
    fn reach_matches_paths_from() {
        let mut rnd = rng(0x9e37_79b9_7f4a_7c15);
        let mut scratch = Scratch::default();
        let before: Vec<usize> = LEVEL_KINDS
            .iter()
            .map(|k| k.load(Ordering::Relaxed))
            .collect();
        for _ in 0..400 {
            let n = 10 + (rnd() % 90) as usize;
            let degree = 1 + (rnd() % 6) as usize;
            let view = random_view(&mut rnd, n, degree, 0);
            let max_hops = 1 + (rnd() % 5) as usize;
            let model = CostModel {
                max_hops,
                ..CostModel::default()
            };
            let g = Graph::build(&view, &model);
            if g.is_empty() {
                continue;
            }
            for _ in 0..4 {
                let s = (rnd() % g.len() as u64) as usize;
                // Mostly a few targets (the pull levels), sometimes many.
                let k = if rnd().is_multiple_of(4) {
                    g.len()
                } else {
                    1 + (rnd() % 4) as usize
                };
                let mut targets: Vec<usize> = (0..k)
                    .map(|_| (rnd() % g.len() as u64) as usize)
                    .filter(|&t| t != s)
                    .collect();
                targets.sort_unstable();
                targets.dedup();
                // One scratch for all searches: what one leaves behind
                // must not change the next.
                let got = g.reach(s, &targets, max_hops, &mut scratch);
                let table = g.paths_from(&g.ids[s], max_hops).unwrap();
                for (i, &t) in targets.iter().enumerate() {
                    assert_eq!(got[i], table.reach(t), "source {s} target {t}");
                }
            }
        }
        for (kind, (k, b)) in LEVEL_KINDS.iter().zip(before).enumerate() {
            assert!(
                k.load(Ordering::Relaxed) > b,
                "level kind {kind} not exercised"
            );
        }
    }

    /// The plan as computed before [`Graph::reach`]: a full table per
    /// source from [`Graph::paths_from`].
    fn compute_reference(
        view: &MeshView,
        model: &CostModel,
        previous: Option<&RoutePlan>,
    ) -> RoutePlan {
        let graph = Graph::build(view, model);
        let mut rooms: Vec<&RoomInput> = view.rooms.iter().collect();
        rooms.sort_by(|a, b| a.room.cmp(&b.room));
        let previous = previous_index(previous);
        let mut routes = Vec::new();
        for room in rooms {
            for source in &room.publishers {
                let Some(&s) = graph.index.get(source) else {
                    continue;
                };
                let table = graph.paths_from(source, model.max_hops).unwrap();
                let prev = previous
                    .get(&(room.room.as_str(), source.as_str()))
                    .copied();
                let best = |t: usize| table.reach(t);
                routes.push(build_tree(
                    &graph,
                    &best,
                    model,
                    &room.room,
                    s,
                    &room.subscribers,
                    prev,
                ));
            }
        }
        RoutePlan {
            routes,
            fec_links: BTreeSet::new(),
        }
    }

    #[test]
    fn compute_matches_reference_as_the_mesh_changes() {
        let mut rnd = rng(0x2545_f491_4f6c_dd1d);
        let loads = [0.0, 0.3, 0.75, 1.0];
        // Small meshes, and one with enough sources for several threads.
        for (n, rooms) in [(30, 10), (60, 20), (80, 30), (200, 120)] {
            for _ in 0..6 {
                let degree = 2 + (rnd() % 4) as usize;
                let mut view = random_view(&mut rnd, n, degree, rooms);
                let model = CostModel {
                    max_hops: 2 + (rnd() % 3) as usize,
                    ..CostModel::default()
                };
                let (mut fast, mut reference) = (None, None);
                for _ in 0..8 {
                    let f = compute(&view, &model, fast.as_ref());
                    let r = compute_reference(&view, &model, reference.as_ref());
                    assert_eq!(f, r);
                    fast = Some(f);
                    reference = Some(r);
                    // Change a few links, a node's state and a load.
                    for _ in 0..3 {
                        let k = (rnd() % view.links.len() as u64) as usize;
                        view.links[k].rtt_ms = (rnd() % 6) as f64 * 5.0;
                    }
                    let k = (rnd() % n as u64) as usize;
                    match rnd() % 3 {
                        0 => view.nodes[k].up = !view.nodes[k].up,
                        1 => view.nodes[k].transit = !view.nodes[k].transit,
                        _ => view.nodes[k].load = loads[(rnd() % 4) as usize],
                    }
                }
            }
        }
    }

    fn brute_force(g: &Graph, s: usize, t: usize, max_hops: usize) -> Option<f64> {
        fn go(
            g: &Graph,
            u: usize,
            t: usize,
            left: usize,
            seen: &mut Vec<bool>,
            acc: f64,
        ) -> Option<f64> {
            if u == t {
                return Some(acc);
            }
            if left == 0 {
                return None;
            }
            let mut best: Option<f64> = None;
            for &(v, c) in &g.adj[u] {
                if seen[v] {
                    continue;
                }
                seen[v] = true;
                if let Some(x) = go(g, v, t, left - 1, seen, acc + c) {
                    best = Some(best.map_or(x, |b: f64| b.min(x)));
                }
                seen[v] = false;
            }
            best
        }
        let mut seen = vec![false; g.len()];
        seen[s] = true;
        go(g, s, t, max_hops, &mut seen, 0.0)
    }
}
