//! TCP reassembly into one ordered byte stream per direction, by sequence number.
//!
//! Not by ACK number (grouping by ACK splits messages). A hole in a stream is declared a gap as soon as
//! the peer acknowledges bytes beyond it: the peer got them, so the capture lost them. Streams without a
//! SYN start at the first byte seen or at the sequence number the peer acknowledges.
//!
//! Connections live in a slab threaded by an intrusive doubly linked list in least-recently-seen order:
//! touching one on every packet is O(1) and costs two `u32`s per connection, where a queue with lazy
//! stale entries would grow by one entry per packet between expiries. The 4-tuple index is std's
//! `HashMap` (SipHash with a random key): the keys are chosen by whoever sends us packets.

use std::cmp::Ordering;
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::mem::size_of;

use crate::source::frames::{Address, Segment, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

/// Which connection an event belongs to, and what the later stages need to know of it.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionInfo {
    /// Unique for the reassembler's lifetime (a new incarnation of a 4-tuple gets a new id).
    pub id: u64,
    pub client: Address,
    pub client_port: u16,
    pub server: Address,
    pub server_port: u16,
    /// The connection's SYN was seen, so both streams start at a message boundary.
    pub saw_syn: bool,
    /// Sequence number of the client stream's position 0 (for the event id), once known.
    pub to_server_base_seq: Option<u32>,
}

/// What happened in one direction of a connection, in stream order.
#[derive(PartialEq, Eq)]
pub enum StreamEvent<'a> {
    /// Bytes at `position`; `peer_acked` is the position in the opposite stream this segment
    /// acknowledges, or -1 when unknown.
    Data { payload: &'a [u8], position: u64, peer_acked: i64 },
    /// `lost` bytes at `position` were never captured.
    Gap { lost: u64, position: u64 },
    /// The direction sent FIN and everything before it was delivered.
    End { position: u64 },
    /// The connection is over (both FINs, RST, idle, evicted, shed, capture end). `to_server` is true.
    Closed,
}

/// Without the payload: it carries request heads, API keys among them.
impl std::fmt::Debug for StreamEvent<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamEvent::Data { payload, position, peer_acked } => f
                .debug_struct("Data")
                .field("payload_bytes", &payload.len())
                .field("position", position)
                .field("peer_acked", peer_acked)
                .finish(),
            StreamEvent::Gap { lost, position } => {
                f.debug_struct("Gap").field("lost", lost).field("position", position).finish()
            }
            StreamEvent::End { position } => f.debug_struct("End").field("position", position).finish(),
            StreamEvent::Closed => f.write_str("Closed"),
        }
    }
}

/// Where the reassembler delivers its events (the HTTP stage, or a test collecting them).
pub trait StreamSink {
    fn event(&mut self, connection: &ConnectionInfo, to_server: bool, time: f64, event: StreamEvent<'_>);

    /// The connection turned out not to be the gateway's traffic (a TLS stream on a port not metered):
    /// whatever is pending on it is dropped, not closed out into results.
    fn forget(&mut self, _connection: &ConnectionInfo) {}
}

#[derive(Clone, Copy, Debug)]
pub struct ReassemblyLimits {
    pub max_connections: usize,
    pub max_pending_bytes_per_stream: usize,
    pub idle_timeout: f64,
}

impl Default for ReassemblyLimits {
    fn default() -> Self {
        ReassemblyLimits { max_connections: 100_000, max_pending_bytes_per_stream: 1 << 20, idle_timeout: 300.0 }
    }
}

#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct ReassemblyCounters {
    pub connections: u64,
    pub other_ports: u64,
    pub duplicate_segments: u64,
    pub gaps: u64,
    pub gap_bytes: u64,
    pub pending_overflows: u64,
    pub expired_connections: u64,
    pub evicted_connections: u64,
    /// closed early to keep the process within its memory budget
    pub shed_connections: u64,
}

/// Signed distance from `reference` to `seq` in modulo-2^32 sequence space.
pub fn seq_delta(seq: u32, reference: u32) -> i64 {
    i64::from(seq.wrapping_sub(reference) as i32)
}

/// Flags that take a segment off the fast path.
const CONTROL_FLAGS: u8 = TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK;
const HALF_SEQ_SPACE: u32 = 1 << 31;
/// The end of the LRU list.
const NIL: u32 = u32::MAX;

/// What one held-back segment costs beyond its payload: its key and box in the B-tree (whose nodes are
/// half empty at worst, hence twice) and the allocator's header of the payload's box.
const HELD_SEGMENT_OVERHEAD: usize = 2 * size_of::<(i64, Held)>() + 16;

/// A segment held back until the bytes before it arrive, with what its ACK said of the peer's stream (which
/// pairing needs: see `HttpExchanges`' answers lost unseen).
struct Held {
    payload: Box<[u8]>,
    peer_acked: i64,
}
/// What one tracked connection costs: its slab slot, and its index entry at hashbrown's 7/8 load with
/// one control byte.
const CONNECTION_BYTES: usize = size_of::<Option<Connection>>() + (size_of::<(FourTuple, u32)>() + 1) * 8 / 7;
// 208 + 51 = 259 bytes on 64-bit targets: keep it a few hundred.
const _: () = assert!(CONNECTION_BYTES <= 320);
/// What the budget counts per connection: the slab and the index grow by doubling (and a resizing index
/// briefly holds its old table and its new one), so at times they hold twice what their entries need.
const BUDGETED_CONNECTION_BYTES: usize = 2 * CONNECTION_BYTES;

/// Stream positions are `i64` inside: the Python compared them with positions computed from sequence
/// numbers, which may lie before position 0 (a retransmission older than the first byte seen, an ACK
/// trailing the stream's start). Delivered positions are never negative and only grow; they reach the
/// events as `u64`.
#[derive(Default)]
struct HalfStream {
    /// Sequence number of stream position 0.
    base_seq: Option<u32>,
    /// Bytes delivered (data or gap) so far.
    position: i64,
    /// Out-of-order payloads by position, drained in order (never a search for the lowest).
    pending: BTreeMap<i64, Held>,
    pending_bytes: usize,
    fin_position: Option<i64>,
    ended: bool,
}

impl HalfStream {
    fn start(&mut self, seq: u32) {
        self.base_seq = Some(seq);
        self.position = 0;
    }

    /// Callers start the stream first (its base is known).
    fn position_of(&self, seq: u32) -> i64 {
        let next = self.base_seq.unwrap_or_default().wrapping_add(self.position as u32);
        self.position.saturating_add(seq_delta(seq, next))
    }

    fn footprint(&self) -> usize {
        self.pending_bytes + self.pending.len() * HELD_SEGMENT_OVERHEAD
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct FourTuple {
    client: Address,
    client_port: u16,
    server: Address,
    server_port: u16,
}

impl std::hash::Hash for FourTuple {
    /// One write of the packed tuple: the derived hash made six, each with SipHash's per-write cost.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let mut packed = [0u8; 38];
        let (client, server) = (self.client.bytes(), self.server.bytes());
        packed[..client.len()].copy_from_slice(client);
        packed[16..16 + server.len()].copy_from_slice(server);
        packed[32..34].copy_from_slice(&self.client_port.to_le_bytes());
        packed[34..36].copy_from_slice(&self.server_port.to_le_bytes());
        packed[36] = u8::from(self.client.is_v6());
        packed[37] = u8::from(self.server.is_v6());
        state.write(&packed);
    }
}

struct Connection {
    tuple: FourTuple,
    id: u64,
    last_seen: f64,
    saw_syn: bool,
    to_server: HalfStream,
    to_client: HalfStream,
    /// Neighbours in the LRU list (slab indices, or NIL).
    older: u32,
    newer: u32,
}

/// A stream position as the events carry it (never negative once delivered).
fn delivered(position: i64) -> u64 {
    u64::try_from(position).unwrap_or_default()
}

impl Connection {
    fn info(&self) -> ConnectionInfo {
        ConnectionInfo {
            id: self.id,
            client: self.tuple.client,
            client_port: self.tuple.client_port,
            server: self.tuple.server,
            server_port: self.tuple.server_port,
            saw_syn: self.saw_syn,
            to_server_base_seq: self.to_server.base_seq,
        }
    }

    fn stream(&mut self, to_server: bool) -> &mut HalfStream {
        if to_server {
            &mut self.to_server
        } else {
            &mut self.to_client
        }
    }

