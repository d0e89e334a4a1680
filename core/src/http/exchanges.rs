//! Pairs requests with responses, in order, per connection: the HTTP stage.
//!
//! HTTP/1.x answers requests in the order they were sent, pipelined or not, so each connection keeps a
//! queue. A response is matched to the oldest unanswered request, but only if the server had received
//! that request when it began answering (its ACK says so); otherwise the response belongs to a request
//! we never saw (a capture that began mid-connection) and is set aside. After server bytes went unseen
//! (a gap), the client's ACKs say whose answers they held (see `Side::skip_answers_lost_unseen`).
//!
//! Each exchange leaves the stage by value: one handed on early (response timeout) leaves a marker in
//! its queue, so a late answer still pairs with its place, and cannot alter what was handed on (the
//! Python's shared objects let a late unreadable response drop the request of an exchange already out).

use std::collections::{HashMap, VecDeque};
use std::mem::size_of;

use crate::http::message::{Exchange, Message};
pub use crate::http::parser::ParserCounters;
pub use crate::http::hand_over::{ConnectionHandOver, ConnectionKey};
use crate::http::hand_over::HandOver;
use crate::http::parser::{begins_a_request, MessageParser, MessageSink, RequestMethod, ResumeIn};
use crate::tcp::reassembly::{ConnectionInfo, StreamEvent, StreamSink};

/// Requests one connection may have waiting for an answer. Beyond it, the answers are clearly not being
/// captured (a one-sided capture): holding more would only grow memory.
pub const MAX_PENDING: usize = 1024;

#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct ExchangeCounters {
    pub requests: u64,
    /// request or response head lost to a gap or unparseable
    pub lost_exchanges: u64,
    /// responses to requests the capture never showed
    pub unmatched_responses: u64,
    /// handed on with status 0
    pub unanswered: u64,
    /// handed on with status 499 (or 400 mid-body): the client closed the connection before any response
    pub client_closed: u64,
    /// arrived after the request was handed on unanswered
    pub late_responses: u64,
    /// a connection's queue hit MAX_PENDING: its waiting requests handed on
    pub unpaired_overflows: u64,
    /// begun after a stop's boundary (`leave_new_requests`): the next run's to bill, from its ring
    pub after_stop: u64,
    /// answers still arriving when the capture ended (a stop, a file's end): billed with the bytes seen
    pub cut_at_end: u64,
    /// answers paired with the requests of a client that pipelines, on a connection that lost the client's
    /// bytes, or the server's with two or more requests waiting: after such a loss the ACKs cannot always
    /// tell whose answer is whose (see `skip_answers_lost_unseen`), so each may carry a neighbour's status
    /// and size
    pub paired_in_doubt: u64,
    /// requests the gateway never read, so never logs and is not billed, on a connection whose bytes were
    /// all seen: those still unanswered after an answer that said `Connection: close`, those sent after the
    /// gateway's FIN, those after the one it was at when it closed first, and those pipelined behind the
    /// one a leaving client gave up on (see `HttpConnection::close`)
    pub never_read: u64,
}

/// One place in a connection's queue.
struct Waiting {
    /// The request and what is known of its answer, until handed on; `None` too when the request was lost.
    exchange: Option<Exchange>,
    /// A request was seen (the Python's `request is not None`; a handed-on one keeps it).
    has_request: bool,
    method: RequestMethod,
    head_end: u64,
    /// the server's bytes the client had when it sent the request (its ACK; -1 when unknown)
    peer_acked: i64,
    request_done: bool,
    /// the client's side ended inside the request's body: nginx logs such a request 400, not 499
    body_cut_short: bool,
    response_done: bool,
    /// handed on already (response timeout); a late answer is dropped
    emitted: bool,
    /// a place kept for a request a previous run billed (`expect_answers`): its answer is not this run's
    previous_runs: bool,
    /// it came after the gateway's end of the connection (an idle keep-alive closed as it was sent): the
    /// gateway never read it
    after_gateway_closed: bool,
}

impl Waiting {
    /// A request this run or a previous one billed, so its answer is no later run's to pair.
    fn billed(&self) -> bool {
        self.exchange.is_some() || self.emitted || self.previous_runs
    }
}

/// What an exchange holds on the heap and in place.
fn exchange_bytes(exchange: &Exchange) -> usize {
    let request = &exchange.request;
    size_of::<Exchange>()
        + request.head.capacity()
        + request.method.capacity()
        + request.target.capacity()
        + request.version.capacity()
}

/// What a queued exchange holds on the heap (its place in the queue is counted with the queue).
fn waiting_bytes(waiting: &Waiting) -> usize {
    waiting.exchange.as_ref().map_or(0, |exchange| exchange_bytes(exchange) - size_of::<Exchange>())
}

fn is_final(status: u16) -> bool {
    status >= 200 || status == 101
}

/// A connection's queue and the state of the response being read.
#[derive(Default)]
struct Pairing {
    pending: VecDeque<Waiting>,
    /// The response being parsed answers the first unanswered request (it stays that one until it ends).
    answering: bool,
    response_status: u16,
    /// What pairing asked of the parsers, done once the parser at work returns.
    resync_responses: bool,
    tunnel_requests: bool,
    /// heap bytes of the exchanges in `pending`
    held: usize,
    /// Final responses still to come for requests handed on unanswered when the queue overflowed: each is
    /// that request's late answer (counted `late_responses`), never the answer of a request after it.
    late_answers: u64,
    /// the response being parsed is one of those
    answering_late: bool,
    /// the client's stream ended (FIN or reset) while the server's was open, and then the server's: the
    /// server saw the client go, so a request still unanswered is one nginx logs as 499 (a capture of the
    /// client's side alone never shows the server's end, and its requests stay unanswered)
    client_left_first: bool,
    server_ended: bool,
    /// the latest final answer said `Connection: close`: the gateway reads no request after it
    answer_closes: bool,
    /// bytes of either side went uncaptured (sticky: `server_gap` is reset by the next answer)
    lost_bytes: bool,
    /// the ends of the client's and the server's bytes delivered so far (their streams' positions)
    client_end: u64,
    server_end: u64,
    /// past a stop's boundary (`leave_new_requests`): which requests are the next run's
    hand_over: Option<HandOver>,
    /// from the previous run: the client's sequence number where it is picked up in step (`expect_answers`)
    client_resume: Option<(u32, ResumeIn)>,
    /// server bytes went unseen (a gap) since the last response head, and where the answers the parser
    /// found lost among them began (each the first unanswered request's, dropped)
    server_gap: bool,
    answers_lost_at: Vec<u64>,
    /// those bytes may have held a head (not only bytes of a framed body, which the parser skipped in step)
    unseen_may_hold_answer: bool,
    /// the last of those was lost in the server's latest gap: what was seen after it, to the next head, is
    /// its body (the next head is where it ended)
    last_lost_runs_on: bool,
    /// where the server's latest gap began and ended; the gap a chunked answer's end went into
    /// (`end_unseen`), and whether server bytes went unseen after it too
    latest_server_gap_at: u64,
    latest_server_gap_end: u64,
    tail_gap_at: u64,
    tail_gap_end: u64,
    gap_after_tail: bool,
    /// where the response being read began, and where the last one read ended, in the server's stream
    /// (for one whose end was in a gap, where that gap began: `tail_unseen`)
    response_position: u64,
    response_end_unseen: bool,
    responses_end: u64,
    tail_unseen: bool,
    /// a request was sent before the answer to one before it began (its ACK says so)
    client_pipelines: bool,
    /// bytes went unseen on this connection where they may have held more than one request or answer in
    /// flight: a client's bytes, or the server's with two or more requests waiting
    lost_in_flight: bool,
}

impl Pairing {
    /// Unanswered requests are a suffix of the queue (responses are done in order), so this is near the front.
    fn first_unanswered(&self) -> Option<usize> {
        self.pending.iter().position(|waiting| !waiting.response_done)
    }

    /// For an answer whose end went into a gap (its size runs on to the next head, over whatever else the
    /// gap held): where it had ended at the latest. The next request, sent once the client had bytes from
    /// past that gap's start, was sent after this answer's end (a client sends its next request once it has
    /// the answer); one sent before, pipelined, says nothing. Never before the gap: those bytes were seen.
    /// One sent once the client had the whole gap, with nothing unseen since, bounds nothing: the gap came
    /// before the server had that request, so it held none of its answer, and what was seen since, with no
    /// head in it, is this answer's.
    fn seen_whole_by(&self) -> u64 {
        let next = self.first_unanswered().and_then(|index| self.pending.get(index + 1));
        let had = next.filter(|next| next.has_request).and_then(|next| u64::try_from(next.peer_acked).ok());
        let after_the_only_gap = !self.gap_after_tail && had.is_some_and(|had| had >= self.tail_gap_end);
        had.filter(|&had| had > self.tail_gap_at && !after_the_only_gap).unwrap_or(u64::MAX)
    }
}

/// Where finished exchanges go, and the counters, shared by every connection (the stage's own fields).
struct Output<'a> {
    parser_counters: &'a mut ParserCounters,
    counters: &'a mut ExchangeCounters,
    finished: &'a mut Vec<Exchange>,
    finished_bytes: &'a mut usize,
}

impl Output<'_> {
    fn emit(&mut self, mut exchange: Exchange, connection: &ConnectionInfo) {
        exchange.connection = *connection;
        self.counters.unanswered += u64::from(exchange.status == 0);
        *self.finished_bytes += exchange_bytes(&exchange);
        self.finished.push(exchange);
    }
}

/// One parser's callbacks, for the requests (`to_server`) or the responses of a connection.
struct Side<'a, 'o> {
    to_server: bool,
    pairing: &'a mut Pairing,
    connection: &'a ConnectionInfo,
    output: &'a mut Output<'o>,
}

impl Side<'_, '_> {
    fn enqueue(&mut self, waiting: Waiting) {
        if self.pairing.pending.len() >= MAX_PENDING {
            self.stop_pairing();
        }
        self.pairing.held += waiting_bytes(&waiting);
        self.pairing.pending.push_back(waiting);
    }

    /// So many requests wait that their answers are not being captured: hand each on, unanswered unless
    /// its answer began, and let the responses pick up again at the next status line.
    fn stop_pairing(&mut self) {
        self.output.counters.unpaired_overflows += 1;
        // the response in progress, if any, is skipped by the resync; every other unanswered one will come
        let unanswered = self.pairing.pending.iter().filter(|waiting| !waiting.response_done).count() as u64;
        let pairing = &self.pairing;
        // (after an interim response `answering` stays set, but the final one has not begun: it will come)
        let in_progress = u64::from(pairing.answering && !pairing.answering_late && is_final(pairing.response_status));
        self.pairing.late_answers += unanswered.saturating_sub(in_progress);
        for waiting in self.pairing.pending.drain(..) {
            if let Some(exchange) = waiting.exchange {
                self.output.emit(exchange, self.connection);
            }
        }
        self.pairing.pending.shrink_to_fit();
        self.pairing.held = 0;
        self.pairing.answering = false;
        self.pairing.resync_responses = true;
    }

    fn flush(&mut self) {
        while let Some(front) = self.pairing.pending.front() {
            if !(front.response_done && front.request_done) {
                break;
            }
            let Some(waiting) = self.pairing.pending.pop_front() else { break };
            self.pairing.held -= waiting_bytes(&waiting);
            if let Some(exchange) = waiting.exchange {
                self.output.emit(exchange, self.connection);
            }
        }
        let pending = &mut self.pairing.pending;
        if pending.is_empty() && pending.capacity() > 16 {
            pending.shrink_to(4); // a burst of pipelined requests is over: give its queue back
        }
    }

    fn request_head(&mut self, message: Message) {
        self.output.counters.requests += 1;
        let pairing = &mut *self.pairing;
        // sent before the answer to a request before it began (one being read began past what it had)
        let had = u64::try_from(message.peer_acked).ok();
        let answering = pairing.first_unanswered().filter(|_| pairing.answering);
        pairing.client_pipelines |= had.is_some_and(|had| {
            let mut earlier = pairing.pending.iter().enumerate().filter(|(_, waiting)| waiting.has_request && !waiting.response_done);
            // (not where it had more of the server's stream than was seen: the answers it had are in what
            // went unseen, a gap yet to show)
            had <= pairing.server_end
                && earlier.any(|(index, _)| Some(index) != answering || had <= pairing.response_position)
        });
        let (method, head_end, peer_acked) = (RequestMethod::of(&message.method), message.head_end, message.peer_acked);
        let after_gateway_closed = pairing.server_ended;
        if self.pairing.hand_over.as_ref().is_some_and(|hand_over| hand_over.next_runs(message.position)) {
            // its place is kept, so that its answer pairs with it and is not taken for another's
            self.output.counters.after_stop += 1;
            let request_done = false;
            let waiting = Waiting { exchange: None, has_request: true, method, head_end, peer_acked, request_done,
                                    body_cut_short: false, response_done: false, emitted: false,
                                    previous_runs: false, after_gateway_closed };
            return self.enqueue(waiting);
        }
        let exchange = Exchange {
            connection: *self.connection,
            request: message,
            status: 0,
            proxied_by_kong: false,
            answered_by_kong: false,
            response_size: 0,
            response_end: 0.0,
        };
        self.enqueue(Waiting {
            exchange: Some(exchange),
            has_request: true,
            method,
            head_end,
            peer_acked,
            request_done: false,
            body_cut_short: false,
            response_done: false,
            emitted: false,
            previous_runs: false,
            after_gateway_closed,
        });
    }

