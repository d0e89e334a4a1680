//! Arbitrary bytes become segments of a few connections (sequence and acknowledgement numbers near each
//! stream's start or anywhere, any flags, any payload length), fed to the reassembler with time passing,
//! expiry and shedding; a sink checks what every consumer of the events relies on.
#![no_main]

use std::collections::HashMap;

use _core::source::frames::{Address, Segment};
use _core::tcp::reassembly::{ConnectionInfo, ReassemblyLimits, StreamEvent, StreamSink, TcpReassembler};
use libfuzzer_sys::fuzz_target;

#[path = "input.rs"]
mod input;
use input::Input;

const SERVER_PORT: u16 = 80;

#[derive(Default)]
struct Direction {
    next_position: u64,
    ended: bool,
}

/// What the sink has learnt of one connection id.
struct Seen {
    info: ConnectionInfo,
    to_server: Direction,
    to_client: Direction,
}

#[derive(Default)]
struct Checker {
    open: HashMap<u64, Seen>,
    closed: Vec<u64>,
}

impl StreamSink for Checker {
    fn event(&mut self, connection: &ConnectionInfo, to_server: bool, _time: f64, event: StreamEvent<'_>) {
        assert!(!self.closed.contains(&connection.id), "an event after CLOSED for {}", connection.id);
        let seen = self.open.entry(connection.id).or_insert_with(|| Seen {
            info: *connection,
            to_server: Direction::default(),
            to_client: Direction::default(),
        });
        let (was, now) = (&seen.info, connection);
        assert_eq!(
            (was.client, was.client_port, was.server, was.server_port),
            (now.client, now.client_port, now.server, now.server_port)
        );
        assert!(!was.saw_syn || now.saw_syn, "saw_syn went back");
        assert!(was.to_server_base_seq.is_none() || was.to_server_base_seq == now.to_server_base_seq, "base moved");
        seen.info = *connection;
        let direction = if to_server { &mut seen.to_server } else { &mut seen.to_client };
        match event {
            StreamEvent::Data { payload, position, .. } => {
                assert!(!payload.is_empty());
                assert_eq!(position, direction.next_position, "data not contiguous");
                direction.next_position += payload.len() as u64;
            }
            StreamEvent::Gap { lost, position } => {
                assert!(lost > 0);
                assert_eq!(position, direction.next_position, "gap not contiguous");
                direction.next_position += lost;
            }
            StreamEvent::End { position } => {
                assert!(!direction.ended, "a second END");
                assert_eq!(position, direction.next_position);
                direction.ended = true;
            }
            StreamEvent::Closed => {
                assert!(to_server);
                self.open.remove(&connection.id);
                self.closed.push(connection.id);
            }
        }
    }
}

/// A sequence number: near the stream's start mostly, anywhere sometimes.
fn sequence_number(input: &mut Input<'_>, base: u32) -> u32 {
    match input.byte() % 4 {
        0 => input.u32(),
        1 => base.wrapping_add(u32::from(input.byte()) * 256 + u32::from(input.byte())),
        _ => base.wrapping_add(u32::from(input.byte() % 64)).wrapping_sub(8),
    }
}

fn check_held(reassembler: &TcpReassembler) {
    let pending: usize = reassembler.connections().map(|(_, to_server, to_client)| to_server + to_client).sum();
    assert!(reassembler.held_bytes() >= pending);
    assert_eq!(reassembler.connections().count(), reassembler.len());
    assert_eq!(reassembler.is_empty(), reassembler.held_bytes() == 0);
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let limits = ReassemblyLimits {
        max_connections: usize::from(input.byte() % 4) + 1,
        max_pending_bytes_per_stream: [16, 256, 1 << 20][usize::from(input.byte() % 3)],
        idle_timeout: f64::from(input.byte() % 8),
    };
    let mut reassembler = TcpReassembler::new(&[SERVER_PORT], limits);
    let mut checker = Checker::default();
    let (client, server) = (Address::new(&[10, 0, 0, 1]), Address::new(&[10, 0, 0, 2]));
    let bases = [input.u32(), 0xFFFF_FFF0, input.u32(), 0];
    let payload = [b'x'; 256];
    let mut time = 0.0;
    while !input.0.is_empty() {
        let selector = input.byte();
        match selector >> 5 {
            0 => {
                time += f64::from(input.byte() % 4);
                reassembler.expire(time, &mut checker);
            }
            1 if selector & 1 == 0 => {
                reassembler.shed_oldest(time, &mut checker);
            }
            _ => {
                let port = 40000 + u16::from(selector & 3);
                let to_server = selector & 4 != 0;
                let (own, peer) = if to_server { (0, 1) } else { (1, 0) };
                let connection_bases = [bases[usize::from(selector & 3)], bases[usize::from(selector & 3) ^ 1]];
                let seq = sequence_number(&mut input, connection_bases[own]);
                let ack = sequence_number(&mut input, connection_bases[peer]);
                let flags = input.byte();
                let length = usize::from(input.byte());
                let payload = payload.get(..length).unwrap_or_default();
                let (src, sport, dst, dport) =
                    if to_server { (client, port, server, SERVER_PORT) } else { (server, SERVER_PORT, client, port) };
                let segment = Segment { src, sport, dst, dport, seq, ack, flags, payload };
                reassembler.feed(time, &segment, &mut checker);
            }
        }
        check_held(&reassembler);
    }
    reassembler.close_all(time, &mut checker);
    assert!(checker.open.is_empty(), "connections left without CLOSED");
    check_held(&reassembler);
});
