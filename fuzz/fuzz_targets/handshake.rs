//! The upgrade-request parser on arbitrary bytes: never panics, and what it accepts is consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringcast_wire::handshake::{parse_request, write_response};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(req)) = parse_request(data, 8192, &["centrifuge-json", "centrifuge-protobuf"]) {
        assert!(req.head_len <= data.len());
        assert_eq!(req.key.len(), 24);
        let mut out = Vec::new();
        write_response(&req, &mut out);
        assert!(out.starts_with(b"HTTP/1.1 101 "));
    }
});
