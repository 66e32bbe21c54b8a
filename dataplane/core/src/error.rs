use crate::ids::{ParticipantId, PeerId, TrackId};

/// Errors of the core's control operations. Each variant says whose fault
/// it was, so the HTTP layer can map it to a status code.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum SfuError {
    /// The client sent an SDP we could not parse or negotiate.
    #[error("bad SDP: {0}")]
    BadSdp(String),
    /// The client asked for something that contradicts its own request.
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("no such participant {0}")]
    NoSuchParticipant(ParticipantId),
    #[error("no such session {0}")]
    NoSuchPeer(PeerId),
    #[error("no such track {0}")]
    NoSuchTrack(TrackId),
    /// The node is at its configured session limit.
    #[error("node is full ({0} sessions)")]
    Full(usize),
    /// The node is draining and accepts no new sessions.
    #[error("node is draining")]
    Draining,
    /// A bug or an unexpected library failure; never the client's fault.
    #[error("internal error: {0}")]
    Internal(String),
}

impl SfuError {
    /// Whether the peer (client) caused the error, as opposed to the node.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            SfuError::BadSdp(_)
                | SfuError::BadRequest(_)
                | SfuError::NoSuchParticipant(_)
                | SfuError::NoSuchPeer(_)
                | SfuError::NoSuchTrack(_)
        )
    }
}
