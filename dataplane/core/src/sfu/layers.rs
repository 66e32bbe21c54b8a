//! Simulcast layers of a track and the pure rules that pick which layer a
//! subscriber receives: [`admit`] (per packet), [`choose_layer`] (per
//! tick), and the watcher counts that tell publishers what is needed.

use std::time::{Duration, Instant};

use str0m::media::Rid;

use crate::meter::BitrateMeter;
use crate::types::TrackKind;

/// A layer with no packet for this long is considered stopped.
pub(super) const LAYER_ACTIVE_WINDOW: Duration = Duration::from_millis(1500);

/// A demanded layer that does not start within this time is skipped for a while.
pub(super) const LAYER_START_GRACE: Duration = Duration::from_secs(3);

/// How long such a layer is skipped before it may be chosen again.
pub(super) const LAYER_RETRY_AFTER: Duration = Duration::from_secs(10);

/// One simulcast encoding of a track (the only one of a track without
/// simulcast): its identity, measured rate, activity and demand.
pub(super) struct Layer {
    pub(super) rid: Option<Rid>,
    pub(super) ssrc: Option<u32>,
    pub(super) meter: BitrateMeter,
    /// Last measured non-zero bitrate, used to rank layers even while paused.
    pub(super) bps: u64,
    pub(super) last_packet: Option<Instant>,
    pub(super) last_keyframe_request: Option<Instant>,
    /// Subscribers currently receiving or switching to this layer.
    pub(super) watchers: u32,
    pub(super) demanded_since: Option<Instant>,
    pub(super) unavailable_until: Option<Instant>,
    /// A remote track's layer its upstream announced as unavailable (over
    /// the link's budget): not chosen, even while its packets still come.
    pub(super) withheld: bool,
}

impl Layer {
    pub(super) fn new(rid: Option<Rid>) -> Self {
        Layer {
            rid,
            ssrc: None,
            meter: BitrateMeter::default(),
            bps: 0,
            last_packet: None,
            last_keyframe_request: None,
            watchers: 0,
            demanded_since: None,
            unavailable_until: None,
            withheld: false,
        }
    }

    /// Whether a packet of it came within [`LAYER_ACTIVE_WINDOW`].
    pub(super) fn active(&self, now: Instant) -> bool {
        self.last_packet
            .is_some_and(|t| now.saturating_duration_since(t) < LAYER_ACTIVE_WINDOW)
    }

    /// Ordering key: bitrate first, then the conventional rid names.
    pub(super) fn rank(&self) -> (u64, u8) {
        let name = match self.rid.as_deref() {
            Some("q") | Some("l") | Some("low") => 1,
            Some("h") | Some("m") | Some("mid") => 2,
            Some("f") | Some("high") => 3,
            _ => 0,
        };
        (self.bps, name)
    }
}

/// Counts a subscription as watching its current and target layers.
pub(super) fn count_watchers(layers: &mut [Layer], current: Option<usize>, target: Option<usize>) {
    for l in [current, target].into_iter().flatten() {
        if let Some(layer) = layers.get_mut(l) {
            layer.watchers += 1;
        }
    }
}

/// Whether a packet of `layer` goes to a subscriber whose layer state is
/// (`current`, `target`); switches `current` to the target on a keyframe.
pub(super) fn admit(
    current: &mut Option<usize>,
    target: Option<usize>,
    layer: usize,
    keyframe: bool,
    kind: TrackKind,
) -> bool {
    if kind == TrackKind::Audio {
        *current = Some(layer);
        return true;
    }
    if target == Some(layer) && *current != Some(layer) {
        if keyframe {
            *current = Some(layer);
            return true;
        }
        return false;
    }
    *current == Some(layer)
}