    /// The request in progress is the last one queued, if it is still there (a response lost meanwhile
    /// may have taken it).
    fn request_complete(&mut self, size: u64, end_time: f64) {
        let Some(waiting) = self.pairing.pending.back_mut() else { return };
        if !waiting.has_request || waiting.request_done {
            return;
        }
        waiting.request_done = true;
        if let Some(exchange) = &mut waiting.exchange {
            exchange.request.size = size;
            exchange.request.end_time = end_time;
        }
        self.flush();
    }

    /// Keep the lost request's place in the queue, so its response pairs with it and is discarded.
    fn request_lost(&mut self) {
        self.output.counters.lost_exchanges += 1;
        self.enqueue(Waiting {
            exchange: None,
            has_request: false,
            method: RequestMethod::Other,
            head_end: 0,
            peer_acked: -1,
            request_done: true,
            body_cut_short: false,
            response_done: false,
            emitted: false,
            previous_runs: false,
            after_gateway_closed: false,
        });
    }

    fn response_head(&mut self, message: Message) {
        // (the answers lost unseen before it were skipped when its framing was read: `answered_method`)
        self.pairing.response_position = message.position;
        let acked = u64::try_from(message.peer_acked).ok();
        let pairing = &mut *self.pairing;
        pairing.response_status = message.status;
        if pairing.late_answers > 0 {
            pairing.answering_late = true;
            pairing.answering = false;
            if is_final(message.status) {
                pairing.late_answers -= 1;
            }
            return;
        }
        pairing.answering_late = false;
        if is_final(message.status) {
            pairing.answer_closes = message.closes;
        }
        let mut answered = pairing.first_unanswered();
        if let Some(waiting) = answered.and_then(|index| pairing.pending.get(index)) {
            if waiting.has_request && acked.is_some_and(|acked| acked < waiting.head_end) {
                answered = None; // the server began this answer before it had that request: not its answer
            }
        }
        pairing.answering = answered.is_some();
        pairing.response_status = message.status;
        let Some(waiting) = answered.and_then(|index| pairing.pending.get_mut(index)) else { return };
        let billed = waiting.billed();
        if let Some(hand_over) = pairing.hand_over.as_mut().filter(|_| billed && is_final(message.status)) {
            hand_over.answer_begins(message.position, waiting.method);
        }
        if waiting.emitted || !is_final(message.status) {
            return;
        }
        if let Some(exchange) = &mut waiting.exchange {
            // known even if the body is cut short
            exchange.status = message.status;
            exchange.proxied_by_kong = message.proxied_by_kong;
            exchange.answered_by_kong = message.answered_by_kong;
        }
    }

    fn response_complete(&mut self, mut size: u64, end_time: f64) {
        let pairing = &mut *self.pairing;
        pairing.tail_unseen = std::mem::take(&mut pairing.response_end_unseen);
        if pairing.tail_unseen {
            size = size.min(pairing.seen_whole_by().saturating_sub(pairing.response_position));
        }
        pairing.responses_end = match pairing.tail_unseen {
            true => pairing.tail_gap_at,
            false => pairing.response_position.saturating_add(size),
        };
        let answering = std::mem::take(&mut pairing.answering);
        let status = pairing.response_status;
        if std::mem::take(&mut pairing.answering_late) {
            self.output.counters.late_responses += u64::from(is_final(status));
            return;
        }
        let answered = pairing.first_unanswered().filter(|_| answering);
        let Some(waiting) = answered.and_then(|index| pairing.pending.get_mut(index)) else {
            self.output.counters.unmatched_responses += u64::from(is_final(status));
            return;
        };
        if !is_final(status) {
            if let Some(exchange) = &mut waiting.exchange {
                exchange.response_size = exchange.response_size.saturating_add(size);
            }
            pairing.answering = true; // an interim response: the final one follows
            return;
        }
        waiting.response_done = true;
        let in_doubt = pairing.lost_in_flight && pairing.client_pipelines;
        match &mut waiting.exchange {
            // handed on unanswered already: it stays as it was billed
            None if waiting.emitted => self.output.counters.late_responses += 1,
            None => {}
            Some(exchange) => {
                exchange.response_size = exchange.response_size.saturating_add(size);
                exchange.status = status;
                exchange.response_end = end_time;
                self.output.counters.paired_in_doubt += u64::from(in_doubt);
            }
        }
        if status == 101 || (waiting.has_request && waiting.method == RequestMethod::Connect && status < 300) {
            pairing.tunnel_requests = true; // bill the upgrade, ignore the tunnel
        }
        self.flush();
    }

    /// A response head we could not read: that exchange is lost, the ones after it are not.
    fn response_lost(&mut self) {
        let pairing = &mut *self.pairing;
        pairing.answering = false;
        if pairing.late_answers > 0 || pairing.answering_late {
            // the late answer of a request handed on already (see `late_answers`), lost to a gap
            if !std::mem::take(&mut pairing.answering_late) {
                pairing.late_answers -= 1;
            }
            self.output.counters.late_responses += 1;
            return;
        }
        if pairing.server_gap && pairing.first_unanswered().is_some() {
            // (a lost head begins where the last answer read ended: after it, or where its body ended)
            pairing.answers_lost_at.push(pairing.responses_end);
            pairing.last_lost_runs_on = true;
        }
        pairing.unseen_may_hold_answer = true;
        self.lose_first_answer();
    }

    /// The first unanswered request's answer is lost: so is that exchange (its place goes).
    fn lose_first_answer(&mut self) {
        let pairing = &mut *self.pairing;
        let Some(index) = pairing.first_unanswered() else { return };
        let Some(waiting) = pairing.pending.get_mut(index) else { return };
        // (one handed on already, a previous run's or the next run's is no loss of this run's)
        self.output.counters.lost_exchanges += u64::from(waiting.exchange.is_some());
        pairing.held -= waiting_bytes(waiting);
        (waiting.response_done, waiting.has_request, waiting.request_done) = (true, false, true);
        waiting.exchange = None;
        pairing.held += waiting_bytes(waiting);
        self.flush();
    }

    /// A response head at `position` (its ACK `peer_acked`), once: where server bytes went unseen since the
    /// last head, the answers lost among them are skipped first. Called before the head's framing is read,
    /// which depends on the method of the request it answers.
    fn after_unseen_bytes(&mut self, position: u64, peer_acked: i64) {
        if std::mem::take(&mut self.pairing.server_gap) && self.pairing.late_answers == 0 {
            self.skip_answers_lost_unseen(position, u64::try_from(peer_acked).ok());
        }
        self.pairing.answers_lost_at.clear();
        self.pairing.unseen_may_hold_answer = false;
        self.pairing.tail_unseen = false;
    }

    /// After server bytes went unseen, a response head at `position` may answer a later request than the
    /// first unanswered: the answers of those before it may have been among them. The client's ACKs tell. A
    /// request sent once the client had server bytes from past the last response read (and past what it had
    /// when it sent the request before) up to this head was sent after an answer we never saw: in order, the
    /// answer of a request before it. Each such request shows one answer lost, from the first; those the
    /// parser found lost already (a head in the gap) were dropped then, and count among them where they
    /// began past what the client had when it sent the first (it was sent before they came). Without
    /// this, each request after a loss in both directions was billed with its neighbour's answer, to the
    /// connection's end. Requests pipelined together, sent before any of those answers, carry no such ACK:
    /// they are paired in order, as before. Where the last answer's own end was unseen (a chunked body), a
    /// request queued before that gap may have been sent before the answer ended, and its successor's ACK
    /// then shows that answer's tail: one answer less is taken as lost (the old pairing, when in doubt).
    fn skip_answers_lost_unseen(&mut self, position: u64, acked: Option<u64>) {
        let pairing = &*self.pairing;
        let Some(first) = pairing.first_unanswered() else { return };
        // what the client had when it sent the first: a request lost to a client-side gap has no ACK, and is
        // taken as sent after the answers before it, unless this client sends requests before their
        // predecessors' answers came
        let first_had = pairing.pending.get(first).and_then(|waiting| u64::try_from(waiting.peer_acked).ok());
        let first_had = first_had.or(pairing.client_pipelines.then_some(0));
        let shown_from = first_had.map(|had| had.max(pairing.responses_end));
        let dropped = pairing.answers_lost_at.iter().filter(|&&began| shown_from.is_some_and(|from| began >= from)).count();
        // one that began before the first was sent, and ended at this head after it was (a request pipelined
        // while that answer came), shows in the ACKs too; only where the first was sent once the client had
        // the whole gap: the gap then held nothing from the first's answer on, and what was seen since, with
        // no head in it, is that lost answer's
        let last_began = pairing.answers_lost_at.last().filter(|_| pairing.last_lost_runs_on);
        let after_the_gap = first_had.is_some_and(|had| had >= pairing.latest_server_gap_end);
        let ended_here = after_the_gap
            && last_began.is_some_and(|&began| shown_from.is_some_and(|from| began < from && from < position));
        let dropped = dropped + usize::from(ended_here);
        let sent_before_the_gap = first_had.is_some_and(|had| had <= pairing.tail_gap_at);
        let accounted = dropped + usize::from(pairing.tail_unseen && sent_before_the_gap);
        let queued = || pairing.pending.range(first..);
        let shown = queued().zip(queued().skip(1)).take_while(|(earlier, later)| {
            let Ok(later_had) = u64::try_from(later.peer_acked) else { return false };
            let earlier_had = u64::try_from(earlier.peer_acked).unwrap_or(0).max(pairing.responses_end);
            let later_sent_after_unseen_bytes = earlier_had < later_had && later_had <= position;
            // (a response the server began before it had the later request cannot be the later one's)
            let server_had_later = acked.is_none_or(|acked| acked >= later.head_end);
            later.has_request && later_sent_after_unseen_bytes && server_had_later
        });
        for _ in accounted..shown.count() {
            self.lose_first_answer();
        }
    }
}

impl MessageSink for Side<'_, '_> {
    fn counters(&mut self) -> &mut ParserCounters {
        self.output.parser_counters
    }

    fn answered_method(&mut self, position: u64, peer_acked: i64) -> RequestMethod {
        if !self.to_server {
            self.after_unseen_bytes(position, peer_acked);
        }
        let pairing = &self.pairing;
        let waiting = pairing.first_unanswered().and_then(|index| pairing.pending.get(index));
        waiting.filter(|waiting| waiting.has_request).map_or(RequestMethod::Unknown, |waiting| waiting.method)
    }

    fn head(&mut self, message: Message) {
        if self.to_server {
            self.request_head(message);
        } else {
            self.response_head(message);
        }
    }

    fn complete(&mut self, size: u64, end_time: f64) {
        if self.to_server {
            self.request_complete(size, end_time);
        } else {
            self.response_complete(size, end_time);
        }
    }

    fn lost(&mut self) {
        if self.to_server {
            self.request_lost();
        } else {
            self.response_lost();
        }
    }

    fn end_unseen(&mut self) {
        // (the gap that took the framing: later ones, before the next head, only lengthen the tail)
        if !self.to_server && !self.pairing.response_end_unseen {
            let pairing = &mut *self.pairing;
            (pairing.response_end_unseen, pairing.gap_after_tail, pairing.unseen_may_hold_answer) = (true, false, true);
            (pairing.tail_gap_at, pairing.tail_gap_end) = (pairing.latest_server_gap_at, pairing.latest_server_gap_end);
        }
    }

    fn cut_short(&mut self) {
        if !self.to_server {
            return;
        }
        if let Some(waiting) = self.pairing.pending.back_mut() {
            waiting.body_cut_short = waiting.has_request && !waiting.request_done;
        }
    }
}

struct HttpConnection {
    connection: ConnectionInfo,
    /// when the stage first heard of it: expiry hands exchanges on in this order, as the Python did
    order: u64,
    requests: MessageParser,
    responses: MessageParser,
    pairing: Pairing,
}

/// What one tracked connection costs in place: its map entry at hashbrown's 7/8 load with its control byte.
const CONNECTION_BYTES: usize = (size_of::<(u64, HttpConnection)>() + 1) * 8 / 7;

impl HttpConnection {
    fn new(connection: &ConnectionInfo, order: u64, max_head_bytes: usize) -> HttpConnection {
        let synced = connection.saw_syn;
        HttpConnection {
            connection: *connection,
            order,
            requests: MessageParser::new(true, synced, max_head_bytes),
            responses: MessageParser::new(false, synced, max_head_bytes),
            pairing: Pairing::default(),
        }
    }

    /// Heap bytes held: partial heads and chunk lines, waiting requests.
    fn held_bytes(&self) -> usize {
        let queue = self.pairing.pending.capacity() * size_of::<Waiting>();
        self.requests.held_bytes() + self.responses.held_bytes() + queue + self.pairing.held
    }

    fn side<'a, 'o>(
        to_server: bool,
        pairing: &'a mut Pairing,
        connection: &'a ConnectionInfo,
        output: &'a mut Output<'o>,
    ) -> Side<'a, 'o> {
        Side { to_server, pairing, connection, output }
    }