    /// The sending direction's stream and its peer's.
    fn streams(&mut self, to_server: bool) -> (&mut HalfStream, &mut HalfStream) {
        if to_server {
            (&mut self.to_server, &mut self.to_client)
        } else {
            (&mut self.to_client, &mut self.to_server)
        }
    }

    fn footprint(&self) -> usize {
        self.to_server.footprint() + self.to_client.footprint()
    }

    fn emit(&self, sink: &mut impl StreamSink, to_server: bool, time: f64, event: StreamEvent<'_>) {
        sink.event(&self.info(), to_server, time, event);
    }

    /// A SYN on a known 4-tuple starts a new connection unless it is a retransmission of the first SYN.
    fn is_new_incarnation(&self, to_server: bool, seq: u32) -> bool {
        let stream = if to_server { &self.to_server } else { &self.to_client };
        match stream.base_seq {
            None => false,
            Some(base) => !(self.saw_syn && seq_delta(seq, base) == -1),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn receive(
        &mut self,
        to_server: bool,
        seq: u32,
        payload: &[u8],
        peer_acked: i64,
        time: f64,
        limits: &ReassemblyLimits,
        counters: &mut ReassemblyCounters,
        sink: &mut impl StreamSink,
    ) {
        let stream = self.stream(to_server);
        let position = stream.position_of(seq);
        if position > stream.position {
            match stream.pending.entry(position) {
                Entry::Vacant(vacant) => {
                    vacant.insert(Held { payload: payload.into(), peer_acked });
                    stream.pending_bytes += payload.len();
                }
                Entry::Occupied(mut held) => {
                    if held.get().payload.len() >= payload.len() {
                        counters.duplicate_segments += 1;
                        return;
                    }
                    stream.pending_bytes += payload.len() - held.get().payload.len();
                    *held.get_mut() = Held { payload: payload.into(), peer_acked };
                }
            }
            if stream.pending_bytes > limits.max_pending_bytes_per_stream {
                counters.pending_overflows += 1;
                if let Some(&first) = stream.pending.keys().next() {
                    self.advance(to_server, first, time, counters, sink);
                }
            }
            return;
        }
        let overlap = u64::try_from(stream.position - position).unwrap_or(u64::MAX);
        let Some(fresh) = usize::try_from(overlap).ok().and_then(|overlap| payload.get(overlap..)) else {
            counters.duplicate_segments += 1;
            return;
        };
        if fresh.is_empty() {
            counters.duplicate_segments += 1;
            return;
        }
        let start = stream.position;
        stream.position = start.saturating_add(fresh.len() as i64);
        let has_pending = !stream.pending.is_empty();
        self.emit(sink, to_server, time, StreamEvent::Data { payload: fresh, position: delivered(start), peer_acked });
        if has_pending {
            self.drain(to_server, time, sink);
        }
    }

    /// Deliver held-back segments that have become contiguous.
    fn drain(&mut self, to_server: bool, time: f64, sink: &mut impl StreamSink) {
        loop {
            let stream = self.stream(to_server);
            let Some(first) = stream.pending.first_entry() else { return };
            if *first.key() > stream.position {
                return;
            }
            let (position, Held { payload, peer_acked }) = first.remove_entry();
            stream.pending_bytes -= payload.len();
            let overlap = usize::try_from(stream.position - position).unwrap_or(usize::MAX);
            if let Some(fresh) = payload.get(overlap..).filter(|fresh| !fresh.is_empty()) {
                let start = stream.position;
                stream.position = start.saturating_add(fresh.len() as i64);
                self.emit(
                    sink,
                    to_server,
                    time,
                    StreamEvent::Data { payload: fresh, position: delivered(start), peer_acked },
                );
            }
        }
    }

    /// Bring the stream up to `target`, delivering what is held and declaring the holes as gaps.
    fn advance(
        &mut self,
        to_server: bool,
        mut target: i64,
        time: f64,
        counters: &mut ReassemblyCounters,
        sink: &mut impl StreamSink,
    ) {
        if let Some(fin_position) = self.stream(to_server).fin_position {
            target = target.min(fin_position);
        }
        while self.stream(to_server).position < target {
            self.drain(to_server, time, sink);
            let stream = self.stream(to_server);
            if stream.position >= target {
                break;
            }
            let hole_end = stream.pending.keys().next().map_or(target, |&first| first.min(target));
            let lost = delivered(hole_end - stream.position);
            let position = stream.position;
            stream.position = hole_end;
            counters.gaps += 1;
            counters.gap_bytes = counters.gap_bytes.saturating_add(lost);
            self.emit(sink, to_server, time, StreamEvent::Gap { lost, position: delivered(position) });
        }
        self.drain(to_server, time, sink);
    }

    fn check_end(&mut self, to_server: bool, time: f64, sink: &mut impl StreamSink) -> bool {
        let stream = self.stream(to_server);
        if !stream.ended && stream.fin_position.is_some_and(|fin_position| stream.position >= fin_position) {
            stream.ended = true;
            let position = delivered(stream.position);
            self.emit(sink, to_server, time, StreamEvent::End { position });
        }
        self.stream(to_server).ended
    }

    /// What is still held back is delivered, with its holes as gaps, then CLOSED. A reset ends both
    /// streams first, the resetting side's first (so the HTTP stage sees who went away first, as for FINs).
    fn finish(&mut self, time: f64, reset_by_client: Option<bool>, counters: &mut ReassemblyCounters, sink: &mut impl StreamSink) {
        for to_server in [true, false] {
            let held_end = self
                .stream(to_server)
                .pending
                .iter()
                .map(|(&position, held)| position.saturating_add(held.payload.len() as i64))
                .max();
            if let Some(held_end) = held_end {
                self.advance(to_server, held_end, time, counters, sink);
            }
        }
        if let Some(by_client) = reset_by_client {
            for to_server in [by_client, !by_client] {
                let stream = self.stream(to_server);
                if !stream.ended {
                    stream.ended = true;
                    let position = delivered(stream.position);
                    self.emit(sink, to_server, time, StreamEvent::End { position });
                }
            }
        }
        self.emit(sink, true, time, StreamEvent::Closed);
    }
}

pub struct TcpReassembler {
    pub counters: ReassemblyCounters,
    limits: ReassemblyLimits,
    /// One bit per port.
    server_ports: Vec<u64>,
    index: HashMap<FourTuple, u32>,
    slots: Vec<Option<Connection>>,
    free_slots: Vec<u32>,
    /// Least and most recently seen connections.
    oldest: u32,
    newest: u32,
    next_id: u64,
    /// Held payloads and their overhead, over every connection.
    pending_footprint: usize,
}

impl TcpReassembler {
    pub fn new(server_ports: &[u16], limits: ReassemblyLimits) -> TcpReassembler {
        let mut port_bits = vec![0u64; 1024];
        for &port in server_ports {
            port_bits[usize::from(port >> 6)] |= 1 << (port & 63);
        }
        // Slab indices are u32 (NIL excluded); and at least one connection (the Python failed at 0).
        let max_connections = limits.max_connections.clamp(1, NIL as usize);
        TcpReassembler {
            counters: ReassemblyCounters::default(),
            limits: ReassemblyLimits { max_connections, ..limits },
            server_ports: port_bits,
            index: HashMap::new(),
            slots: Vec::new(),
            free_slots: Vec::new(),
            oldest: NIL,
            newest: NIL,
            next_id: 1,
            pending_footprint: 0,
        }
    }

    fn is_server_port(&self, port: u16) -> bool {
        self.server_ports[usize::from(port >> 6)] & (1 << (port & 63)) != 0
    }

    pub fn feed(&mut self, time: f64, segment: &Segment<'_>, sink: &mut impl StreamSink) {
        let (tuple, to_server) = if self.is_server_port(segment.dport) {
            let tuple = FourTuple {
                client: segment.src,
                client_port: segment.sport,
                server: segment.dst,
                server_port: segment.dport,
            };
            (tuple, true)
        } else if self.is_server_port(segment.sport) {
            let tuple = FourTuple {
                client: segment.dst,
                client_port: segment.dport,
                server: segment.src,
                server_port: segment.sport,
            };
            (tuple, false)
        } else {
            self.counters.other_ports += 1;
            return;
        };
        let flags = segment.flags;
        let mut found = self.index.get(&tuple).copied();
        if let Some(slot) = found {
            if flags & CONTROL_FLAGS == TCP_ACK && self.fast_path(slot, to_server, time, segment, sink) {
                return;
            }
            if flags & TCP_SYN != 0
                && self.connection(slot).is_some_and(|c| c.is_new_incarnation(to_server, segment.seq))
            {
                self.close(slot, time, sink);
                found = None;
            }
        }
        let slot = match found {
            Some(slot) => {
                self.touch(slot, time);
                slot
            }
            None => {
                if segment.payload.is_empty() && flags & TCP_SYN == 0 {
                    return; // a bare ACK, FIN or RST of a connection we never saw: nothing to meter
                }
                self.open(tuple, time, sink)
            }
        };
        let Some(connection) = self.slots.get_mut(slot as usize).and_then(Option::as_mut) else { return };
        let footprint_before = connection.footprint();
        let counters = &mut self.counters;
        if flags & TCP_SYN != 0 {
            // Set before this segment's events (the Python set it after its ACK's, but its HTTP stage
            // read it only once the whole segment had been handled).
            connection.saw_syn = true;
        }

        let mut peer_acked = -1;
        if flags & TCP_ACK != 0 {
            let peer = connection.stream(!to_server);
            if peer.base_seq.is_none() {
                peer.start(segment.ack); // the peer's next byte, learnt before we see the peer send anything
            }
            peer_acked = peer.position_of(segment.ack);
            if peer_acked > peer.position {
                connection.advance(!to_server, peer_acked, time, counters, sink);
            }
        }

        let mut seq = segment.seq;
        let stream = connection.stream(to_server);
        if flags & TCP_SYN != 0 {
            if stream.base_seq.is_none() || stream.position == 0 {
                stream.start(seq.wrapping_add(1));
            }
            seq = seq.wrapping_add(1); // data on a SYN (TCP Fast Open) starts after it
        } else if stream.base_seq.is_none() {
            stream.start(seq);
        }

        if !segment.payload.is_empty() {
            connection.receive(to_server, seq, segment.payload, peer_acked, time, &self.limits, counters, sink);
        }
        let stream = connection.stream(to_server);
        if flags & TCP_FIN != 0 && stream.fin_position.is_none() {
            stream.fin_position = Some(stream.position_of(seq).saturating_add(segment.payload.len() as i64));
        }
        let footprint_after = connection.footprint();
        self.pending_footprint = self.pending_footprint - footprint_before + footprint_after;
        if flags & TCP_RST != 0 {
            self.close_reset(slot, time, Some(to_server), sink);
        } else {
            // this segment's data, or its ACK of the peer's, may have completed either direction
            let peer_ended = connection.check_end(!to_server, time, sink);
            if connection.check_end(to_server, time, sink) && peer_ended {
                self.close(slot, time, sink);
            }
        }
    }

    /// In order, nothing held back, nothing of the peer's unacknowledged: deliver it as it is. False when
    /// the segment needs the full treatment.
    fn fast_path(
        &mut self,
        slot: u32,
        to_server: bool,
        time: f64,
        segment: &Segment<'_>,
        sink: &mut impl StreamSink,
    ) -> bool {
        let Some(connection) = self.slots.get_mut(slot as usize).and_then(Option::as_mut) else { return false };
        let (stream, peer) = connection.streams(to_server);
        if !stream.pending.is_empty() || !peer.pending.is_empty() || stream.fin_position.is_some() {
            return false;
        }
        let (Some(base), Some(peer_base)) = (stream.base_seq, peer.base_seq) else { return false };
        // how far the ACK trails the peer
        let behind = peer_base.wrapping_add(peer.position as u32).wrapping_sub(segment.ack);
        if behind >= HALF_SEQ_SPACE || segment.seq.wrapping_sub(base).wrapping_sub(stream.position as u32) != 0 {
            return false;
        }
        let peer_acked = peer.position - i64::from(behind);
        let start = stream.position;
        stream.position = start.saturating_add(segment.payload.len() as i64);
        self.touch(slot, time);
        if !segment.payload.is_empty() {
            if let Some(connection) = self.connection(slot) {
                let event = StreamEvent::Data { payload: segment.payload, position: delivered(start), peer_acked };
                connection.emit(sink, to_server, time, event);
            }
        }
        true
    }

    /// Close connections idle for longer than the limit (call it as capture time advances).
    pub fn expire(&mut self, now: f64, sink: &mut impl StreamSink) {
        let deadline = now - self.limits.idle_timeout;
        while let Some(oldest) = self.connection(self.oldest) {
            // as the Python's `last_seen >= deadline` (a NaN time expires)
            if matches!(oldest.last_seen.partial_cmp(&deadline), Some(Ordering::Greater | Ordering::Equal)) {
                break;
            }
            self.counters.expired_connections += 1;
            self.close(self.oldest, now, sink);
        }
    }

    pub fn close_all(&mut self, now: f64, sink: &mut impl StreamSink) {
        while self.oldest != NIL {
            self.close(self.oldest, now, sink);
        }
    }

    /// Close the least recently seen connection (delivering what it holds, its holes as gaps), counted as
    /// shed; false when none is open. The memory budget calls it.
    pub fn shed_oldest(&mut self, now: f64, sink: &mut impl StreamSink) -> bool {
        if self.oldest == NIL {
            return false;
        }
        self.counters.shed_connections += 1;
        self.close(self.oldest, now, sink);
        true
    }

    /// When the least recently seen connection was last seen (the one `shed_oldest` would close).
    pub fn oldest_seen(&self) -> Option<f64> {
        self.connection(self.oldest).map(|connection| connection.last_seen)
    }

    /// Connections open now.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes this stage holds now: out-of-order payloads plus its per-connection state, for the budget.
    /// (The slab and the index keep the capacity of their peak, at most `max_connections`, after closes.)
    pub fn held_bytes(&self) -> usize {
        self.pending_footprint + self.len() * BUDGETED_CONNECTION_BYTES
    }

    /// The open connections, least recently seen first, each with the payload bytes its two directions
    /// (to the server, to the client) hold back: for tests and diagnostics.
    pub fn connections(&self) -> impl Iterator<Item = (ConnectionInfo, usize, usize)> + '_ {
        let mut slot = self.oldest;
        std::iter::from_fn(move || {
            let connection = self.connection(slot)?;
            slot = connection.newer;
            Some((connection.info(), connection.to_server.pending_bytes, connection.to_client.pending_bytes))
        })
    }

    fn connection(&self, slot: u32) -> Option<&Connection> {
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }

    fn open(&mut self, tuple: FourTuple, time: f64, sink: &mut impl StreamSink) -> u32 {
        if self.index.len() >= self.limits.max_connections && self.oldest != NIL {
            self.counters.evicted_connections += 1;
            self.close(self.oldest, time, sink);
        }
        let connection = Connection {
            tuple,
            id: self.next_id,
            last_seen: time,
            saw_syn: false,
            to_server: HalfStream::default(),
            to_client: HalfStream::default(),
            older: NIL,
            newer: NIL,
        };
        self.next_id += 1;
        self.counters.connections += 1;
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                if let Some(free) = self.slots.get_mut(slot as usize) {
                    *free = Some(connection);
                }
                slot
            }
            None => {
                // below NIL: at most max_connections slots are ever in use, and it is clamped below NIL
                let slot = self.slots.len() as u32;
                self.slots.push(Some(connection));
                slot
            }
        };
        self.index.insert(tuple, slot);
        self.link_newest(slot);
        slot
    }

