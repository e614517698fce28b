//! Arbitrary payloads for every protocol version, outside and inside a streamed block:
//! the decoder must return a message or an error, never panic, and an error must point
//! inside the payload.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sluice::pgoutput::Decoder;

fuzz_target!(|data: &[u8]| {
    for protocol in 1..=4 {
        for in_stream in [false, protocol >= 2] {
            let mut decoder = Decoder::new(protocol);
            if in_stream {
                decoder
                    .decode(Bytes::from_static(&[b'S', 0, 0, 0, 1, 1]))
                    .expect("a valid Stream Start");
            }
            if let Err(error) = decoder.decode(Bytes::copy_from_slice(data)) {
                assert!(error.offset() <= data.len(), "{error}");
            }
        }
    }
});
