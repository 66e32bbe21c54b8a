//! Quotas: how many sessions, rooms, tracks and plain-RTP endpoints one
//! identity and one token may hold, and the node-wide session limit.
//!
//! Every session is charged to the [`Owner`] its participant joined with
//! ([`Sfu::join_as`]) in a [`QuotaLedger`] that all cores of a node share
//! (it travels in [`SfuConfig::ledger`](crate::SfuConfig::ledger), so every
//! clone of one configuration counts in one ledger). The checks run when a
//! participant joins and when a session is created, never per packet.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::SfuError;
use crate::ids::{ParticipantId, PeerId};

use super::Sfu;

/// Upper bounds on what one identity or one token may hold at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaLimits {
    /// Live sessions (WebRTC sessions and plain-RTP endpoints).
    pub sessions: usize,
    /// Rooms joined.
    pub rooms: usize,
    /// Published tracks.
    pub tracks: usize,
    /// Plain-RTP endpoints (either direction).
    pub rtp_endpoints: usize,
}

impl QuotaLimits {
    /// No limit at all.
    pub const UNLIMITED: QuotaLimits = QuotaLimits {
        sessions: usize::MAX,
        rooms: usize::MAX,
        tracks: usize::MAX,
        rtp_endpoints: usize::MAX,
    };

    /// Each limit the smaller of the two: what a token's claims do to the
    /// configured limits (they may only tighten them).
    pub fn tighten(self, other: QuotaLimits) -> QuotaLimits {
        QuotaLimits {
            sessions: self.sessions.min(other.sessions),
            rooms: self.rooms.min(other.rooms),
            tracks: self.tracks.min(other.tracks),
            rtp_endpoints: self.rtp_endpoints.min(other.rtp_endpoints),
        }
    }
}

impl Default for QuotaLimits {
    fn default() -> Self {
        QuotaLimits::UNLIMITED
    }
}

/// The configured limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaConfig {
    /// Sessions of every owner together, on every core sharing the ledger
    /// (the node's `max_sessions`; each core also keeps its own
    /// [`SfuConfig::max_peers`](crate::SfuConfig::max_peers)).
    pub node_sessions: usize,
    /// What one identity (a token's `sub`) may hold, over all its tokens.
    pub per_identity: QuotaLimits,
    /// What one token may hold.
    pub per_token: QuotaLimits,
}

impl Default for QuotaConfig {
    /// No limits (an embedder sets them; the node derives its defaults
    /// from `max_sessions`).
    fn default() -> Self {
        QuotaConfig {
            node_sessions: usize::MAX,
            per_identity: QuotaLimits::UNLIMITED,
            per_token: QuotaLimits::UNLIMITED,
        }
    }
}

/// Which limit refused a request. Each is a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(usize)]
pub enum QuotaLimit {
    /// The node's session limit (every owner together).
    NodeSessions = 0,
    /// Sessions of one identity.
    IdentitySessions,
    /// Rooms of one identity.
    IdentityRooms,
    /// Published tracks of one identity.
    IdentityTracks,
    /// Plain-RTP endpoints of one identity.
    IdentityRtpEndpoints,
    /// Sessions of one token.
    TokenSessions,
    /// Rooms of one token.
    TokenRooms,
    /// Published tracks of one token.
    TokenTracks,
    /// Plain-RTP endpoints of one token.
    TokenRtpEndpoints,
}

impl QuotaLimit {
    /// Every limit, in metric order.
    pub const ALL: [QuotaLimit; 9] = [
        QuotaLimit::NodeSessions,
        QuotaLimit::IdentitySessions,
        QuotaLimit::IdentityRooms,
        QuotaLimit::IdentityTracks,
        QuotaLimit::IdentityRtpEndpoints,
        QuotaLimit::TokenSessions,
        QuotaLimit::TokenRooms,
        QuotaLimit::TokenTracks,
        QuotaLimit::TokenRtpEndpoints,
    ];

