//! What can go wrong in the local store, said so the operator (or the API client) knows what to do.

use std::path::PathBuf;

/// Errors from opening or using the node's store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file exists but is not an SQLite database (or is damaged beyond opening).
    #[error(
        "{path} is not a readable SQLite database ({detail}); move it aside to start with an empty store, or restore it from a backup"
    )]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What SQLite said.
        detail: String,
    },
    /// The file is an SQLite database that belongs to something else.
    #[error(
        "{path} is an SQLite database, but not an Outpost store (application_id {found:#x}); point [node] data_dir at a directory of its own"
    )]
    Foreign {
        /// The database file.
        path: PathBuf,
        /// The application id found in its header.
        found: i64,
    },
    /// The store was written by a newer Outpost whose schema this build does not know.
    #[error(
        "{path} has schema version {found}, newer than this build's {supported}; run a newer outpost or restore an older backup"
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// Schema version in the file.
        found: i64,
        /// Newest schema version this build knows.
        supported: i64,
    },
    /// A filesystem problem around the database (creating `data_dir`, permissions).
    #[error("cannot use the data directory {path}: {source}")]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// SQLite failed while running a statement (disk full, I/O error …).
    #[error("local store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A name, key or value the API refuses; the message says which limit.
    #[error("{0}")]
    Invalid(String),
    /// A value larger than `state.max_value_size` (HTTP 413, like any body over a limit).
    #[error("value of {len} bytes is larger than the {limit}-byte limit (state.max_value_size)")]
    TooLarge {
        /// The value's size.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A conditional write whose condition did not hold (HTTP 412); nothing changed.
    #[error("precondition failed: {0}; nothing was written")]
    PreconditionFailed(String),
    /// The named object exists with another type (e.g. `incr` on a set).
    #[error(
        "{name:?} is a {existing}, not a {wanted}; pick another name or use the {existing} operations"
    )]
    KindConflict {
        /// The object name.
        name: String,
        /// Its current type.
        existing: &'static str,
        /// The type the operation needs.
        wanted: &'static str,
    },
    /// A bounded queue (the outbox) has no room; the message names the limit.
    #[error("{0}")]
    Full(String),
    /// Stored or received bytes that do not decode (a bug or a foreign publisher).
    #[error("cannot decode stored state: {0}")]
    Decode(String),
    /// The writer thread is gone (the node is shutting down or a commit failed for good).
    #[error("the local store is closed; restart the node")]
    Closed,
}

impl StoreError {
    /// Whether the client (rather than the node) is at fault; the HTTP API maps this to 4xx.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            StoreError::Invalid(_)
                | StoreError::TooLarge { .. }
                | StoreError::PreconditionFailed(_)
                | StoreError::KindConflict { .. }
        )
    }
}
