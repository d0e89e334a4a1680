//! HTTPS as the gateway's TLS library sees it: plaintext chunks from the uprobes on `SSL_read` and
//! `SSL_write` (see `core/bpf/tls.bpf.c`), turned into the same stream events TCP reassembly emits, one
//! connection per (process, `SSL*`) stream, so that the HTTP stage, metering and sinks are shared.
//!
//! A stream begins at `SSL_set_fd` (its first byte is a message boundary, as after a SYN) or, when the
//! probes were attached after that, at its first chunk (counted `tls_midstream`; the parsers resync at
//! the next message start, as for a TCP stream without a SYN). It ends at `SSL_free`, when a new
//! `SSL_set_fd` reuses the `SSL*`, or when its process exits.
//!
//! Event ids: the HTTP stage's id is a hash of the 4-tuple and of a 32-bit number, TCP's sequence number
//! of the request's first byte. Here the number is the client's initial sequence number + 1 (read from
//! the kernel's `tcp_sock`, so unique per incarnation of a 4-tuple as TCP's is) plus the request's
//! plaintext position in the stream: stable for a stream seen from its start (any run of the agent gives
//! the same id), unique per request. A stream attached mid-connection counts from the ciphertext position
//! the gateway had read to (`copied_seq`) at its first chunk: past every plaintext position an earlier run
//! could have used, so no id of an earlier run is reused, but two runs attached mid-connection differ.
//! TLS ids never equal the plaintext capture's ids of the same 4-tuple's requests, unless by chance, since
//! the ciphertext's positions are different numbers.

use std::collections::HashMap;

use crate::source::frames::Address;
use crate::tcp::reassembly::{ConnectionInfo, StreamEvent, StreamSink};

/// Plaintext bytes one record carries at most, and the pieces one call is cut into at most (tls.bpf.c).
pub const PIECE: u32 = 8192;
pub const PIECES: u32 = 128;
/// The record header's size (struct chunk_header).
pub const HEADER: usize = 112;

pub(crate) const KIND_READ: u32 = 0;
const KIND_WRITE: u32 = 1;
const KIND_OPEN: u32 = 2;
const KIND_CLOSE: u32 = 3;
const KIND_EXIT: u32 = 5;
const KIND_WRITE_FAILED: u32 = 6;
/// The stream's socket is on a port not metered (the gateway's own TLS to an upstream, its Admin API's
/// port), found only now: a connection begun before the probes. Those begun since never reach the core.
const KIND_UNMETERED: u32 = 7;

/// How long a write sent at its call's entry waits for its thread to go on before it counts as done: a
/// failure shows within the call, microseconds after its entry; holding longer only delays.
pub const HOLD_SECONDS: f64 = 1.0;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// TLS streams' connection ids have this bit set: never one of TCP reassembly's.
const TLS_ID_BIT: u64 = 1 << 63;

/// Whether a connection is one of these streams (not one reassembled from packets).
pub fn is_tls_stream(connection: &ConnectionInfo) -> bool {
    connection.id & TLS_ID_BIT != 0
}

/// What the HTTP/2 client sends first after ALPN chose h2.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct TlsCounters {
    /// plaintext records received from the probes
    pub chunks: u64,
    /// streams (SSL* per process) seen
    pub streams: u64,
    /// streams whose beginning the probes missed (attached mid-connection)
    pub midstream: u64,
    /// calls longer than the probes copy, whose buffer could not be read, or whose records (some or all)
    /// the ring had no room for: bytes the stream lost
    pub truncated_chunks: u64,
    pub truncated_bytes: u64,
    /// streams that began with HTTP/2's preface (ALPN h2): counted, not parsed
    pub http2_connections: u64,
    /// watched processes that exited
    pub exits: u64,
    /// records too short for their header or of an unknown kind
    pub bad_records: u64,
    /// writes that did not go out (the socket was full or broken): the gateway sends them again
    pub write_retries: u64,
    /// connections begun before the probes that turned out to be on a port not metered: dropped
    pub unmetered: u64,
    /// streams closed to keep the pipeline within its memory budget (as TCP's shed connections)
    pub shed: u64,
}

/// One record from the ring, decoded.
#[derive(Debug)]
pub struct Record<'a> {
    pub kind: u32,
    pub pid: u32,
    pub ssl: u64,
    pub time_ns: u64,
    pub offset: u32,
    pub call_len: u32,
    pub family: u16,
    pub local_port: u16,
    pub remote_port: u16,
    /// at `SSL_free`: the client had closed its side first
    pub client_left: bool,
    pub client_isn: u32,
    pub copied_seq: u32,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    /// the thread that made the call
    pub tid: u32,
    /// a write sent at its call's entry, before its outcome is known
    pub at_entry: bool,
    /// where the call begins in its direction's plaintext, counted by the probes since the stream's socket
    /// was known (None before: the count began later); at `SSL_free`, the bytes read in all
    pub stream_pos: Option<u64>,
    /// which count `stream_pos` is of (a socket evicted from the probes' map and learned again counts anew)
    pub generation: u32,
    /// the other direction's count then (at `SSL_free`, the bytes written in all): what the gateway had
    /// written when it read, what it had read when it wrote
    pub other_pos: u64,
    pub data: &'a [u8],
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap_or_default())
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap_or_default())
}