    /// End a connection: what is still held back is delivered, with its holes as gaps.
    fn close(&mut self, slot: u32, time: f64, sink: &mut impl StreamSink) {
        self.close_reset(slot, time, None, sink);
    }

    /// End a connection; `reset_by_client`: Some when a reset ends it (true: the client's).
    fn close_reset(&mut self, slot: u32, time: f64, reset_by_client: Option<bool>, sink: &mut impl StreamSink) {
        let Some(connection) = self.slots.get_mut(slot as usize).and_then(Option::as_mut) else { return };
        let footprint = connection.footprint();
        connection.finish(time, reset_by_client, &mut self.counters, sink);
        let tuple = connection.tuple;
        self.pending_footprint -= footprint;
        self.unlink(slot);
        self.index.remove(&tuple);
        if let Some(freed) = self.slots.get_mut(slot as usize) {
            *freed = None;
        }
        self.free_slots.push(slot);
    }

    /// The connection was seen now: the most recent in the LRU order.
    fn touch(&mut self, slot: u32, time: f64) {
        if let Some(connection) = self.slots.get_mut(slot as usize).and_then(Option::as_mut) {
            connection.last_seen = time;
        }
        if self.newest != slot {
            self.unlink(slot);
            self.link_newest(slot);
        }
    }

