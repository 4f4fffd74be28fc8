//! The envelope and body decoders on arbitrary bytes (what the console socket receives):
//! they must never panic, whatever they accept must re-encode to exactly the same bytes,
//! and checking signatures on it must not panic either.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mayfly_command::{Body, Envelope};

fuzz_target!(|data: &[u8]| {
    if let Ok(env) = Envelope::decode(data) {
        assert_eq!(env.encode(), data, "envelope encoding is not canonical");
        for s in env.signatures() {
            let _ = env.signature_valid(s);
        }
    }
    if let Ok(body) = Body::decode(data) {
        assert_eq!(body.encode().expect("accepted body re-encodes"), data, "body encoding is not canonical");
    }
});
