//! Pairs requests with responses, in order, per connection: the HTTP stage.
//! (Ported from the Python `agent/http/exchanges.py`.)

use crate::http::message::Exchange;
use crate::tcp::reassembly::{ConnectionInfo, StreamEvent, StreamSink};

#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct ParserCounters {
    pub parse_errors: u64,
    pub lost_heads: u64,
    pub resync_skipped_bytes: u64,
    pub oversized_heads: u64,
}

#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct ExchangeCounters {
    pub requests: u64,
    pub lost_exchanges: u64,
    pub unmatched_responses: u64,
    pub unanswered: u64,
    pub late_responses: u64,
    pub unpaired_overflows: u64,
}

pub struct HttpExchanges {
    pub parser_counters: ParserCounters,
    pub counters: ExchangeCounters,
}

impl HttpExchanges {
    pub fn new(_response_timeout: f64, _max_head_bytes: usize) -> HttpExchanges {
        unimplemented!("http helper")
    }

    /// Hand on, unanswered, complete requests waiting longer than the response timeout.
    pub fn expire(&mut self, _now: f64) {
        unimplemented!("http helper")
    }

    /// The exchanges finished since the last call, in the order they finished.
    pub fn take(&mut self) -> std::vec::Drain<'_, Exchange> {
        unimplemented!("http helper")
    }

    /// Bytes this stage holds now (partial heads, waiting requests, per-connection state), for the budget.
    pub fn held_bytes(&self) -> usize {
        unimplemented!("http helper")
    }
}

impl StreamSink for HttpExchanges {
    fn event(&mut self, _connection: &ConnectionInfo, _to_server: bool, _time: f64, _event: StreamEvent<'_>) {
        unimplemented!("http helper")
    }
}
