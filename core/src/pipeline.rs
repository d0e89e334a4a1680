//! The stages wired together under one memory budget: frames in, event lines out.
//!
//! The control plane hands in frames a batch at a time (a capture file's next few thousand, or a ring's
//! ready blocks) and gets back the JSON Lines of the events those frames completed. Nothing here does
//! I/O: the capture file and the ring are read by their own types, the lines are written by the sinks.

use std::collections::HashMap;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::http::exchanges::{ConnectionHandOver, HttpExchanges};
use crate::metering::billing::{Meter, MeterConfig};
use crate::source::capture_file::Frame;
use crate::source::frames::{flow_hash_captured, FrameDecoder};
use crate::source::tls::{self, monotonic_to_wall, TlsStreams};
use crate::tcp::reassembly::{ConnectionInfo, ReassemblyLimits, TcpReassembler};

/// Capture time between idle and response-timeout sweeps.
const HOUSEKEEPING_INTERVAL: f64 = 1.0;
/// Payload bytes fed between two looks at the memory budget: bounds how far a burst can overshoot it.
const BUDGET_CHECK_BYTES: usize = 1 << 20;

pub struct PipelineConfig {
    pub ports: Vec<u16>,
    pub limits: ReassemblyLimits,
    pub response_timeout: f64,
    pub max_head_bytes: usize,
    /// Bytes the pipeline's state (connections, held segments, partial heads, waiting requests, requests
    /// waiting for the credential table) may hold; see `Pipeline::keep_within_budget` for what goes first.
    pub max_memory: usize,
    pub meter: MeterConfig,
    /// Replay workers: this pipeline takes the connections dealt to `share` of `shares` (see
    /// `ConnectionDealer`); a single process is share 0 of 1.
    pub share: u32,
    pub shares: u32,
}

pub struct Pipeline {
    decoder: FrameDecoder,
    reassembler: TcpReassembler,
    /// HTTPS read from the TLS library (`--tls-port`): its streams go into the same HTTP stage
    tls: TlsStreams,
    http: HttpExchanges,
    pub meter: Meter,
    dealer: ConnectionDealer,
    share: u32,
    /// what a fresh start of the capture state needs (after an internal error)
    ports: Vec<u16>,
    limits: ReassemblyLimits,
    response_timeout: f64,
    max_head_bytes: usize,
    max_memory: usize,
    packets: u64,
    last_time: f64,
    next_housekeeping: f64,
    fed_since_budget_check: usize,
    /// the credential table's clock as the batch began (key expiry)
    now: f64,
    /// the batch's events so far (some metered mid-batch, to free what their exchanges held)
    lines: Vec<u8>,
    /// Frames or batches whose processing panicked: a bug, never expected; counted and logged rather than
    /// fatal, and the capture state is started afresh, since a panic may have left it half-updated.
    internal_errors: u64,
}

impl Pipeline {
    pub fn new(config: PipelineConfig) -> Pipeline {
        Pipeline {
            decoder: FrameDecoder::default(),
            reassembler: TcpReassembler::new(&config.ports, config.limits),
            tls: TlsStreams::new(monotonic_to_wall()),
            http: HttpExchanges::new(config.response_timeout, config.max_head_bytes),
            meter: Meter::new(config.meter),
            dealer: ConnectionDealer::new(config.shares),
            share: config.share,
            ports: config.ports,
            limits: config.limits,
            response_timeout: config.response_timeout,
            max_head_bytes: config.max_head_bytes,
            max_memory: config.max_memory,
            packets: 0,
            last_time: 0.0,
            next_housekeeping: 0.0,
            fed_since_budget_check: 0,
            now: 0.0,
            lines: Vec::new(),
            internal_errors: 0,
        }
    }

    /// Starts a batch: `now` is the credential table's clock (for key expiry).
    pub fn begin_batch(&mut self, now: f64) {
        self.now = now;
    }

    /// One frame through decoding, reassembly and HTTP framing, if its connection is this share's; its
    /// exchanges are metered by `end_batch`.
    pub fn feed_frame(&mut self, frame: &Frame<'_>) {
        if self.dealer.owner(frame.linktype, frame.data, frame.wire_length) != self.share {
            return;
        }
        self.packets += 1;
        if panic::catch_unwind(AssertUnwindSafe(|| self.process(frame))).is_err() {
            self.start_afresh();
        }
    }

