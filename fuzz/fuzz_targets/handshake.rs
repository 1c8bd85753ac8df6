//! The upgrade-request parser on arbitrary bytes: never panics, and what it accepts is consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringcast_wire::deflate::{DeflateConfig, DeflateParams};
use ringcast_wire::handshake::{parse_request_with, write_response};

fuzz_target!(|data: &[u8]| {
    let deflate = DeflateConfig::enabled();
    if let Ok(Some(req)) = parse_request_with(data, 8192, &["centrifuge-json", "centrifuge-protobuf"], &deflate) {
        assert!(req.head_len <= data.len());
        assert_eq!(req.key.len(), 24);
        let mut out = Vec::new();
        write_response(&req, &mut out);
        assert!(out.starts_with(b"HTTP/1.1 101 "));
        // A negotiated extension is answered so that a client reads back the same parameters.
        if let Some(params) = req.deflate {
            let mut value = Vec::new();
            params.write_header_value(&mut value);
            assert_eq!(DeflateParams::from_response([value.as_slice()]), Ok(Some(params)));
        }
    }
});
