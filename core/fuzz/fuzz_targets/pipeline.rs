//! The whole data plane on hostile traffic: arbitrary bytes become raw-IPv4 TCP segments of a few
//! connections to the gateway port (flags, sequence numbers and payloads from the input) with the
//! credential table loaded, ending with `finish`. It must never panic or count an internal error, every
//! line it emits must be one JSON object, no key parameter may be left in its `request_uri`, a consumer
//! subject is the key's consumer, and the state stays within its memory budget.
#![no_main]

use _core::metering::key_lookup::unquote_plus;
use _core::metering::subject::SubjectRule;
use _core::source::capture_file::Frame;
use _core::source::frames::DLT_IPV4;
use libfuzzer_sys::fuzz_target;

#[path = "input.rs"]
mod input;
use input::Input;
#[path = "plane.rs"]
mod plane;

fn frame(to_server: bool, client: u8, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
    let (client_address, server_address) = ([10, 0, 0, client], [10, 0, 0, 200]);
    let (source, destination) = if to_server { (client_address, server_address) } else { (server_address, client_address) };
    let (sport, dport) = if to_server { (40000 + u16::from(client), 8000) } else { (8000, 40000 + u16::from(client)) };
    let mut packet = vec![0x45, 0];
    packet.extend_from_slice(&((40 + payload.len()) as u16).to_be_bytes());
    packet.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
    packet.extend_from_slice(&source);
    packet.extend_from_slice(&destination);
    packet.extend_from_slice(&sport.to_be_bytes());
    packet.extend_from_slice(&dport.to_be_bytes());
    packet.extend_from_slice(&seq.to_be_bytes());
    packet.extend_from_slice(&ack.to_be_bytes());
    packet.extend_from_slice(&[0x50, flags, 0xFF, 0xFF, 0, 0, 0, 0]);
    packet.extend_from_slice(payload);
    packet
}

/// Whether a URI's query still has an `apikey` parameter (key-auth's default key name), by name as
/// key-auth decodes it.
fn names_a_key(uri: &[u8]) -> bool {
    let Some(question) = uri.iter().position(|&b| b == b'?') else {
        return false;
    };
    uri[question + 1..].split(|&b| b == b'&').any(|part| {
        let name = part.split(|&b| b == b'=').next().unwrap_or(b"");
        unquote_plus(name).as_ref() == b"apikey"
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

/// The `request_uri` value of an event line (up to its closing quote; escaped quotes end it early, which
/// only shortens what is searched).
fn request_uri(line: &[u8]) -> &[u8] {
    const FIELD: &[u8] = b"\"request_uri\":\"";
    let Some(start) = line.windows(FIELD.len()).position(|window| window == FIELD) else {
        return b"";
    };
    let value = &line[start + FIELD.len()..];
    &value[..value.iter().position(|&b| b == b'"').unwrap_or(value.len())]
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let choice = input.byte() % 3;
    let rule = match choice {
        0 => SubjectRule::Consumer,
        1 => SubjectRule::Header("x-tenant".to_string()),
        _ => SubjectRule::Query("tenant".to_string()),
    };
    let mut pipeline = plane::pipeline(rule);
    // the table loaded, or not yet (consumer subjects held, then dropped to stay within the budget)
    let table_loaded = input.byte() & 1 == 0;
    if table_loaded {
        plane::load_credentials(&mut pipeline);
    }
    pipeline.begin_batch(1.0);
    let mut out = Vec::new();
    let mut sequences = [[1000u32, 5000u32]; 4];
    let mut time = 1.0;
    while !input.0.is_empty() {
        let control = input.byte();
        let client = control & 3;
        let to_server = control & 4 == 0;
        let flags = input.byte();
        let jump = u32::from(input.byte()) << (input.byte() % 24);
        let length = usize::from(input.byte()) * 2;
        let payload = input.take(length);
        time += f64::from(input.byte()) / 16.0;
        let (ours, theirs) = if to_server { (0, 1) } else { (1, 0) };
        let stream = &mut sequences[usize::from(client)];
        let (seq, ack) = (stream[ours].wrapping_add(jump & 0xFF00_0000), stream[theirs]);
        let data = frame(to_server, client, seq, ack, flags, payload);
        pipeline.feed_frame(&Frame { time, linktype: DLT_IPV4, data: &data, wire_length: data.len() });
        stream[ours] = seq.wrapping_add(payload.len() as u32);
        if control & 0x80 != 0 {
            plane::end_batch(&mut pipeline, &mut out);
        }
    }
    for line in plane::finish(&mut pipeline, &mut out) {
        assert!(!names_a_key(request_uri(&line)), "a key parameter reached an event's request_uri");
        if choice == 0 {
            assert!(contains(&line, b"\"subject\":\"alice\""), "a consumer subject is the key's consumer");
        }
    }
});
