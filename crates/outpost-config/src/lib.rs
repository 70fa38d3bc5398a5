//! Outpost's configuration: the TOML model an operator writes, checked before anything runs.
//!
//! # Layout
//! - [`model`]: the serde structs (`deny_unknown_fields`, defaults, humantime durations, byte sizes).
//! - [`validate`]: the pass after parsing that checks what types cannot (names that must exist,
//!   duplicate routes, overlapping listeners, coordinates in range …).
//! - [`diagnostics`]: every problem, from the TOML parser, serde or validation, becomes a
//!   [`Diagnostic`] pointing at `file:line:col` with a caret snippet and a `help:` line.
//!
//! Where it sits: `outpost check` and `outpost serve` call [`Config::load`]; a reload (SIGHUP) calls
//! it again and keeps the old config when the new one has diagnostics. Nothing else in the
//! workspace parses TOML.

pub mod diagnostics;
pub mod model;
pub mod validate;

pub use diagnostics::{Diagnostic, Diagnostics};
pub use model::*;

use std::path::{Path, PathBuf};

/// Why a configuration could not be loaded: the file is unreadable, or its content has problems.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read at all (missing, permissions …).
    #[error("cannot read config file {path}: {source}; check the path given to --config")]
    Read {
        /// The path as given.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The file was read but has one or more problems; the rendered text names each one.
    #[error("{}", .0.render())]
    Invalid(Diagnostics),
}

impl Config {
    /// Reads, parses and validates a config file; relative paths inside it (TLS certificates)
    /// are resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::parse(&src, &path.display().to_string(), &base)
    }

    /// Parses and validates config text; `origin` names the source in diagnostics and `base_dir`
    /// anchors relative paths.
    pub fn parse(src: &str, origin: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(src).map_err(|e| {
            ConfigError::Invalid(Diagnostics::new(
                origin,
                src,
                vec![diagnostics::from_toml_error(&e)],
            ))
        })?;
        config.base_dir = base_dir.to_path_buf();
        let problems = validate::validate(&config);
        if problems.is_empty() {
            Ok(config)
        } else {
            let located = diagnostics::locate(src, problems);
            Err(ConfigError::Invalid(Diagnostics::new(origin, src, located)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = include_str!("../../../examples/retail/outpost.toml");

    fn parse_and_render(src: &str) {
        if let Err(ConfigError::Invalid(d)) = Config::parse(src, "fuzz.toml", Path::new(".")) {
            let text = d.render();
            assert!(
                text.contains("fuzz.toml"),
                "diagnostics name the file: {text}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// A reload must never panic on a broken file: any edit of a real config yields either
        /// a config or rendered diagnostics (odd spans, multi-byte text, truncation included).
        #[test]
        fn any_edit_of_a_real_config_parses_or_renders(
            start in 0usize..EXAMPLE.len(),
            len in 0usize..40,
            insert in "\\PC{0,12}",
        ) {
            let start = (0..=start).rev().find(|i| EXAMPLE.is_char_boundary(*i)).unwrap_or(0);
            let end = (start + len).min(EXAMPLE.len());
            let end = (end..=EXAMPLE.len()).find(|i| EXAMPLE.is_char_boundary(*i)).unwrap_or(EXAMPLE.len());
            let mutated = format!("{}{}{}", &EXAMPLE[..start], insert, &EXAMPLE[end..]);
            parse_and_render(&mutated);
        }

        /// Arbitrary text, including non-TOML, never panics.
        #[test]
        fn arbitrary_text_parses_or_renders(src in "\\PC{0,300}") {
            parse_and_render(&src);
        }
    }
}