    /// The limit's name: a metric label, and what a refusal names.
    pub fn label(self) -> &'static str {
        match self {
            QuotaLimit::NodeSessions => "node_sessions",
            QuotaLimit::IdentitySessions => "identity_sessions",
            QuotaLimit::IdentityRooms => "identity_rooms",
            QuotaLimit::IdentityTracks => "identity_tracks",
            QuotaLimit::IdentityRtpEndpoints => "identity_rtp_endpoints",
            QuotaLimit::TokenSessions => "token_sessions",
            QuotaLimit::TokenRooms => "token_rooms",
            QuotaLimit::TokenTracks => "token_tracks",
            QuotaLimit::TokenRtpEndpoints => "token_rtp_endpoints",
        }
    }
}

impl std::fmt::Display for QuotaLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// Who a participant's sessions are charged to: its identity and, when the
/// API layer knows it, the token it came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The identity (a token's `sub`).
    pub identity: String,
    /// A key naming the token (its `jti`, or a digest of it); `None`: only
    /// the identity is counted.
    pub token: Option<String>,
    /// The token's own limits (from its claims); they only tighten
    /// [`QuotaConfig::per_token`].
    pub token_limits: QuotaLimits,
    /// Not held to the per-identity and per-token limits (operator
    /// tokens); still counted, and still held to the node's limit.
    pub exempt: bool,
    /// The token's codec list (its `codecs` claim): the participant's
    /// sessions negotiate only these, in this order
    /// ([`Sfu::set_participant_codecs`](crate::Sfu::set_participant_codecs)).
    pub codecs: Option<Vec<crate::CodecSpec>>,
}

impl Owner {
    /// An owner known by identity alone.
    pub fn identity(identity: &str) -> Self {
        Owner {
            identity: identity.to_owned(),
            token: None,
            token_limits: QuotaLimits::UNLIMITED,
            exempt: false,
            codecs: None,
        }
    }

    /// The same owner, whose sessions negotiate only `codecs`, in order.
    pub fn with_codecs(mut self, codecs: Option<Vec<crate::CodecSpec>>) -> Self {
        self.codecs = codecs;
        self
    }

    /// The same owner, charged also to the token named `key`.
    pub fn with_token(mut self, key: impl Into<String>) -> Self {
        self.token = Some(key.into());
        self
    }

    /// The same owner, with its token's own limits.
    pub fn with_token_limits(mut self, limits: QuotaLimits) -> Self {
        self.token_limits = limits;
        self
    }

    /// The same owner, exempt from the per-identity and per-token limits.
    pub fn exempt(mut self, exempt: bool) -> Self {
        self.exempt = exempt;
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Identity(String),
    Token(String),
}

#[derive(Debug, Default)]
struct Usage {
    sessions: usize,
    tracks: usize,
    rtp_endpoints: usize,
    /// Participants per room.
    rooms: HashMap<String, usize>,
}

impl Usage {
    fn is_empty(&self) -> bool {
        self.sessions == 0 && self.tracks == 0 && self.rtp_endpoints == 0 && self.rooms.is_empty()
    }
}

#[derive(Debug, Default)]
struct Book {
    sessions: usize,
    by: HashMap<Key, Usage>,
}

/// What one session takes from its owner's quota.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Charge {
    pub(crate) sessions: usize,
    pub(crate) tracks: usize,
    pub(crate) rtp_endpoints: usize,
}

/// The counts every quota is checked against, shared by the cores of a
/// node (and by the WebSocket layer through [`QuotaLedger::reserve_session`]).
/// Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct QuotaLedger {
    book: Arc<Mutex<Book>>,
}

/// A refused charge: the limit and its value.
pub(crate) type Refusal = (QuotaLimit, usize);

fn limits_of(config: &QuotaConfig, owner: &Owner) -> [(Key, QuotaLimits, bool); 2] {
    // The second entry is unused (`false`) without a token.
    let token = owner.token.clone().unwrap_or_default();
    [
        (
            Key::Identity(owner.identity.clone()),
            config.per_identity,
            true,
        ),
        (
            Key::Token(token),
            config.per_token.tighten(owner.token_limits),
            owner.token.is_some(),
        ),
    ]
}

