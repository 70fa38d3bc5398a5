//! Any text given to `outpost check` / `outpost serve` must yield a config or rendered
//! diagnostics, never a panic (spans at odd offsets, multi-byte characters, huge numbers).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_config::{Config, ConfigError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(ConfigError::Invalid(d)) = Config::parse(text, "fuzz.toml", std::path::Path::new("."))
    {
        let _ = d.render();
    }
});
