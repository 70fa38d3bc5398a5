//! An origin's bytes through the HTTP/1.1 client's response parser: head (interim answers
//! skipped), framing (Content-Length, chunked, close-delimited) and the chunked decoder. An
//! origin is a peer too: a broken or hostile one must get an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_proxy::origin::h1::parse_response;

fuzz_target!(|data: &[u8]| {
    let head_request = data.first().is_some_and(|b| b & 1 == 1);
    if let Ok((response, body)) = parse_response(data, head_request) {
        // A body is never longer than what arrived.
        assert!(body.len() <= data.len());
        assert!(!head_request || body.is_empty());
        let _ = response.status();
    }
});