fn limit_names(is_identity: bool) -> [QuotaLimit; 4] {
    if is_identity {
        [
            QuotaLimit::IdentitySessions,
            QuotaLimit::IdentityRooms,
            QuotaLimit::IdentityTracks,
            QuotaLimit::IdentityRtpEndpoints,
        ]
    } else {
        [
            QuotaLimit::TokenSessions,
            QuotaLimit::TokenRooms,
            QuotaLimit::TokenTracks,
            QuotaLimit::TokenRtpEndpoints,
        ]
    }
}

impl QuotaLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    fn book(&self) -> MutexGuard<'_, Book> {
        // The book stays consistent under a panic elsewhere (every update
        // is a few additions), so a poisoned lock is used as it is.
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `charge` from `owner`'s quota, or refuses it (taking nothing).
    pub(crate) fn try_charge(
        &self,
        config: &QuotaConfig,
        owner: &Owner,
        charge: Charge,
    ) -> Result<(), Refusal> {
        let mut book = self.book();
        if charge.sessions > 0 && book.sessions + charge.sessions > config.node_sessions {
            return Err((QuotaLimit::NodeSessions, config.node_sessions));
        }
        let scopes = limits_of(config, owner);
        if !owner.exempt {
            for (i, (key, limits, used)) in scopes.iter().enumerate() {
                if !used {
                    continue;
                }
                let names = limit_names(i == 0);
                let u = book.by.get(key);
                let have = |f: fn(&Usage) -> usize| u.map_or(0, f);
                if charge.sessions > 0 && have(|u| u.sessions) + charge.sessions > limits.sessions {
                    return Err((names[0], limits.sessions));
                }
                if charge.tracks > 0 && have(|u| u.tracks) + charge.tracks > limits.tracks {
                    return Err((names[2], limits.tracks));
                }
                if charge.rtp_endpoints > 0
                    && have(|u| u.rtp_endpoints) + charge.rtp_endpoints > limits.rtp_endpoints
                {
                    return Err((names[3], limits.rtp_endpoints));
                }
            }
        }
        book.sessions += charge.sessions;
        for (key, _, used) in scopes {
            if used {
                let u = book.by.entry(key).or_default();
                u.sessions += charge.sessions;
                u.tracks += charge.tracks;
                u.rtp_endpoints += charge.rtp_endpoints;
            }
        }
        Ok(())
    }

    /// Gives back what [`QuotaLedger::try_charge`] took.
    pub(crate) fn release(&self, owner: &Owner, charge: Charge) {
        let mut book = self.book();
        book.sessions = book.sessions.saturating_sub(charge.sessions);
        for (key, _, used) in limits_of(&QuotaConfig::default(), owner) {
            if !used {
                continue;
            }
            if let Some(u) = book.by.get_mut(&key) {
                u.sessions = u.sessions.saturating_sub(charge.sessions);
                u.tracks = u.tracks.saturating_sub(charge.tracks);
                u.rtp_endpoints = u.rtp_endpoints.saturating_sub(charge.rtp_endpoints);
                if u.is_empty() {
                    book.by.remove(&key);
                }
            }
        }
    }

    /// Counts one more participant of `owner` in `room`, or refuses it
    /// when that would be one room too many.
    pub(crate) fn try_enter_room(
        &self,
        config: &QuotaConfig,
        owner: &Owner,
        room: &str,
    ) -> Result<(), Refusal> {
        let mut book = self.book();
        let scopes = limits_of(config, owner);
        if !owner.exempt {
            for (i, (key, limits, used)) in scopes.iter().enumerate() {
                if !used {
                    continue;
                }
                let (rooms, here) = book
                    .by
                    .get(key)
                    .map_or((0, false), |u| (u.rooms.len(), u.rooms.contains_key(room)));
                if !here && rooms + 1 > limits.rooms {
                    return Err((limit_names(i == 0)[1], limits.rooms));
                }
            }
        }
        for (key, _, used) in scopes {
            if used {
                *book
                    .by
                    .entry(key)
                    .or_default()
                    .rooms
                    .entry(room.to_owned())
                    .or_default() += 1;
            }
        }
        Ok(())
    }

    /// Counts one participant of `owner` fewer in `room`.
    pub(crate) fn leave_room(&self, owner: &Owner, room: &str) {
        let mut book = self.book();
        for (key, _, used) in limits_of(&QuotaConfig::default(), owner) {
            if !used {
                continue;
            }
            if let Some(u) = book.by.get_mut(&key) {
                if let Some(n) = u.rooms.get_mut(room) {
                    *n -= 1;
                    if *n == 0 {
                        u.rooms.remove(room);
                    }
                }
                if u.is_empty() {
                    book.by.remove(&key);
                }
            }
        }
    }

    /// Sessions counted node-wide.
    pub fn sessions(&self) -> usize {
        self.book().sessions
    }

    /// Sessions counted for `owner`: its identity's and its token's (0
    /// without a token).
    pub fn sessions_of(&self, owner: &Owner) -> (usize, usize) {
        let book = self.book();
        let [(ik, _, _), (tk, _, has_token)] = limits_of(&QuotaConfig::default(), owner);
        let of = |k: &Key| book.by.get(k).map_or(0, |u| u.sessions);
        (of(&ik), if has_token { of(&tk) } else { 0 })
    }

    /// Reserves one session slot for `owner` outside the cores, e.g. for a
    /// WebSocket room session, against the same per-identity, per-token and
    /// node-wide session limits the cores enforce. The slot is given back
    /// when the returned guard drops. Refused with [`SfuError::Quota`] (or
    /// [`SfuError::Full`] at the node's limit).
    pub fn reserve_session(
        &self,
        config: &QuotaConfig,
        owner: &Owner,
    ) -> Result<SessionSlot, SfuError> {
        let charge = Charge {
            sessions: 1,
            ..Charge::default()
        };
        self.try_charge(config, owner, charge)
            .map_err(refusal_error)?;
        Ok(SessionSlot {
            ledger: self.clone(),
            owner: owner.clone(),
        })
    }
}

