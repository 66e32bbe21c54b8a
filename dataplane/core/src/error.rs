//! The core's error type: what went wrong with a control call, and whose
//! fault it was.

use std::net::SocketAddr;

use crate::ids::{ParticipantId, PeerId, TrackId};
use crate::types::{CodecSpec, RtpDirection, TrackKind};

/// Errors of the core's control operations. Each variant says whose fault
/// it was, so the HTTP layer can map it to a status code
/// ([`SfuError::is_client_error`]).
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum SfuError {
    /// The client sent an SDP offer we could not parse or negotiate.
    #[error("bad SDP: {0}")]
    InvalidSdp(SdpError),
    /// The client's request contradicts itself or the room's state.
    #[error("bad request: {0}")]
    InvalidSpec(SpecError),
    /// The request names a participant this core does not have.
    #[error("no such participant {0}")]
    NoSuchParticipant(ParticipantId),
    /// The request names a session this core does not have.
    #[error("no such session {0}")]
    NoSuchPeer(PeerId),
    /// The request names a track this core does not have.
    #[error("no such track {0}")]
    NoSuchTrack(TrackId),
    /// The node is at its configured session limit.
    #[error("node is full ({0} sessions)")]
    Full(usize),
    /// The owner of the request is at one of its quotas (docs/api.md,
    /// "Limits"): too many sessions, rooms, tracks or plain endpoints for
    /// one identity or one token.
    #[error("quota exceeded: {limit} (at most {max})")]
    Quota {
        /// The limit that was hit.
        limit: crate::sfu::QuotaLimit,
        /// Its value.
        max: usize,
    },
    /// The node is draining and accepts no new sessions.
    #[error("node is draining")]
    Draining,
    /// A bug or an unexpected library failure; never the client's fault.
    #[error("internal error: {0}")]
    Internal(String),
}

/// What is wrong with an SDP offer.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdpError {
    /// The text is not SDP (the parser's words).
    #[error("{0}")]
    Unparsable(String),
    /// Valid SDP that cannot be answered (str0m's words).
    #[error("{0}")]
    NotNegotiable(String),
    /// A subscribe offer with an m-line that sends media.
    #[error("subscribe offers must be recvonly; m-line {mid} sends media")]
    SubscribeSendsMedia {
        /// The offending m-line.
        mid: String,
    },
    /// A publish offer with an m-line that only receives.
    #[error("publish offers must send media; m-line {mid} is recvonly")]
    PublishReceivesOnly {
        /// The offending m-line.
        mid: String,
    },
    /// Nothing in the offer is audio or video in a codec the core routes.
    #[error(
        "the offer has no usable audio or video m-line (supported: Opus, VP8, H.264, VP9, AV1)"
    )]
    NoUsableMedia,
    /// A publish offer's m-line offers no codec the room allows.
    #[error(
        "m-line {mid} offers {offered}, and this room allows only {allowed} for {kind}; \
         offer one of those"
    )]
    CodecNotAllowed {
        /// The m-line.
        mid: String,
        /// Audio or video.
        kind: &'static str,
        /// The codecs the m-line offers, as in its `a=rtpmap` lines.
        offered: String,
        /// The codecs the room allows for this kind, in order.
        allowed: String,
    },
    /// A subscribe offer that cannot receive a track of the room: it
    /// offers none of the track's codec.
    #[error(
        "track {track} is {codec}, and this offer's {kind} m-lines do not offer {codec} \
         (they offer {offered}); offer {codec}, or wait for codec bridging, which needs a \
         transcoding node (hwcodec)"
    )]
    NoCommonCodec {
        /// The track that cannot be sent.
        track: String,
        /// Its codec.
        codec: &'static str,
        /// Audio or video.
        kind: &'static str,
        /// The codecs the offer's m-lines of that kind accept.
        offered: String,
    },
}

