//! The crate's error type.

use std::io;

/// What went wrong, and whose fault it was: the kernel refusing something
/// (`Load`, `Program`, `Map`, `Attach`), or the caller (`InvalidArgument`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The embedded BPF object could not be loaded (kernel too old, no
    /// privileges, or BTF/relocation problems).
    #[error("loading the BPF object failed: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    /// A program could not be loaded (verifier rejection) or used.
    #[error("BPF program {name}: {source}")]
    Program {
        /// Program name in the object.
        name: &'static str,
        /// What aya or the kernel said.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// A map operation failed.
    #[error("BPF map {name}: {source}")]
    Map {
        /// Map name in the object.
        name: &'static str,
        /// What aya or the kernel said.
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// The embedded object lacks a program or map this crate expects: a build
    /// problem, not a runtime one.
    #[error("the BPF object has no {kind} named {name}")]
    Missing {
        /// "program" or "map".
        kind: &'static str,
        /// Its name.
        name: &'static str,
    },
    /// Attaching a program failed.
    #[error("attaching {program} to {target}: {source}")]
    Attach {
        /// Program name.
        program: &'static str,
        /// Interface name or socket description.
        target: String,
        /// What aya or the kernel said.
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// The caller passed something the kernel path cannot represent.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A table has no room for another entry.
    #[error("the {table} table is full ({capacity} entries)")]
    TableFull {
        /// Which table ("mesh flow").
        table: &'static str,
        /// Its capacity.
        capacity: usize,
    },
    /// A mesh flow entry the kernel path cannot carry out.
    #[error("invalid mesh flow entry: {0}")]
    InvalidMeshEntry(#[from] MeshEntryError),
    /// An I/O error (duplicating a socket descriptor, reading a CPU count).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn map(name: &'static str, source: aya::maps::MapError) -> Self {
        Self::Map {
            name,
            source: Box::new(source),
        }
    }

    pub(crate) fn program(name: &'static str, source: aya::programs::ProgramError) -> Self {
        Self::Program {
            name,
            source: Box::new(source),
        }
    }
}

/// Why a [`MeshFlowEntry`](crate::MeshFlowEntry) was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MeshEntryError {
    /// The destination has a sequence number or timestamp offset: mesh
    /// transit keeps both (the tag would have to be recomputed over
    /// different numbers, and the downstream index is the upstream's
    /// sequence number).
    #[error(
        "a mesh transit destination must have seq_offset 0 and ts_offset 0, not {seq_offset} and {ts_offset}"
    )]
    NonZeroOffsets {
        /// The destination's `seq_offset`.
        seq_offset: u16,
        /// The destination's `ts_offset`.
        ts_offset: u32,
    },
    /// `in_highest` or `out_highest` is not a 48-bit SRTP packet index.
    #[error("{field} {value:#x} is not a 48-bit SRTP packet index")]
    IndexOutOfRange {
        /// "in_highest" or "out_highest".
        field: &'static str,
        /// The value given.
        value: u64,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
