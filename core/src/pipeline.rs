//! The stages wired together under one memory budget: frames in, event lines out.
//!
//! The control plane hands in frames a batch at a time (a capture file's next few thousand, or a ring's
//! ready blocks) and gets back the JSON Lines of the events those frames completed. Nothing here does
//! I/O: the capture file and the ring are read by their own types, the lines are written by the sinks.

use std::collections::HashMap;
use std::panic::{self, AssertUnwindSafe};

use crate::http::exchanges::HttpExchanges;
use crate::metering::billing::{Meter, MeterConfig};
use crate::source::capture_file::Frame;
use crate::source::frames::{flow_hash, FrameDecoder};
use crate::tcp::reassembly::{ReassemblyLimits, TcpReassembler};

/// Capture time between idle and response-timeout sweeps.
const HOUSEKEEPING_INTERVAL: f64 = 1.0;
/// Payload bytes fed between two looks at the memory budget: bounds how far a burst can overshoot it.
const BUDGET_CHECK_BYTES: usize = 1 << 20;

pub struct PipelineConfig {
    pub ports: Vec<u16>,
    pub limits: ReassemblyLimits,
    pub response_timeout: f64,
    pub max_head_bytes: usize,
    /// Bytes the capture state (connections, held segments, partial heads, waiting requests) may hold;
    /// past it the least recently active connections are closed early (counted `shed_connections`).
    pub max_memory: usize,
    pub meter: MeterConfig,
}

pub struct Pipeline {
    decoder: FrameDecoder,
    reassembler: TcpReassembler,
    http: HttpExchanges,
    pub meter: Meter,
    max_memory: usize,
    packets: u64,
    last_time: f64,
    next_housekeeping: f64,
    fed_since_budget_check: usize,
    /// Frames whose processing panicked: a bug, never expected; counted and logged rather than fatal.
    internal_errors: u64,
}

impl Pipeline {
    pub fn new(config: PipelineConfig) -> Pipeline {
        Pipeline {
            decoder: FrameDecoder::default(),
            reassembler: TcpReassembler::new(&config.ports, config.limits),
            http: HttpExchanges::new(config.response_timeout, config.max_head_bytes),
            meter: Meter::new(config.meter),
            max_memory: config.max_memory,
            packets: 0,
            last_time: 0.0,
            next_housekeeping: 0.0,
            fed_since_budget_check: 0,
            internal_errors: 0,
        }
    }

    /// One frame through decoding, reassembly and HTTP framing; its exchanges wait for `end_batch`.
    pub fn feed_frame(&mut self, frame: &Frame<'_>) {
        self.packets += 1;
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| self.process(frame)));
        if outcome.is_err() {
            self.internal_errors += 1;
        }
    }

    fn process(&mut self, frame: &Frame<'_>) {
        let Some(segment) = self.decoder.decode(frame.linktype, frame.data) else {
            return;
        };
        let time = frame.time;
        if time > self.last_time {
            self.last_time = time;
        }
        if time >= self.next_housekeeping {
            self.housekeeping(time);
        }
        self.fed_since_budget_check += segment.payload.len();
        self.reassembler.feed(time, &segment, &mut self.http);
        if self.fed_since_budget_check >= BUDGET_CHECK_BYTES {
            self.keep_within_budget();
        }
    }

    /// The events of every exchange finished since the last call, appended to `out` as JSON Lines.
    /// `now` is the credential table's clock (for key expiry).
    pub fn end_batch(&mut self, now: f64, out: &mut Vec<u8>) {
        self.keep_within_budget();
        self.meter.meter(self.http.take(), now, out);
    }

    /// Time passes without packets (a quiet live interface): expire what has waited too long.
    pub fn tick(&mut self, capture_time: f64, now: f64, out: &mut Vec<u8>) {
        self.housekeeping(capture_time);
        self.end_batch(now, out);
    }

    /// The capture is over: every connection is closed, so requests still in flight are emitted too.
    pub fn finish(&mut self, now: f64, out: &mut Vec<u8>) {
        self.reassembler.close_all(self.last_time, &mut self.http);
        self.meter.meter(self.http.take(), now, out);
    }

    fn housekeeping(&mut self, now: f64) {
        self.next_housekeeping = now + HOUSEKEEPING_INTERVAL;
        self.reassembler.expire(now, &mut self.http);
        self.http.expire(now);
    }

    /// Closes the least recently active connections while the capture state is over budget: a flood of
    /// half-open requests costs the oldest of them, never the process's memory.
    fn keep_within_budget(&mut self) {
        self.fed_since_budget_check = 0;
        while self.held_bytes() > self.max_memory {
            if !self.reassembler.shed_oldest(self.last_time, &mut self.http) {
                break;
            }
        }
    }

    /// Bytes the capture state holds now (what the budget limits).
    pub fn held_bytes(&self) -> usize {
        self.reassembler.held_bytes() + self.http.held_bytes()
    }

    /// Everything counted along the way, by stage, in the summary line's order.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let tcp = &self.reassembler.counters;
        let parser = &self.http.parser_counters;
        let http = &self.http.counters;
        let meter = &self.meter.counters;
        let decoder = &self.decoder.counters;
        vec![
            ("packets", self.packets),
            ("connections", tcp.connections),
            ("requests", http.requests),
            ("events", meter.events),
            ("rejected", meter.rejected),
            ("unresolved", meter.unresolved),
            ("unanswered", http.unanswered),
            ("gaps", tcp.gaps),
            ("gap_bytes", tcp.gap_bytes),
            ("lost_exchanges", http.lost_exchanges),
            ("parse_errors", parser.parse_errors),
            ("corrupt_packets", decoder.corrupt),
            // frames lost; not_tcp is filtered, not lost
            ("unsupported_link", decoder.unsupported_link),
            ("unmatched_responses", http.unmatched_responses),
            ("late_responses", http.late_responses),
            ("duplicate_segments", tcp.duplicate_segments),
            ("oversized_heads", parser.oversized_heads),
            ("pending_overflows", tcp.pending_overflows),
            ("unpaired_overflows", http.unpaired_overflows),
            ("expired_connections", tcp.expired_connections),
            ("evicted_connections", tcp.evicted_connections),
            ("shed_connections", tcp.shed_connections),
            ("ip_fragments", decoder.fragments),
            ("held_overflow", meter.held_overflow),
            ("internal_errors", self.internal_errors),
        ]
    }
}