    fn process(&mut self, frame: &Frame<'_>) {
        let Some(segment) = self.decoder.decode_captured(frame.linktype, frame.data, frame.wire_length) else {
            return;
        };
        let time = frame.time;
        if time > self.last_time {
            self.last_time = time;
        }
        // also when the clock went back (a bogus future timestamp must not stop housekeeping for good)
        if time >= self.next_housekeeping || time < self.next_housekeeping - 2.0 * HOUSEKEEPING_INTERVAL {
            self.housekeeping(time);
        }
        self.fed_since_budget_check += segment.payload.len();
        self.reassembler.feed(time, &segment, &mut self.http);
        if self.fed_since_budget_check >= BUDGET_CHECK_BYTES {
            self.keep_within_budget();
        }
    }

    /// One record of the TLS probes' ring (a plaintext chunk or a stream's start or end).
    pub fn feed_tls(&mut self, record: &[u8]) {
        if panic::catch_unwind(AssertUnwindSafe(|| self.process_tls(record))).is_err() {
            self.start_afresh();
        }
    }

    fn process_tls(&mut self, record: &[u8]) {
        self.fed_since_budget_check += record.len();
        self.tls.feed(record, &mut self.http);
        if self.fed_since_budget_check >= BUDGET_CHECK_BYTES {
            self.keep_within_budget();
        }
    }

