//! What can go wrong outside a request: opening the registry, deploying, rolling back.

/// A deploy, rollback or start-up failure; the message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum FunctionError {
    /// The bytes are not a component the host can run.
    #[error(
        "function `{name}`: not a runnable component: {reason}. A function must be a \
         WebAssembly component exporting wasi:http/incoming-handler@0.2.x (cargo build \
         --target wasm32-wasip2, or componentize-py -w wasi:http/proxy) and importing only \
         WASI 0.2, wasi:keyvalue@0.2.0-draft and wasi:config@0.2.0-rc.1"
    )]
    Invalid {
        /// Function name.
        name: String,
        /// What wasmtime said.
        reason: String,
    },
    /// The name is not declared in the config.
    #[error(
        "no function `{0}` in the config; declare it with [functions.{0}] component = \
         \"path.wasm\" (its limits and routes live there)"
    )]
    Unknown(String),
    /// Rollback to a version that does not exist.
    #[error("function `{name}` has no version {version}; `outpost fn list` shows them")]
    NoSuchVersion {
        /// Function name.
        name: String,
        /// The version asked for.
        version: u32,
    },
    /// Rollback without a version when there is nothing older.
    #[error("function `{0}` has no version older than the active one to roll back to")]
    NothingToRollBack(String),
    /// The component is larger than a deploy may be.
    #[error("component of {size} bytes is larger than the {limit}-byte deploy limit")]
    TooLarge {
        /// Size received.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Reading or writing the function directory failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The manifest of versions is unreadable.
    #[error(
        "function manifest {path} is damaged ({reason}); restore it from a backup or remove \
         it to start the history over (deployed components stay in components/)"
    )]
    Manifest {
        /// The file.
        path: std::path::PathBuf,
        /// The parse error.
        reason: String,
    },
    /// The engine could not be built.
    #[error("WebAssembly engine: {0}")]
    Engine(String),
}