    fn handle(&mut self, to_server: bool, time: f64, event: StreamEvent<'_>, output: &mut Output<'_>) {
        if let StreamEvent::Data { payload, position, .. } = event {
            let pairing = &mut self.pairing;
            let end = position + payload.len() as u64;
            if to_server {
                if let Some((resume, into)) = pairing.client_resume.take() {
                    // where the previous run said the client is picked up in step, if this data is not past it
                    let at = self.connection.to_server_base_seq.map(|base| u64::from(resume.wrapping_sub(base)));
                    let skip = at.and_then(|at| at.checked_sub(position)).filter(|&skip| skip < 1 << 31);
                    if let Some(skip) = skip.filter(|&skip| self.requests.resume_after(skip, into)) {
                        if let Some(hand_over) = &mut pairing.hand_over {
                            hand_over.resume_at(position + skip, into); // past this run's own boundary: handed on
                        }
                    }
                }
                pairing.client_end = pairing.client_end.max(end);
                if let Some(hand_over) = &mut pairing.hand_over {
                    hand_over.client_data(begins_a_request(payload));
                }
            } else {
                self.requests.peer_spoke();
                pairing.server_end = pairing.server_end.max(end);
                if let Some(hand_over) = &mut pairing.hand_over {
                    hand_over.server_data(pairing.client_end);
                }
            }
        }
        let parser = if to_server { &mut self.requests } else { &mut self.responses };
        let mut side = Self::side(to_server, &mut self.pairing, &self.connection, output);
        match event {
            StreamEvent::Data { payload, position, peer_acked } => {
                parser.feed(payload, time, position, peer_acked, &mut side)
            }
            StreamEvent::Gap { lost, position } => {
                let pairing = &mut side.pairing;
                pairing.lost_bytes = true;
                let two_waiting = || pairing.pending.iter().filter(|waiting| !waiting.response_done).nth(1).is_some();
                pairing.lost_in_flight |= to_server || two_waiting();
                if !to_server {
                    (pairing.server_gap, pairing.latest_server_gap_at) = (true, position);
                    pairing.latest_server_gap_end = position.saturating_add(lost);
                    pairing.gap_after_tail |= pairing.response_end_unseen;
                    pairing.last_lost_runs_on = false;
                    pairing.unseen_may_hold_answer |= !parser.in_body(); // (the responses' parser)
                }
                parser.gap(lost, time, &mut side)
            }
            StreamEvent::End { .. } => {
                let pairing = &mut side.pairing;
                if to_server {
                    pairing.client_left_first = !pairing.server_ended;
                } else {
                    pairing.server_ended = true;
                }
                parser.end(time, &mut side)
            }
            StreamEvent::Closed => {}
        }
        self.follow_up();
    }

    /// What pairing asked of the parsers while one of them was at work.
    fn follow_up(&mut self) {
        let pairing = &mut self.pairing;
        if std::mem::take(&mut pairing.resync_responses) {
            self.responses.resync();
        }
        if std::mem::take(&mut pairing.tunnel_requests) {
            if let Some(size) = self.requests.tunnel() {
                // the request in progress never completes: it is handed on with the bytes seen
                let in_progress = pairing.pending.back_mut().filter(|waiting| !waiting.request_done);
                if let Some(exchange) = in_progress.and_then(|waiting| waiting.exchange.as_mut()) {
                    exchange.request.size = size;
                }
            }
        }
    }

    /// The connection is over: whatever is still waiting is handed on with what is known of it.
    fn close(mut self, time: f64, output: &mut Output<'_>) {
        self.requests.end(time, &mut Self::side(true, &mut self.pairing, &self.connection, output));
        self.responses.end(time, &mut Self::side(false, &mut self.pairing, &self.connection, output));
        let pairing = &mut self.pairing;
        let client_left = pairing.client_left_first && pairing.server_ended;
        let server_left = pairing.server_ended && !pairing.client_left_first;
        // which requests nginx never read is told only where every byte was seen: after a loss, an answer
        // seen may have been paired with another request, and its own request taken for one not read
        let seen_whole = !pairing.lost_bytes;
        // the gateway said it closes after its latest answer: it reads none of the requests still waiting,
        // whoever is seen to close first
        let closed_after_answer = pairing.answer_closes;
        // server bytes went unseen since the last answer read: one sent before the client had them may be in
        // them (nginx answered it), and is not taken for one its client left
        let unseen_up_to = (pairing.server_gap && pairing.unseen_may_hold_answer).then_some(pairing.latest_server_gap_end);
        // nginx reads a connection's requests one at a time: the first waiting is the one it was at
        let mut first = true;
        for waiting in pairing.pending.drain(..) {
            let had = u64::try_from(waiting.peer_acked).ok();
            let answer_maybe_unseen = unseen_up_to.is_some_and(|end| had.is_none_or(|had| had < end));
            let at_it = !waiting.response_done && !waiting.after_gateway_closed && std::mem::take(&mut first);
            if let Some(mut exchange) = waiting.exchange {
                // the gateway closed after an answer that said so, or while it was at an earlier request
                // (the first waiting it may have read: a crash, nginx's 444), or the client left while it
                // was at an earlier one: it never read this one (a request still arriving when the gateway
                // closed may have timed out, 408, and stays unanswered; one answered, a 101's, was read)
                let whole = !waiting.body_cut_short;
                let never_read = closed_after_answer || waiting.after_gateway_closed
                    || (server_left && whole && !at_it) || (client_left && !at_it);
                if seen_whole && !waiting.response_done && never_read {
                    output.counters.never_read += 1;
                    continue;
                }
                if client_left && !answer_maybe_unseen && exchange.status == 0 {
                    // given up on before any final answer (nginx's 100 Continue, which it counts, may be out)
                    exchange.status = if waiting.body_cut_short { CLIENT_LEFT_MID_BODY } else { CLIENT_CLOSED_REQUEST };
                    output.counters.client_closed += 1;
                }
                output.emit(exchange, &self.connection);
            }
        }
    }

    /// The answer to a request this run bills is arriving (its head was read, its body has not ended).
    fn answer_arriving(&self) -> bool {
        let pairing = &self.pairing;
        let answered = pairing.first_unanswered().and_then(|index| pairing.pending.get(index));
        pairing.answering && self.responses.in_body() && answered.is_some_and(|waiting| waiting.exchange.is_some())
    }

    /// Hand on, unanswered, complete requests still waiting for a response since before `cutoff`.
    fn expire(&mut self, cutoff: f64, output: &mut Output<'_>) {
        let pairing = &mut self.pairing;
        let answering = if pairing.answering { pairing.first_unanswered() } else { None };
        for (index, waiting) in pairing.pending.iter_mut().enumerate() {
            let due = waiting.request_done && !waiting.response_done && Some(index) != answering;
            let expired = waiting.exchange.as_ref().is_some_and(|exchange| exchange.request.end_time < cutoff);
            if !(due && expired) {
                continue;
            }
            if let Some(exchange) = waiting.exchange.take() {
                pairing.held -= exchange_bytes(&exchange) - size_of::<Exchange>();
                waiting.emitted = true;
                output.emit(exchange, &self.connection);
            }
        }
    }
}

/// nginx's (and Kong's) status for a request whose client closed the connection before its final answer.
pub const CLIENT_CLOSED_REQUEST: u16 = 499;
/// nginx's status for a request whose client closed the connection before sending all of its body ("client
/// prematurely closed connection" while reading it).
pub const CLIENT_LEFT_MID_BODY: u16 = 400;

/// Stream events in, completed exchanges out, for every connection the reassembler reports.
pub struct HttpExchanges {
    pub parser_counters: ParserCounters,
    pub counters: ExchangeCounters,
    response_timeout: f64,
    max_head_bytes: usize,
    /// by connection id (ours, from the reassembler: not chosen by whoever sends packets)
    connections: HashMap<u64, HttpConnection>,
    next_order: u64,
    finished: Vec<Exchange>,
    finished_bytes: usize,
    /// heap bytes of every connection (see `HttpConnection::held_bytes`)
    connections_held: usize,
    /// after a stop's boundary: the connections whose new requests are the next run's
    next_run_takes: Option<fn(&ConnectionInfo) -> bool>,
    /// from the previous run's stop, by connection (see `expect_answers`)
    previous_runs: HashMap<ConnectionKey, ConnectionHandOver>,
    capture_ended: bool,
}

fn key_of(connection: &ConnectionInfo) -> ConnectionKey {
    (connection.client, connection.client_port, connection.server, connection.server_port)
}

/// Connections the previous run may name (`expect_answers`); more are not kept.
const MAX_HANDED_OVER: usize = 1 << 18;
/// Restarts through which what a run handed over is carried for a connection not seen since.
const MAX_RESTARTS_CARRIED: u8 = 3;

impl HttpExchanges {
    pub fn new(response_timeout: f64, max_head_bytes: usize) -> HttpExchanges {
        HttpExchanges {
            parser_counters: ParserCounters::default(),
            counters: ExchangeCounters::default(),
            response_timeout,
            max_head_bytes,
            connections: HashMap::new(),
            next_order: 0,
            finished: Vec::new(),
            finished_bytes: 0,
            connections_held: 0,
            next_run_takes: None,
            previous_runs: HashMap::new(),
            capture_ended: false,
        }
    }

    /// A stop's boundary: the next run reads the capture on from here (the ring it takes over), so a request
    /// of a connection `of` selects whose first byte comes from now on is left to it (counted `after_stop`);
    /// the requests begun before still get their answers here. Where the boundary falls inside a request,
    /// the next run sees that connection as one joined inside a request: it takes none of its requests
    /// until the server speaks, so up to then they stay this run's.
    /// With `resume` (the next run gets `answers_owed`), where the client's next request begins is handed
    /// over where known, and the next run starts there in step.
    pub fn leave_new_requests(&mut self, of: fn(&ConnectionInfo) -> bool, resume: bool) {
        self.next_run_takes = Some(of);
        for http in self.connections.values_mut().filter(|http| of(&http.connection)) {
            let pairing = &mut http.pairing;
            let known = if resume && http.connection.to_server_base_seq.is_some() {
                http.requests.next_resume()
            } else {
                None
            };
            // (a body of 2 GiB or more is left to the joined rule: sequence numbers wrap at 4 GiB)
            let client_resume = known.filter(|&(skip, _)| skip < 1 << 31).map(|(skip, into)| (pairing.client_end + skip, into));
            pairing.hand_over = Some(HandOver::at(pairing.client_end, pairing.server_end, client_resume));
        }
    }

    /// Requests this run bills that wait for (the rest of) their exchange, on the connections `of` selects;
    /// a head still arriving where the next run waits for the server's answer counts too.
    pub fn requests_in_flight(&self, of: fn(&ConnectionInfo) -> bool) -> usize {
        let connections = self.connections.values().filter(|http| of(&http.connection));
        connections
            .map(|http| {
                let waiting = http.pairing.pending.iter().filter(|waiting| waiting.exchange.is_some()).count();
                // a request still arriving, this run's if it began before what the next run takes
                let arriving = http.pairing.hand_over.as_ref().is_some_and(|hand_over| match http.requests.message_start() {
                    Some(start) => !hand_over.next_runs(start),
                    None => hand_over.until_answer() && !http.requests.between_messages(),
                });
                waiting + usize::from(arriving)
            })
            .sum()
    }

    /// The capture ends, and every connection is closed next: an answer still arriving then to a request
    /// this run bills is billed with the bytes seen by then (counted `cut_at_end`).
    pub fn capture_ends(&mut self) {
        self.capture_ended = true;
    }

    /// At the end of a stop that leaves the ring to the next run: for each connection, the methods of this
    /// run's requests whose answers the next run will see (they began past the boundary, or have not begun).
    pub fn answers_owed(&self) -> Vec<ConnectionHandOver> {
        let mut owed = Vec::new();
        for http in self.connections.values() {
            let pairing = &http.pairing;
            let Some(hand_over) = &pairing.hand_over else { continue };
            let base = http.connection.to_server_base_seq;
            let handed_on = hand_over.client_resume.zip(base).map(|((at, into), base)| (base.wrapping_add(at as u32), into));
            let client_resume = handed_on.or(pairing.client_resume); // one from the previous run not reached yet
            let mut methods = hand_over.owed.clone();
            // the answer in progress was listed when it began, if it began past the boundary
            let answering = pairing.answering && is_final(pairing.response_status);
            let in_progress = if answering { pairing.first_unanswered() } else { None };
            for (index, waiting) in pairing.pending.iter().enumerate() {
                if waiting.billed() && !waiting.response_done && Some(index) != in_progress {
                    methods.push(waiting.method);
                }
            }
            if !methods.is_empty() || client_resume.is_some() {
                let key = key_of(&http.connection);
                owed.push(ConnectionHandOver { key, answers: methods, client_resume, restarts: 0 });
            }
        }
        // a previous run's, for connections this run never saw: still owed to that run, for a few restarts
        // (a connection whose later packets carry no data is never seen again)
        let seen: std::collections::HashSet<ConnectionKey> = owed.iter().map(|connection| connection.key).collect();
        let carried = self.previous_runs.values().filter(|connection| !seen.contains(&connection.key));
        owed.extend(carried.filter(|connection| connection.restarts < MAX_RESTARTS_CARRIED).map(|connection| {
            ConnectionHandOver { restarts: connection.restarts + 1, ..connection.clone() }
        }));
        owed
    }