    /// Processes the TLS probes reported exited since the last call.
    pub fn tls_exited(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.tls.exited)
    }

    /// Appends to `out` the JSON Lines of every exchange finished since the last call.
    pub fn end_batch(&mut self, out: &mut Vec<u8>) {
        self.meter_finished();
        self.keep_within_budget();
        out.append(&mut self.lines);
    }

    /// A stop's boundary in the packet capture: the next run takes the ring over from the next block on, so
    /// the requests it will take are left to it, and the others are still finished here; with `resume`,
    /// the next run gets `answers_owed`, with where the client's next request begins.
    pub fn leave_new_requests(&mut self, resume: bool) {
        self.http.leave_new_requests(from_packets, resume);
    }

    /// Requests from the packet capture this run bills that still wait for (the rest of) their exchange.
    pub fn requests_in_flight(&self) -> usize {
        self.http.requests_in_flight(from_packets)
    }

    /// After `leave_new_requests`, before `finish`: the answers the next run will see to this run's
    /// requests, by connection (see `HttpExchanges::answers_owed`).
    pub fn answers_owed(&self) -> Vec<ConnectionHandOver> {
        self.http.answers_owed()
    }

    /// The previous run's `answers_owed`, before the first frame.
    pub fn expect_answers(&mut self, owed: Vec<ConnectionHandOver>) {
        self.http.expect_answers(owed);
    }

    /// Time passes without packets (a quiet live interface): expire what has waited too long.
    pub fn tick(&mut self, capture_time: f64, out: &mut Vec<u8>) {
        self.housekeeping(capture_time);
        self.end_batch(out);
    }

    /// The capture is over: every connection is closed, so requests still in flight are emitted too.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        self.http.capture_ends();
        self.reassembler.close_all(self.last_time, &mut self.http);
        self.tls.close_all(self.last_time.max(self.tls.last_time), &mut self.http);
        self.end_batch(out);
    }

    fn housekeeping(&mut self, now: f64) {
        self.next_housekeeping = now + HOUSEKEEPING_INTERVAL;
        self.reassembler.expire(now, &mut self.http);
        self.tls.release_held(now - tls::HOLD_SECONDS, &mut self.http);
        self.tls.expire(now - self.limits.idle_timeout, &mut self.http);
        self.http.expire(now);
    }

    /// The finished exchanges' events, appended to `lines`. A panic while metering loses the rest of this
    /// call's exchanges (counted as an internal error), never a line half-written.
    fn meter_finished(&mut self) {
        let (meter, http, now, out) = (&mut self.meter, &mut self.http, self.now, &mut self.lines);
        let start = out.len();
        if panic::catch_unwind(AssertUnwindSafe(|| meter.meter(http.take(), now, out))).is_err() {
            let whole = out[start..].iter().rposition(|&byte| byte == b'\n').map_or(start, |end| start + end + 1);
            out.truncate(whole);
            self.internal_errors += 1;
        }
    }

    /// Keeps what the pipeline holds within `max_memory`. Finished exchanges are metered first (their
    /// events cost nothing here). Then, while still over: while requests waiting for the credential table
    /// hold more than half the budget, the oldest of them goes (counted `held_overflow`, unresolved);
    /// otherwise the least recently active connection is closed early (counted `shed_connections`; what
    /// it held is handed on as on any close). A flood of half-open requests costs the oldest of them, never
    /// the process's memory, and never the finished requests waiting for the table while they fit.
    fn keep_within_budget(&mut self) {
        self.fed_since_budget_check = 0;
        if self.held_bytes() <= self.max_memory {
            return;
        }
        self.meter_finished();
        while self.held_bytes() > self.max_memory {
            let waiting_hold_most = self.meter.held_bytes() > self.max_memory / 2;
            if waiting_hold_most && self.meter.drop_oldest_held() {
                continue;
            }
            // the least recently active connection, packets' or TLS's, goes first
            let shed = match (self.tls.oldest(), self.reassembler.oldest_seen()) {
                (Some(oldest), packets) if packets.is_none_or(|packets| oldest.1 < packets) => {
                    self.tls.shed(oldest, &mut self.http);
                    true
                }
                _ => self.reassembler.shed_oldest(self.last_time, &mut self.http),
            };
            if !shed && !self.meter.drop_oldest_held() {
                break;
            }
            self.meter_finished();
        }
    }

    /// After a panic the stages' state may be half-updated: what had finished is metered, the requests
    /// still in flight are counted lost, and the capture state starts afresh (the counters are kept), so
    /// that one bad frame cannot poison the rest.
    fn start_afresh(&mut self) {
        self.internal_errors += 1;
        self.meter_finished();
        let in_flight: usize = self.http.waiting().map(|(_, waiting)| waiting).sum();
        let (tcp, parser, mut http) = (self.reassembler.counters, self.http.parser_counters, self.http.counters);
        let tls = self.tls.counters;
        self.tls = TlsStreams::new(monotonic_to_wall());
        self.tls.counters = tls;
        http.lost_exchanges += in_flight as u64;
        self.reassembler = TcpReassembler::new(&self.ports, self.limits);
        self.http = HttpExchanges::new(self.response_timeout, self.max_head_bytes);
        self.reassembler.counters = tcp;
        self.http.parser_counters = parser;
        self.http.counters = http;
    }

    /// Bytes the pipeline's state holds now (what the budget limits). The replay dealer's table is not
    /// in it: nothing can be shed from it, and it bounds itself (`MAX_DEALT_FLOWS`, about 15 MB).
    pub fn held_bytes(&self) -> usize {
        self.reassembler.held_bytes() + self.tls.held_bytes() + self.http.held_bytes() + self.meter.held_bytes()
    }

    /// Everything counted along the way, by stage, in the summary line's order.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let tcp = &self.reassembler.counters;
        let parser = &self.http.parser_counters;
        let http = &self.http.counters;
        let meter = &self.meter.counters;
        let decoder = &self.decoder.counters;
        let tls = &self.tls.counters;
        vec![
            ("packets", self.packets),
            ("connections", tcp.connections),
            ("requests", http.requests),
            ("events", meter.events),
            ("rejected", meter.rejected),
            ("unresolved", meter.unresolved),
            ("no_route", meter.no_route),
            ("out_of_scope", meter.out_of_scope),
            ("status_filtered", meter.status_filtered),
            ("unanswered", http.unanswered),
            ("client_closed", http.client_closed),
            ("never_read", http.never_read),
            ("after_stop", http.after_stop),
            ("cut_at_end", http.cut_at_end),
            ("gaps", tcp.gaps),
            ("gap_bytes", tcp.gap_bytes),
            ("lost_exchanges", http.lost_exchanges),
            ("paired_in_doubt", http.paired_in_doubt),
            ("parse_errors", parser.parse_errors),
            ("corrupt_packets", decoder.corrupt),
            ("cut_short_packets", decoder.cut_short), // by the capture's snap length
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
            ("shed_connections", tcp.shed_connections + tls.shed),
            ("ip_fragments", decoder.fragments),
            ("held_overflow", meter.held_overflow),
            ("internal_errors", self.internal_errors),
            // HTTPS from the TLS probes (--tls-port)
            ("tls_chunks", tls.chunks),
            ("tls_streams", tls.streams),
            ("tls_midstream", tls.midstream),
            ("tls_truncated_chunks", tls.truncated_chunks),
            ("tls_truncated_bytes", tls.truncated_bytes),
            ("http2_connections", tls.http2_connections),
            ("tls_bad_records", tls.bad_records),
            ("tls_write_retries", tls.write_retries),
            ("tls_unmetered", tls.unmetered),
        ]
    }
}

/// Which replay worker a frame belongs to: connections are dealt out in turn as they first appear, so the
/// workers get equal shares (a hash alone left one with 58% of a 33-connection load). Every worker sees
/// the same frames in the same order, so each deals the same way without talking to the others.
/// Connections are told apart by flow hash: two that share one share a worker, and the table stays small;
/// past `MAX_DEALT_FLOWS` (a hostile capture of random ports) new flows go by hash alone. Frames no
/// connection claims (not TCP, corrupt) are share 0's, to be counted once.
fn from_packets(connection: &ConnectionInfo) -> bool {
    !tls::is_tls_stream(connection)
}