impl<'a> Record<'a> {
    /// The layout of `struct chunk_header` in tls.bpf.c; `None` when too short or inconsistent.
    pub fn parse(bytes: &'a [u8]) -> Option<Record<'a>> {
        if bytes.len() < HEADER {
            return None;
        }
        let len = u32_at(bytes, 32) as usize;
        let data = bytes.get(HEADER..HEADER + len)?;
        Some(Record {
            ssl: u64_at(bytes, 0),
            time_ns: u64_at(bytes, 8),
            pid: u32_at(bytes, 16),
            kind: u32_at(bytes, 20),
            offset: u32_at(bytes, 24),
            call_len: u32_at(bytes, 28),
            family: u16_at(bytes, 36),
            local_port: u16_at(bytes, 38),
            remote_port: u16_at(bytes, 40),
            client_left: u16_at(bytes, 42) != 0,
            client_isn: u32_at(bytes, 44),
            copied_seq: u32_at(bytes, 48),
            local_addr: bytes[52..68].try_into().unwrap_or_default(),
            remote_addr: bytes[68..84].try_into().unwrap_or_default(),
            tid: u32_at(bytes, 84),
            at_entry: u32_at(bytes, 88) != 0,
            stream_pos: (u32_at(bytes, 92) != 0).then(|| u64_at(bytes, 96)),
            generation: u32_at(bytes, 92),
            other_pos: u64_at(bytes, 104),
            data,
        })
    }

    fn addresses(&self) -> Option<(Address, Address)> {
        match self.family {
            AF_INET => Some((Address::new(&self.remote_addr[..4]), Address::new(&self.local_addr[..4]))),
            AF_INET6 => Some((Address::new(&self.remote_addr), Address::new(&self.local_addr))),
            _ => None,
        }
    }
}

/// The most bytes one gap of whole calls may be: past it, the probes' count is taken to have started
/// again rather than to say that much was lost.
const MAX_GAP: u64 = 1 << 40;

/// One direction's place: where its next byte goes, and how far into the current call it is.
#[derive(Default)]
struct Direction {
    position: u64,
    call_len: u32,
    call_next: u32,
    /// what turns a record's `stream_pos` into `position`, from the first positioned call of the probes'
    /// count `generation`: a call that begins past `position` follows calls the ring had no room for, a gap
    /// of that many bytes
    base: Option<u64>,
    generation: u32,
    /// where the current call began (`position` then), and its `stream_pos`: a piece whose `stream_pos`
    /// is another is a new call's, its first piece dropped
    call_start: u64,
    call_pos: Option<u64>,
    /// bytes the current call begins with that the direction already has (see `Place::Overlap`)
    had: u64,
}

/// Where a call that begins at `stream_pos` goes, against what the direction has so far.
#[derive(Debug, PartialEq, Eq)]
enum Place {
    /// right after what came before, or its place unknown
    Next,
    /// after this many bytes of calls the ring had no room for
    After(u64),
    /// the previous write again, as long or longer (nginx adds to a write it makes again): its first
    /// attempt failed, the record saying so was dropped, and this many of its bytes are had already
    Overlap(u64),
}

impl Direction {
    fn place(&mut self, stream_pos: Option<u64>, generation: u32, write: bool) -> Place {
        let Some(stream_pos) = stream_pos else { return Place::Next };
        let Some(base) = self.base.filter(|_| self.generation == generation) else {
            // the first of this count: counted from here
            (self.base, self.generation) = (Some(self.position.wrapping_sub(stream_pos)), generation);
            return Place::Next;
        };
        let start = stream_pos.wrapping_add(base);
        if start > self.position && start - self.position < MAX_GAP {
            return Place::After(start - self.position);
        }
        if write && start < self.position && start == self.call_start {
            return Place::Overlap(self.position - start);
        }
        if start != self.position {
            // what the count cannot say (a write made again that is not the previous one): from here
            self.base = Some(self.position.wrapping_sub(stream_pos));
        }
        Place::Next
    }

