//! Choosing a node for a client. Pure.

/// A node that could take the client.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub id: &'a str,
    pub region: &'a str,
    /// 0.0 – 1.0.
    pub load: f64,
    /// Already serves the room.
    pub has_room: bool,
}

/// Load at or above which a node is only chosen if every node is.
pub const OVERLOAD: f64 = 0.95;

/// The index of the best candidate: lowest `load + 10·(other region) −
/// 0.05·(has room)`, overloaded nodes last, ties by id.
pub fn choose(cands: &[Candidate<'_>], region: Option<&str>) -> Option<usize> {
    let score = |c: &Candidate<'_>| {
        let mut s = c.load.clamp(0.0, 1.0);
        if region.is_some_and(|r| r != c.region) {
            s += 10.0;
        }
        if c.has_room {
            s -= 0.05;
        }
        s
    };
    (0..cands.len()).min_by(|&a, &b| {
        let (ca, cb) = (&cands[a], &cands[b]);
        (ca.load >= OVERLOAD)
            .cmp(&(cb.load >= OVERLOAD))
            .then(score(ca).total_cmp(&score(cb)))
            .then(ca.id.cmp(cb.id))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c<'a>(id: &'a str, region: &'a str, load: f64, has_room: bool) -> Candidate<'a> {
        Candidate {
            id,
            region,
            load,
            has_room,
        }
    }

    #[test]
    fn region_then_load_then_room() {
        let cs = [
            c("a", "eu", 0.5, false),
            c("b", "eu", 0.2, false),
            c("c", "us", 0.0, false),
        ];
        assert_eq!(choose(&cs, Some("eu")), Some(1));
        assert_eq!(choose(&cs, Some("us")), Some(2));
        assert_eq!(choose(&cs, None), Some(2));
        assert_eq!(choose(&cs, Some("ap")), Some(2));
        let cs = [c("a", "eu", 0.22, true), c("b", "eu", 0.2, false)];
        assert_eq!(choose(&cs, Some("eu")), Some(0));
        // Overloaded in-region node loses to an out-of-region one.
        let cs = [c("a", "eu", 0.97, false), c("b", "us", 0.5, false)];
        assert_eq!(choose(&cs, Some("eu")), Some(1));
        let cs = [c("b", "eu", 0.1, false), c("a", "eu", 0.1, false)];
        assert_eq!(choose(&cs, Some("eu")), Some(1));
        assert_eq!(choose(&[], None), None);
    }
}