    /// The previous run's `answers_owed`: on each of those connections, when this run joins it, the first
    /// answers pair with places kept for those requests, not with this run's, and the client's stream is
    /// read in step from where the previous run said a request begins.
    pub fn expect_answers(&mut self, owed: Vec<ConnectionHandOver>) {
        for mut connection in owed.into_iter().take(MAX_HANDED_OVER) {
            connection.answers.truncate(MAX_PENDING); // more cannot have been waiting
            self.previous_runs.entry(connection.key).or_insert(connection); // the first of a key: its newest
        }
    }

    /// Hand on, unanswered, complete requests waiting longer than the response timeout.
    pub fn expire(&mut self, now: f64) {
        let cutoff = now - self.response_timeout;
        let HttpExchanges {
            parser_counters, counters, connections, finished, finished_bytes, connections_held, ..
        } = self;
        let mut output = Output { parser_counters, counters, finished, finished_bytes };
        let mut runs = Vec::new();
        for http in connections.values_mut() {
            if http.pairing.pending.is_empty() {
                continue;
            }
            let (start, before) = (output.finished.len(), http.held_bytes());
            http.expire(cutoff, &mut output);
            *connections_held = *connections_held - before + http.held_bytes();
            if output.finished.len() > start {
                runs.push((http.order, start, output.finished.len()));
            }
        }
        if runs.len() > 1 {
            // connections in the order the stage first heard of them, each one's exchanges in its order
            runs.sort_unstable_by_key(|&(order, ..)| order);
            let first = runs.iter().map(|&(_, start, _)| start).min().unwrap_or_default();
            let mut expired: Vec<Option<Exchange>> = output.finished.drain(first..).map(Some).collect();
            for (_, start, end) in runs {
                let run = expired.get_mut(start - first..end - first).unwrap_or_default();
                output.finished.extend(run.iter_mut().filter_map(Option::take));
            }
        }
    }

    /// The exchanges finished since the last call, in the order they finished.
    pub fn take(&mut self) -> std::vec::Drain<'_, Exchange> {
        self.finished_bytes = 0;
        self.finished.drain(..)
    }

    /// Bytes this stage holds now (partial heads, waiting requests, per-connection state, finished
    /// exchanges not yet taken), for the budget.
    pub fn held_bytes(&self) -> usize {
        self.connections.len() * CONNECTION_BYTES + self.connections_held + self.finished_bytes
    }

    /// The connections tracked now, each with how many requests wait in its queue: for tests and diagnostics.
    pub fn waiting(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        self.connections.iter().map(|(&id, http)| (id, http.pairing.pending.len()))
    }
}

impl StreamSink for HttpExchanges {
    fn event(&mut self, connection: &ConnectionInfo, to_server: bool, time: f64, event: StreamEvent<'_>) {
        let HttpExchanges {
            parser_counters,
            counters,
            connections,
            finished,
            finished_bytes,
            connections_held,
            next_order,
            max_head_bytes,
            next_run_takes,
            previous_runs,
            capture_ended,
            ..
        } = self;
        let mut output = Output { parser_counters, counters, finished, finished_bytes };
        if event == StreamEvent::Closed {
            if let Some(http) = connections.remove(&connection.id) {
                *connections_held -= http.held_bytes();
                output.counters.cut_at_end += u64::from(*capture_ended && http.answer_arriving());
                http.close(time, &mut output);
            }
            return;
        }
        let http = connections.entry(connection.id).or_insert_with(|| {
            *next_order += 1;
            let mut http = HttpConnection::new(connection, *next_order, *max_head_bytes);
            if next_run_takes.is_some_and(|of| of(connection)) {
                // first seen past the boundary: the next run sees it from the same place, its SYN if this
                // run does, and makes of a joined one's first bytes what this run does
                let hand_over = if connection.saw_syn { HandOver::all_next_runs() } else { HandOver::at(0, 0, None) };
                http.pairing.hand_over = Some(hand_over);
            }
            // (a new incarnation of the 4-tuple, seen from its SYN, owes nothing: the entry goes all the same)
            let handed = previous_runs.remove(&key_of(connection)).filter(|_| !connection.saw_syn);
            let (answers, client_resume) = handed.map_or((Vec::new(), None), |handed| (handed.answers, handed.client_resume));
            http.pairing.client_resume = client_resume;
            for method in answers {
                http.pairing.pending.push_back(Waiting {
                    exchange: None, has_request: true, method, head_end: 0, peer_acked: -1, request_done: true,
                    body_cut_short: false, response_done: false, emitted: false, previous_runs: true,
                    after_gateway_closed: false,
                });
            }
            *connections_held += http.held_bytes(); // its queue holds from the start
            http
        });
        http.connection = *connection;
        let before = http.held_bytes();
        http.handle(to_server, time, event, &mut output);
        *connections_held = *connections_held - before + http.held_bytes();
    }