/// Which replay worker a frame belongs to: connections are dealt out in turn as they first appear, so the
/// workers get equal shares (a hash alone left one with 58% of a 33-connection load). Every worker sees
/// the same frames in the same order, so each deals the same way without talking to the others.
/// Connections are told apart by flow hash: two that share one share a worker, and the table stays small.
/// Frames no connection claims (not TCP, corrupt) are share 0's, to be counted once.
pub struct ConnectionDealer {
    shares: u32,
    owners: HashMap<u32, u32>,
    dealt: u32,
}

impl ConnectionDealer {
    pub fn new(shares: u32) -> ConnectionDealer {
        ConnectionDealer { shares: shares.max(1), owners: HashMap::new(), dealt: 0 }
    }

    pub fn owner(&mut self, linktype: u32, frame: &[u8]) -> u32 {
        if self.shares == 1 {
            return 0;
        }
        let Some(flow) = flow_hash(linktype, frame) else {
            return 0;
        };
        let (shares, dealt) = (self.shares, &mut self.dealt);
        *self.owners.entry(flow).or_insert_with(|| {
            let owner = *dealt % shares;
            *dealt = dealt.wrapping_add(1);
            owner
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::subject::SubjectRule;
    use crate::source::frames::{DLT_IPV4, TCP_ACK, TCP_FIN, TCP_SYN};

    const CLIENT: [u8; 4] = [10, 0, 0, 1];
    const SERVER: [u8; 4] = [10, 0, 0, 2];
    const PORT: u16 = 8000;

    /// A raw IPv4 frame carrying one TCP segment.
    fn frame(to_server: bool, client_port: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let (source, destination) = if to_server { (CLIENT, SERVER) } else { (SERVER, CLIENT) };
        let (sport, dport) = if to_server { (client_port, PORT) } else { (PORT, client_port) };
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

    fn pipeline(max_memory: usize) -> Pipeline {
        Pipeline::new(PipelineConfig {
            ports: vec![PORT],
            limits: ReassemblyLimits::default(),
            response_timeout: 60.0,
            max_head_bytes: 65536,
            max_memory,
            meter: MeterConfig {
                source: "test".to_string(),
                rule: SubjectRule::Header("x-tenant".to_string()),
                max_held: 100,
            },
        })
    }

    fn feed(pipeline: &mut Pipeline, time: f64, data: &[u8]) {
        pipeline.feed_frame(&Frame { time, linktype: DLT_IPV4, data });
    }

    /// A whole keep-alive connection: handshake, one request, its response, both FINs.
    fn conversation(pipeline: &mut Pipeline, client_port: u16, request: &[u8], response: &[u8]) {
        let (c, s) = (1000u32, 5000u32);
        let (request_end, response_end) = (c + 1 + request.len() as u32, s + 1 + response.len() as u32);
        feed(pipeline, 1.0, &frame(true, client_port, c, 0, TCP_SYN, b""));
        feed(pipeline, 1.001, &frame(false, client_port, s, c + 1, TCP_SYN | TCP_ACK, b""));
        feed(pipeline, 1.002, &frame(true, client_port, c + 1, s + 1, TCP_ACK, request));
        feed(pipeline, 1.010, &frame(false, client_port, s + 1, request_end, TCP_ACK, response));
        feed(pipeline, 1.011, &frame(true, client_port, request_end, response_end, TCP_ACK | TCP_FIN, b""));
        feed(pipeline, 1.012, &frame(false, client_port, response_end, request_end + 1, TCP_ACK | TCP_FIN, b""));
    }

    fn counter(pipeline: &Pipeline, name: &str) -> u64 {
        pipeline.counters().into_iter().find(|(counter, _)| *counter == name).map(|(_, value)| value).unwrap()
    }

    #[test]
    fn frames_of_one_exchange_give_one_event_line() {
        let mut pipeline = pipeline(256 << 20);
        let request = b"GET /orders?page=2 HTTP/1.1\r\nHost: api.example.com\r\nX-Tenant: acme\r\n\r\n";
        conversation(&mut pipeline, 40000, request, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        let mut out = Vec::new();
        pipeline.end_batch(0.0, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.ends_with('\n'));
        assert!(text.contains(r#""subject":"acme""#), "{text}");
        assert!(text.contains(r#""request_uri":"/orders?page=2""#), "{text}");
        assert!(text.contains(r#""response_http_status":200"#), "{text}");
        assert_eq!((counter(&pipeline, "packets"), counter(&pipeline, "requests")), (6, 1));
        assert_eq!(counter(&pipeline, "events"), 1);
    }

    #[test]
    fn a_request_still_in_flight_is_emitted_by_finish() {
        let mut pipeline = pipeline(256 << 20);
        feed(&mut pipeline, 1.0, &frame(true, 40001, 1000, 0, TCP_SYN, b""));
        feed(&mut pipeline, 1.001, &frame(false, 40001, 5000, 1001, TCP_SYN | TCP_ACK, b""));
        feed(&mut pipeline, 1.002, &frame(true, 40001, 1001, 5001, TCP_ACK, b"GET / HTTP/1.1\r\nX-Tenant: t\r\n\r\n"));
        let mut out = Vec::new();
        pipeline.end_batch(0.0, &mut out);
        assert!(out.is_empty());
        pipeline.finish(0.0, &mut out);
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(counter(&pipeline, "unanswered"), 1);
    }

    #[test]
    fn over_budget_the_oldest_connections_are_shed() {
        let budget = 4 << 20;
        let mut pipeline = pipeline(budget);
        // Half-open requests whose heads never end: each holds its partial head until shed.
        let partial = [b"GET / HTTP/1.1\r\nX-Filler: ".as_slice(), &[b'a'; 60_000]].concat();
        for index in 0..400u16 {
            let port = 10_000 + index;
            feed(&mut pipeline, 1.0, &frame(true, port, 1000, 0, TCP_SYN, b""));
            feed(&mut pipeline, 1.0, &frame(true, port, 1001, 0, TCP_ACK, &partial));
        }
        let mut out = Vec::new();
        pipeline.end_batch(0.0, &mut out);
        assert!(counter(&pipeline, "shed_connections") > 0);
        assert!(pipeline.held_bytes() <= budget, "{} held", pipeline.held_bytes());
    }

    #[test]
    fn exchanges_survive_under_a_budget_they_fit_in() {
        let mut pipeline = pipeline(16 << 20);
        for index in 0..50u16 {
            conversation(&mut pipeline, 20_000 + index, b"GET / HTTP/1.1\r\nX-Tenant: t\r\n\r\n",
                         b"HTTP/1.1 204 No Content\r\n\r\n");
        }
        let mut out = Vec::new();
        pipeline.end_batch(0.0, &mut out);
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 50);
        assert_eq!(counter(&pipeline, "shed_connections"), 0);
    }

    #[test]
    fn connections_are_dealt_in_turn_and_keep_their_share() {
        let mut dealer = ConnectionDealer::new(2);
        let first = frame(true, 30000, 1, 0, TCP_SYN, b"");
        let second = frame(true, 30001, 1, 0, TCP_SYN, b"");
        let third = frame(true, 30002, 1, 0, TCP_SYN, b"");
        let owners: Vec<u32> = [&first, &second, &third].iter().map(|f| dealer.owner(DLT_IPV4, f)).collect();
        assert_eq!(owners, vec![0, 1, 0]);
        let reply = frame(false, 30001, 9, 2, TCP_SYN | TCP_ACK, b"");
        assert_eq!(dealer.owner(DLT_IPV4, &reply), 1, "both directions go to the same share");
        assert_eq!(dealer.owner(DLT_IPV4, b"\x45junk"), 0, "frames no connection claims are share 0's");
    }
}
