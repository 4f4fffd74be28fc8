//! The message decoder on arbitrary bytes: it must never panic, and whatever it accepts
//! must re-encode to exactly the same bytes (canonical encoding).

#![no_main]

use libfuzzer_sys::fuzz_target;
use mayfly_ring::wire::{Request, Response};

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = Request::decode(data) {
        let again = request
            .body
            .encode(request.id)
            .expect("accepted request re-encodes");
        assert_eq!(again, data, "request encoding is not canonical");
    }
    if let Ok(response) = Response::decode(data) {
        let again = response
            .body
            .encode(response.id)
            .expect("accepted response re-encodes");
        assert_eq!(again, data, "response encoding is not canonical");
    }
});