    /// Of the call's bytes from `from` to `to` (offsets in it), how many the direction does not have yet.
    fn unhad(&self, from: u32, to: u32) -> u64 {
        u64::from(to).max(self.had).saturating_sub(u64::from(from).max(self.had))
    }
}

struct Stream {
    info: ConnectionInfo,
    opened: bool,
    /// the base of the id numbers is known (from the first client chunk)
    based: bool,
    http2: bool,
    /// no data went either way yet (HTTP/2 is recognized by its first bytes)
    first_data: bool,
    directions: [Direction; 2],
    last_time: f64,
}

/// Whether a stream's first bytes are HTTP/2's, as they are after ALPN chose h2: the client's preface,
/// or the server's SETTINGS frame (a server speaking HTTP/1.x writes nothing before a request; nginx's h2
/// sends its SETTINGS before reading the preface).
fn starts_http2(to_server: bool, data: &[u8]) -> bool {
    if to_server {
        return data.starts_with(H2_PREFACE);
    }
    // a frame header: 24-bit length, type 4 (SETTINGS), flags 0, stream 0
    data.len() >= 9 && data[3] == 4 && data[4] == 0 && data[5..9] == [0, 0, 0, 0]
}

/// CLOCK_REALTIME - CLOCK_MONOTONIC now: what turns the probes' `bpf_ktime_get_ns` into wall time.
pub fn monotonic_to_wall() -> f64 {
    let read = |clock| {
        let mut time = libc::timespec { tv_sec: 0, tv_nsec: 0 };
        // SAFETY: clock_gettime writes one timespec, which lives on this stack frame.
        unsafe { libc::clock_gettime(clock, &mut time) };
        time.tv_sec as f64 + time.tv_nsec as f64 / 1e9
    };
    read(libc::CLOCK_REALTIME) - read(libc::CLOCK_MONOTONIC)
}

/// A write sent at its call's entry (its records, as they came), held until its thread goes on: a
/// KIND_WRITE_FAILED before then means the bytes did not go out, and the gateway's next call sends them.
struct Held {
    tid: u32,
    key: (u32, u64),
    time: f64,
    records: Vec<Vec<u8>>,
}

/// The (process, `SSL*`) streams, fed the probes' records in ring order.
pub struct TlsStreams {
    pub counters: TlsCounters,
    streams: HashMap<(u32, u64), Stream>,
    /// writes waiting to be known done, oldest first (at most one per thread)
    held: Vec<Held>,
    next_id: u64,
    /// added to the records' monotonic clock to give the wall clock the events carry
    clock_offset: f64,
    /// the latest record's time (wall clock), 0 before any
    pub last_time: f64,
    /// processes an exit was reported for, for the loader to forget
    pub exited: Vec<u32>,
}

impl TlsStreams {
    pub fn new(clock_offset: f64) -> TlsStreams {
        TlsStreams {
            counters: TlsCounters::default(),
            streams: HashMap::new(),
            held: Vec::new(),
            next_id: 0,
            clock_offset,
            last_time: 0.0,
            exited: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Bytes held here: the streams' state and the writes held for their threads to go on, for the budget.
    pub fn held_bytes(&self) -> usize {
        let held: usize = self.held.iter().flat_map(|held| &held.records).map(Vec::len).sum();
        self.streams.len() * size_of::<Stream>() + self.held.len() * size_of::<Held>() + held
    }

    /// The least recently active stream, and when it last had a record: the one to shed first.
    pub fn oldest(&self) -> Option<((u32, u64), f64)> {
        self.streams.iter().map(|(key, stream)| (*key, stream.last_time)).min_by(|a, b| a.1.total_cmp(&b.1))
    }

    /// Closes stream `key` (last active at `time`), its held write first, to stay within the memory budget.
    /// Its later records begin a stream joined mid-way.
    pub fn shed(&mut self, (key, time): ((u32, u64), f64), sink: &mut impl StreamSink) {
        self.release(|held| held.key == key, sink);
        if let Some(stream) = self.streams.remove(&key) {
            self.counters.shed += 1;
            sink.event(&stream.info, true, time, StreamEvent::Closed);
        }
    }

    /// A record's monotonic time on the wall clock.
    pub fn wall_time(&self, time_ns: u64) -> f64 {
        time_ns as f64 / 1e9 + self.clock_offset
    }

    /// One ring record; what it completes goes to `sink`.
    pub fn feed(&mut self, bytes: &[u8], sink: &mut impl StreamSink) {
        let Some(record) = Record::parse(bytes) else {
            self.counters.bad_records += 1;
            return;
        };
        let time = self.wall_time(record.time_ns);
        self.last_time = self.last_time.max(time);
        let key = (record.pid, record.ssl);
        let (tid, kind) = (record.tid, record.kind);
        if kind == KIND_UNMETERED {
            self.counters.unmetered += 1;
            self.held.retain(|held| held.key != key);
            if let Some(old) = self.streams.remove(&key) {
                sink.forget(&old.info);
            }
            return;
        }
        if kind == KIND_WRITE_FAILED {
            if let Some(at) = self.held.iter().position(|held| held.tid == tid && held.key == key) {
                self.held.remove(at);
                self.counters.write_retries += 1;
            }
            return;
        }
        if kind == KIND_WRITE && record.at_entry && record.offset > 0 {
            if let Some(held) = self.held.iter_mut().find(|held| held.tid == tid && held.key == key) {
                held.records.push(bytes.to_vec());
                return;
            }
        }
        // held past the hold, by the records' own clock (an idle thread's last write, under load)
        if self.held.first().is_some_and(|held| held.time < time - HOLD_SECONDS) {
            self.release_held(time - HOLD_SECONDS, sink);
        }
        // the thread went on, or the stream is used again, or its process ended: the held write was done
        self.release(|held| held.tid == tid || held.key == key || (kind == KIND_EXIT && held.key.0 == key.0), sink);
        if kind == KIND_WRITE && record.at_entry {
            self.held.push(Held { tid, key, time, records: vec![bytes.to_vec()] });
            return;
        }
        self.apply(&record, time, sink);
    }

    /// Writes held since before `older_than` (wall clock) are done: their threads made no call since.
    pub fn release_held(&mut self, older_than: f64, sink: &mut impl StreamSink) {
        self.release(|held| held.time < older_than, sink);
    }

    fn release(&mut self, done: impl Fn(&Held) -> bool, sink: &mut impl StreamSink) {
        if !self.held.iter().any(&done) {
            return;
        }
        let (released, kept): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.held).into_iter().partition(done);
        self.held = kept;
        for bytes in released.iter().flat_map(|held| &held.records) {
            if let Some(record) = Record::parse(bytes) {
                let time = self.wall_time(record.time_ns);
                self.apply(&record, time, sink);
            }
        }
    }

    fn apply(&mut self, record: &Record<'_>, time: f64, sink: &mut impl StreamSink) {
        let key = (record.pid, record.ssl);
        match record.kind {
            KIND_OPEN => {
                if let Some(old) = self.streams.remove(&key) {
                    sink.event(&old.info, true, time, StreamEvent::Closed);
                }
                let mut stream = self.new_stream(time, true);
                if record.stream_pos.is_some() {
                    // the probes count the stream's bytes from here: from its first byte
                    for direction in &mut stream.directions {
                        (direction.base, direction.generation) = (Some(0), record.generation);
                    }
                }
                self.streams.insert(key, stream);
            }
            KIND_CLOSE => {
                if let Some(mut old) = self.streams.remove(&key) {
                    if let (Some(read), false) = (record.stream_pos, old.http2) {
                        // what the stream's last calls sent that never came: a gap up to its end
                        for (index, total) in [read, record.other_pos].into_iter().enumerate() {
                            let direction = &mut old.directions[index];
                            if let Place::After(lost) = direction.place(Some(total), record.generation, false) {
                                Self::gap(&old.info, direction, index == 0, time, lost, &mut self.counters, sink);
                            }
                        }
                    }
                    let [client, server] = &old.directions;
                    if record.client_left && !old.http2 {
                        // as TCP's FIN from the client before the server's: a request waiting is a 499
                        sink.event(&old.info, true, time, StreamEvent::End { position: client.position });
                        sink.event(&old.info, false, time, StreamEvent::End { position: server.position });
                    } else if record.family != 0 && !old.http2 {
                        // the client had not closed its side at SSL_free: the gateway closes first, as with
                        // its FIN first (nginx's 444, a request it timed out): it never read the requests behind
                        sink.event(&old.info, false, time, StreamEvent::End { position: server.position });
                    }
                    sink.event(&old.info, true, time, StreamEvent::Closed);
                }
            }
            KIND_EXIT => {
                self.counters.exits += 1;
                self.exited.push(record.pid);
                self.close_process(record.pid, time, sink);
            }
            KIND_READ | KIND_WRITE => {
                self.counters.chunks += 1;
                if !self.streams.contains_key(&key) {
                    self.counters.midstream += 1;
                    let stream = self.new_stream(time, false);
                    self.streams.insert(key, stream);
                }
                let stream = self.streams.get_mut(&key).expect("inserted above");
                Self::data(stream, record, time, &mut self.counters, sink);
            }
            _ => self.counters.bad_records += 1,
        }
    }

    fn new_stream(&mut self, time: f64, opened: bool) -> Stream {
        self.counters.streams += 1;
        self.next_id += 1;
        let unknown = Address::new(&[0, 0, 0, 0]);
        Stream {
            info: ConnectionInfo {
                id: TLS_ID_BIT | self.next_id,
                client: unknown,
                client_port: 0,
                server: unknown,
                server_port: 0,
                saw_syn: opened,
                to_server_base_seq: None,
            },
            opened,
            based: false,
            http2: false,
            first_data: true,
            directions: [Direction::default(), Direction::default()],
            last_time: time,
        }
    }

    fn data(stream: &mut Stream, record: &Record<'_>, time: f64, counters: &mut TlsCounters,
            sink: &mut impl StreamSink) {
        stream.last_time = time;
        if let Some((client, server)) = record.addresses() {
            stream.info.client = client;
            stream.info.server = server;
            stream.info.client_port = record.remote_port;
            stream.info.server_port = record.local_port;
        }
        let to_server = record.kind == KIND_READ;
        if to_server && !stream.based && record.family != 0 {
            stream.based = true;
            // see the module's note on ids; a mid-stream base is the ciphertext read so far
            let base = if stream.opened { record.client_isn } else { record.copied_seq };
            stream.info.to_server_base_seq = Some(base);
        }
        if stream.first_data {
            stream.first_data = false;
            if stream.opened && record.offset == 0 && starts_http2(to_server, record.data) {
                stream.http2 = true;
                counters.http2_connections += 1;
            }
        }
        if stream.http2 {
            return;
        }
        // what the gateway had of the other direction by then, past what came of it: dropped (as data that
        // TCP's ACK covers, never captured), and the other direction's current call is over
        let other = &mut stream.directions[usize::from(to_server)];
        if let Some(base) = other.base.filter(|_| record.stream_pos.is_some() && other.generation == record.generation) {
            let acked = record.other_pos.wrapping_add(base);
            if acked > other.position && acked - other.position < MAX_GAP {
                other.call_next = other.call_len;
                Self::gap(&stream.info, other, !to_server, time, acked - other.position, counters, sink);
            }
        }
        let direction = &mut stream.directions[usize::from(!to_server)];
        // a piece of another call than the current one (its first piece dropped, where the count says so)
        let new_call = record.offset == 0 || (record.stream_pos.is_some() && record.stream_pos != direction.call_pos);
        if new_call {
            // a new call ends the previous one: what it did not deliver is lost
            let lost = direction.unhad(direction.call_next, direction.call_len);
            if lost > 0 {
                Self::gap(&stream.info, direction, to_server, time, lost, counters, sink);
            }
            direction.had = 0;
            match direction.place(record.stream_pos, record.generation, !to_server) {
                Place::Next => {}
                Place::After(lost) => Self::gap(&stream.info, direction, to_server, time, lost, counters, sink),
                Place::Overlap(had) => {
                    direction.had = had;
                    counters.write_retries += 1;
                }
            }
            direction.call_start = direction.position - direction.had;
            direction.call_pos = record.stream_pos;
            direction.call_len = record.call_len;
            direction.call_next = 0;
        }
        if record.offset > direction.call_next {
            // a piece of this call never arrived (the ring had no room)
            let lost = direction.unhad(direction.call_next, record.offset);
            if lost > 0 {
                Self::gap(&stream.info, direction, to_server, time, lost, counters, sink);
            }
        }
        // (the part of the piece the direction has already: a write made again)
        let had_here = usize::try_from(direction.had.saturating_sub(u64::from(record.offset))).unwrap_or(usize::MAX);
        let fresh = &record.data[had_here.min(record.data.len())..];
        let expected = PIECE.min(record.call_len.saturating_sub(record.offset));
        if !fresh.is_empty() {
            // as TCP's ACK: what the gateway had written when it read, what it had read when it wrote (all of
            // the client's stream so far, where the probes' count is unknown). It is the gateway's, at least
            // what the client had: a request pipelined, which nginx reads once it has answered the one
            // before, does not show as pipelined
            let other = &stream.directions[usize::from(to_server)];
            let other_base = other.base.filter(|_| other.generation == record.generation);
            let counted = record.stream_pos.and(other_base).map(|base| record.other_pos.wrapping_add(base));
            let peer_acked = match counted.and_then(|position| i64::try_from(position).ok()) {
                Some(position) => position,
                None if to_server => -1,
                None => other.position as i64,
            };
            let direction = &mut stream.directions[usize::from(!to_server)];
            let payload = fresh;
            sink.event(&stream.info, to_server, time,
                       StreamEvent::Data { payload, position: direction.position, peer_acked });
            direction.position += payload.len() as u64;
        }
        let direction = &mut stream.directions[usize::from(!to_server)];
        direction.call_next = record.offset + record.data.len() as u32;
        if (record.data.len() as u32) < expected {
            let lost = direction.unhad(direction.call_next, record.offset + expected);
            direction.call_next = record.offset + expected;
            if lost > 0 {
                Self::gap(&stream.info, direction, to_server, time, lost, counters, sink);
            }
        }
        let last_copied = PIECES * PIECE;
        if direction.call_next >= last_copied && direction.call_len > last_copied {
            let lost = direction.unhad(direction.call_next, direction.call_len);
            direction.call_next = direction.call_len;
            if lost > 0 {
                Self::gap(&stream.info, direction, to_server, time, lost, counters, sink);
            }
        }
    }

    fn gap(info: &ConnectionInfo, direction: &mut Direction, to_server: bool, time: f64, lost: u64,
           counters: &mut TlsCounters, sink: &mut impl StreamSink) {
        counters.truncated_chunks += 1;
        counters.truncated_bytes += lost;
        sink.event(info, to_server, time, StreamEvent::Gap { lost, position: direction.position });
        direction.position += lost;
    }

    fn close_process(&mut self, pid: u32, time: f64, sink: &mut impl StreamSink) {
        let keys: Vec<(u32, u64)> = self.streams.keys().filter(|(owner, _)| *owner == pid).copied().collect();
        for key in keys {
            if let Some(stream) = self.streams.remove(&key) {
                sink.event(&stream.info, true, time, StreamEvent::Closed);
            }
        }
    }

    /// Streams idle since before `older_than` (wall clock) are closed, as TCP's idle expiry does.
    pub fn expire(&mut self, older_than: f64, sink: &mut impl StreamSink) {
        let keys: Vec<(u32, u64)> =
            self.streams.iter().filter(|(_, stream)| stream.last_time < older_than).map(|(key, _)| *key).collect();
        self.release(|held| keys.contains(&held.key), sink); // a response still held is the stream's last
        for key in keys {
            if let Some(stream) = self.streams.remove(&key) {
                sink.event(&stream.info, true, older_than, StreamEvent::Closed);
            }
        }
    }

    /// The capture is over: every stream is closed.
    pub fn close_all(&mut self, time: f64, sink: &mut impl StreamSink) {
        self.release(|_| true, sink);
        for (_, stream) in self.streams.drain() {
            sink.event(&stream.info, true, time, StreamEvent::Closed);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect {
        events: Vec<(u64, bool, String)>,
    }

    impl StreamSink for Collect {
        fn event(&mut self, connection: &ConnectionInfo, to_server: bool, _time: f64, event: StreamEvent<'_>) {
            let text = match event {
                StreamEvent::Data { payload, position, peer_acked } => {
                    format!("data {position} {peer_acked} {}", String::from_utf8_lossy(payload))
                }
                StreamEvent::Gap { lost, position } => format!("gap {position} {lost}"),
                StreamEvent::End { position } => format!("end {position}"),
                StreamEvent::Closed => "closed".to_string(),
            };
            self.events.push((connection.id & !TLS_ID_BIT, to_server, text));
        }

        fn forget(&mut self, connection: &ConnectionInfo) {
            self.events.push((connection.id & !TLS_ID_BIT, true, "forgotten".to_string()));
        }
    }

    pub(crate) fn record(kind: u32, pid: u32, ssl: u64, offset: u32, call_len: u32, data: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0u8; HEADER];
        bytes[0..8].copy_from_slice(&ssl.to_ne_bytes());
        bytes[8..16].copy_from_slice(&1_000_000_000u64.to_ne_bytes());
        bytes[16..20].copy_from_slice(&pid.to_ne_bytes());
        bytes[20..24].copy_from_slice(&kind.to_ne_bytes());
        bytes[24..28].copy_from_slice(&offset.to_ne_bytes());
        bytes[28..32].copy_from_slice(&call_len.to_ne_bytes());
        bytes[32..36].copy_from_slice(&(data.len() as u32).to_ne_bytes());
        bytes[36..38].copy_from_slice(&AF_INET.to_ne_bytes());
        bytes[38..40].copy_from_slice(&8443u16.to_ne_bytes());
        bytes[40..42].copy_from_slice(&40000u16.to_ne_bytes());
        bytes[44..48].copy_from_slice(&5000u32.to_ne_bytes());
        bytes[48..52].copy_from_slice(&9000u32.to_ne_bytes());
        bytes[52..56].copy_from_slice(&[127, 0, 0, 1]);
        bytes[68..72].copy_from_slice(&[127, 0, 0, 2]);
        bytes.extend_from_slice(data);
        bytes
    }

    /// A write sent at its call's entry by thread `tid` (tls.bpf.c's ssl_write_worker).
    fn at_entry(kind: u32, tid: u32, ssl: u64, offset: u32, call_len: u32, data: &[u8]) -> Vec<u8> {
        let mut bytes = record(kind, 7, ssl, offset, call_len, data);
        bytes[84..88].copy_from_slice(&tid.to_ne_bytes());
        bytes[88..92].copy_from_slice(&1u32.to_ne_bytes());
        bytes
    }

    fn texts(sink: &Collect) -> Vec<&str> {
        sink.events.iter().map(|(_, _, text)| text.as_str()).collect()
    }

    #[test]
    fn a_write_sent_at_entry_waits_for_its_thread_to_go_on_and_a_failed_one_is_forgotten() {
        let (mut streams, mut sink) = (TlsStreams::new(0.0), Collect::default());
        let with_tid = |mut bytes: Vec<u8>, tid: u32| {
            bytes[84..88].copy_from_slice(&tid.to_ne_bytes());
            bytes
        };
        streams.feed(&with_tid(record(KIND_OPEN, 7, 1, 0, 0, b""), 70), &mut sink);
        streams.feed(&with_tid(record(KIND_READ, 7, 1, 0, 5, b"GET /"), 70), &mut sink);
        // the response's first attempt fails (the socket is full) and is sent again, in two pieces
        streams.feed(&at_entry(KIND_WRITE, 70, 1, 0, 4, b"HTTP"), &mut sink);
        assert_eq!(texts(&sink), ["data 0 -1 GET /"], "held until the thread goes on");
        streams.feed(&with_tid(record(KIND_WRITE_FAILED, 7, 1, 0, 0, b""), 70), &mut sink);
        let long = PIECE + 2;
        streams.feed(&at_entry(KIND_WRITE, 70, 1, 0, long, &vec![b'H'; PIECE as usize]), &mut sink);
        streams.feed(&at_entry(KIND_WRITE, 70, 1, PIECE, long, b"!!"), &mut sink);
        assert_eq!(sink.events.len(), 1);
        // another thread's call does not end this one's; this thread's next call does
        streams.feed(&with_tid(record(KIND_READ, 7, 2, 0, 1, b"G"), 71), &mut sink);
        assert_eq!(sink.events.len(), 2);
        streams.feed(&with_tid(record(KIND_READ, 7, 3, 0, 1, b"G"), 70), &mut sink);
        let events = texts(&sink);
        assert_eq!(events[2], format!("data 0 5 {}", "H".repeat(PIECE as usize)));
        assert_eq!(events[3], "data 8192 5 !!");
        assert_eq!(streams.counters.write_retries, 1);
        assert_eq!(streams.counters.truncated_chunks, 0, "the forgotten attempt is not a gap");
    }

    #[test]
    fn a_stream_found_on_a_port_not_metered_is_forgotten_with_its_held_write() {
        let (mut streams, mut sink) = (TlsStreams::new(0.0), Collect::default());
        // the gateway's request to its upstream over a connection begun before the probes, then the read of
        // the upstream's answer finds the socket on another port
        streams.feed(&at_entry(KIND_WRITE, 70, 1, 0, 5, b"GET /"), &mut sink);
        streams.feed(&record(KIND_UNMETERED, 7, 1, 0, 0, b""), &mut sink);
        streams.release_held(f64::MAX, &mut sink);
        assert_eq!(streams.counters.unmetered, 1);
        assert!(sink.events.is_empty() && streams.is_empty(), "nothing of it: {:?}", sink.events);
        // one that had reached the pipeline (a server port not metered: its request) is forgotten there,
        // not closed (a close would bill its unanswered request as the client's leaving)
        streams.feed(&record(KIND_READ, 7, 3, 0, 5, b"GET /"), &mut sink);
        streams.feed(&record(KIND_UNMETERED, 7, 3, 0, 0, b""), &mut sink);
        assert_eq!(texts(&sink), ["data 0 -1 GET /", "forgotten"]);
        assert!(streams.is_empty());
    }

    #[test]
    fn a_held_write_is_done_after_the_hold_its_stream_used_again_or_the_capture_over() {
        let (mut streams, mut sink) = (TlsStreams::new(0.0), Collect::default());
        streams.feed(&at_entry(KIND_WRITE, 70, 1, 0, 2, b"ok"), &mut sink);
        // the pipeline's housekeeping releases what is older than the hold (the records' time is 1 s)
        streams.release_held(1.0 + HOLD_SECONDS / 2.0 - HOLD_SECONDS, &mut sink);
        assert!(sink.events.is_empty(), "younger than the hold");
        streams.release_held(1.0 + 2.0 * HOLD_SECONDS - HOLD_SECONDS, &mut sink);
        assert_eq!(texts(&sink), ["data 0 0 ok"]);
        // the same stream's next record, from another thread, comes after it
        streams.feed(&at_entry(KIND_WRITE, 70, 1, 0, 2, b"no"), &mut sink);
        streams.feed(&record(KIND_CLOSE, 7, 1, 0, 0, b""), &mut sink);
        assert_eq!(&texts(&sink)[1..], ["data 2 0 no", "end 4", "closed"]);
        streams.feed(&at_entry(KIND_WRITE, 70, 5, 0, 3, b"end"), &mut sink);
        streams.close_all(2.0, &mut sink);
        assert_eq!(&texts(&sink)[4..], ["data 0 0 end", "closed"]);
        // a failure for a write no longer held (or never held) changes nothing
        streams.feed(&record(KIND_WRITE_FAILED, 7, 5, 0, 0, b""), &mut sink);
        assert_eq!(streams.counters.write_retries, 0);
    }

    /// `bytes` with the probes' count of its direction so far (tls.bpf.c's stream_pos)
    fn at(bytes: Vec<u8>, stream_pos: u64) -> Vec<u8> {
        at_count(bytes, stream_pos, 1)
    }

    /// `bytes` with the probes' count of its direction so far, of count `generation`
    fn at_count(mut bytes: Vec<u8>, stream_pos: u64, generation: u32) -> Vec<u8> {
        bytes[92..96].copy_from_slice(&generation.to_ne_bytes());
        bytes[96..104].copy_from_slice(&stream_pos.to_ne_bytes());
        bytes
    }

    /// `bytes` with the probes' count of the other direction (other_pos)
    fn acked(mut bytes: Vec<u8>, other_pos: u64) -> Vec<u8> {
        bytes[104..112].copy_from_slice(&other_pos.to_ne_bytes());
        bytes
    }

    #[test]
    fn calls_the_ring_had_no_room_for_are_a_gap_of_their_length() {
        let (mut streams, mut sink) = (TlsStreams::new(0.0), Collect::default());
        streams.feed(&record(KIND_OPEN, 7, 1, 0, 0, b""), &mut sink);
        streams.feed(&at(record(KIND_READ, 7, 1, 0, 6, b"GET /a"), 0), &mut sink);
        streams.feed(&acked(at(record(KIND_WRITE, 7, 1, 0, 2, b"ok"), 0), 6), &mut sink);
        // the next request's read (6 bytes) and its answer's write (3) were dropped; a piece of a long call too
        let long = PIECE + 4;
        streams.feed(&acked(at(record(KIND_READ, 7, 1, 0, long, &vec![b'x'; PIECE as usize]), 12), 5), &mut sink);
        let last_read = 12 + u64::from(long) + 10;
        streams.feed(&acked(at(record(KIND_READ, 7, 1, 0, 6, b"GET /d"), last_read), 5), &mut sink);
        streams.feed(&acked(at(record(KIND_WRITE, 7, 1, 0, 2, b"ok"), 5), last_read + 6), &mut sink);
        let events = texts(&sink);
        // (the first read's ACK is unknown: the probes' count of the writes is, from the first write on)
        assert_eq!(events[..2], ["data 0 -1 GET /a", "data 0 6 ok"]);
        // the dropped write shows first, by what the gateway had written when it read on
        assert_eq!(events[2..4], ["gap 2 3", "gap 6 6"]);
        assert!(events[4].starts_with("data 12 5 xxx"));
        assert_eq!(events[5..], [format!("gap {} 4", 12 + PIECE), format!("gap {} 10", 12 + long),
                                  format!("data {} 5 GET /d", 22 + long), format!("data 5 {} ok", 28 + long)]);
        assert_eq!((streams.counters.truncated_chunks, streams.counters.truncated_bytes), (4, 6 + 4 + 10 + 3));
    }

    #[test]
    fn after_the_ring_dropped_answers_each_request_later_seen_gets_its_own() {
        let (mut streams, mut http) = (TlsStreams::new(0.0), crate::http::exchanges::HttpExchanges::new(60.0, 65536));
        streams.feed(&at(record(KIND_OPEN, 7, 1, 0, 0, b""), 0), &mut http);
        let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").into_bytes();
        let answer = |status: u16, body: &str| {
            format!("HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{body}", body.len()).into_bytes()
        };
        let (mut read, mut written) = (0u64, 0u64);
        // a keep-alive client, one request at a time: /2's answer, /3 and its answer, were dropped
        for (path, status, body, kept) in [("/1", 200, "one", (true, true)), ("/2", 201, "two!", (true, false)),
                                           ("/3", 202, "three", (false, false)), ("/4", 203, "4", (true, true))] {
            let (request, response) = (get(path), answer(status, body));
            if kept.0 {
                let bytes = acked(at(record(KIND_READ, 7, 1, 0, request.len() as u32, &request), read), written);
                streams.feed(&bytes, &mut http);
            }
            read += request.len() as u64;
            if kept.1 {
                let bytes = acked(at(record(KIND_WRITE, 7, 1, 0, response.len() as u32, &response), written), read);
                streams.feed(&bytes, &mut http);
            }
            written += response.len() as u64;
        }
        let exchanges: Vec<(Vec<u8>, u16)> = http.take().map(|exchange| (exchange.request.target, exchange.status)).collect();
        assert_eq!(exchanges, [(b"/1".to_vec(), 200), (b"/4".to_vec(), 203)]);
        assert_eq!(http.counters.lost_exchanges, 2);
    }

    #[test]
    fn an_upload_whose_end_was_dropped_is_billed_whole_as_its_answer_shows() {
        let (mut streams, mut http) = (TlsStreams::new(0.0), crate::http::exchanges::HttpExchanges::new(60.0, 65536));
        streams.feed(&at(record(KIND_OPEN, 7, 1, 0, 0, b""), 0), &mut http);
        let head = b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n";
        let first = [head.as_slice(), &[b'x'; 40]].concat();
        streams.feed(&at(record(KIND_READ, 7, 1, 0, first.len() as u32, &first), 0), &mut http);
        // the read of the body's last 60 bytes was dropped; the answer's write says the gateway had them
        let answer = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok";
        let had = (head.len() + 100) as u64;
        streams.feed(&acked(at(record(KIND_WRITE, 7, 1, 0, answer.len() as u32, answer), 0), had), &mut http);
        let exchanges: Vec<(u16, u64)> = http.take().map(|exchange| (exchange.status, exchange.request.size)).collect();
        assert_eq!(exchanges, [(201, had)]);
        assert_eq!(streams.counters.truncated_bytes, 60);
    }

    #[test]
    fn what_a_stream_sent_that_never_came_is_a_gap_up_to_the_totals_at_its_close() {
        let (mut streams, mut sink) = (TlsStreams::new(0.0), Collect::default());
        // its first request's read was dropped, then its answer's write
        streams.feed(&at(record(KIND_OPEN, 7, 1, 0, 0, b""), 0), &mut sink);
        streams.feed(&at(record(KIND_READ, 7, 1, 0, 5, b"GET /"), 6), &mut sink);
        streams.feed(&acked(at(record(KIND_CLOSE, 7, 1, 0, 0, b""), 11), 40), &mut sink);
        let events: Vec<(bool, &str)> = sink.events.iter().map(|(_, to_server, text)| (*to_server, text.as_str())).collect();
        assert_eq!(events, [(true, "gap 0 6"), (true, "data 6 0 GET /"), (false, "gap 0 40"), (false, "end 40"),
                            (true, "closed")]);
        // a close whose totals are all there adds nothing
        streams.feed(&at(record(KIND_OPEN, 7, 2, 0, 0, b""), 0), &mut sink);
        streams.feed(&at(record(KIND_READ, 7, 2, 0, 2, b"GE"), 0), &mut sink);
        streams.feed(&at(record(KIND_CLOSE, 7, 2, 0, 0, b""), 2), &mut sink);
        assert_eq!(texts(&sink)[5..], ["data 0 0 GE", "end 0", "closed"]);
        assert_eq!(streams.counters.truncated_bytes, 46);
    }

    #[test]
    fn a_write_sent_again_whose_failure_went_unseen_is_taken_once() {
        let (mut streams, mut sink) = (TlsStreams::new(0.0), Collect::default());
        streams.feed(&record(KIND_OPEN, 7, 1, 0, 0, b""), &mut sink);
        streams.feed(&at(at_entry(KIND_WRITE, 70, 1, 0, 4, b"HTTP"), 0), &mut sink);
        // its KIND_WRITE_FAILED was lost: the second attempt, at the same place, releases the first
        let long = PIECE + 2;
        streams.feed(&at(at_entry(KIND_WRITE, 70, 1, 0, 4, b"HTTP"), 0), &mut sink);
        streams.feed(&at(at_entry(KIND_WRITE, 70, 1, 0, long, &vec![b'b'; PIECE as usize]), 4), &mut sink);
        streams.feed(&at(at_entry(KIND_WRITE, 70, 1, PIECE, long, b"!!"), 4), &mut sink);
        streams.close_all(2.0, &mut sink);
        let events = texts(&sink);
        assert_eq!(events[0], "data 0 0 HTTP");
        assert!(events[1].starts_with("data 4 0 bbb"));
        assert_eq!(events[2..], [format!("data {} 0 !!", 4 + PIECE), "closed".to_string()]);
        assert_eq!((streams.counters.write_retries, streams.counters.truncated_chunks), (1, 0));
    }

    #[test]
    fn a_count_that_starts_again_is_followed_from_there() {
        let (mut streams, mut sink) = (TlsStreams::new(0.0), Collect::default());
        // a stream begun before the probes: its first call is not positioned, its socket known later
        streams.feed(&record(KIND_READ, 7, 1, 0, 6, b"GET /a"), &mut sink);
        streams.feed(&acked(at_count(record(KIND_WRITE, 7, 1, 0, 3, b"ok1"), 0, 5), 0), &mut sink);
        streams.feed(&acked(at_count(record(KIND_READ, 7, 1, 0, 6, b"GET /b"), 0, 5), 3), &mut sink);
        streams.feed(&acked(at_count(record(KIND_WRITE, 7, 1, 0, 3, b"ok2"), 3, 5), 6), &mut sink);
        // the socket's entry was evicted and learned again: a new count, from 0 once more, whose first
        // write is not taken for the first write made again
        streams.feed(&acked(at_count(record(KIND_READ, 7, 1, 0, 6, b"GET /c"), 0, 9), 0), &mut sink);
        streams.feed(&acked(at_count(record(KIND_WRITE, 7, 1, 0, 3, b"ok3"), 0, 9), 6), &mut sink);
        assert_eq!(texts(&sink), ["data 0 -1 GET /a", "data 0 6 ok1", "data 6 3 GET /b", "data 3 12 ok2",
                                  "data 12 -1 GET /c", "data 6 18 ok3"]);
        assert_eq!((streams.counters.truncated_chunks, streams.counters.write_retries), (0, 0));
    }

    #[test]
    fn a_write_made_again_longer_delivers_only_what_is_new() {
        let (mut streams, mut sink) = (TlsStreams::new(0.0), Collect::default());
        streams.feed(&at(record(KIND_OPEN, 7, 1, 0, 0, b""), 0), &mut sink);
        streams.feed(&at(at_entry(KIND_WRITE, 70, 1, 0, 4, b"HTTP"), 0), &mut sink);
        // its failure's record was dropped; nginx makes it again with more of its chain (in two pieces)
        let long = PIECE + 3;
        let first = [b"HTTP".as_slice(), &vec![b'b'; PIECE as usize - 4]].concat();
        streams.feed(&at(at_entry(KIND_WRITE, 70, 1, 0, long, &first), 0), &mut sink);
        streams.feed(&at(at_entry(KIND_WRITE, 70, 1, PIECE, long, b"end"), 0), &mut sink);
        streams.close_all(2.0, &mut sink);
        let events = texts(&sink);
        assert_eq!(events[0], "data 0 0 HTTP");
        assert_eq!(events[1], format!("data 4 0 {}", "b".repeat(PIECE as usize - 4)));
        assert_eq!(events[2..], [format!("data {PIECE} 0 end"), "closed".to_string()]);
        assert_eq!((streams.counters.write_retries, streams.counters.truncated_chunks), (1, 0));
    }

    #[test]
    fn a_long_call_whose_first_piece_was_dropped_is_placed_by_its_count() {
        let (mut streams, mut sink) = (TlsStreams::new(0.0), Collect::default());
        streams.feed(&at(record(KIND_OPEN, 7, 1, 0, 0, b""), 0), &mut sink);
        let long = PIECE + 2;
        streams.feed(&at(record(KIND_WRITE, 7, 1, 0, long, &vec![b'a'; PIECE as usize]), 0), &mut sink);
        streams.feed(&at(record(KIND_WRITE, 7, 1, PIECE, long, b"aa"), 0), &mut sink);
        // the next call's first piece was dropped: its second follows the first call's end and a gap
        streams.feed(&at(record(KIND_WRITE, 7, 1, PIECE, long, b"bb"), u64::from(long)), &mut sink);
        let events = texts(&sink);
        assert_eq!(events[1..], [format!("data {PIECE} 0 aa"), format!("gap {long} {PIECE}"),
                                 format!("data {} 0 bb", long + PIECE)]);
    }

    #[test]
    fn a_stream_from_set_fd_to_free_is_one_connection_in_order() {
        let (mut streams, mut sink) = (TlsStreams::new(0.0), Collect::default());
        streams.feed(&record(KIND_OPEN, 7, 0xAB, 0, 0, b""), &mut sink);
        streams.feed(&record(KIND_READ, 7, 0xAB, 0, 5, b"GET /"), &mut sink);
        streams.feed(&record(KIND_WRITE, 7, 0xAB, 0, 4, b"HTTP"), &mut sink);
        streams.feed(&record(KIND_READ, 7, 0xAB, 0, 3, b"abc"), &mut sink);
        streams.feed(&record(KIND_CLOSE, 7, 0xAB, 0, 0, b""), &mut sink);
        let texts: Vec<&str> = sink.events.iter().map(|(_, _, text)| text.as_str()).collect();
        assert_eq!(texts, ["data 0 -1 GET /", "data 0 5 HTTP", "data 5 -1 abc", "end 4", "closed"]);
        assert_eq!((streams.counters.streams, streams.counters.midstream), (1, 0));
        assert!(streams.is_empty());
    }

    #[test]
    fn the_id_base_is_the_client_isn_or_midstream_the_read_position() {
        let (mut streams, mut sink) = (TlsStreams::new(0.0), Collect::default());
        streams.feed(&record(KIND_OPEN, 7, 1, 0, 0, b""), &mut sink);
        streams.feed(&record(KIND_READ, 7, 1, 0, 1, b"G"), &mut sink);
        streams.feed(&record(KIND_READ, 7, 2, 0, 1, b"G"), &mut sink);
        let bases: Vec<Option<u32>> = [1, 2].iter().map(|ssl| streams.streams[&(7, *ssl)].info.to_server_base_seq).collect();
        assert_eq!(bases, [Some(5000), Some(9000)]);
        assert!(streams.streams[&(7, 1)].info.saw_syn && !streams.streams[&(7, 2)].info.saw_syn);
        assert_eq!(streams.counters.midstream, 1);
        let info = streams.streams[&(7, 1)].info;
        assert_eq!((info.client_port, info.server_port), (40000, 8443));
        assert_eq!(info.client, Address::new(&[127, 0, 0, 2]));
    }

    #[test]
    fn pieces_of_a_long_call_follow_on_and_what_was_not_copied_is_a_gap() {
        let (mut streams, mut sink) = (TlsStreams::new(0.0), Collect::default());
        let piece = vec![b'x'; PIECE as usize];
        let call = PIECES * PIECE + 100;
        streams.feed(&record(KIND_OPEN, 7, 1, 0, 0, b""), &mut sink);
        for index in 0..PIECES {
            streams.feed(&record(KIND_WRITE, 7, 1, index * PIECE, call, &piece), &mut sink);
        }
        let last = &sink.events.last().unwrap().2;
        assert_eq!(last, &format!("gap {} 100", PIECES * PIECE));
        assert_eq!((streams.counters.truncated_chunks, streams.counters.truncated_bytes), (1, 100));
        // a lost middle piece (ring full) is a gap of its size
        streams.feed(&record(KIND_READ, 7, 1, 0, 3 * PIECE, &piece), &mut sink);
        streams.feed(&record(KIND_READ, 7, 1, 2 * PIECE, 3 * PIECE, &piece), &mut sink);
        assert_eq!(sink.events[sink.events.len() - 2].2, format!("gap {PIECE} {PIECE}"));
    }

    #[test]
    fn an_http2_stream_is_counted_and_not_handed_on() {
        let (mut streams, mut sink) = (TlsStreams::new(0.0), Collect::default());
        streams.feed(&record(KIND_OPEN, 7, 1, 0, 0, b""), &mut sink);
        streams.feed(&record(KIND_READ, 7, 1, 0, 24, H2_PREFACE), &mut sink);
        streams.feed(&record(KIND_WRITE, 7, 1, 0, 9, b"\0\0\0\x04\0\0\0\0\0"), &mut sink);
        // nginx's h2 writes its SETTINGS first
        streams.feed(&record(KIND_OPEN, 7, 2, 0, 0, b""), &mut sink);
        streams.feed(&record(KIND_WRITE, 7, 2, 0, 9, b"\0\0\x12\x04\0\0\0\0\0"), &mut sink);
        streams.feed(&record(KIND_READ, 7, 2, 0, 24, H2_PREFACE), &mut sink);
        assert_eq!(streams.counters.http2_connections, 2);
        assert!(sink.events.is_empty());
    }

    #[test]
    fn a_process_that_exits_closes_its_streams_and_a_reused_ssl_is_a_new_stream() {
        let (mut streams, mut sink) = (TlsStreams::new(0.0), Collect::default());
        streams.feed(&record(KIND_OPEN, 7, 1, 0, 0, b""), &mut sink);
        streams.feed(&record(KIND_READ, 7, 1, 0, 1, b"G"), &mut sink);
        streams.feed(&record(KIND_OPEN, 7, 1, 0, 0, b""), &mut sink);
        streams.feed(&record(KIND_READ, 7, 1, 0, 1, b"G"), &mut sink);
        streams.feed(&record(KIND_READ, 8, 1, 0, 1, b"G"), &mut sink);
        streams.feed(&record(KIND_EXIT, 7, 0, 0, 0, b""), &mut sink);
        let ids: Vec<(u64, &str)> = sink.events.iter().map(|(id, _, text)| (*id, text.as_str())).collect();
        assert_eq!(ids, [(1, "data 0 -1 G"), (1, "closed"), (2, "data 0 -1 G"), (3, "data 0 -1 G"), (2, "closed")]);
        assert_eq!(streams.exited, [7]);
        assert_eq!(streams.len(), 1);
    }

    #[test]
    fn a_client_that_left_first_ends_its_stream_before_the_close() {
        let (mut streams, mut sink) = (TlsStreams::new(0.0), Collect::default());
        streams.feed(&record(KIND_OPEN, 7, 1, 0, 0, b""), &mut sink);
        streams.feed(&record(KIND_READ, 7, 1, 0, 1, b"G"), &mut sink);
        let mut close = record(KIND_CLOSE, 7, 1, 0, 0, b"");
        close[42..44].copy_from_slice(&1u16.to_ne_bytes());
        streams.feed(&close, &mut sink);
        let texts: Vec<&str> = sink.events.iter().map(|(_, _, text)| text.as_str()).collect();
        assert_eq!(texts, ["data 0 -1 G", "end 1", "end 0", "closed"]);
    }

    #[test]
    fn an_answered_request_survives_the_clients_close() {
        let (mut streams, mut http) = (TlsStreams::new(0.0), crate::http::exchanges::HttpExchanges::new(60.0, 65536));
        streams.feed(&record(KIND_OPEN, 7, 1, 0, 0, b""), &mut http);
        let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
        streams.feed(&record(KIND_READ, 7, 1, 0, request.len() as u32, request), &mut http);
        streams.feed(&record(KIND_WRITE, 7, 1, 0, response.len() as u32, response), &mut http);
        let mut close = record(KIND_CLOSE, 7, 1, 0, 0, b"");
        close[42..44].copy_from_slice(&1u16.to_ne_bytes());
        streams.feed(&close, &mut http);
        let statuses: Vec<u16> = http.take().map(|exchange| exchange.status).collect();
        assert_eq!(statuses, [200]);
    }

    #[test]
    fn requests_behind_the_one_the_gateway_closed_on_were_never_read() {
        let (mut streams, mut http) = (TlsStreams::new(0.0), crate::http::exchanges::HttpExchanges::new(60.0, 65536));
        streams.feed(&record(KIND_OPEN, 7, 1, 0, 0, b""), &mut http);
        // nginx's `return 444` for the first of three pipelined requests: no answer, the connection closed
        let requests = b"GET /444 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\nGET /3 HTTP/1.1\r\nHost: a\r\n\r\n";
        streams.feed(&record(KIND_READ, 7, 1, 0, requests.len() as u32, requests), &mut http);
        streams.feed(&record(KIND_CLOSE, 7, 1, 0, 0, b""), &mut http);
        let exchanges: Vec<(Vec<u8>, u16)> = http.take().map(|exchange| (exchange.request.target, exchange.status)).collect();
        assert_eq!(exchanges, [(b"/444".to_vec(), 0)]);
        assert_eq!(http.counters.never_read, 2);
    }

    #[test]
    fn short_records_are_counted_not_read() {
        let (mut streams, mut sink) = (TlsStreams::new(0.0), Collect::default());
        streams.feed(&[0u8; 10], &mut sink);
        let mut lying = record(KIND_READ, 7, 1, 0, 1, b"G");
        lying[32..36].copy_from_slice(&1000u32.to_ne_bytes());
        streams.feed(&lying, &mut sink);
        assert_eq!(streams.counters.bad_records, 2);
        assert!(sink.events.is_empty());
    }
}