/// What is wrong with an endpoint or layer request.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// An empty codec list.
    #[error("a codec list names at least one codec")]
    NoCodecs,
    /// A codec named twice in one list.
    #[error("codec {0} is named twice")]
    RepeatedCodec(CodecSpec),
    /// A codec the node's configuration does not allow.
    #[error("codec {codec} is not among this node's codecs ({node})")]
    CodecNotOnNode {
        /// The codec asked for.
        codec: CodecSpec,
        /// The node's codecs, in order.
        node: String,
    },
    /// A plain endpoint's `fmtp` that cannot describe its stream.
    #[error("fmtp {fmtp:?}: {reason}")]
    Fmtp {
        /// The fmtp given (at most 200 characters of it).
        fmtp: String,
        /// What is wrong.
        reason: String,
    },
    /// As many rooms carry a codec list of their own as the core keeps.
    #[error("{0} rooms already carry a codec list of their own; clear one first")]
    TooManyRoomCodecLists(usize),
    /// A plain subscriber asked for a track in another codec.
    #[error(
        "track {track} is {track_codec}, and this endpoint asks for {codec}; codec bridging \
         needs a transcoding node (hwcodec)"
    )]
    CodecMismatch {
        /// The track.
        track: String,
        /// The track's codec.
        track_codec: CodecSpec,
        /// The endpoint's codec.
        codec: CodecSpec,
    },
    /// Not a static (0-63) or dynamic (96-127) RTP payload type.
    #[error("payload_type {0} is not a valid dynamic or static RTP payload type (0-63, 96-127)")]
    PayloadType(u8),
    /// An audio-level extension id where none may be, or out of range.
    #[error(
        "audio_level_ext {0}: only an audio publisher has one, and it is a one-byte \
         header-extension id (1-14)"
    )]
    AudioLevelExt(u8),
    /// A remote address with a wildcard IP or port 0.
    #[error("remote {0} must be a concrete IP:PORT")]
    RemoteNotConcrete(SocketAddr),
    /// A broadcast, multicast or reserved remote address.
    #[error("remote {0} is not a unicast address")]
    RemoteNotUnicast(SocketAddr),
    /// A loopback or link-local remote the operator has not allowed.
    #[error(
        "remote {0} is a loopback or link-local address, which this node only sends to \
         when its operator allows it (rtp_allow_networks)"
    )]
    RemoteRestricted(SocketAddr),
    /// A remote of an address family the media socket cannot reach.
    #[error("remote {remote} is not reachable from the media socket on {local}")]
    RemoteFamily {
        /// The remote address.
        remote: SocketAddr,
        /// The media socket's address.
        local: std::net::IpAddr,
    },
    /// The remote address is a WebRTC session's.
    #[error("remote {0} already belongs to a WebRTC session")]
    RemoteIsWebRtc(SocketAddr),
    /// The remote already has an endpoint in this direction.
    #[error("remote {remote} already has a {direction:?} endpoint")]
    RemoteTaken {
        /// The remote address.
        remote: SocketAddr,
        /// The direction it already has.
        direction: RtpDirection,
    },
    /// The requested track is of another kind or another room.
    #[error("track {track} is not a {} track of this room", kind.as_str())]
    WrongTrack {
        /// The requested track.
        track: TrackId,
        /// The kind the request asked for.
        kind: TrackKind,
    },
    /// A codec of another kind than the endpoint's.
    #[error("codec {} is not a {} codec", codec.as_str(), kind.as_str())]
    CodecKind {
        /// The requested codec.
        codec: CodecSpec,
        /// The endpoint's kind.
        kind: TrackKind,
    },
    /// A local-endpoint call for a session that is not a local endpoint
    /// of that direction.
    #[error("session {peer} is not a local {direction:?} endpoint")]
    NotLocal {
        /// The session.
        peer: PeerId,
        /// The direction the call needs.
        direction: RtpDirection,
    },
    /// A layer choice for a session that is not a WebRTC subscriber.
    #[error("layers can only be chosen for WebRTC subscribers")]
    NotLayered,
}

impl From<SpecError> for SfuError {
    fn from(e: SpecError) -> Self {
        SfuError::InvalidSpec(e)
    }
}

impl From<SdpError> for SfuError {
    fn from(e: SdpError) -> Self {
        SfuError::InvalidSdp(e)
    }
}

impl SfuError {
    /// Whether the peer (client) caused the error, as opposed to the node.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            SfuError::InvalidSdp(_)
                | SfuError::InvalidSpec(_)
                | SfuError::NoSuchParticipant(_)
                | SfuError::NoSuchPeer(_)
                | SfuError::NoSuchTrack(_)
                | SfuError::Quota { .. }
        )
    }
}
