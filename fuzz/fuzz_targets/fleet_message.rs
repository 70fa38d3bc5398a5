//! Messages from the fleet's streams: anything on the wire (a foreign publisher, a damaged
//! message) decodes to an error, never a panic; what decodes merges into any state without
//! panicking, and merging it twice changes nothing more (idempotence).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_state::crdt::Crdt;
use outpost_state::{Batch, Change};

fuzz_target!(|data: &[u8]| {
    let Ok(batch) = Batch::decode(data) else {
        let _ = Change::decode(data);
        let _ = Crdt::decode(data);
        return;
    };
    for change in &batch.changes {
        if let Change::Crdt { delta, .. } = change {
            let mut state = Crdt::empty(delta.kind());
            if state.merge(delta).is_ok() {
                let once = state.clone();
                let _ = state.merge(delta);
                assert_eq!(state, once, "merge is idempotent");
                let _ = state.to_json();
            }
        }
    }
});