    fn links(&mut self, slot: u32) -> Option<(&mut u32, &mut u32)> {
        let connection = self.slots.get_mut(slot as usize)?.as_mut()?;
        Some((&mut connection.older, &mut connection.newer))
    }

    fn unlink(&mut self, slot: u32) {
        let Some((older, newer)) = self.links(slot) else { return };
        let (before, after) = (*older, *newer);
        (*older, *newer) = (NIL, NIL);
        match self.links(before) {
            Some((_, newer)) => *newer = after,
            None => self.oldest = after,
        }
        match self.links(after) {
            Some((older, _)) => *older = before,
            None => self.newest = before,
        }
    }

    fn link_newest(&mut self, slot: u32) {
        let previous = self.newest;
        let Some((older, _)) = self.links(slot) else { return };
        *older = previous;
        match self.links(previous) {
            Some((_, newer)) => *newer = slot,
            None => self.oldest = slot,
        }
        self.newest = slot;
    }
}

#[cfg(test)]
mod tests {
    //! The Python stage's tests, case for case: each plays a small conversation by hand (sequence and
    //! acknowledgement numbers included) and checks the byte streams and counters.

    use super::*;

    const CLIENT: [u8; 4] = [10, 0, 0, 1];
    const SERVER: [u8; 4] = [10, 0, 0, 2];
    const CLIENT_PORT: u16 = 40000;
    const SERVER_PORT: u16 = 8000;
    const PSH: u8 = 0x08;
    const CLIENT_ISN: u32 = 1000;
    const SERVER_ISN: u32 = 5000;

    #[derive(Clone, Debug, PartialEq)]
    enum Kind {
        Data(Vec<u8>, i64),
        Gap(u64),
        End,
        Closed,
    }
    use Kind::{Closed, End};

    #[derive(Clone, Debug)]
    struct Recorded {
        info: ConnectionInfo,
        to_server: bool,
        time: f64,
        kind: Kind,
        position: u64,
    }

    #[derive(Default)]
    struct Recorder(Vec<Recorded>);

    impl StreamSink for Recorder {
        fn event(&mut self, connection: &ConnectionInfo, to_server: bool, time: f64, event: StreamEvent<'_>) {
            let (kind, position) = match event {
                StreamEvent::Data { payload, position, peer_acked } => {
                    (Kind::Data(payload.to_vec(), peer_acked), position)
                }
                StreamEvent::Gap { lost, position } => (Kind::Gap(lost), position),
                StreamEvent::End { position } => (End, position),
                StreamEvent::Closed => (Closed, 0),
            };
            self.0.push(Recorded { info: *connection, to_server, time, kind, position });
        }
    }

    /// The reassembler and every event it delivered.
    struct Harness {
        reassembler: TcpReassembler,
        events: Vec<Recorded>,
    }

    impl Harness {
        fn new(limits: ReassemblyLimits) -> Harness {
            Harness { reassembler: TcpReassembler::new(&[SERVER_PORT], limits), events: Vec::new() }
        }

        fn feed(&mut self, time: f64, segment: &Segment<'_>) -> Vec<Recorded> {
            let mut recorder = Recorder::default();
            self.reassembler.feed(time, segment, &mut recorder);
            self.record(recorder)
        }

        fn expire(&mut self, now: f64) -> Vec<Recorded> {
            let mut recorder = Recorder::default();
            self.reassembler.expire(now, &mut recorder);
            self.record(recorder)
        }

        fn close_all(&mut self, now: f64) -> Vec<Recorded> {
            let mut recorder = Recorder::default();
            self.reassembler.close_all(now, &mut recorder);
            self.record(recorder)
        }

        fn record(&mut self, recorder: Recorder) -> Vec<Recorded> {
            self.events.extend(recorder.0.iter().cloned());
            recorder.0
        }

        fn counters(&self) -> ReassemblyCounters {
            self.reassembler.counters
        }
    }

    /// One connection driven by hand; `client_next`/`server_next` are the sequence numbers each side
    /// acknowledges by default.
    #[derive(Clone, Copy)]
    struct Conversation {
        client_port: u16,
        client_isn: u32,
        server_isn: u32,
    }

    impl Default for Conversation {
        fn default() -> Self {
            Conversation { client_port: CLIENT_PORT, client_isn: CLIENT_ISN, server_isn: SERVER_ISN }
        }
    }

