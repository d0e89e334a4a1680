//! Arbitrary bytes become both directions of a few connections (data in pieces of any length, gaps, ends,
//! closes, time passing with expiry), fed to the HTTP stage as the reassembler's events; it must never
//! panic, stay within its bounds, and release every connection it was told is closed.
#![no_main]

use _core::http::exchanges::{HttpExchanges, MAX_PENDING};
use _core::source::frames::Address;
use _core::tcp::reassembly::{ConnectionInfo, StreamEvent, StreamSink};
use libfuzzer_sys::fuzz_target;

#[path = "input.rs"]
mod input;
use input::Input;

const MAX_HEAD_BYTES: usize = 512;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mut http = HttpExchanges::new(f64::from(input.byte() % 8), MAX_HEAD_BYTES);
    let connection = |id: u64, saw_syn: bool| ConnectionInfo {
        id,
        client: Address::new(&[10, 0, 0, 1]),
        client_port: 40000 + id as u16,
        server: Address::new(&[10, 0, 0, 2]),
        server_port: 80,
        saw_syn,
        to_server_base_seq: Some(1),
    };
    // per connection slot: its id (a closed one comes back as a new id) and each direction's position
    let mut ids = [1u64, 2, 3];
    let mut next_id = 4;
    let mut positions = [[0u64; 2]; 3];
    let mut time = 0.0;
    while !input.0.is_empty() {
        let selector = input.byte();
        let slot = usize::from(selector & 3) % 3;
        let to_server = selector & 4 != 0;
        let info = connection(ids[slot], selector & 8 != 0);
        let position = &mut positions[slot][usize::from(!to_server)];
        match selector >> 4 {
            0 => {
                time += f64::from(input.byte() % 4);
                http.expire(time);
            }
            1 => {
                let lost = u64::from(input.byte()) + 1;
                http.event(&info, to_server, time, StreamEvent::Gap { lost, position: *position });
                *position += lost;
            }
            2 => http.event(&info, to_server, time, StreamEvent::End { position: *position }),
            3 => {
                http.event(&info, true, time, StreamEvent::Closed);
                assert!(http.waiting().all(|(id, _)| id != info.id), "state kept after CLOSED");
                ids[slot] = next_id;
                next_id += 1;
                positions[slot] = [0, 0];
            }
            _ => {
                let length = usize::from(input.byte());
                let payload = input.take(length);
                let peer_acked = i64::from(input.byte()) - 1;
                http.event(&info, to_server, time, StreamEvent::Data { payload, position: *position, peer_acked });
                *position += payload.len() as u64;
            }
        }
        assert!(http.waiting().all(|(_, waiting)| waiting <= MAX_PENDING));
        for exchange in http.take() {
            assert!(exchange.request.size >= exchange.request.head.len() as u64);
        }
    }
    for id in ids {
        http.event(&connection(id, false), true, time, StreamEvent::Closed);
    }
    http.take().for_each(drop);
    assert_eq!((http.waiting().count(), http.held_bytes()), (0, 0));
});
