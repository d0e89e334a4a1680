//! TCP reassembly into one ordered byte stream per direction, by sequence number.
//! (Ported from the Python `agent/tcp/reassembly.py`; its docstrings say why it works as it does.)

use crate::source::frames::{Address, Segment};

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
#[derive(Debug, PartialEq, Eq)]
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

/// Where the reassembler delivers its events (the HTTP stage, or a test collecting them).
pub trait StreamSink {
    fn event(&mut self, connection: &ConnectionInfo, to_server: bool, time: f64, event: StreamEvent<'_>);
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

pub struct TcpReassembler {
    pub counters: ReassemblyCounters,
}

impl TcpReassembler {
    pub fn new(_server_ports: &[u16], _limits: ReassemblyLimits) -> TcpReassembler {
        unimplemented!("tcp helper")
    }

    pub fn feed(&mut self, _time: f64, _segment: &Segment<'_>, _sink: &mut impl StreamSink) {
        unimplemented!("tcp helper")
    }

    /// Close connections idle for longer than the limit (call it as capture time advances).
    pub fn expire(&mut self, _now: f64, _sink: &mut impl StreamSink) {
        unimplemented!("tcp helper")
    }

    pub fn close_all(&mut self, _now: f64, _sink: &mut impl StreamSink) {
        unimplemented!("tcp helper")
    }

    /// Close the least recently seen connection (delivering what it holds, its holes as gaps), counted as
    /// shed; false when none is open. The memory budget calls it.
    pub fn shed_oldest(&mut self, _now: f64, _sink: &mut impl StreamSink) -> bool {
        unimplemented!("tcp helper")
    }

    /// Connections open now.
    pub fn len(&self) -> usize {
        unimplemented!("tcp helper")
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes this stage holds now: out-of-order payloads plus its per-connection state, for the budget.
    pub fn held_bytes(&self) -> usize {
        unimplemented!("tcp helper")
    }
}
