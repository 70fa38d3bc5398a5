//! The disk tier's file format: whatever is on disk (torn writes, bit rot, foreign files) is
//! rejected with an error, never a panic or a huge allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_cache::object;

fuzz_target!(|data: &[u8]| {
    let Ok((meta_len, ..)) = object::decode_prefix(data) else {
        return;
    };
    let meta_end = object::PREFIX_LEN.saturating_add(meta_len);
    if data.len() < meta_end {
        return;
    }
    let _ = object::decode(
        data,
        &data[object::PREFIX_LEN..meta_end],
        Some(&data[meta_end..]),
    );
    let _ = object::decode(data, &data[object::PREFIX_LEN..meta_end], None);
});