/// Picks the best layer for a budget: the highest-ranked available layer
/// whose bitrate fits, else the lowest. A pinned rid wins when it exists.
pub(super) fn choose_layer(
    layers: &[Layer],
    now: Instant,
    budget_bps: Option<u64>,
    pinned: Option<&Rid>,
) -> Option<usize> {
    if layers.len() == 1 {
        return Some(0);
    }
    if let Some(rid) = pinned
        && let Some(i) = layers.iter().position(|l| l.rid.as_ref() == Some(rid))
    {
        return Some(i);
    }
    let mut available: Vec<usize> = (0..layers.len())
        .filter(|&i| {
            let l = &layers[i];
            l.ssrc.is_some()
                && !l.withheld
                && (l.active(now) || l.unavailable_until.is_none_or(|u| now >= u))
        })
        .collect();
    if available.is_empty() {
        return None;
    }
    available.sort_by_key(|&i| layers[i].rank());

    match budget_bps {
        None => available.last().copied(),
        Some(b) => available
            .iter()
            .rev()
            .copied()
            .find(|&i| layers[i].bps <= b * 9 / 10)
            .or_else(|| available.first().copied()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(rid: &str, bps: u64, now: Instant) -> Layer {
        let mut l = Layer::new(Some(Rid::from(rid)));
        l.ssrc = Some(bps as u32 | 1);
        l.bps = bps;
        l.last_packet = Some(now);
        l
    }

    #[test]
    fn activity_ends_after_the_window() {
        let now = Instant::now();
        let mut l = Layer::new(None);
        assert!(!l.active(now), "no packet yet");
        l.last_packet = Some(now);
        assert!(l.active(now));
        assert!(l.active(now + LAYER_ACTIVE_WINDOW - Duration::from_millis(1)));
        assert!(!l.active(now + LAYER_ACTIVE_WINDOW));
    }

    #[test]
    fn rank_orders_by_bitrate_then_rid_name() {
        let now = Instant::now();
        assert!(layer("q", 100, now).rank() < layer("h", 200, now).rank());
        // Equal (e.g. unmeasured) bitrates: the conventional names decide.
        let names = ["x", "q", "h", "f"];
        let ranks: Vec<_> = names.iter().map(|n| layer(n, 0, now).rank()).collect();
        assert!(ranks.windows(2).all(|w| w[0] < w[1]), "{ranks:?}");
        assert_eq!(layer("low", 0, now).rank(), layer("l", 0, now).rank());
        assert_eq!(layer("mid", 0, now).rank(), layer("m", 0, now).rank());
        assert_eq!(layer("high", 0, now).rank(), layer("f", 0, now).rank());
        // A measured low layer outranks an unmeasured high one.
        assert!(layer("q", 1, now).rank() > layer("f", 0, now).rank());
    }

    #[test]
    fn audio_is_always_admitted() {
        let mut current = None;
        assert!(admit(&mut current, None, 0, false, TrackKind::Audio));
        assert_eq!(current, Some(0));
    }

    #[test]
    fn video_switches_on_a_keyframe_of_the_target_only() {
        let mut current = Some(0);
        // The current layer flows while the target waits for a keyframe.
        assert!(admit(&mut current, Some(1), 0, false, TrackKind::Video));
        assert!(!admit(&mut current, Some(1), 1, false, TrackKind::Video));
        assert_eq!(current, Some(0));
        // The target's keyframe switches; the old layer stops.
        assert!(admit(&mut current, Some(1), 1, true, TrackKind::Video));
        assert_eq!(current, Some(1));
        assert!(!admit(&mut current, Some(1), 0, true, TrackKind::Video));
        assert!(admit(&mut current, Some(1), 1, false, TrackKind::Video));
    }

    #[test]
    fn video_without_a_layer_waits_for_a_keyframe() {
        let mut current = None;
        assert!(!admit(&mut current, Some(0), 0, false, TrackKind::Video));
        assert!(
            !admit(&mut current, None, 0, true, TrackKind::Video),
            "no target"
        );
        assert!(admit(&mut current, Some(0), 0, true, TrackKind::Video));
        assert_eq!(current, Some(0));
    }

    #[test]
    fn a_single_layer_is_always_chosen() {
        let now = Instant::now();
        assert_eq!(
            choose_layer(&[Layer::new(None)], now, Some(0), None),
            Some(0)
        );
    }

    #[test]
    fn the_best_layer_that_fits_the_budget_is_chosen() {
        let now = Instant::now();
        let layers = [
            layer("f", 2_000_000, now),
            layer("q", 150_000, now),
            layer("h", 600_000, now),
        ];
        assert_eq!(
            choose_layer(&layers, now, None, None),
            Some(0),
            "no budget: best"
        );
        assert_eq!(choose_layer(&layers, now, Some(10_000_000), None), Some(0));
        // 90 % of the budget must cover the layer.
        assert_eq!(choose_layer(&layers, now, Some(2_000_000), None), Some(2));
        assert_eq!(choose_layer(&layers, now, Some(700_000), None), Some(2));
        assert_eq!(choose_layer(&layers, now, Some(600_000), None), Some(1));
        // Nothing fits: the lowest.
        assert_eq!(choose_layer(&layers, now, Some(1), None), Some(1));
    }

    #[test]
    fn a_pinned_rid_wins_when_it_exists() {
        let now = Instant::now();
        let layers = [layer("f", 2_000_000, now), layer("q", 150_000, now)];
        let q = Rid::from("q");
        assert_eq!(choose_layer(&layers, now, None, Some(&q)), Some(1));
        let missing = Rid::from("h");
        assert_eq!(choose_layer(&layers, now, None, Some(&missing)), Some(0));
    }

    #[test]
    fn unavailable_layers_are_skipped() {
        let now = Instant::now();
        let mut layers = [layer("f", 2_000_000, now), layer("q", 150_000, now)];
        // Withheld by the upstream.
        layers[0].withheld = true;
        assert_eq!(choose_layer(&layers, now, None, None), Some(1));
        layers[0].withheld = false;
        // Stopped and marked unavailable until later.
        let later = now + LAYER_ACTIVE_WINDOW;
        layers[0].unavailable_until = Some(later + LAYER_RETRY_AFTER);
        layers[1].last_packet = Some(later);
        assert_eq!(choose_layer(&layers, later, None, None), Some(1));
        // ... until the retry time.
        let retry = later + LAYER_RETRY_AFTER;
        layers[1].last_packet = Some(retry);
        assert_eq!(choose_layer(&layers, retry, None, None), Some(0));
        // A layer never seen (no SSRC) is not chosen.
        layers[0].ssrc = None;
        assert_eq!(choose_layer(&layers, retry, None, None), Some(1));
        layers[1].ssrc = None;
        assert_eq!(choose_layer(&layers, retry, None, None), None);
    }

    #[test]
    fn watchers_count_current_and_target() {
        let now = Instant::now();
        let mut layers = [layer("q", 1, now), layer("h", 2, now), layer("f", 3, now)];
        count_watchers(&mut layers, Some(0), Some(2));
        count_watchers(&mut layers, Some(2), Some(2));
        count_watchers(&mut layers, None, None);
        count_watchers(&mut layers, Some(7), None);
        let counts: Vec<u32> = layers.iter().map(|l| l.watchers).collect();
        assert_eq!(counts, [1, 0, 3]);
    }
}
