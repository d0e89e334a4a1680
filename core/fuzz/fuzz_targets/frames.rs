//! Arbitrary bytes as a frame of every supported link type (and a few unsupported ones): decoding must
//! never panic (whole or as a frame the capture cut short), a segment's payload must lie inside the frame, and the flow hash must not care which
//! way the frame went.
#![no_main]

use _core::source::frames::{flow_hash, flow_hash_captured, FrameDecoder, SUPPORTED_LINK_TYPES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut decoder = FrameDecoder::default();
    for linktype in SUPPORTED_LINK_TYPES.into_iter().chain([2, 105, 276 + 1]) {
        if let Some(segment) = decoder.decode(linktype, data) {
            assert!(segment.payload.len() <= data.len());
        }
        let _ = flow_hash(linktype, data);
        // as a frame the capture cut short
        if let Some(segment) = decoder.decode_captured(linktype, data, data.len() + 1) {
            assert!(segment.payload.len() <= data.len());
        }
        let _ = flow_hash_captured(linktype, data, data.len() + 1);
    }
});