/// One session slot held outside the cores ([`QuotaLedger::reserve_session`]);
/// dropping it gives the slot back.
#[derive(Debug)]
pub struct SessionSlot {
    ledger: QuotaLedger,
    owner: Owner,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.ledger.release(
            &self.owner,
            Charge {
                sessions: 1,
                ..Charge::default()
            },
        );
    }
}

/// The error a refusal is reported as.
pub(crate) fn refusal_error((limit, max): Refusal) -> SfuError {
    match limit {
        QuotaLimit::NodeSessions => SfuError::Full(max),
        limit => SfuError::Quota { limit, max },
    }
}

/// The core's side of the quotas: whom each participant and session is
/// charged to, and the refusals counted.
#[derive(Debug, Default)]
pub(super) struct QuotaState {
    pub(super) owners: HashMap<ParticipantId, Owner>,
    pub(super) charges: HashMap<PeerId, (Owner, Charge)>,
    pub(super) refusals: [u64; QuotaLimit::ALL.len()],
}

impl Sfu {
    /// Counts a refusal by `limit` and returns its error.
    pub(super) fn refuse(&mut self, refusal: Refusal) -> SfuError {
        self.quota.refusals[refusal.0 as usize] += 1;
        refusal_error(refusal)
    }

    /// Charges a new session of `participant` (no-op for a participant
    /// without an owner, e.g. a mesh placeholder).
    pub(super) fn charge_session(
        &mut self,
        participant: ParticipantId,
        charge: Charge,
    ) -> Result<Option<(Owner, Charge)>, SfuError> {
        let Some(owner) = self.quota.owners.get(&participant) else {
            return Ok(None);
        };
        let owner = owner.clone();
        match self
            .config
            .ledger
            .try_charge(&self.config.quotas, &owner, charge)
        {
            Ok(()) => Ok(Some((owner, charge))),
            Err(r) => Err(self.refuse(r)),
        }
    }

    /// Gives a charge back (a session that was not created after all).
    pub(super) fn uncharge(&mut self, charged: Option<(Owner, Charge)>) {
        if let Some((owner, charge)) = charged {
            self.config.ledger.release(&owner, charge);
        }
    }

    /// Records what a new session `id` was charged.
    pub(super) fn keep_charge(&mut self, id: PeerId, charged: Option<(Owner, Charge)>) {
        if let Some(c) = charged {
            self.quota.charges.insert(id, c);
        }
    }