pub struct ConnectionDealer {
    shares: u32,
    owners: HashMap<u32, u32>,
    dealt: u32,
}

const MAX_DEALT_FLOWS: usize = 1 << 20;

impl ConnectionDealer {
    pub fn new(shares: u32) -> ConnectionDealer {
        ConnectionDealer { shares: shares.max(1), owners: HashMap::new(), dealt: 0 }
    }

    /// `wire_length`: the frame's length on the wire (see `FrameDecoder::decode_captured`).
    pub fn owner(&mut self, linktype: u32, frame: &[u8], wire_length: usize) -> u32 {
        if self.shares == 1 {
            return 0;
        }
        let Some(flow) = flow_hash_captured(linktype, frame, wire_length) else {
            return 0;
        };
        if let Some(&owner) = self.owners.get(&flow) {
            return owner;
        }
        if self.owners.len() >= MAX_DEALT_FLOWS {
            return flow % self.shares;
        }
        let owner = self.dealt % self.shares;
        self.dealt = self.dealt.wrapping_add(1);
        self.owners.insert(flow, owner);
        owner
    }

}

/// Rust's default panic message can quote the data it failed on; the core's say only where they
/// happened, once per process (each one is counted as `internal_errors` and logged by the control plane).
pub fn quiet_panics() {
    static SAID: AtomicBool = AtomicBool::new(false);
    panic::set_hook(Box::new(|info| {
        if !SAID.swap(true, Ordering::Relaxed) {
            let place = info.location().map_or_else(String::new, |at| format!(" at {}:{}", at.file(), at.line()));
            eprintln!("agent: error: internal error in the core{place}; counted as internal_errors, the capture goes on");
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::subject::SubjectRule;
    use crate::source::frames::{DLT_IPV4, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

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
        pipeline_with(max_memory, SubjectRule::Header("x-tenant".to_string()))
    }

    fn pipeline_with(max_memory: usize, rule: SubjectRule) -> Pipeline {
        Pipeline::new(PipelineConfig {
            ports: vec![PORT],
            limits: ReassemblyLimits::default(),
            response_timeout: 60.0,
            max_head_bytes: 65536,
            max_memory,
            meter: MeterConfig {
                source: "test".to_string(),
                rule,
                max_held: 100_000,
            },
            share: 0,
            shares: 1,
        })
    }

    fn feed(pipeline: &mut Pipeline, time: f64, data: &[u8]) {
        pipeline.feed_frame(&Frame { time, linktype: DLT_IPV4, data, wire_length: data.len() });
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
        pipeline.end_batch(&mut out);
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
        pipeline.end_batch(&mut out);
        assert!(out.is_empty());
        pipeline.finish(&mut out);
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(counter(&pipeline, "unanswered"), 1);
    }

    #[test]
    fn a_request_its_client_gave_up_on_is_a_499() {
        for close in [TCP_ACK | TCP_FIN, TCP_RST] {
            let mut pipeline = pipeline(256 << 20);
            feed(&mut pipeline, 1.0, &frame(true, 40001, 1000, 0, TCP_SYN, b""));
            feed(&mut pipeline, 1.001, &frame(false, 40001, 5000, 1001, TCP_SYN | TCP_ACK, b""));
            let request = b"GET / HTTP/1.1\r\nX-Tenant: t\r\n\r\n";
            feed(&mut pipeline, 1.002, &frame(true, 40001, 1001, 5001, TCP_ACK, request));
            feed(&mut pipeline, 2.0, &frame(true, 40001, 1001 + request.len() as u32, 5001, close, b""));
            feed(&mut pipeline, 2.001, &frame(false, 40001, 5001, 1002 + request.len() as u32, TCP_ACK | TCP_FIN, b""));
            let mut out = Vec::new();
            pipeline.end_batch(&mut out);
            pipeline.finish(&mut out);
            let line = String::from_utf8(out).unwrap();
            assert!(line.contains(r#""response_http_status":499,"response_size_bytes":0,"upstream_status":null"#), "{line}");
            assert_eq!((counter(&pipeline, "client_closed"), counter(&pipeline, "unanswered")), (1, 0));
        }
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
        pipeline.end_batch(&mut out);
        assert!(counter(&pipeline, "shed_connections") > 0);
        assert!(pipeline.held_bytes() <= budget, "{} held", pipeline.held_bytes());
    }

    /// A TLS probes' read record of stream `ssl`, `data` its whole call.
    fn tls_read(ssl: u64, data: &[u8]) -> Vec<u8> {
        crate::source::tls::tests::record(crate::source::tls::KIND_READ, 7, ssl, 0, data.len() as u32, data)
    }

    #[test]
    fn over_budget_the_oldest_tls_streams_are_shed_too() {
        let budget = 4 << 20;
        let mut pipeline = pipeline(budget);
        let filler = [b'a'; 7_500];
        for ssl in 0..400u64 {
            pipeline.feed_tls(&tls_read(ssl, b"GET / HTTP/1.1\r\nX-Filler: "));
            for _ in 0..8 {
                pipeline.feed_tls(&tls_read(ssl, &filler));
            }
        }
        let mut out = Vec::new();
        pipeline.end_batch(&mut out);
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
        pipeline.end_batch(&mut out);
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 50);
        assert_eq!(counter(&pipeline, "shed_connections"), 0);
    }

    /// A request whose head carries `padding` bytes of one header.
    fn big_request(padding: usize) -> Vec<u8> {
        [b"GET / HTTP/1.1\r\nX-Tenant: t\r\napikey: k\r\nX-Padding: ".as_slice(), &vec![b'p'; padding], b"\r\n\r\n"]
            .concat()
    }

    #[test]
    fn requests_waiting_for_the_credential_table_are_within_the_budget() {
        let budget = 16 << 20;
        let mut pipeline = pipeline_with(budget, SubjectRule::Consumer);
        for index in 0..400u16 {
            conversation(&mut pipeline, 20_000 + index, &big_request(60_000), b"HTTP/1.1 200 OK\r\n\r\n");
        }
        let mut out = Vec::new();
        pipeline.end_batch(&mut out);
        assert!(pipeline.held_bytes() <= budget, "{} held", pipeline.held_bytes());
        assert!(counter(&pipeline, "held_overflow") > 0);
        assert_eq!(counter(&pipeline, "shed_connections"), 0, "dropping waiting requests frees enough");
    }

    #[test]
    fn finished_exchanges_do_not_cost_connections_their_place() {
        let mut pipeline = pipeline(16 << 20);
        for index in 0..10u16 {
            let port = 10_000 + index;
            feed(&mut pipeline, 1.0, &frame(true, port, 1000, 0, TCP_SYN, b""));
            feed(&mut pipeline, 1.0, &frame(true, port, 1001, 0, TCP_ACK, b"GET /slow HTTP/1.1\r\nX-Tenant: t\r\n"));
        }
        for index in 0..300u16 {
            conversation(&mut pipeline, 20_000 + index, &big_request(60_000), b"HTTP/1.1 204 No Content\r\n\r\n");
        }
        let mut out = Vec::new();
        pipeline.end_batch(&mut out);
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 300);
        assert_eq!(counter(&pipeline, "shed_connections"), 0);
        pipeline.finish(&mut out);
        assert_eq!(counter(&pipeline, "lost_exchanges") + counter(&pipeline, "unanswered"), 10);
    }

    #[test]
    fn a_pipeline_takes_only_the_connections_dealt_to_its_share() {
        let mut shares: Vec<Pipeline> = (0..2)
            .map(|share| {
                let mut one = pipeline(256 << 20);
                (one.share, one.dealer) = (share, ConnectionDealer::new(2));
                one
            })
            .collect();
        for pipeline in &mut shares {
            for index in 0..4u16 {
                conversation(pipeline, 30_000 + index, b"GET / HTTP/1.1\r\nX-Tenant: t\r\n\r\n",
                             b"HTTP/1.1 204 No Content\r\n\r\n");
            }
        }
        let requests: Vec<u64> = shares.iter().map(|pipeline| counter(pipeline, "requests")).collect();
        assert_eq!(requests, vec![2, 2]);
    }

    #[test]
    fn connections_are_dealt_in_turn_and_keep_their_share() {
        let mut dealer = ConnectionDealer::new(2);
        let first = frame(true, 30000, 1, 0, TCP_SYN, b"");
        let second = frame(true, 30001, 1, 0, TCP_SYN, b"");
        let third = frame(true, 30002, 1, 0, TCP_SYN, b"");
        let owners: Vec<u32> = [&first, &second, &third].iter().map(|f| dealer.owner(DLT_IPV4, f, f.len())).collect();
        assert_eq!(owners, vec![0, 1, 0]);
        let reply = frame(false, 30001, 9, 2, TCP_SYN | TCP_ACK, b"");
        assert_eq!(dealer.owner(DLT_IPV4, &reply, reply.len()), 1, "both directions go to the same share");
        assert_eq!(dealer.owner(DLT_IPV4, b"\x45junk", 5), 0, "frames no connection claims are share 0's");
    }
}
