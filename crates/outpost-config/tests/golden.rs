//! Golden-file tests: the exact text a user sees for each invalid config under `tests/golden/`.
//!
//! Each `NAME.toml` has a `NAME.err` beside it. Run with `UPDATE_GOLDEN=1` to rewrite the `.err`
//! files after an intended change of wording, then review the diff.

use std::path::Path;

use outpost_config::{Config, ConfigError};

#[test]
fn invalid_configs_match_their_golden_messages() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut checked = 0;
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .expect("golden dir exists")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    entries.sort();
    for toml_path in entries {
        let src = std::fs::read_to_string(&toml_path).expect("readable golden input");
        let name = toml_path
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .into_owned();
        let got = match Config::parse(&src, &name, &dir) {
            Ok(_) => panic!("{name} should be rejected"),
            Err(ConfigError::Invalid(d)) => d.render(),
            Err(other) => panic!("{name}: unexpected error kind {other}"),
        };
        let err_path = toml_path.with_extension("err");
        if update {
            std::fs::write(&err_path, &got).expect("write golden");
        } else {
            let want = std::fs::read_to_string(&err_path).unwrap_or_else(|_| {
                panic!("missing {}; run with UPDATE_GOLDEN=1", err_path.display())
            });
            assert_eq!(got, want, "diagnostics for {name} changed");
        }
        checked += 1;
    }
    assert!(checked >= 8, "expected the golden inputs, found {checked}");
}

#[test]
fn the_retail_example_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/retail/outpost.toml");
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.node.id, "tokyo-1");
    assert_eq!(config.origins["central"].endpoints.len(), 2);
    assert_eq!(
        config.routes[0].max_body_bytes.map(|b| b.as_u64()),
        Some(1024 * 1024)
    );
}
