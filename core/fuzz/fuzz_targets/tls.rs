//! The TLS probes' records into the whole data plane: arbitrary bytes become ring records of a few
//! (process, `SSL*`) streams (kinds, pieces, the probes' positions and ACKs, threads and held writes from
//! the input, the plaintext hostile), ending with `finish`. It must never panic or count an internal error,
//! every line it emits must be one JSON object, and the state stays within its memory budget.
#![no_main]

use _core::metering::subject::SubjectRule;
use _core::source::tls::HEADER;
use libfuzzer_sys::fuzz_target;

#[path = "input.rs"]
mod input;
use input::Input;
#[path = "plane.rs"]
mod plane;

/// A record as tls.bpf.c's struct chunk_header lays it out, then its plaintext.
fn record(input: &mut Input<'_>, time_ns: u64) -> Vec<u8> {
    let control = input.byte();
    let mut bytes = vec![0u8; HEADER];
    bytes[0..8].copy_from_slice(&u64::from(control & 3).to_ne_bytes()); // the SSL*
    bytes[8..16].copy_from_slice(&time_ns.to_ne_bytes());
    bytes[16..20].copy_from_slice(&(100 + u32::from(control >> 2 & 1)).to_ne_bytes()); // the process
    bytes[20..24].copy_from_slice(&u32::from(input.byte() % 8).to_ne_bytes()); // the kind
    let piece = u32::from(input.byte() % 4) * 8192;
    let length = usize::from(input.byte()) * 4;
    let data = input.take(length);
    let call_len = piece + data.len() as u32 + u32::from(input.byte());
    bytes[24..28].copy_from_slice(&piece.to_ne_bytes());
    bytes[28..32].copy_from_slice(&call_len.to_ne_bytes());
    bytes[32..36].copy_from_slice(&(data.len() as u32).to_ne_bytes());
    bytes[36..38].copy_from_slice(&(if control & 8 == 0 { 2u16 } else { 0 }).to_ne_bytes()); // AF_INET
    bytes[38..40].copy_from_slice(&8443u16.to_ne_bytes());
    bytes[40..42].copy_from_slice(&(40000 + u16::from(control & 3)).to_ne_bytes());
    bytes[42..44].copy_from_slice(&u16::from(control >> 4 & 1).to_ne_bytes()); // the client left
    bytes[44..48].copy_from_slice(&input.u32().to_ne_bytes());
    bytes[48..52].copy_from_slice(&input.u32().to_ne_bytes());
    bytes[52..56].copy_from_slice(&[127, 0, 0, 1]);
    bytes[68..72].copy_from_slice(&[127, 0, 0, 2]);
    bytes[84..88].copy_from_slice(&(200 + u32::from(control >> 5 & 1)).to_ne_bytes()); // the thread
    bytes[88..92].copy_from_slice(&u32::from(control >> 6 & 1).to_ne_bytes()); // sent at its entry
    // positioned, in one of a few generations of the probes' count (0: not positioned)
    let generation = if control >> 7 == 0 { 0 } else { 1 + u32::from(input.byte() % 3) };
    bytes[92..96].copy_from_slice(&generation.to_ne_bytes());
    // the probes' counts, now and then past 32 bits (and past the largest gap taken for one)
    let high = u64::from(input.byte() % 4) << 38;
    bytes[96..104].copy_from_slice(&(high | u64::from(input.u32())).to_ne_bytes());
    bytes[104..112].copy_from_slice(&(high | u64::from(input.u32())).to_ne_bytes());
    bytes.extend_from_slice(data);
    if input.byte() == 0xFF {
        bytes.truncate(usize::from(input.byte())); // a record cut short
    }
    bytes
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mut pipeline = plane::pipeline(SubjectRule::Consumer);
    plane::load_credentials(&mut pipeline);
    pipeline.begin_batch(1.0);
    let mut out = Vec::new();
    let mut time_ns = 1_000_000_000u64;
    while !input.0.is_empty() {
        time_ns += u64::from(input.byte()) << 20;
        let bytes = record(&mut input, time_ns);
        pipeline.feed_tls(&bytes);
        if input.byte() & 0x80 != 0 {
            plane::end_batch(&mut pipeline, &mut out);
        }
    }
    plane::finish(&mut pipeline, &mut out);
});
