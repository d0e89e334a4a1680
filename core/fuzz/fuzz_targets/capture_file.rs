//! Arbitrary bytes as a capture file (pcap, pcapng, gzip of either, or nothing of the kind): opening
//! either refuses it with a message or yields frames until the end; never a panic, never a frame that
//! claims more bytes than the file holds, and every loss is counted with its reason.
#![no_main]

use _core::source::capture_file::CaptureFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(mut capture) = CaptureFile::from_bytes("fuzz.pcap", data.to_vec()) else {
        return;
    };
    let mut frames = 0usize;
    while let Some(frame) = capture.next_frame() {
        assert!(frame.data.len() <= data.len().max(1 << 20));
        frames += 1;
        if frames > 1 << 20 {
            break;
        }
    }
    let counted: u64 = capture.losses().iter().map(|(_, count)| count).sum();
    assert_eq!(counted, capture.truncated_records());
});