    /// Gives back a closed session's charge.
    pub(super) fn release_session(&mut self, id: PeerId) {
        if let Some((owner, charge)) = self.quota.charges.remove(&id) {
            self.config.ledger.release(&owner, charge);
        }
    }

    /// Forgets a removed participant's owner and room.
    pub(super) fn release_participant(&mut self, participant: ParticipantId, room: &str) {
        if let Some(owner) = self.quota.owners.remove(&participant) {
            self.config.ledger.leave_room(&owner, room);
        }
    }

    /// The ledger this core counts in (shared with the cores cloned from
    /// the same configuration).
    pub fn quota_ledger(&self) -> &QuotaLedger {
        &self.config.ledger
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one() -> Charge {
        Charge {
            sessions: 1,
            ..Charge::default()
        }
    }

    #[test]
    fn identity_and_token_limits_and_release() {
        let ledger = QuotaLedger::new();
        let config = QuotaConfig {
            node_sessions: 10,
            per_identity: QuotaLimits {
                sessions: 3,
                ..QuotaLimits::UNLIMITED
            },
            per_token: QuotaLimits {
                sessions: 2,
                ..QuotaLimits::UNLIMITED
            },
        };
        let a1 = Owner::identity("a").with_token("t1");
        let a2 = Owner::identity("a").with_token("t2");
        assert!(ledger.try_charge(&config, &a1, one()).is_ok());
        assert!(ledger.try_charge(&config, &a1, one()).is_ok());
        assert_eq!(
            ledger.try_charge(&config, &a1, one()),
            Err((QuotaLimit::TokenSessions, 2))
        );
        assert!(ledger.try_charge(&config, &a2, one()).is_ok());
        assert_eq!(
            ledger.try_charge(&config, &a2, one()),
            Err((QuotaLimit::IdentitySessions, 3))
        );
        // A claim tightens the token's limit.
        let tight = Owner::identity("b")
            .with_token("t3")
            .with_token_limits(QuotaLimits {
                sessions: 1,
                ..QuotaLimits::UNLIMITED
            });
        assert!(ledger.try_charge(&config, &tight, one()).is_ok());
        assert_eq!(
            ledger.try_charge(&config, &tight, one()),
            Err((QuotaLimit::TokenSessions, 1))
        );
        ledger.release(&a1, one());
        assert!(ledger.try_charge(&config, &a2, one()).is_ok());
        assert_eq!(ledger.sessions(), 4);
        assert_eq!(ledger.sessions_of(&a2), (3, 2));
    }

    #[test]
    fn the_node_limit_holds_for_exempt_owners_and_slots_give_back() {
        let ledger = QuotaLedger::new();
        let config = QuotaConfig {
            node_sessions: 2,
            per_identity: QuotaLimits {
                sessions: 1,
                ..QuotaLimits::UNLIMITED
            },
            per_token: QuotaLimits::UNLIMITED,
        };
        let admin = Owner::identity("ops").exempt(true);
        let a = ledger.reserve_session(&config, &admin).unwrap();
        let _b = ledger.reserve_session(&config, &admin).unwrap();
        assert!(matches!(
            ledger.reserve_session(&config, &admin),
            Err(SfuError::Full(2))
        ));
        drop(a);
        let user = Owner::identity("u");
        let _c = ledger.reserve_session(&config, &user).unwrap();
        assert_eq!(ledger.sessions(), 2);
    }

    #[test]
    fn rooms_count_once_per_room() {
        let ledger = QuotaLedger::new();
        let config = QuotaConfig {
            per_identity: QuotaLimits {
                rooms: 1,
                ..QuotaLimits::UNLIMITED
            },
            ..QuotaConfig::default()
        };
        let a = Owner::identity("a");
        ledger.try_enter_room(&config, &a, "r1").unwrap();
        ledger.try_enter_room(&config, &a, "r1").unwrap();
        assert_eq!(
            ledger.try_enter_room(&config, &a, "r2"),
            Err((QuotaLimit::IdentityRooms, 1))
        );
        ledger.leave_room(&a, "r1");
        assert!(ledger.try_enter_room(&config, &a, "r2").is_err());
        ledger.leave_room(&a, "r1");
        ledger.try_enter_room(&config, &a, "r2").unwrap();
    }
}