    fn forget(&mut self, connection: &ConnectionInfo) {
        if let Some(http) = self.connections.remove(&connection.id) {
            self.connections_held -= http.held_bytes();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::frames::Address;

    fn connection(id: u64) -> ConnectionInfo {
        ConnectionInfo {
            id,
            client: Address::new(&[10, 0, 0, 1]),
            client_port: 40000 + id as u16,
            server: Address::new(&[10, 0, 0, 2]),
            server_port: 8000,
            saw_syn: true,
            to_server_base_seq: Some(1001),
        }
    }

    /// Both directions of one connection, fed as the reassembler would (positions tracked here).
    struct Conversation {
        info: ConnectionInfo,
        sent: [u64; 2],
    }

    impl Conversation {
        fn new(id: u64) -> Self {
            Conversation { info: connection(id), sent: [0, 0] }
        }

        fn send(&mut self, http: &mut HttpExchanges, to_server: bool, time: f64, payload: &[u8]) {
            let index = usize::from(!to_server);
            let position = self.sent[index];
            self.sent[index] += payload.len() as u64;
            // the server has everything the client sent
            let peer_acked = if to_server { -1 } else { self.sent[0] as i64 };
            http.event(&self.info, to_server, time, StreamEvent::Data { payload, position, peer_acked });
        }

        fn close(&self, http: &mut HttpExchanges, time: f64) {
            http.event(&self.info, true, time, StreamEvent::Closed);
        }

        /// The client leaves (FIN), then the server, and the connection is closed.
        fn client_then_server_leave(&self, http: &mut HttpExchanges) {
            http.event(&self.info, true, 2.0, StreamEvent::End { position: self.sent[0] });
            http.event(&self.info, false, 2.001, StreamEvent::End { position: self.sent[1] });
            self.close(http, 2.002);
        }

        /// Bytes the client sends having received the server's up to `had` (its ACK).
        fn send_having(&mut self, http: &mut HttpExchanges, payload: &[u8], had: u64) {
            let position = self.sent[0];
            self.sent[0] += payload.len() as u64;
            http.event(&self.info, true, 1.0, StreamEvent::Data { payload, position, peer_acked: had as i64 });
        }

        /// Bytes the client sends having received everything the server sent so far.
        fn send_having_all(&mut self, http: &mut HttpExchanges, payload: &[u8]) {
            self.send_having(http, payload, self.sent[1]);
        }

        /// `lost` bytes of one direction that the capture never saw.
        fn lose(&mut self, http: &mut HttpExchanges, to_server: bool, lost: usize) {
            let index = usize::from(!to_server);
            let position = self.sent[index];
            self.sent[index] += lost as u64;
            http.event(&self.info, to_server, 1.0, StreamEvent::Gap { lost: lost as u64, position });
        }
    }

    const REQUEST: &[u8] = b"GET /orders?page=2 HTTP/1.1\r\nHost: api.example.com\r\napikey: k1\r\n\r\n";
    const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nX-Kong-Upstream-Latency: 3\r\nContent-Length: 5\r\n\r\n[1,2]";

    #[test]
    fn a_request_and_its_response_become_one_exchange() {
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        conversation.send(&mut http, true, 1.0, REQUEST);
        conversation.send(&mut http, false, 1.25, RESPONSE);
        let exchanges: Vec<Exchange> = http.take().collect();
        let [exchange] = &exchanges[..] else { panic!("{exchanges:?}") };
        assert_eq!(exchange.request.target, b"/orders?page=2");
        assert_eq!((exchange.request.size, exchange.request.start_time), (REQUEST.len() as u64, 1.0));
        assert_eq!(
            (exchange.status, exchange.response_size, exchange.response_end),
            (200, RESPONSE.len() as u64, 1.25)
        );
        assert!(exchange.proxied_by_kong && !exchange.answered_by_kong);
        assert_eq!(exchange.request.header(b"apikey"), Some(&b"k1"[..]));
    }

    /// What crosses one connection, and where a stop's boundary falls in it.
    enum Step {
        Client(Vec<u8>),
        Server(Vec<u8>),
        Boundary,
    }
    use Step::{Boundary, Client, Server};

    fn get(target: &str) -> Vec<u8> {
        format!("GET {target} HTTP/1.1\r\nHost: api\r\napikey: k1\r\n\r\n").into_bytes()
    }

    fn answer(status: u16) -> Vec<u8> {
        format!("HTTP/1.1 {status} Fine\r\nContent-Length: 2\r\n\r\nok").into_bytes()
    }

    /// The stopping run (from the connection's start if `from_syn`, else joined at the first step), which
    /// reads on past the boundary, and the next run, which joins at the boundary with the answers the
    /// stopping run handed over: the requests each billed, with their status.
    fn two_runs(from_syn: bool, resume: bool, steps: &[Step]) -> [Vec<(String, u16)>; 2] {
        let mut stopping = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut first = Conversation::new(1);
        first.info.saw_syn = from_syn;
        let boundary = steps.iter().position(|step| matches!(step, Boundary)).expect("a boundary");
        let mut client_at_boundary = 0;
        for step in steps {
            match step {
                Boundary => {
                    stopping.leave_new_requests(packets, resume);
                    client_at_boundary = first.sent[0];
                }
                Client(bytes) => first.send(&mut stopping, true, 1.0, bytes),
                Server(bytes) => first.send(&mut stopping, false, 1.0, bytes),
            }
        }
        let mut next = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        next.expect_answers(stopping.answers_owed());
        let mut second = Conversation::new(1);
        second.info.saw_syn = false;
        // the next run's client stream begins at the boundary: its first byte's sequence number is its base
        second.info.to_server_base_seq = first.info.to_server_base_seq.map(|base| base + client_at_boundary as u32);
        for step in &steps[boundary + 1..] {
            match step {
                Client(bytes) => second.send(&mut next, true, 2.0, bytes),
                Server(bytes) => second.send(&mut next, false, 2.0, bytes),
                Boundary => {}
            }
        }
        first.close(&mut stopping, 3.0);
        second.close(&mut next, 3.0);
        [targets(&mut stopping), targets(&mut next)]
    }

    /// A case: its name, whether the stopping run saw the connection's start, its steps, what each run bills.
    type Case<'a> = (&'a str, bool, Vec<Step>, [Vec<(String, u16)>; 2]);

    fn billed(targets: &[(&str, u16)]) -> Vec<(String, u16)> {
        targets.iter().map(|&(target, status)| (target.to_string(), status)).collect()
    }

    #[test]
    fn across_a_stops_boundary_each_request_is_billed_once_with_its_own_answer() {
        let half = |bytes: Vec<u8>, first: bool| if first { bytes[..20].to_vec() } else { bytes[20..].to_vec() };
        let long = format!("/long?{}", "q".repeat(1500));
        let cases: Vec<Case> = vec![
            ("a request pipelined behind one in flight", true,
             vec![Client(get("/a")), Server(answer(200)), Client(get("/b")), Boundary, Client(get("/c")),
                  Server(answer(201)), Server(answer(202))],
             [billed(&[("/a", 200), ("/b", 201)]), billed(&[("/c", 202)])]),
            ("a head straddling the boundary", true,
             vec![Client(half(get("/b"), true)), Boundary, Client(half(get("/b"), false)), Server(answer(201)),
                  Client(get("/c")), Server(answer(202))],
             [billed(&[("/b", 201)]), billed(&[("/c", 202)])]),
            ("a stray line end before the next request", true,
             vec![Client(get("/a")), Server(answer(200)), Boundary, Client([&b"\r\n"[..], &get("/c")].concat()),
                  Server(answer(202)), Client(get("/d")), Server(answer(203))],
             [billed(&[("/a", 200), ("/c", 202)]), billed(&[("/d", 203)])]),
            ("a request line longer than its first segment", true,
             vec![Client(get("/a")), Server(answer(200)), Boundary, Client(get(&long)[..1000].to_vec()),
                  Client(get(&long)[1000..].to_vec()), Server(answer(202)), Client(get("/d")), Server(answer(203))],
             [billed(&[("/a", 200), (long.as_str(), 202)]), billed(&[("/d", 203)])]),
            ("a connection first seen past the boundary, joined", false,
             vec![Boundary, Client(get(&long)[1000..].to_vec()), Server(answer(202)), Client(get("/d")),
                  Server(answer(203))],
             [billed(&[]), billed(&[("/d", 203)])]),
            ("a stopping run that joined the connection itself", false,
             vec![Server(answer(200)), Boundary, Client(get("/c")), Server(answer(202))],
             [billed(&[]), billed(&[("/c", 202)])]),
            ("the server speaking first past the boundary", true,
             vec![Client(get("/b")), Boundary, Server(answer(201)), Client(get("/c")), Server(answer(202))],
             [billed(&[("/b", 201)]), billed(&[("/c", 202)])]),
        ];
        for (case, from_syn, steps, expected) in cases {
            assert_eq!(two_runs(from_syn, false, &steps), expected, "{case}");
        }
    }

    /// With the hand-over of where the client's next request begins, the next run reads in step: a stray
    /// line end or a long request line is its own request, and a body that looks like requests is a body.
    #[test]
    fn where_the_stopping_run_knew_the_framing_the_next_run_reads_in_step_from_the_boundary() {
        let long = format!("/long?{}", "q".repeat(1500));
        let forged = b"GET /forged HTTP/1.1\r\nHost: api\r\napikey: someone-else\r\n\r\n";
        let body = [&b"0123456789"[..], forged].concat();
        let upload = [format!("POST /upload HTTP/1.1\r\nHost: api\r\nContent-Length: {}\r\n\r\n", body.len())
            .as_bytes(), &body[..10]].concat();
        let chunked = |size_line: &str| {
            [format!("POST /upload HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: chunked\r\n\r\n{size_line}").as_bytes(),
             &body[..10]].concat()
        };
        let chunk = format!("{:x}\r\n", body.len());
        let cases: Vec<Case> = vec![
            ("an upload whose body past the boundary looks like a request", true,
             vec![Client(upload), Boundary, Client(body[10..].to_vec()), Server(answer(201)), Client(get("/real")),
                  Server(answer(202))],
             [billed(&[("/upload", 201)]), billed(&[("/real", 202)])]),
            ("inside a chunk's data, whose rest looks like a request", true,
             vec![Client(chunked(&chunk)), Boundary, Client([&body[10..], b"\r\n0\r\n\r\n"].concat()),
                  Server(answer(201)), Client(get("/real")), Server(answer(202))],
             [billed(&[("/upload", 201)]), billed(&[("/real", 202)])]),
            ("at a chunk's size line, whose chunk looks like a request", true,
             vec![Client([chunked(&chunk), body[10..].to_vec(), b"\r\n".to_vec()].concat()), Boundary,
                  Client([format!("{:x}\r\n", forged.len()).as_bytes(), forged, b"\r\n0\r\n\r\n"].concat()),
                  Server(answer(201)), Client(get("/real")), Server(answer(202))],
             [billed(&[("/upload", 201)]), billed(&[("/real", 202)])]),
            ("a stray line end before the next request", true,
             vec![Client(get("/a")), Server(answer(200)), Boundary, Client([&b"\r\n"[..], &get("/c")].concat()),
                  Server(answer(202))],
             [billed(&[("/a", 200)]), billed(&[("/c", 202)])]),
            ("a request line longer than its first segment", true,
             vec![Client(get("/a")), Server(answer(200)), Boundary, Client(get(&long)[..1000].to_vec()),
                  Client(get(&long)[1000..].to_vec()), Server(answer(202))],
             [billed(&[("/a", 200)]), billed(&[(long.as_str(), 202)])]),
            ("a request pipelined behind one in flight", true,
             vec![Client(get("/a")), Server(answer(200)), Client(get("/b")), Boundary, Client(get("/c")),
                  Server(answer(201)), Server(answer(202))],
             [billed(&[("/a", 200), ("/b", 201)]), billed(&[("/c", 202)])]),
            ("a head straddling the boundary: not known, as without the hand-over", true,
             vec![Client(get("/b")[..20].to_vec()), Boundary, Client(get("/b")[20..].to_vec()), Server(answer(201)),
                  Client(get("/c")), Server(answer(202))],
             [billed(&[("/b", 201)]), billed(&[("/c", 202)])]),
        ];
        for (case, from_syn, steps, expected) in cases {
            assert_eq!(two_runs(from_syn, true, &steps), expected, "{case}");
        }
    }

    #[test]
    fn answers_owed_to_a_run_before_the_last_are_handed_on_through_the_restarts_between() {
        let run = || HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let joined = |id| {
            let mut conversation = Conversation::new(id);
            conversation.info.saw_syn = false;
            conversation
        };
        // run 1 bills /a and /b, stops before their answers; its next run sees no packet of connection 2,
        // and /b is still owed when that run stops too
        let (mut first, mut one, mut two) = (run(), Conversation::new(1), Conversation::new(2));
        one.send(&mut first, true, 1.0, &get("/a"));
        two.send(&mut first, true, 1.0, &get("/b"));
        first.leave_new_requests(packets, false);
        let mut second = run();
        second.expect_answers(first.answers_owed());
        assert_eq!(first.take().count(), 0);
        let mut one_again = joined(1);
        one_again.send(&mut second, true, 2.0, &get("/c")); // pipelined behind /a: the second run's
        second.leave_new_requests(packets, false);
        let mut third = run();
        third.expect_answers(second.answers_owed());
        let (mut one_third, mut two_third) = (joined(1), joined(2));
        one_third.send(&mut third, false, 3.0, &answer(200));
        two_third.send(&mut third, false, 3.0, &answer(201));
        one_third.send(&mut third, false, 3.0, &answer(202));
        two_third.send(&mut third, true, 3.0, &get("/d"));
        two_third.send(&mut third, false, 3.0, &answer(203));
        let billed: Vec<(Vec<u8>, u16)> = third.take().map(|exchange| (exchange.request.target, exchange.status)).collect();
        assert_eq!(billed, [(b"/d".to_vec(), 203)], "the answers to /a, /b and /c are owed to the runs before");
        assert_eq!(third.counters.unmatched_responses, 0);
    }

    /// A run that joins connection 1 as the next run does, from `base` (the client's sequence number of its
    /// first byte), with what the previous run handed over.
    fn next_run(previous: &HttpExchanges, base: u32) -> (HttpExchanges, Conversation) {
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        http.expect_answers(previous.answers_owed());
        let mut conversation = Conversation::new(1);
        conversation.info.saw_syn = false;
        conversation.info.to_server_base_seq = Some(base);
        (http, conversation)
    }

    fn targets(http: &mut HttpExchanges) -> Vec<(String, u16)> {
        http.take().map(|e| (String::from_utf8(e.request.target).unwrap(), e.status)).collect()
    }

    fn forged_upload() -> (Vec<u8>, Vec<u8>) {
        let rest = b"\r\nGET /forged HTTP/1.1\r\nHost: api\r\napikey: someone-else\r\n\r\n".to_vec();
        let head = format!("POST /upload HTTP/1.1\r\nHost: api\r\nContent-Length: {}\r\n\r\n0123456789", rest.len() + 30);
        (head.into_bytes(), [&[b'x'; 20][..], &rest].concat())
    }

    fn packets(_: &ConnectionInfo) -> bool {
        true
    }

    /// A run that saw `client` on connection 1 from its SYN, then stopped, handing over what it knew: the
    /// run, and the sequence number of the next run's first client byte.
    fn stopped_after(client: &[u8]) -> (HttpExchanges, u32) {
        let mut run = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        conversation.send(&mut run, true, 1.0, client);
        run.leave_new_requests(packets, true);
        (run, 1001 + conversation.sent[0] as u32)
    }

    #[test]
    fn where_the_next_request_begins_is_handed_on_by_a_run_that_did_not_reach_it() {
        let (head, rest) = forged_upload();
        let (first, boundary) = stopped_after(&head);
        let (mut second, _) = next_run(&first, boundary);
        second.leave_new_requests(packets, true); // it stopped before any of connection 1's packets came
        let (mut third, mut conversation) = next_run(&second, boundary);
        conversation.send(&mut third, true, 3.0, &rest);
        conversation.send(&mut third, false, 3.0, &answer(201));
        conversation.send(&mut third, true, 3.0, &get("/real"));
        conversation.send(&mut third, false, 3.0, &answer(202));
        conversation.close(&mut third, 3.5);
        assert_eq!(targets(&mut third), [("/real".to_string(), 202)]);
        // the run between saw the gateway speak first past its own boundary, then the body's end
        let (mut second, mut seen) = next_run(&first, boundary);
        second.leave_new_requests(packets, true);
        seen.send(&mut second, false, 2.0, b"HTTP/1.1 100 Continue\r\n\r\n");
        seen.send(&mut second, true, 2.0, &rest[..22]); // up to the line that looks like a request
        let (mut third, mut conversation) = next_run(&second, boundary + 22);
        conversation.send(&mut third, true, 3.0, &rest[22..]);
        conversation.send(&mut third, false, 3.0, &answer(201));
        conversation.close(&mut third, 3.5);
        assert_eq!(targets(&mut third), []);
    }

    #[test]
    fn a_gap_inside_the_end_of_a_body_read_in_step_is_skipped_not_searched() {
        let (head, rest) = forged_upload();
        let (first, boundary) = stopped_after(&head);
        let (mut next, mut conversation) = next_run(&first, boundary);
        conversation.send(&mut next, true, 2.0, &rest[..5]);
        next.event(&conversation.info, true, 2.0, StreamEvent::Gap { lost: 10, position: 5 });
        conversation.sent[0] += 10;
        conversation.send(&mut next, true, 2.0, &rest[15..]);
        conversation.send(&mut next, false, 2.0, &answer(201));
        conversation.close(&mut next, 2.5);
        assert_eq!(targets(&mut next), []);
    }

    #[test]
    fn a_tunnel_opened_before_the_next_runs_first_client_bytes_stays_a_tunnel() {
        let (first, boundary) = stopped_after(b"CONNECT api:443 HTTP/1.1\r\nHost: api:443\r\napikey: k1\r\n\r\n");
        let (mut next, mut conversation) = next_run(&first, boundary);
        conversation.send(&mut next, false, 2.0, b"HTTP/1.1 200 Connection Established\r\n\r\n");
        conversation.send(&mut next, true, 2.0, &get("/inside-the-tunnel"));
        conversation.close(&mut next, 2.5);
        assert_eq!(targets(&mut next), []);
    }

    #[test]
    fn what_was_handed_over_for_a_4_tuple_is_not_applied_to_its_next_incarnation() {
        let (head, _) = forged_upload();
        let (first, boundary) = stopped_after(&head);
        let (mut second, _) = next_run(&first, boundary);
        let mut reborn = Conversation::new(1); // the same 4-tuple, opened again: seen from its SYN
        reborn.info.id = 2;
        reborn.send(&mut second, true, 2.0, &get("/b"));
        second.leave_new_requests(packets, true);
        assert!(second.answers_owed().iter().all(|connection| connection.answers.len() == 1));
        let (mut third, mut conversation) = next_run(&second, 1001 + reborn.sent[0] as u32);
        conversation.send(&mut third, false, 3.0, &answer(201)); // /b's: owed to the second run
        conversation.send(&mut third, true, 3.0, &get("/c"));
        conversation.send(&mut third, false, 3.0, &answer(203));
        conversation.close(&mut third, 3.5);
        assert_eq!(targets(&mut third), [("/c".to_string(), 203)]);
    }

    #[test]
    fn after_a_stops_boundary_requests_begun_before_are_finished_and_new_ones_left_to_the_next_run() {
        fn request(target: &str) -> Vec<u8> {
            format!("POST {target} HTTP/1.1\r\nHost: api\r\napikey: k1\r\nContent-Length: 4\r\n\r\nbody").into_bytes()
        }
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let (mut kept, mut split) = (Conversation::new(1), Conversation::new(2));
        let (waiting, half_sent) = (request("/waiting"), request("/half-sent"));
        kept.send(&mut http, true, 1.0, &waiting);
        split.send(&mut http, true, 1.0, &half_sent[..20]); // its head straddles the boundary
        http.leave_new_requests(packets, false);
        assert_eq!(http.requests_in_flight(packets), 2, "a request waiting, and a head still arriving");
        // the rest of the head, and a request pipelined behind it before the server answered: the next
        // run joins this connection inside a request and takes nothing before the answer, so it is this run's
        split.send(&mut http, true, 1.1, &[&half_sent[20..], &request("/behind-the-split")[..]].concat());
        kept.send(&mut http, true, 1.1, &request("/after-the-boundary")); // pipelined behind the first
        let mut opened_after = Conversation::new(3);
        opened_after.send(&mut http, true, 1.1, &request("/on-a-new-connection"));
        assert_eq!(http.requests_in_flight(packets), 3);
        for conversation in [&mut kept, &mut split, &mut opened_after] {
            conversation.send(&mut http, false, 1.2, RESPONSE);
        }
        split.send(&mut http, false, 1.2, RESPONSE);
        split.send(&mut http, true, 1.25, &request("/after-the-answer")); // the next run takes it
        split.send(&mut http, false, 1.3, RESPONSE);
        kept.send(&mut http, false, 1.3, RESPONSE); // the answer to the request after the boundary
        assert_eq!(http.requests_in_flight(packets), 0);
        let billed: Vec<(Vec<u8>, u16)> = http.take().map(|exchange| (exchange.request.target, exchange.status)).collect();
        let behind = (b"/behind-the-split".to_vec(), 200);
        assert_eq!(billed, [(b"/waiting".to_vec(), 200), (b"/half-sent".to_vec(), 200), behind]);
        assert_eq!((http.counters.after_stop, http.counters.unmatched_responses), (3, 0));
        for conversation in [&kept, &split, &opened_after] {
            conversation.close(&mut http, 1.3);
        }
        assert_eq!((http.take().count(), http.counters.unanswered), (0, 0));
    }


    #[test]
    fn after_a_loss_in_both_directions_each_request_billed_has_its_own_answer() {
        // in the order the reassembler gives it: the server's bytes lost are known at the next request's
        // ACK, the client's once the server acknowledges past them; the request held back until then
        // keeps its own ACK
        for lost_exchanges in 1..4 {
            let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
            let mut conversation = Conversation::new(1);
            conversation.send(&mut http, true, 1.0, &get("/1"));
            conversation.send(&mut http, false, 1.0, &answer(201));
            let (requests, answers) = (get("/lost").len() * lost_exchanges, answer(500).len() * lost_exchanges);
            conversation.lose(&mut http, false, answers);
            conversation.lose(&mut http, true, requests);
            for (target, status) in [("/2", 202), ("/3", 203), ("/4", 204)] {
                conversation.send_having_all(&mut http, &get(target));
                conversation.send(&mut http, false, 1.0, &answer(status));
            }
            assert_eq!(targets(&mut http), billed(&[("/1", 201), ("/2", 202), ("/3", 203), ("/4", 204)]));
            assert_eq!((http.counters.lost_exchanges, http.counters.unmatched_responses), (1, 0));
        }
    }

    #[test]
    fn a_chunked_answer_whose_end_was_lost_with_the_exchanges_after_it_hides_no_answer() {
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        conversation.send(&mut http, true, 1.0, &get("/1"));
        conversation.send(&mut http, false, 1.0, b"HTTP/1.1 201 Fine\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nsome\r\n");
        // the chunked body's end, then /lost and its answer
        conversation.lose(&mut http, false, b"0\r\n\r\n".len() + answer(500).len());
        conversation.lose(&mut http, true, get("/lost").len());
        for (target, status) in [("/2", 202), ("/3", 203)] {
            conversation.send_having_all(&mut http, &get(target));
            conversation.send(&mut http, false, 1.0, &answer(status));
        }
        assert_eq!(targets(&mut http), billed(&[("/1", 201), ("/2", 202), ("/3", 203)]));
    }

    #[test]
    fn an_answer_still_arriving_when_the_capture_ends_is_billed_as_far_as_seen_and_counted() {
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let (mut arriving, mut answered, mut closed) = (Conversation::new(1), Conversation::new(2), Conversation::new(3));
        for conversation in [&mut arriving, &mut answered, &mut closed] {
            conversation.send(&mut http, true, 1.0, &get("/download"));
        }
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npart";
        arriving.send(&mut http, false, 1.0, head);
        answered.send(&mut http, false, 1.0, &answer(200));
        // the server's end inside the body: the gateway sent no more (nginx logs what it sent)
        closed.send(&mut http, false, 1.0, head);
        http.event(&closed.info, false, 1.0, StreamEvent::End { position: head.len() as u64 });
        closed.close(&mut http, 1.0);
        http.capture_ends();
        for conversation in [&arriving, &answered] {
            conversation.close(&mut http, 2.0);
        }
        let sizes: Vec<(u16, u64)> = http.take().map(|exchange| (exchange.status, exchange.response_size)).collect();
        assert_eq!(sizes, [(200, answer(200).len() as u64), (200, head.len() as u64), (200, head.len() as u64)]);
        assert_eq!(http.counters.cut_at_end, 1);
    }

    #[test]
    fn a_loss_from_a_seen_requests_answer_to_past_a_lost_request_leaves_the_next_its_own_answer() {
        // /1's answer, /lost and its answer are lost: the parser finds /1's answer lost (its gap began between
        // answers), and /2's ACK shows /lost's too, whose own ACK was lost with it
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        conversation.send(&mut http, true, 1.0, &get("/1"));
        conversation.lose(&mut http, false, answer(501).len() + answer(502).len());
        conversation.lose(&mut http, true, get("/lost").len());
        conversation.send_having_all(&mut http, &get("/2"));
        conversation.send(&mut http, false, 1.0, &answer(202));
        assert_eq!(targets(&mut http), billed(&[("/2", 202)]));
        assert_eq!(http.counters.unmatched_responses, 0);
    }

    #[test]
    fn with_two_requests_in_flight_one_answer_lost_costs_one_request() {
        // /2 goes out behind /1; /1's answer is lost, and /3 goes out once the client has it: the answer the
        // ACKs show unseen is the one the parser found lost already, not another
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        conversation.send_having(&mut http, &get("/1"), 0);
        conversation.send_having(&mut http, &get("/2"), 0);
        conversation.lose(&mut http, false, answer(201).len());
        conversation.send_having_all(&mut http, &get("/3"));
        conversation.send(&mut http, false, 1.0, &answer(202));
        conversation.send(&mut http, false, 1.0, &answer(203));
        assert_eq!(targets(&mut http), billed(&[("/2", 202), ("/3", 203)]));
        assert_eq!((http.counters.lost_exchanges, http.counters.unmatched_responses), (1, 0));
    }

    #[test]
    fn after_answers_lost_one_after_another_the_next_seen_is_its_own_requests() {
        // a client sending each request once it has the answer before: /2's, /3's and /4's answers are lost,
        // the first one found lost by the parser (its gap began between answers), the others only shown
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        conversation.send(&mut http, true, 1.0, &get("/1"));
        conversation.send(&mut http, false, 1.0, &answer(201));
        for target in ["/2", "/3", "/4", "/5"] {
            if target != "/2" {
                conversation.lose(&mut http, false, answer(500).len());
            }
            conversation.send_having_all(&mut http, &get(target));
        }
        conversation.send(&mut http, false, 1.0, &answer(205));
        assert_eq!(targets(&mut http), billed(&[("/1", 201), ("/5", 205)]));
        assert_eq!((http.counters.lost_exchanges, http.counters.unmatched_responses), (3, 0));
    }

    #[test]
    fn the_first_answer_after_lost_ones_is_framed_as_an_answer_to_its_own_request() {
        // a HEAD's answer says how long its body would be, and has none: read as the lost GET's, it would
        // take the next answer for its body
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        conversation.send(&mut http, true, 1.0, &get("/1"));
        conversation.send(&mut http, false, 1.0, &answer(201));
        conversation.lose(&mut http, false, answer(500).len());
        conversation.lose(&mut http, true, get("/lost").len());
        conversation.send_having_all(&mut http, b"HEAD /2 HTTP/1.1\r\nHost: api\r\napikey: k1\r\n\r\n");
        conversation.send(&mut http, false, 1.0, b"HTTP/1.1 202 Fine\r\nContent-Length: 55\r\n\r\n");
        conversation.send_having_all(&mut http, &get("/3"));
        conversation.send(&mut http, false, 1.0, &answer(203));
        assert_eq!(targets(&mut http), billed(&[("/1", 201), ("/2", 202), ("/3", 203)]));
    }

    #[test]
    fn a_chunked_answer_whose_end_was_lost_is_billed_as_far_as_the_next_request_shows_it_went() {
        // its size would otherwise run on to the next head, over the answers lost with its end
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        conversation.send(&mut http, true, 1.0, &get("/1"));
        let seen = b"HTTP/1.1 201 Fine\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nsome\r\n";
        conversation.send(&mut http, false, 1.0, seen);
        let end = b"0\r\n\r\n";
        conversation.lose(&mut http, false, end.len());
        conversation.send_having_all(&mut http, &get("/2"));
        conversation.lose(&mut http, false, answer(500).len());
        conversation.send_having_all(&mut http, &get("/3"));
        conversation.send(&mut http, false, 1.0, &answer(203));
        let sizes: Vec<(String, u16, u64)> = http.take()
            .map(|exchange| (String::from_utf8(exchange.request.target).unwrap(), exchange.status, exchange.response_size))
            .collect();
        let whole = (seen.len() + end.len()) as u64;
        assert_eq!(sizes, [("/1".into(), 201, whole), ("/3".into(), 203, answer(203).len() as u64)]);
    }

    #[test]
    fn a_request_pipelined_behind_a_chunked_answer_whose_end_was_lost_keeps_its_own_answer() {
        // /3 goes out once the client has all of /1's answer, whose last chunk the capture lost: that
        // unseen tail is /1's, not a lost answer of /2's
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        conversation.send_having(&mut http, &get("/1"), 0);
        conversation.send_having(&mut http, &get("/2"), 0);
        conversation.send(&mut http, false, 1.0, b"HTTP/1.1 201 Fine\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nsome\r\n");
        conversation.lose(&mut http, false, b"0\r\n\r\n".len());
        conversation.send_having_all(&mut http, &get("/3"));
        conversation.send(&mut http, false, 1.0, &answer(202));
        conversation.send(&mut http, false, 1.0, &answer(203));
        assert_eq!(targets(&mut http), billed(&[("/1", 201), ("/2", 202), ("/3", 203)]));
    }

    #[test]
    fn a_request_sent_just_before_a_chunked_answers_unseen_tail_keeps_its_own_answer() {
        // /2 goes out while /1's chunked answer arrives, having all of it the capture saw: then its tail is
        // lost, and /3 goes out once the client has the whole of it
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        conversation.send_having(&mut http, &get("/1"), 0);
        conversation.send(&mut http, false, 1.0, b"HTTP/1.1 201 Fine\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nsome\r\n");
        conversation.send_having_all(&mut http, &get("/2"));
        conversation.lose(&mut http, false, b"5\r\nmore!\r\n0\r\n\r\n".len());
        conversation.send_having_all(&mut http, &get("/3"));
        conversation.send(&mut http, false, 1.0, &answer(202));
        conversation.send(&mut http, false, 1.0, &answer(203));
        assert_eq!(targets(&mut http), billed(&[("/1", 201), ("/2", 202), ("/3", 203)]));
    }

    #[test]
    fn a_chunked_answer_whose_end_is_unseen_is_billed_at_least_the_bytes_seen() {
        // an earlier gap inside the chunk data, /2 pipelined while /1's answer comes, then only the last
        // chunk unseen: /1 is billed past the later gap's start, not cut at the first gap
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        conversation.send_having(&mut http, &get("/1"), 0);
        conversation.send(&mut http, false, 1.0, b"HTTP/1.1 201 Fine\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n");
        conversation.send(&mut http, false, 1.0, &[b'a'; 50]);
        conversation.lose(&mut http, false, 50);
        conversation.send(&mut http, false, 1.0, b"\r\n3e8\r\n");
        conversation.send(&mut http, false, 1.0, &[b'b'; 400]);
        conversation.send_having_all(&mut http, &get("/2"));
        conversation.send(&mut http, false, 1.0, &[b'b'; 600]);
        conversation.send(&mut http, false, 1.0, b"\r\n");
        let seen_up_to = conversation.sent[1];
        conversation.lose(&mut http, false, b"0\r\n\r\n".len());
        conversation.send(&mut http, false, 1.0, &answer(202));
        let billed: Vec<(Vec<u8>, u64)> = http.take().map(|e| (e.request.target, e.response_size)).collect();
        assert_eq!(billed.len(), 2);
        assert_eq!(billed[0].0, b"/1");
        assert!(billed[0].1 >= seen_up_to, "/1 billed {} bytes, {} of its answer were seen", billed[0].1, seen_up_to);
        assert_eq!(billed[1], (b"/2".to_vec(), answer(202).len() as u64));
    }

    #[test]
    fn a_request_pipelined_while_a_lost_answers_body_arrives_keeps_its_own_answer() {
        // the head of /lost's answer is lost with /lost itself; /2 goes out while the rest of that answer's
        // body arrives, /3 once it is in: the answer that ended between them is the lost one, not /2's
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        conversation.send(&mut http, true, 1.0, &get("/1"));
        conversation.send(&mut http, false, 1.0, &answer(201));
        conversation.lose(&mut http, true, get("/lost").len());
        conversation.lose(&mut http, false, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n".len() + 200);
        conversation.send(&mut http, false, 1.0, &[b'x'; 400]);
        conversation.send_having_all(&mut http, &get("/2"));
        conversation.send(&mut http, false, 1.0, &[b'x'; 400]);
        conversation.send_having_all(&mut http, &get("/3"));
        conversation.send(&mut http, false, 1.0, &answer(202));
        conversation.send(&mut http, false, 1.0, &answer(203));
        assert_eq!(targets(&mut http), billed(&[("/1", 201), ("/2", 202), ("/3", 203)]));
        assert_eq!(http.counters.lost_exchanges, 1);
    }

    /// A chunk-size line lost, /2 pipelined after that gap while /1's answer still comes: what was seen
    /// after the gap is /1's, whole.
    #[test]
    fn a_chunked_answer_whose_framing_went_into_the_only_gap_is_billed_every_byte_seen_after_it() {
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        conversation.send_having(&mut http, &get("/1"), 0);
        conversation.send(&mut http, false, 1.0, b"HTTP/1.1 201 Fine\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n");
        conversation.send(&mut http, false, 1.0, &[b'a'; 100]);
        conversation.send(&mut http, false, 1.0, b"\r\n");
        conversation.lose(&mut http, false, b"3e8\r\n".len()); // the chunk-size line: framing lost here
        conversation.send(&mut http, false, 1.0, &[b'b'; 400]);
        conversation.send_having_all(&mut http, &get("/2")); // pipelined while /1's answer still comes
        conversation.send(&mut http, false, 1.0, &[b'b'; 600]);
        conversation.send(&mut http, false, 1.0, b"\r\n0\r\n\r\n");
        let seen_up_to = conversation.sent[1];
        conversation.send(&mut http, false, 1.0, &answer(202));
        let billed: Vec<(Vec<u8>, u64)> = http.take().map(|e| (e.request.target, e.response_size)).collect();
        assert_eq!(billed.len(), 2);
        assert_eq!(billed[0].0, b"/1");
        assert!(billed[0].1 >= seen_up_to - 5, "/1 billed {} bytes, {} of its answer were seen", billed[0].1, seen_up_to - 5);
        assert_eq!(billed[1], (b"/2".to_vec(), answer(202).len() as u64));
    }

    /// After a loss with two requests waiting, the answers a pipelining client's requests get are counted
    /// in doubt; a client that sends each request once it has the answer before is paired by its ACKs, and
    /// is not.
    #[test]
    fn answers_paired_after_a_loss_with_a_pipelining_clients_requests_are_counted_in_doubt() {
        for pipelines in [false, true] {
            let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
            let mut conversation = Conversation::new(1);
            conversation.send_having_all(&mut http, &get("/1"));
            if pipelines {
                conversation.send_having_all(&mut http, &get("/2"));
            }
            conversation.send(&mut http, false, 1.0, &answer(201));
            if !pipelines {
                conversation.send_having_all(&mut http, &get("/2"));
            }
            conversation.send(&mut http, false, 1.0, &answer(202));
            conversation.send_having_all(&mut http, &get("/3"));
            if pipelines {
                conversation.send_having_all(&mut http, &get("/4"));
            }
            conversation.lose(&mut http, false, answer(203).len());
            assert_eq!(http.counters.paired_in_doubt, 0, "nothing paired since the loss");
            if pipelines {
                conversation.send(&mut http, false, 1.0, &answer(214));
            }
            conversation.send_having_all(&mut http, &get("/5"));
            conversation.send(&mut http, false, 1.0, &answer(215));
            let mut expected = billed(&[("/1", 201), ("/2", 202), ("/4", 214), ("/5", 215)]);
            if !pipelines {
                expected.remove(2);
            }
            assert_eq!(targets(&mut http), expected);
            assert_eq!(http.counters.paired_in_doubt, if pipelines { 2 } else { 0 });
        }
    }

    #[test]
    fn pipelined_requests_after_a_lost_answer_are_answered_in_order() {
        // sent before any answer, their ACKs say nothing of which answers were lost: the gap's own lost
        // head is the one loss
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        for target in ["/1", "/2", "/3", "/4"] {
            conversation.send_having(&mut http, &get(target), 0);
        }
        conversation.send(&mut http, false, 1.0, &answer(201));
        conversation.lose(&mut http, false, answer(202).len());
        conversation.send(&mut http, false, 1.0, &answer(203));
        conversation.send(&mut http, false, 1.0, &answer(204));
        assert_eq!(targets(&mut http), billed(&[("/1", 201), ("/3", 203), ("/4", 204)]));
        assert_eq!(http.counters.lost_exchanges, 1);
    }

    /// The client leaves (FIN), then the server: nginx's 499 for a whole request, 400 for one whose body
    /// was cut short.
    #[test]
    fn a_request_its_client_left_is_499_or_400_when_its_body_was_cut_short() {
        let whole = b"POST /a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc".as_slice();
        let cut = b"POST /a HTTP/1.1\r\nContent-Length: 30\r\n\r\nabc".as_slice();
        for (request, status) in [(whole, 499), (cut, 400)] {
            let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
            let mut conversation = Conversation::new(1);
            conversation.send(&mut http, true, 1.0, request);
            conversation.client_then_server_leave(&mut http);
            let exchanges: Vec<Exchange> = http.take().collect();
            let [exchange] = &exchanges[..] else { panic!("{exchanges:?}") };
            assert_eq!((exchange.status, exchange.response_size), (status, 0));
            assert_eq!((http.counters.client_closed, http.counters.unanswered), (1, 0));
        }
    }

    /// Answers went unseen (one gap: the parser loses one head, /2's), then the client left, then the
    /// server: nginx answered /3, so it is unanswered here, not 499; a request sent once the client had what
    /// went unseen is 499 still.
    #[test]
    fn a_request_whose_answer_went_unseen_before_both_sides_closed_is_not_taken_for_one_its_client_left() {
        for sent_after_the_gap in [false, true] {
            let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
            let mut conversation = Conversation::new(1);
            conversation.send_having_all(&mut http, &get("/1"));
            conversation.send(&mut http, false, 1.0, &answer(201));
            conversation.send_having_all(&mut http, &get("/2"));
            conversation.send_having(&mut http, &get("/3"), conversation.sent[1] + answer(202).len() as u64);
            conversation.lose(&mut http, false, answer(202).len() + answer(203).len());
            if sent_after_the_gap {
                conversation.send_having_all(&mut http, &get("/4"));
            }
            conversation.client_then_server_leave(&mut http);
            let mut expected = billed(&[("/1", 201), ("/3", 0)]);
            if sent_after_the_gap {
                expected.push(("/4".to_string(), CLIENT_CLOSED_REQUEST));
            }
            assert_eq!(targets(&mut http), expected);
        }
    }

    /// nginx reads a connection's requests one at a time and logs none it never read: the requests still
    /// waiting after an answer that said `Connection: close` (its keep-alive limit, say), those sent after
    /// its FIN, those after the one it was at when it closed first otherwise (a crash: that one stays
    /// unanswered), and those behind the one a leaving client gave up on (that one 499) are not billed; a
    /// request still arriving when the gateway closed is (it may have timed out, 408), with status 0; after
    /// a loss, none is taken for unread.
    #[test]
    fn the_requests_the_gateway_never_read_are_counted_not_billed() {
        let closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".to_vec();
        // (the gateway's answer before it closes, or the client leaves first; billed; never read)
        type Case<'a> = (Option<Vec<u8>>, &'a [(&'a str, u16)], u64);
        let cases: [Case; 3] = [
            (Some(closing.clone()), &[("/1", 200)], 2),
            (Some(answer(200)), &[("/1", 200), ("/2", 0)], 1),
            (None, &[("/1", CLIENT_CLOSED_REQUEST)], 2),
        ];
        for (gateway_closes_after, expected, never_read) in cases {
            let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
            let mut conversation = Conversation::new(1);
            conversation.send_having_all(&mut http, &[get("/1"), get("/2"), get("/3")].concat());
            if let Some(first_answer) = &gateway_closes_after {
                conversation.send(&mut http, false, 1.0, first_answer);
                http.event(&conversation.info, false, 2.0, StreamEvent::End { position: conversation.sent[1] });
                http.event(&conversation.info, true, 2.001, StreamEvent::End { position: conversation.sent[0] });
                conversation.close(&mut http, 2.002);
            } else {
                conversation.client_then_server_leave(&mut http);
            }
            assert_eq!(targets(&mut http), billed(expected));
            assert_eq!(http.counters.never_read, never_read, "{expected:?}");
        }
        // requests sent as the gateway closed an idle keep-alive connection (its FIN came first)
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        conversation.send_having_all(&mut http, &get("/1"));
        conversation.send(&mut http, false, 1.0, &answer(200));
        http.event(&conversation.info, false, 2.0, StreamEvent::End { position: conversation.sent[1] });
        conversation.send_having_all(&mut http, &[get("/2"), get("/3")].concat());
        http.event(&conversation.info, true, 2.001, StreamEvent::End { position: conversation.sent[0] });
        conversation.close(&mut http, 2.002);
        assert_eq!(targets(&mut http), billed(&[("/1", 200)]));
        assert_eq!(http.counters.never_read, 2);
        // after an answer that said Connection: close, a client that leaves first leaves nothing nginx read
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        conversation.send_having_all(&mut http, &[get("/1"), get("/2")].concat());
        conversation.send(&mut http, false, 1.0, &closing);
        conversation.client_then_server_leave(&mut http);
        assert_eq!(targets(&mut http), billed(&[("/1", 200)]));
        assert_eq!(http.counters.never_read, 1);
        // an upgrade answered while its request's body was still arriving was read: it stays billed
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        conversation.send_having_all(&mut http, b"POST /ws HTTP/1.1\r\nUpgrade: websocket\r\nContent-Length: 10\r\n\r\n12345");
        conversation.send(&mut http, false, 1.0, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n");
        conversation.client_then_server_leave(&mut http);
        assert_eq!(targets(&mut http), billed(&[("/ws", 101)]));
        assert_eq!(http.counters.never_read, 0);
        // after a loss an answer seen may have gone to another request: nothing is taken for never read
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        conversation.send_having_all(&mut http, &[get("/1"), get("/2"), get("/3")].concat());
        conversation.lose(&mut http, false, answer(200).len());
        conversation.send(&mut http, false, 1.0, &closing);
        conversation.client_then_server_leave(&mut http);
        assert_eq!(targets(&mut http), billed(&[("/2", 200), ("/3", CLIENT_CLOSED_REQUEST)]));
        assert_eq!((http.counters.lost_exchanges, http.counters.never_read), (1, 0));
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        conversation.send_having_all(&mut http, b"POST /slow HTTP/1.1\r\nContent-Length: 10\r\n\r\n12345");
        http.event(&conversation.info, false, 2.0, StreamEvent::End { position: 0 });
        conversation.close(&mut http, 2.001);
        assert_eq!(targets(&mut http), billed(&[("/slow", 0)]));
        assert_eq!(http.counters.never_read, 0);
    }

    /// `Expect: 100-continue`, the interim answer, then the client leaves without the body: nginx logs 400
    /// with the interim answer's 25 bytes (it had been unanswered, status 0).
    #[test]
    fn a_client_that_leaves_after_the_interim_answer_is_billed_400_with_its_bytes() {
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        let head = b"POST /upload HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n";
        conversation.send_having_all(&mut http, head);
        let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
        conversation.send(&mut http, false, 1.5, interim);
        conversation.client_then_server_leave(&mut http);
        let exchanges: Vec<Exchange> = http.take().collect();
        let sizes: Vec<(u16, u64)> = exchanges.iter().map(|e| (e.status, e.response_size)).collect();
        assert_eq!(sizes, [(CLIENT_LEFT_MID_BODY, interim.len() as u64)]);
        assert_eq!((http.counters.client_closed, http.counters.unanswered), (1, 0));
    }

    /// `MAX_PENDING + extra` pipelined requests, each for a distinct path; the queue overflows once.
    fn overflowing(http: &mut HttpExchanges, conversation: &mut Conversation, extra: usize) {
        for index in 0..MAX_PENDING + extra {
            conversation.send(http, true, 1.0, format!("GET /{index} HTTP/1.1\r\n\r\n").as_bytes());
        }
    }

    fn response(status: u16) -> Vec<u8> {
        format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n").into_bytes()
    }

    #[test]
    fn after_a_queue_overflow_the_late_answers_pair_with_no_later_request() {
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        overflowing(&mut http, &mut conversation, 2);
        let handed: Vec<Exchange> = http.take().collect();
        assert_eq!(handed.len(), MAX_PENDING);
        assert!(handed.iter().all(|exchange| exchange.status == 0));
        for _ in 0..MAX_PENDING {
            conversation.send(&mut http, false, 2.0, &response(404));
        }
        for _ in 0..2 {
            conversation.send(&mut http, false, 2.0, &response(200));
        }
        let answered: Vec<Exchange> = http.take().collect();
        assert_eq!(answered.iter().map(|exchange| exchange.status).collect::<Vec<_>>(), vec![200, 200]);
        assert_eq!(answered[0].request.target, format!("/{MAX_PENDING}").into_bytes());
        assert_eq!(http.counters.late_responses, MAX_PENDING as u64);
    }

    #[test]
    fn an_interim_late_answer_leaves_its_final_one_to_come() {
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        conversation.send(&mut http, true, 1.0, b"GET /first HTTP/1.1\r\n\r\n");
        conversation.send(&mut http, false, 1.5, b"HTTP/1.1 100 Continue\r\n\r\n");
        overflowing(&mut http, &mut conversation, 0);
        http.take().for_each(drop);
        // the first request's final answer and those of the 1023 handed on with it are late
        for _ in 0..MAX_PENDING {
            conversation.send(&mut http, false, 2.0, &response(404));
        }
        conversation.send(&mut http, false, 2.0, &response(200));
        let answered: Vec<Exchange> = http.take().collect();
        assert_eq!(answered.iter().map(|exchange| exchange.status).collect::<Vec<_>>(), vec![200]);
        assert_eq!(http.counters.late_responses, MAX_PENDING as u64);
    }

    #[test]
    fn a_late_answer_lost_to_a_gap_costs_no_later_request_its_answer() {
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        overflowing(&mut http, &mut conversation, 1);
        http.take().for_each(drop);
        conversation.send(&mut http, false, 2.0, &response(404));
        let position = conversation.sent[1];
        let lost = response(404).len() as u64;
        http.event(&conversation.info, false, 2.0, StreamEvent::Gap { lost, position });
        conversation.sent[1] += lost;
        for _ in 2..MAX_PENDING {
            conversation.send(&mut http, false, 2.0, &response(404));
        }
        conversation.send(&mut http, false, 2.0, &response(200));
        let answered: Vec<Exchange> = http.take().collect();
        assert_eq!(answered.iter().map(|exchange| exchange.status).collect::<Vec<_>>(), vec![200]);
        assert_eq!(http.counters.lost_exchanges, 0);
    }

    #[test]
    fn an_interim_response_counts_towards_the_final_one() {
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
        conversation.send(&mut http, true, 0.0, b"POST /u HTTP/1.1\r\nContent-Length: 4\r\n\r\n");
        conversation.send(&mut http, false, 0.0, interim);
        conversation.send(&mut http, true, 0.0, b"data");
        conversation.send(&mut http, false, 0.0, RESPONSE);
        let exchanges: Vec<Exchange> = http.take().collect();
        assert_eq!(
            exchanges.iter().map(|e| (e.status, e.response_size)).collect::<Vec<_>>(),
            [(200, (interim.len() + RESPONSE.len()) as u64)]
        );
    }

    #[test]
    fn a_late_unreadable_response_leaves_the_exchange_handed_on_alone() {
        // The Python's `_response_lost` set `request = None` on the very object it had handed on.
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        conversation.send(&mut http, true, 10.0, REQUEST);
        http.expire(71.0);
        conversation.send(&mut http, false, 80.0, b"HTTP/1.1 200 OK\r\nBad Header\x01Line\r\n\r\n");
        conversation.send(&mut http, false, 80.0, b"HTTP/9 nonsense\r\n\r\n");
        let exchanges: Vec<Exchange> = http.take().collect();
        let [exchange] = &exchanges[..] else { panic!("{exchanges:?}") };
        assert_eq!(
            (&exchange.request.target[..], exchange.status, exchange.response_size),
            (&b"/orders?page=2"[..], 0, 0)
        );
        assert_eq!(http.counters.unanswered, 1);
    }

    #[test]
    fn a_late_response_is_counted_and_changes_nothing() {
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        conversation.send(&mut http, true, 10.0, REQUEST);
        http.expire(71.0);
        let handed_on: Vec<Exchange> = http.take().collect();
        conversation.send(&mut http, false, 80.0, RESPONSE);
        conversation.send(&mut http, true, 81.0, REQUEST);
        conversation.send(&mut http, false, 81.5, RESPONSE);
        let after: Vec<Exchange> = http.take().collect();
        assert_eq!((handed_on.len(), handed_on[0].status), (1, 0));
        assert_eq!(after.iter().map(|e| e.response_end).collect::<Vec<_>>(), [81.5]);
        assert_eq!(http.counters.late_responses, 1);
    }

    #[test]
    fn closing_a_connection_hands_on_what_waits_and_releases_its_state() {
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        conversation.send(&mut http, true, 1.0, &[REQUEST, REQUEST, b"GET /partial HTTP/1.1\r\nHo"].concat());
        assert!(http.held_bytes() > 2 * REQUEST.len());
        conversation.close(&mut http, 9.0);
        assert_eq!(http.take().map(|e| e.status).collect::<Vec<_>>(), [0, 0]);
        assert_eq!((http.held_bytes(), http.waiting().count()), (0, 0));
        assert_eq!(http.parser_counters.lost_heads, 1);
    }

    #[test]
    fn a_connection_s_queue_never_exceeds_max_pending() {
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        for _ in 0..3 * MAX_PENDING {
            conversation.send(&mut http, true, 0.0, REQUEST);
            assert!(http.waiting().all(|(_, waiting)| waiting <= MAX_PENDING));
        }
        assert_eq!(http.counters.unpaired_overflows, 2);
        assert_eq!(http.take().count(), 2 * MAX_PENDING);
    }

    #[test]
    fn expiry_hands_on_connections_in_the_order_they_were_first_seen() {
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversations: Vec<Conversation> = (1..=40).map(Conversation::new).collect();
        for conversation in &mut conversations {
            conversation.send(&mut http, true, 0.0, REQUEST);
        }
        http.expire(100.0);
        let ids: Vec<u64> = http.take().map(|e| e.connection.id).collect();
        assert_eq!(ids, (1..=40).collect::<Vec<_>>());
    }

    #[test]
    fn an_upgrade_is_billed_and_its_tunnel_ignored() {
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut conversation = Conversation::new(1);
        conversation.send(&mut http, true, 0.0, b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n");
        conversation.send(&mut http, false, 0.0, b"HTTP/1.1 101 Switching Protocols\r\n\r\n");
        conversation.send(&mut http, true, 0.0, REQUEST);
        conversation.send(&mut http, false, 0.0, RESPONSE);
        conversation.close(&mut http, 1.0);
        assert_eq!(http.take().map(|e| e.status).collect::<Vec<_>>(), [101]);
        assert_eq!(http.counters.requests, 1);
    }

    const MAX_HEAD_BYTES_FOR_TESTS: usize = crate::http::parser::MAX_HEAD_BYTES;

    const BENCH: [(u64, u32); 2] = [(10, 50_000), (1000, 500)];

    /// `cargo test --release -- --ignored --nocapture exchanges_per_second`: a typical request and response
    /// (one segment each), over a few connections and over many.
    #[test]
    #[ignore]
    fn exchanges_per_second() {
        let request = b"GET /customers/4680/invoices?page=2 HTTP/1.1\r\nHost: api.example.test\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\napikey: bob-key-41d2e8\r\n\r\n";
        let response = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 27\r\nConnection: keep-alive\r\nX-Kong-Upstream-Latency: 2\r\nX-Kong-Proxy-Latency: 0\r\nVia: kong/3.9.0\r\n\r\n{\"invoices\": [1, 2, 3, 4]}\n";
        for (connections, rounds) in BENCH {
            let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
            let mut conversations: Vec<Conversation> = (1..=connections).map(Conversation::new).collect();
            let started = std::time::Instant::now();
            let mut total = 0;
            for round in 0..rounds {
                for conversation in &mut conversations {
                    conversation.send(&mut http, true, f64::from(round), request);
                    conversation.send(&mut http, false, f64::from(round), response);
                }
                total += http.take().count();
            }
            let elapsed = started.elapsed();
            assert_eq!(total, rounds as usize * conversations.len());
            println!("{connections} connections: {:.0} ns per exchange", elapsed.as_nanos() as f64 / total as f64);
        }
    }

    /// The server's gap holds /lost's head and the rest of its answer, /b's whole
    /// answer and /c's head; what is seen after the gap is /c's body, then /d's answer. /b was pipelined
    /// while /lost's answer came (inside the gap), /c sent once /b's answer was in (inside the gap too), /d
    /// once /c's was. /d's answer is /d's; /b and /c are lost.
    #[test]
    fn a_gap_holding_a_lost_answers_end_and_the_next_two_answers_skips_both() {
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut c = Conversation::new(1);
        c.send(&mut http, true, 1.0, &get("/1"));
        c.send(&mut http, false, 1.0, &answer(201));
        c.lose(&mut http, true, get("/lost").len());
        let a_at = c.sent[1];
        let a_len = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n".len() + 1000;
        let c_head = b"HTTP/1.1 203 OK\r\nContent-Length: 1000\r\n\r\n".len();
        let b_end = a_at + (a_len + answer(202).len()) as u64;
        c.lose(&mut http, false, a_len + answer(202).len() + c_head + 100);
        c.send_having(&mut http, &get("/b"), a_at + 50); // pipelined while /lost's answer came
        c.send_having(&mut http, &get("/c"), b_end + 5); // once /b's answer was in
        c.send(&mut http, false, 1.0, &[b'x'; 900]); // the rest of /c's answer
        c.send_having_all(&mut http, &get("/d"));
        c.send(&mut http, false, 1.0, &answer(204));
        assert_eq!(targets(&mut http), billed(&[("/1", 201), ("/d", 204)]));
    }

    /// A gap inside the last answer's Content-Length body (it completed: the gap held no head), /2
    /// pipelined during that download, the client leaves, then the server: nothing can hide /2's answer,
    /// it is nginx's 499.
    #[test]
    fn a_gap_inside_a_framed_body_does_not_hide_a_499() {
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut c = Conversation::new(1);
        c.send_having_all(&mut http, &get("/1"));
        c.send(&mut http, false, 1.0, b"HTTP/1.1 201 OK\r\nContent-Length: 1000\r\n\r\n");
        c.send(&mut http, false, 1.0, &[b'x'; 100]);
        c.lose(&mut http, false, 500);
        c.send_having(&mut http, &get("/2"), c.sent[1] - 100); // pipelined, inside the gap
        c.send(&mut http, false, 1.0, &[b'x'; 400]); // /1's answer completes
        c.client_then_server_leave(&mut http);
        assert_eq!(targets(&mut http), billed(&[("/1", 201), ("/2", CLIENT_CLOSED_REQUEST)]));
    }

    /// The same with the request's ACK unknown (every request of the TLS source has none), /2 sent after
    /// /1's answer was whole: 499.
    #[test]
    fn a_request_with_no_ack_after_a_gap_inside_a_framed_body_is_still_499() {
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut c = Conversation::new(1);
        c.send(&mut http, true, 1.0, &get("/1"));
        c.send(&mut http, false, 1.0, b"HTTP/1.1 201 OK\r\nContent-Length: 1000\r\n\r\n");
        c.send(&mut http, false, 1.0, &[b'x'; 100]);
        c.lose(&mut http, false, 500);
        c.send(&mut http, false, 1.0, &[b'x'; 400]);
        c.send(&mut http, true, 1.5, &get("/2")); // peer_acked -1, as tls.rs sends a request when it cannot tell
        c.client_then_server_leave(&mut http);
        assert_eq!(targets(&mut http), billed(&[("/1", 201), ("/2", CLIENT_CLOSED_REQUEST)]));
    }

    /// A chunk-size line lost, then a second gap takes /1's end and /2's head: what is seen after it is
    /// /2's body, not /1's, and /1 is billed no further than /2's ACK shows.
    #[test]
    fn a_later_gap_keeps_the_cap_on_a_chunked_answer_whose_framing_was_lost() {
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut c = Conversation::new(1);
        c.send_having(&mut http, &get("/1"), 0);
        c.send(&mut http, false, 1.0, b"HTTP/1.1 201 Fine\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n");
        c.send(&mut http, false, 1.0, &[b'a'; 100]);
        c.send(&mut http, false, 1.0, b"\r\n");
        c.lose(&mut http, false, b"3e8\r\n".len());
        c.send(&mut http, false, 1.0, &[b'b'; 1000]);
        let had = c.sent[1];
        c.send_having_all(&mut http, &get("/2"));
        let head2 = b"HTTP/1.1 202 Fine\r\nContent-Length: 2000\r\n\r\n";
        c.lose(&mut http, false, b"\r\n0\r\n\r\n".len() + head2.len());
        c.send(&mut http, false, 1.0, &[b'c'; 2000]);
        c.send_having_all(&mut http, &get("/3"));
        c.send(&mut http, false, 1.0, &answer(203));
        let billed: Vec<(Vec<u8>, u64, u16)> = http.take().map(|e| (e.request.target, e.response_size, e.status)).collect();
        assert_eq!(billed[0].0, b"/1");
        assert!(billed[0].1 <= had, "/1 billed {} bytes, /2 was sent having {had}", billed[0].1);
        assert_eq!(billed.last().map(|b| (b.0.clone(), b.2)), Some((b"/3".to_vec(), 203)));
    }

    /// While looking for the next head the parser keeps the last bytes seen (a head may span segments): a
    /// gap there bills them to the message, which had been billed that much short.
    #[test]
    fn bytes_kept_to_find_a_head_are_billed_when_a_gap_follows() {
        let mut http = HttpExchanges::new(60.0, MAX_HEAD_BYTES_FOR_TESTS);
        let mut c = Conversation::new(1);
        c.send_having(&mut http, &get("/1"), 0);
        c.send(&mut http, false, 1.0, b"HTTP/1.1 201 Fine\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n");
        c.send(&mut http, false, 1.0, &[b'a'; 100]);
        c.send(&mut http, false, 1.0, b"\r\n");
        c.lose(&mut http, false, b"3e8\r\n".len());
        c.send(&mut http, false, 1.0, &[b'b'; 1000]);
        let had = c.sent[1];
        c.send_having_all(&mut http, &get("/2"));
        c.lose(&mut http, false, b"\r\n0\r\n\r\n".len());
        c.send(&mut http, false, 1.0, &answer(202));
        let billed: Vec<(Vec<u8>, u64)> = http.take().map(|e| (e.request.target, e.response_size)).collect();
        assert_eq!(billed[0].0, b"/1");
        assert!(billed[0].1 >= had, "/1 billed {} bytes, {had} of it were seen before /2 was sent", billed[0].1);
    }
}