    #[derive(Clone, Copy)]
    struct Send<'a> {
        payload: &'a [u8],
        flags: u8,
        ack: Option<u32>,
        time: f64,
    }

    const PLAIN: Send<'static> = Send { payload: b"", flags: TCP_ACK | PSH, ack: None, time: 0.0 };

    fn data(payload: &[u8]) -> Send<'_> {
        Send { payload, ..PLAIN }
    }

    fn flagged(flags: u8) -> Send<'static> {
        Send { flags, ..PLAIN }
    }

    impl Send<'_> {
        fn ack(self, ack: u32) -> Self {
            Send { ack: Some(ack), ..self }
        }
        fn flags(self, flags: u8) -> Self {
            Send { flags, ..self }
        }
        fn at(self, time: f64) -> Self {
            Send { time, ..self }
        }
    }

    impl Conversation {
        fn port(client_port: u16) -> Conversation {
            Conversation { client_port, ..Conversation::default() }
        }
        fn client_next(&self) -> u32 {
            self.client_isn.wrapping_add(1)
        }
        fn server_next(&self) -> u32 {
            self.server_isn.wrapping_add(1)
        }
        /// Sequence number of client stream byte `offset`.
        fn client_at(&self, offset: u32) -> u32 {
            self.client_next().wrapping_add(offset)
        }
        fn server_at(&self, offset: u32) -> u32 {
            self.server_next().wrapping_add(offset)
        }

        fn client_sends(&self, harness: &mut Harness, seq: u32, send: Send<'_>) -> Vec<Recorded> {
            let segment = Segment {
                src: Address::new(&CLIENT),
                sport: self.client_port,
                dst: Address::new(&SERVER),
                dport: SERVER_PORT,
                seq,
                ack: send.ack.unwrap_or(self.server_next()),
                flags: send.flags,
                payload: send.payload,
            };
            harness.feed(send.time, &segment)
        }

        fn server_sends(&self, harness: &mut Harness, seq: u32, send: Send<'_>) -> Vec<Recorded> {
            let segment = Segment {
                src: Address::new(&SERVER),
                sport: SERVER_PORT,
                dst: Address::new(&CLIENT),
                dport: self.client_port,
                seq,
                ack: send.ack.unwrap_or(self.client_next()),
                flags: send.flags,
                payload: send.payload,
            };
            harness.feed(send.time, &segment)
        }

        fn handshake(&self, harness: &mut Harness, time: f64) -> Vec<Recorded> {
            let mut events = self.client_sends(harness, self.client_isn, flagged(TCP_SYN).ack(0).at(time));
            let syn_ack = flagged(TCP_SYN | TCP_ACK).ack(self.client_next()).at(time);
            events.extend(self.server_sends(harness, self.server_isn, syn_ack));
            events.extend(self.client_sends(harness, self.client_next(), flagged(TCP_ACK).at(time)));
            events
        }
    }

    fn new() -> (Harness, Conversation) {
        new_with(ReassemblyLimits::default(), Conversation::default())
    }

    fn new_with(limits: ReassemblyLimits, conversation: Conversation) -> (Harness, Conversation) {
        (Harness::new(limits), conversation)
    }

    /// (data or gap, position) of one direction's DATA and GAP events, in order; peer_acked left out.
    #[derive(Debug, PartialEq)]
    enum Piece {
        Data(Vec<u8>, u64),
        Gap(u64, u64),
    }

    fn stream(events: &[Recorded], to_server: bool) -> Vec<Piece> {
        events
            .iter()
            .filter(|event| event.to_server == to_server)
            .filter_map(|event| match &event.kind {
                Kind::Data(payload, _) => Some(Piece::Data(payload.clone(), event.position)),
                Kind::Gap(lost) => Some(Piece::Gap(*lost, event.position)),
                _ => None,
            })
            .collect()
    }

    fn d(payload: &[u8], position: u64) -> Piece {
        Piece::Data(payload.to_vec(), position)
    }

    fn received(events: &[Recorded], to_server: bool) -> Vec<u8> {
        stream(events, to_server)
            .into_iter()
            .flat_map(|piece| match piece {
                Piece::Data(payload, _) => payload,
                Piece::Gap(..) => Vec::new(),
            })
            .collect()
    }

    fn positions(events: &[Recorded]) -> Vec<u64> {
        stream(events, true)
            .iter()
            .map(|piece| match piece {
                Piece::Data(_, position) | Piece::Gap(_, position) => *position,
            })
            .collect()
    }

    #[derive(Debug, PartialEq)]
    enum K {
        Data,
        Gap,
        End,
        Closed,
    }

    fn kinds(events: &[Recorded]) -> Vec<K> {
        events
            .iter()
            .map(|event| match event.kind {
                Kind::Data(..) => K::Data,
                Kind::Gap(_) => K::Gap,
                End => K::End,
                Closed => K::Closed,
            })
            .collect()
    }

    fn permutations(items: &[usize]) -> Vec<Vec<usize>> {
        if items.len() <= 1 {
            return vec![items.to_vec()];
        }
        let mut all = Vec::new();
        for (i, &first) in items.iter().enumerate() {
            let mut rest = items.to_vec();
            rest.remove(i);
            for mut tail in permutations(&rest) {
                tail.insert(0, first);
                all.push(tail);
            }
        }
        all
    }

    /// A small deterministic shuffle (xorshift), for the hostile orders.
    fn shuffle<T>(items: &mut [T], mut state: u64) {
        for i in (1..items.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            items.swap(i, (state % (i as u64 + 1)) as usize);
        }
    }

    #[test]
    fn in_order_segments_are_delivered_with_their_positions() {
        let (mut h, c) = new();
        c.handshake(&mut h, 0.0);
        for (offset, chunk) in [(0, &b"GET / HT"[..]), (8, b"TP/1.1\r\n"), (16, b"\r\n")] {
            c.client_sends(&mut h, c.client_at(offset), data(chunk));
        }
        assert_eq!(stream(&h.events, true), [d(b"GET / HT", 0), d(b"TP/1.1\r\n", 8), d(b"\r\n", 16)]);
    }

    const CHUNKS: [(u32, &[u8]); 4] = [(0, b"aaaa"), (4, b"bbbb"), (8, b"cccc"), (12, b"dd")];

    #[test]
    fn out_of_order_segments_are_delivered_in_sequence_order() {
        for order in permutations(&[0, 1, 2, 3]) {
            let (mut h, c) = new();
            c.handshake(&mut h, 0.0);
            for index in order {
                let (offset, chunk) = CHUNKS[index];
                c.client_sends(&mut h, c.client_at(offset), data(chunk));
            }
            assert_eq!(received(&h.events, true), b"aaaabbbbccccdd");
            let positions = positions(&h.events);
            assert!(positions.windows(2).all(|pair| pair[0] < pair[1]));
            assert_eq!(h.counters().gaps, 0);
        }
    }

    #[test]
    fn held_back_segments_wait_for_the_hole() {
        let (mut h, c) = new();
        c.handshake(&mut h, 0.0);
        assert!(c.client_sends(&mut h, c.client_at(4), data(b"bbbb")).is_empty());
        let delivered = c.client_sends(&mut h, c.client_at(0), data(b"aaaa"));
        assert_eq!(stream(&delivered, true), [d(b"aaaa", 0), d(b"bbbb", 4)]);
    }

    #[test]
    fn a_held_back_segment_is_delivered_with_what_its_own_ack_said() {
        let (mut h, c) = new();
        c.handshake(&mut h, 0.0);
        c.server_sends(&mut h, c.server_at(0), data(b"hello"));
        c.client_sends(&mut h, c.client_at(4), data(b"bbbb").ack(c.server_at(5)));
        let delivered = c.client_sends(&mut h, c.client_at(0), data(b"aaaa").ack(c.server_at(0)));
        let kinds: Vec<Kind> = delivered.iter().map(|event| event.kind.clone()).collect();
        // pairing reads in the ACKs which answers the client had when it sent each request
        assert_eq!(kinds, [Kind::Data(b"aaaa".to_vec(), 0), Kind::Data(b"bbbb".to_vec(), 5)]);
    }

    #[test]
    fn exact_duplicates_and_retransmissions_are_dropped_and_counted() {
        let (mut h, c) = new();
        c.handshake(&mut h, 0.0);
        c.client_sends(&mut h, c.client_at(0), data(b"hello "));
        c.client_sends(&mut h, c.client_at(6), data(b"world"));
        assert!(c.client_sends(&mut h, c.client_at(0), data(b"hello ")).is_empty());
        assert!(c.client_sends(&mut h, c.client_at(2), data(b"llo")).is_empty()); // a retransmitted part
        assert!(c.client_sends(&mut h, c.client_at(0), data(b"hello world")).is_empty()); // repacketised
        assert_eq!(received(&h.events, true), b"hello world");
        assert_eq!(h.counters().duplicate_segments, 3);
    }

    #[test]
    fn a_held_back_segment_seen_twice_is_delivered_once_and_counted() {
        let (mut h, c) = new();
        c.handshake(&mut h, 0.0);
        c.client_sends(&mut h, c.client_at(5), data(b"world"));
        c.client_sends(&mut h, c.client_at(5), data(b"world"));
        c.client_sends(&mut h, c.client_at(0), data(b"hello"));
        assert_eq!(received(&h.events, true), b"helloworld");
        assert_eq!(h.counters().duplicate_segments, 1);
    }

    #[test]
    fn a_longer_segment_at_a_held_position_replaces_it() {
        let (mut h, c) = new();
        c.handshake(&mut h, 0.0);
        c.client_sends(&mut h, c.client_at(5), data(b"wor"));
        c.client_sends(&mut h, c.client_at(5), data(b"world"));
        c.client_sends(&mut h, c.client_at(0), data(b"hello"));
        assert_eq!(stream(&h.events, true), [d(b"hello", 0), d(b"world", 5)]);
        assert_eq!(h.counters().duplicate_segments, 0);
    }

    #[test]
    fn overlapping_retransmission_is_trimmed_to_the_new_bytes() {
        let (mut h, c) = new();
        c.handshake(&mut h, 0.0);
        c.client_sends(&mut h, c.client_at(0), data(b"0123456789"));
        let delivered = c.client_sends(&mut h, c.client_at(5), data(b"56789abcde"));
        assert_eq!(stream(&delivered, true), [d(b"abcde", 10)]);
        assert_eq!(received(&h.events, true), b"0123456789abcde");
        assert_eq!(h.counters().duplicate_segments, 0);
    }

    #[test]
    fn overlapping_held_back_segments_are_stitched_without_repeating_bytes() {
        let (mut h, c) = new();
        c.handshake(&mut h, 0.0);
        c.client_sends(&mut h, c.client_at(10), data(b"abcdefghij"));
        c.client_sends(&mut h, c.client_at(15), data(b"fghijKLMNO"));
        c.client_sends(&mut h, c.client_at(0), data(b"0123456789"));
        assert_eq!(received(&h.events, true), b"0123456789abcdefghijKLMNO");
    }

    #[test]
    fn sequence_numbers_wrapping_past_2_32() {
        for order in [[0, 1, 2], [2, 1, 0], [1, 0, 2]] {
            let conversation = Conversation { client_isn: 0xFFFF_FFF0, ..Conversation::default() };
            let (mut h, c) = new_with(ReassemblyLimits::default(), conversation);
            c.handshake(&mut h, 0.0);
            let chunks: [(u32, &[u8]); 3] = [(0, &[b'A'; 10]), (10, &[b'B'; 10]), (20, &[b'C'; 10])];
            assert!(c.client_at(10) > c.client_at(20)); // the second chunk crosses 2^32
            for index in order {
                let (offset, chunk) = chunks[index];
                c.client_sends(&mut h, c.client_at(offset), data(chunk));
            }
            assert_eq!(received(&h.events, true), [[b'A'; 10], [b'B'; 10], [b'C'; 10]].concat());
            assert_eq!(positions(&h.events), [0, 10, 20]);
            // the server's ACK across the wrap acknowledges exactly what was sent: no gap
            c.server_sends(&mut h, c.server_at(0), data(b"HTTP/1.1 204 No Content\r\n\r\n").ack(c.client_at(30)));
            assert_eq!(h.counters().gaps, 0);
        }
    }

    #[test]
    fn a_hole_becomes_a_gap_as_soon_as_the_peer_acknowledges_beyond_it() {
        let (mut h, c) = new();
        c.handshake(&mut h, 0.0);
        c.client_sends(&mut h, c.client_at(0), data(b"0123456789"));
        c.client_sends(&mut h, c.client_at(20), data(b"KLMNOPQRST")); // bytes 10..19 never captured
        assert!(c.server_sends(&mut h, c.server_at(0), flagged(TCP_ACK).ack(c.client_at(10))).is_empty());
        let declared = c.server_sends(&mut h, c.server_at(0), flagged(TCP_ACK).ack(c.client_at(30)));
        assert_eq!(stream(&declared, true), [Piece::Gap(10, 10), d(b"KLMNOPQRST", 20)]);
        assert_eq!((h.counters().gaps, h.counters().gap_bytes), (1, 10));
    }

    #[test]
    fn bytes_acknowledged_but_never_seen_are_a_gap_at_the_end_of_the_stream() {
        let (mut h, c) = new();
        c.handshake(&mut h, 0.0);
        c.client_sends(&mut h, c.client_at(0), data(b"0123456789"));
        let declared = c.server_sends(&mut h, c.server_at(0), data(b"HTTP/1.1 200 OK\r\n").ack(c.client_at(25)));
        assert_eq!(stream(&declared, true), [Piece::Gap(15, 10)]);
        assert_eq!(received(&declared, false), b"HTTP/1.1 200 OK\r\n");
        assert_eq!(h.counters().gap_bytes, 15);
    }

    #[test]
    fn a_stream_without_syn_starts_at_its_first_segment_and_the_peer_at_the_acknowledged_byte() {
        let (mut h, c) = new();
        let first = c.client_sends(&mut h, 777_777, data(b"GET /a HTTP/1.1\r\n\r\n").ack(999_999));
        assert_eq!(stream(&first, true), [d(b"GET /a HTTP/1.1\r\n\r\n", 0)]);
        assert!(!first[0].info.saw_syn);
        assert_eq!(first[0].info.to_server_base_seq, Some(777_777));
        // the server's answer starts at the byte the client acknowledged; an older retransmitted part is trimmed
        let answer = c.server_sends(&mut h, 999_990, data(b"#########HTTP/1.1 200 OK\r\n").ack(777_777 + 19));
        assert_eq!(stream(&answer, false), [d(b"HTTP/1.1 200 OK\r\n", 0)]);
        assert_eq!((h.counters().connections, h.counters().gaps), (1, 0));
    }

    #[test]
    fn server_data_seen_first_starts_the_client_stream_at_its_ack() {
        let (mut h, c) = new();
        let answer = c.server_sends(&mut h, 50_000, data(b"HTTP/1.1 200 OK\r\n").ack(60_000));
        assert_eq!(answer[0].info.to_server_base_seq, Some(60_000));
        let later = c.client_sends(&mut h, 60_000, data(b"GET /next HTTP/1.1\r\n\r\n").ack(50_017));
        assert_eq!(stream(&later, true), [d(b"GET /next HTTP/1.1\r\n\r\n", 0)]);
    }

    #[test]
    fn fin_ends_a_direction_only_after_all_its_data() {
        let (mut h, c) = new();
        c.handshake(&mut h, 0.0);
        // the FIN overtakes the last data segment
        assert!(c.client_sends(&mut h, c.client_at(5), data(b"world").flags(TCP_ACK | TCP_FIN)).is_empty());
        let delivered = c.client_sends(&mut h, c.client_at(0), data(b"hello"));
        assert_eq!(kinds(&delivered), [K::Data, K::Data, K::End]);
        assert!(delivered.iter().all(|event| event.to_server));
        assert_eq!(delivered[2].position, 10);
    }

    #[test]
    fn fin_in_order_ends_the_direction_at_once() {
        let (mut h, c) = new();
        c.handshake(&mut h, 0.0);
        c.client_sends(&mut h, c.client_at(0), data(b"hello"));
        let ended = c.client_sends(&mut h, c.client_at(5), flagged(TCP_ACK | TCP_FIN));
        assert_eq!(kinds(&ended), [K::End]);
        assert_eq!(ended[0].position, 5);
    }

    #[test]
    fn bare_fin_overtaking_the_last_data_ends_the_direction_after_it() {
        let (mut h, c) = new();
        c.handshake(&mut h, 0.0);
        c.client_sends(&mut h, c.client_at(0), data(b"hello"));
        assert!(c.client_sends(&mut h, c.client_at(10), flagged(TCP_ACK | TCP_FIN)).is_empty());
        let delivered = c.client_sends(&mut h, c.client_at(5), data(b"world"));
        assert_eq!(kinds(&delivered), [K::Data, K::End]);
        let closing = c.server_sends(&mut h, c.server_at(0), flagged(TCP_ACK | TCP_FIN).ack(c.client_at(11)));
        assert_eq!(kinds(&closing), [K::End, K::Closed]);
        assert_eq!(h.reassembler.len(), 0);
    }

    #[test]
    fn both_fins_close_the_connection_and_forget_it() {
        let (mut h, c) = new();
        c.handshake(&mut h, 0.0);
        c.client_sends(&mut h, c.client_at(0), data(b"GET / HTTP/1.1\r\n\r\n"));
        c.server_sends(&mut h, c.server_at(0), data(b"HTTP/1.1 204 No Content\r\n\r\n").ack(c.client_at(18)));
        c.client_sends(&mut h, c.client_at(18), flagged(TCP_ACK | TCP_FIN).ack(c.server_at(27)));
        let closing = c.server_sends(&mut h, c.server_at(27), flagged(TCP_ACK | TCP_FIN).ack(c.client_at(19)));
        assert_eq!(kinds(&closing), [K::End, K::Closed]);
        assert_eq!(h.reassembler.len(), 0);
        // the last ACK of the teardown does not bring the connection back
        assert!(c.client_sends(&mut h, c.client_at(19), flagged(TCP_ACK).ack(c.server_at(28))).is_empty());
        assert_eq!((h.reassembler.len(), h.counters().connections), (0, 1));
        assert_eq!(h.reassembler.held_bytes(), 0);
    }

    #[test]
    fn fin_after_a_hole_ends_once_the_peer_acknowledges_it() {
        let (mut h, c) = new();
        c.handshake(&mut h, 0.0);
        c.client_sends(&mut h, c.client_at(0), data(b"0123456789"));
        c.client_sends(&mut h, c.client_at(20), data(b"KLMNOPQRST").flags(TCP_ACK | TCP_FIN)); // 10..19 lost
        let acknowledged = c.server_sends(&mut h, c.server_at(0), flagged(TCP_ACK).ack(c.client_at(31)));
        assert_eq!(kinds(&acknowledged), [K::Gap, K::Data, K::End]);
        let closing = c.server_sends(&mut h, c.server_at(0), flagged(TCP_ACK | TCP_FIN).ack(c.client_at(31)));
        assert!(kinds(&closing).contains(&K::Closed));
        assert_eq!(h.reassembler.len(), 0);
    }

    #[test]
    fn rst_closes_the_connection_after_delivering_what_was_held() {
        let (mut h, c) = new();
        c.handshake(&mut h, 0.0);
        c.client_sends(&mut h, c.client_at(0), data(b"abc"));
        c.client_sends(&mut h, c.client_at(6), data(b"ghi")); // 3..5 never captured
        let reset = c.server_sends(&mut h, c.server_at(0), flagged(TCP_RST).ack(0));
        let kinds: Vec<(bool, Kind)> = reset.iter().map(|event| (event.to_server, event.kind.clone())).collect();
        // the reset ends both streams, the resetting server's first; the held segment keeps its own ACK
        let expected =
            [(true, Kind::Gap(3)), (true, Kind::Data(b"ghi".to_vec(), 0)), (false, End), (true, End), (true, Closed)];
        assert_eq!(kinds, expected);
        assert_eq!(h.reassembler.len(), 0);
    }

    #[test]
    fn a_client_reset_ends_the_clients_stream_first() {
        let (mut h, c) = new();
        c.handshake(&mut h, 0.0);
        c.client_sends(&mut h, c.client_at(0), data(b"abc"));
        let reset = c.client_sends(&mut h, c.client_at(3), flagged(TCP_RST));
        let ends: Vec<bool> = reset.iter().filter(|event| event.kind == End).map(|event| event.to_server).collect();
        assert_eq!(ends, [true, false]);
    }

    #[test]
    fn a_new_syn_on_a_reused_four_tuple_starts_a_new_connection() {
        let (mut h, c) = new();
        c.handshake(&mut h, 0.0);
        c.client_sends(&mut h, c.client_at(0), data(b"GET /old HTTP/1.1\r\n\r\n"));
        let old = h.events.last().map(|event| event.info.id);
        let reused = Conversation { client_isn: 900_000, server_isn: 700_000, ..Conversation::default() };
        let restarted = reused.handshake(&mut h, 1.0);
        assert_eq!(kinds(&restarted)[0], K::Closed);
        assert_eq!(Some(restarted[0].info.id), old);
        let delivered = reused.client_sends(&mut h, reused.client_at(0), data(b"GET /new HTTP/1.1\r\n\r\n").at(1.0));
        assert_eq!(stream(&delivered, true), [d(b"GET /new HTTP/1.1\r\n\r\n", 0)]);
        assert_ne!(Some(delivered[0].info.id), old);
        assert_eq!(delivered[0].info.to_server_base_seq, Some(900_001));
        assert_eq!((h.counters().connections, h.reassembler.len()), (2, 1));
    }

    #[test]
    fn a_retransmitted_syn_is_not_a_new_connection() {
        let (mut h, c) = new();
        c.handshake(&mut h, 0.0);
        c.client_sends(&mut h, c.client_at(0), data(b"abc"));
        assert!(c.client_sends(&mut h, CLIENT_ISN, flagged(TCP_SYN).ack(0)).is_empty());
        assert!(c.server_sends(&mut h, SERVER_ISN, flagged(TCP_SYN | TCP_ACK).ack(c.client_at(0))).is_empty());
        c.client_sends(&mut h, c.client_at(3), data(b"def"));
        assert_eq!(received(&h.events, true), b"abcdef");
        assert_eq!(h.counters().connections, 1);
    }

    #[test]
    fn a_new_syn_after_a_clean_close_starts_over() {
        let (mut h, c) = new();
        c.handshake(&mut h, 0.0);
        c.client_sends(&mut h, c.client_at(0), flagged(TCP_ACK | TCP_FIN));
        c.server_sends(&mut h, c.server_at(0), flagged(TCP_ACK | TCP_FIN).ack(c.client_at(1)));
        let again = Conversation { client_isn: CLIENT_ISN + 100_000, ..Conversation::default() };
        again.handshake(&mut h, 0.0);
        assert_eq!(stream(&again.client_sends(&mut h, again.client_at(0), data(b"x")), true), [d(b"x", 0)]);
        assert_eq!(h.counters().connections, 2);
    }

    #[test]
    fn max_connections_evicts_the_least_recently_seen() {
        let limits = ReassemblyLimits { max_connections: 2, ..ReassemblyLimits::default() };
        let mut h = Harness::new(limits);
        let (first, second, third) = (Conversation::port(40001), Conversation::port(40002), Conversation::port(40003));
        first.handshake(&mut h, 1.0);
        second.handshake(&mut h, 2.0);
        first.client_sends(&mut h, first.client_at(0), data(b"still here").at(3.0));
        let opened = third.handshake(&mut h, 4.0);
        let closed: Vec<u16> = opened.iter().filter(|e| e.kind == Closed).map(|e| e.info.client_port).collect();
        assert_eq!(closed, [40002]);
        assert_eq!(h.counters().evicted_connections, 1);
        assert_eq!(h.reassembler.len(), 2);
        let more = first.client_sends(&mut h, first.client_at(10), data(b"!").at(5.0));
        assert_eq!(stream(&more, true), [d(b"!", 10)]);
        assert_eq!(h.counters().connections, 3);
    }

    #[test]
    fn idle_connections_expire_and_are_counted() {
        let mut h = Harness::new(ReassemblyLimits { idle_timeout: 10.0, ..ReassemblyLimits::default() });
        let (quiet, busy) = (Conversation::port(40001), Conversation::port(40002));
        quiet.handshake(&mut h, 0.0);
        busy.handshake(&mut h, 0.0);
        busy.client_sends(&mut h, busy.client_at(0), data(b"x").at(8.0));
        assert!(h.expire(9.0).is_empty());
        let expired = h.expire(11.0);
        let closed: Vec<(K, u16)> =
            kinds(&expired).into_iter().zip(expired.iter().map(|e| e.info.client_port)).collect();
        assert_eq!(closed, [(K::Closed, 40001)]);
        assert_eq!(expired[0].time, 11.0);
        assert_eq!(h.counters().expired_connections, 1);
        assert_eq!(h.reassembler.len(), 1);
    }

    #[test]
    fn expiry_delivers_held_bytes_with_their_holes_before_closing() {
        let mut h = Harness::new(ReassemblyLimits { idle_timeout: 10.0, ..ReassemblyLimits::default() });
        let c = Conversation::default();
        c.handshake(&mut h, 0.0);
        c.client_sends(&mut h, c.client_at(0), data(b"abc"));
        c.client_sends(&mut h, c.client_at(5), data(b"fg"));
        let expired = h.expire(100.0);
        assert_eq!(stream(&expired, true), [Piece::Gap(2, 3), d(b"fg", 5)]);
        assert_eq!(kinds(&expired).last(), Some(&K::Closed));
    }

    #[test]
    fn too_many_held_back_bytes_force_a_gap_instead_of_growing() {
        let limit = 100;
        let mut h =
            Harness::new(ReassemblyLimits { max_pending_bytes_per_stream: limit, ..ReassemblyLimits::default() });
        let c = Conversation::default();
        c.handshake(&mut h, 0.0);
        c.client_sends(&mut h, c.client_at(0), data(&[b'0'; 10]));
        let mut expected = vec![b'0'; 10];
        for offset in (20..220).step_by(40) {
            // bytes 10..19 lost; 200 bytes arrive behind the hole
            let chunk = [b'A' + (offset / 40) as u8; 40];
            c.client_sends(&mut h, c.client_at(offset), data(&chunk));
            expected.extend_from_slice(&chunk);
            let held: Vec<usize> = h.reassembler.connections().map(|(_, to_server, _)| to_server).collect();
            assert!(held.len() == 1 && held[0] <= limit);
        }
        assert!(h.counters().pending_overflows >= 1);
        assert_eq!(stream(&h.events, true)[1], Piece::Gap(10, 10));
        assert_eq!(received(&h.events, true), expected);
    }

    const HELD_SEGMENTS: u32 = 50_000; // quadratic draining would show as a very slow test

    #[test]
    fn a_request_whose_first_byte_comes_last_after_many_held_segments() {
        let (mut h, c) = new();
        c.handshake(&mut h, 0.0);
        let content: Vec<u8> = (0..HELD_SEGMENTS).map(|i| i as u8).collect();
        let mut offsets: Vec<u32> = (1..HELD_SEGMENTS).collect();
        shuffle(&mut offsets, 7);
        for &offset in &offsets {
            let byte = &content[offset as usize..offset as usize + 1];
            c.client_sends(&mut h, c.client_at(offset), data(byte));
        }
        assert!(stream(&h.events, true).is_empty());
        assert!(h.reassembler.held_bytes() >= (HELD_SEGMENTS as usize - 1) * (1 + HELD_SEGMENT_OVERHEAD));
        c.client_sends(&mut h, c.client_at(0), data(&content[..1]));
        assert_eq!(positions(&h.events), (0..u64::from(HELD_SEGMENTS)).collect::<Vec<_>>());
        assert_eq!(received(&h.events, true), content);
        assert_eq!((h.counters().gaps, h.counters().duplicate_segments), (0, 0));
        assert_eq!(h.reassembler.held_bytes(), BUDGETED_CONNECTION_BYTES);
    }

    #[test]
    fn many_held_segments_with_holes_become_gaps_in_order_when_acknowledged() {
        let (mut h, c) = new();
        c.handshake(&mut h, 0.0);
        for offset in (1..2 * HELD_SEGMENTS).rev().step_by(2) {
            // odd bytes only, last first: every even byte is lost
            c.client_sends(&mut h, c.client_at(offset), data(b"x"));
        }
        c.server_sends(&mut h, c.server_at(0), flagged(TCP_ACK).ack(c.client_at(2 * HELD_SEGMENTS)));
        let expected: Vec<Piece> = (0..u64::from(2 * HELD_SEGMENTS))
            .step_by(2)
            .flat_map(|offset| [Piece::Gap(1, offset), d(b"x", offset + 1)])
            .collect();
        assert_eq!(stream(&h.events, true), expected);
        assert_eq!(h.counters().gaps, u64::from(HELD_SEGMENTS));
    }

    #[test]
    fn a_bare_control_segment_of_an_unknown_connection_creates_nothing() {
        for flags in [TCP_ACK, TCP_ACK | TCP_FIN, TCP_RST, TCP_ACK | TCP_RST] {
            let (mut h, c) = new();
            assert!(c.client_sends(&mut h, 123_456, flagged(flags).ack(654_321)).is_empty());
            assert!(c.server_sends(&mut h, 654_321, flagged(flags).ack(123_456)).is_empty());
            assert_eq!((h.reassembler.len(), h.counters().connections), (0, 0));
        }
    }

    #[test]
    fn segments_of_other_ports_are_counted_and_ignored() {
        let (mut h, _) = new();
        let segment = Segment {
            src: Address::new(&CLIENT),
            sport: 40000,
            dst: Address::new(&SERVER),
            dport: 9999,
            seq: 1,
            ack: 1,
            flags: TCP_ACK | PSH,
            payload: b"GET / HTTP/1.1\r\n\r\n",
        };
        assert!(h.feed(0.0, &segment).is_empty());
        assert_eq!((h.counters().other_ports, h.reassembler.len()), (1, 0));
    }

    #[test]
    fn close_all_closes_every_connection_at_capture_end() {
        let (mut h, _) = new();
        for port in [40001, 40002, 40003] {
            Conversation::port(port).handshake(&mut h, 0.0);
        }
        let closed = h.close_all(5.0);
        let ports: Vec<u16> = closed.iter().filter(|e| e.kind == Closed).map(|e| e.info.client_port).collect();
        assert_eq!(ports, [40001, 40002, 40003]); // least recently seen first
        assert_eq!(h.reassembler.len(), 0);
        assert_eq!(h.reassembler.held_bytes(), 0);
    }

    // --- beyond the Python's cases ---

    #[test]
    fn data_on_a_syn_starts_after_it() {
        let (mut h, c) = new();
        let fast_open = c.client_sends(&mut h, CLIENT_ISN, data(b"GET / HTTP/1.1\r\n\r\n").flags(TCP_SYN).ack(0));
        assert_eq!(stream(&fast_open, true), [d(b"GET / HTTP/1.1\r\n\r\n", 0)]);
        assert!(fast_open[0].info.saw_syn);
        assert_eq!(fast_open[0].info.to_server_base_seq, Some(CLIENT_ISN + 1));
    }

    #[test]
    fn data_carries_the_position_its_ack_acknowledges() {
        let (mut h, c) = new();
        c.handshake(&mut h, 0.0);
        c.client_sends(&mut h, c.client_at(0), data(b"GET / HTTP/1.1\r\n\r\n"));
        let early = c.server_sends(&mut h, c.server_at(0), data(b"HTTP/1.1 ").ack(c.client_at(4)));
        let late = c.server_sends(&mut h, c.server_at(9), data(b"200 OK\r\n\r\n").ack(c.client_at(18)));
        assert_eq!(early[0].kind, Kind::Data(b"HTTP/1.1 ".to_vec(), 4));
        assert_eq!(late[0].kind, Kind::Data(b"200 OK\r\n\r\n".to_vec(), 18));
        let unacknowledged = c.client_sends(&mut h, c.client_at(18), data(b"G").flags(PSH));
        assert_eq!(unacknowledged[0].kind, Kind::Data(b"G".to_vec(), -1));
    }

    #[test]
    fn shedding_closes_the_least_recently_seen_and_counts_it() {
        let (mut h, _) = new();
        let (first, second) = (Conversation::port(40001), Conversation::port(40002));
        first.handshake(&mut h, 0.0);
        second.handshake(&mut h, 1.0);
        second.client_sends(&mut h, second.client_at(4), data(b"held"));
        first.client_sends(&mut h, first.client_at(0), data(b"x").at(2.0));
        assert_eq!(h.reassembler.held_bytes(), 2 * BUDGETED_CONNECTION_BYTES + 4 + HELD_SEGMENT_OVERHEAD);
        let mut recorder = Recorder::default();
        assert!(h.reassembler.shed_oldest(3.0, &mut recorder));
        let shed = std::mem::take(&mut recorder.0);
        assert_eq!(kinds(&shed), [K::Gap, K::Data, K::Closed]);
        assert!(shed.iter().all(|event| event.info.client_port == 40002));
        assert_eq!(h.reassembler.held_bytes(), BUDGETED_CONNECTION_BYTES);
        assert!(h.reassembler.shed_oldest(3.0, &mut recorder));
        assert!(!h.reassembler.shed_oldest(3.0, &mut recorder));
        assert_eq!(h.counters().shed_connections, 2);
        assert_eq!(h.reassembler.held_bytes(), 0);
    }

    /// Counts what it is given, so that the work is not optimised away.
    #[derive(Default)]
    struct Counting {
        events: u64,
        bytes: u64,
    }

    impl StreamSink for Counting {
        fn event(&mut self, _: &ConnectionInfo, _: bool, _: f64, event: StreamEvent<'_>) {
            self.events += 1;
            if let StreamEvent::Data { payload, .. } = event {
                self.bytes += payload.len() as u64;
            }
        }
    }

    /// `cargo test --release -- --ignored --nocapture in_order_throughput`: ~500k in-order segments over 33
    /// connections (requests and responses taking turns, each acknowledging the other).
    #[test]
    #[ignore]
    fn in_order_throughput() {
        const CONNECTIONS: u16 = 33;
        const EXCHANGES: u32 = 7_600; // per connection: 2 data segments each, plus the handshakes
        let (request, response) = ([b'q'; 200], [b'r'; 300]);
        let mut segments = Vec::new();
        let (client, server) = (Address::new(&CLIENT), Address::new(&SERVER));
        let conversations: Vec<Conversation> = (0..CONNECTIONS)
            .map(|i| Conversation {
                client_port: 40000 + i,
                client_isn: u32::from(i) * 7_919_993,
                server_isn: 0xFFFF_0000,
            })
            .collect();
        let segment = |c: &Conversation, to_server: bool, seq: u32, ack: u32, flags: u8, payload| {
            let (src, sport, dst, dport) = if to_server {
                (client, c.client_port, server, SERVER_PORT)
            } else {
                (server, SERVER_PORT, client, c.client_port)
            };
            Segment { src, sport, dst, dport, seq, ack, flags, payload }
        };
        for c in &conversations {
            segments.push(segment(c, true, c.client_isn, 0, TCP_SYN, &[][..]));
            segments.push(segment(c, false, c.server_isn, c.client_next(), TCP_SYN | TCP_ACK, &[][..]));
            segments.push(segment(c, true, c.client_next(), c.server_next(), TCP_ACK, &[][..]));
        }
        for exchange in 0..EXCHANGES {
            for c in &conversations {
                let (sent, answered) = (exchange * 200, exchange * 300);
                segments.push(segment(c, true, c.client_at(sent), c.server_at(answered), TCP_ACK | PSH, &request[..]));
                segments.push(segment(
                    c,
                    false,
                    c.server_at(answered),
                    c.client_at(sent + 200),
                    TCP_ACK | PSH,
                    &response[..],
                ));
            }
        }
        let mut reassembler = TcpReassembler::new(&[SERVER_PORT], ReassemblyLimits::default());
        let mut sink = Counting::default();
        let started = std::time::Instant::now();
        for (i, segment) in segments.iter().enumerate() {
            reassembler.feed(i as f64 * 1e-6, segment, &mut sink);
        }
        let elapsed = started.elapsed();
        println!(
            "{} segments, {} events, {} bytes in {:?}: {:.1} ns per segment",
            segments.len(),
            sink.events,
            sink.bytes,
            elapsed,
            elapsed.as_nanos() as f64 / segments.len() as f64
        );
        assert_eq!(sink.bytes, u64::from(CONNECTIONS) * u64::from(EXCHANGES) * 500);
        assert_eq!(reassembler.counters.gaps, 0);
    }
}
