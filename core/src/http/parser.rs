//! Incremental HTTP/1.x message framing for one direction of a connection.
//! The rules are nginx's lenient ones, as regular expressions once stated them; they are written out by
//! hand here, each function saying which one it is.
//!
//! Fed bytes (and gaps) in stream order, it reports where each message's head ends and where the message
//! ends, counting body bytes without keeping them. After a gap it cannot bridge, or a message it cannot
//! frame, it resynchronises at the next start line instead of giving up on the connection. Requests are
//! judged as the gateway's nginx judges them (what it answers 400 or 501 never reaches Kong, so is never
//! billed); responses stay lenient (the server sent them, so what it answered is billed).

use std::sync::LazyLock;

use memchr::memmem::Finder;

use crate::http::message::{trim_ascii_whitespace, Message};

/// A chunk-size or trailer line longer than this loses the body's framing.
pub const MAX_LINE: usize = 4096;
/// The default limit of one message head.
pub const MAX_HEAD_BYTES: usize = 65536;
/// Bytes kept while searching for a start line, so one split across segments is still found.
const RESYNC_KEEP: usize = 256;

#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct ParserCounters {
    pub parse_errors: u64,
    pub lost_heads: u64,
    pub resync_skipped_bytes: u64,
    pub oversized_heads: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Head,
    Body,
    ChunkSize,
    ChunkData,
    ChunkEnd,
    Trailers,
    UntilClose,
    Tunnel,
    Resync,
}

/// What a stream picked up in step begins with (`MessageParser::next_resume`): a message, or, inside a
/// chunked body, the line end after a chunk's data, a chunk's size line, or the trailers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResumeIn {
    Message,
    ChunkEnd,
    ChunkSize,
    Trailers,
}

/// What a response's framing needs to know of the request it answers: the answer to HEAD has no body,
/// a 2xx answer to CONNECT opens a tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestMethod {
    Head,
    Connect,
    Other,
    /// The request was lost to a gap (or never seen): an answer whose head says a body follows may be a
    /// HEAD's, which has none, so the parser looks at what follows the head before taking it for the body.
    Unknown,
}

impl RequestMethod {
    /// As sent (case-sensitive, as nginx compares it).
    pub fn of(method: &[u8]) -> RequestMethod {
        match method {
            b"HEAD" => RequestMethod::Head,
            b"CONNECT" => RequestMethod::Connect,
            _ => RequestMethod::Other,
        }
    }
}

/// Where a parser reports: `head` (the head is known, a body may follow), `complete` (the last byte of
/// the message whose head was reported last was seen) and `lost` (a message began, but its head was lost
/// to a gap or could not be parsed).
pub trait MessageSink {
    fn counters(&mut self) -> &mut ParserCounters;
    /// Responses: how the request being answered was sent; the head begins at `position`, and its first
    /// segment acknowledged `peer_acked` of the peer's stream (-1 when unknown).
    fn answered_method(&mut self, position: u64, peer_acked: i64) -> RequestMethod;
    fn head(&mut self, message: Message);
    fn complete(&mut self, size: u64, end_time: f64);
    fn lost(&mut self);
    /// The direction ended inside the body of the message whose head was reported last (a body with a
    /// length or chunks, not one delimited by the close); `complete` follows.
    fn cut_short(&mut self) {}
    /// The end of the message whose head was reported last was lost to a gap (a chunked body): its
    /// `complete` comes where the next message starts, and its size reaches that far.
    fn end_unseen(&mut self) {}
}

/// The message in progress: in `Head` one whose head is still arriving, in the other states one whose
/// head was reported.
struct Progress {
    start_time: f64,
    position: u64,
    peer_acked: i64,
    size: u64,
}

/// One direction of a connection.
pub struct MessageParser {
    is_request: bool,
    state: State,
    max_head_bytes: usize,
    /// A partial head, a partial chunk line, or the bytes kept while resynchronising.
    buffer: Vec<u8>,
    /// Resynchronising: the kept bytes begin a line (or a segment). The Python took their first byte as
    /// the start of a line whatever preceded it, found start lines there that had been searched already,
    /// and could then read bytes a second time.
    kept_starts_line: bool,
    /// A response to an unknown request whose head says a body follows: its first bytes decide (`feed`).
    body_may_be_absent: bool,
    message: Option<Progress>,
    remaining: u64,
    joined: Joined,
}

/// A request stream joined after its start (its connection's SYN, or the TLS library's start, unseen). Its
/// first bytes may begin a request (a keep-alive connection joined between two). If they do not, the
/// stream is inside a request, whose body may hold text that looks like requests (an upload of logs or
/// HAR files, or a client that means to bill its requests to another key): nothing it sends is searched
/// for a request until the server has spoken, which it does once that request is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Joined {
    Synced,
    FirstBytes,
    UntilAnswer,
}

/// Whether a joined request stream whose first bytes are `bytes` takes them for a request's start.
pub fn begins_a_request(bytes: &[u8]) -> bool {
    Window { kept: &[], data: bytes }.request_start_at(0, true)
}

/// What a head said, once parsed.
struct Parsed {
    method: (usize, usize),
    target: (usize, usize),
    /// `None`: no version (HTTP/0.9 style)
    version: Option<(usize, usize)>,
    status: u16,
    state: State,
    remaining: u64,
    /// A response to a request the capture lost (`RequestMethod::Unknown`).
    unknown_request: bool,
    closes: bool,
    proxied_by_kong: bool,
    answered_by_kong: bool,
}

impl MessageParser {
    /// `synced`: the stream starts at a message boundary (the connection's SYN was seen).
    pub fn new(is_request: bool, synced: bool, max_head_bytes: usize) -> MessageParser {
        MessageParser {
            is_request,
            state: if synced { State::Head } else { State::Resync },
            max_head_bytes,
            buffer: Vec::new(),
            kept_starts_line: true,
            body_may_be_absent: false,
            message: None,
            remaining: 0,
            joined: if is_request && !synced { Joined::FirstBytes } else { Joined::Synced },
        }
    }

    /// Waiting for a message's first byte: the next bytes begin a message (or junk), not the middle of one.
    pub fn between_messages(&self) -> bool {
        self.state == State::Head && self.buffer.is_empty() && self.joined == Joined::Synced
    }

    /// Inside the body of the message whose head was reported last (it has not ended yet).
    pub fn in_body(&self) -> bool {
        self.message.is_some() && !matches!(self.state, State::Head | State::Tunnel)
    }

    /// Where the message in progress (its head still arriving, or its body) began.
    pub fn message_start(&self) -> Option<u64> {
        self.message.as_ref().map(|message| message.position)
    }

    /// Where this stream could be picked up in step, when that is known: how many bytes from the current
    /// position, and into what. 0 into a message between messages; the rest of a body of known length;
    /// inside a chunked body, the rest of a chunk's data, or 0 at the start of one of its lines.
    pub fn next_resume(&self) -> Option<(u64, ResumeIn)> {
        if self.between_messages() {
            return Some((0, ResumeIn::Message));
        }
        if self.message.is_none() || self.joined != Joined::Synced {
            return None;
        }
        match self.state {
            State::Body => Some((self.remaining, ResumeIn::Message)),
            State::ChunkData => Some((self.remaining, ResumeIn::ChunkEnd)),
            State::ChunkEnd if self.buffer.is_empty() => Some((0, ResumeIn::ChunkEnd)),
            State::ChunkSize if self.buffer.is_empty() => Some((0, ResumeIn::ChunkSize)),
            State::Trailers if self.buffer.is_empty() => Some((0, ResumeIn::Trailers)),
            _ => None,
        }
    }

    /// A joined stream whose framing a previous run knew (`next_resume`): `into` begins `skip` bytes from
    /// here, and what comes before is the end of a body the previous run read. False where that cannot be
    /// followed (a chunk's line is never skipped into): the stream is then joined as any other.
    pub fn resume_after(&mut self, skip: u64, into: ResumeIn) -> bool {
        if self.state == State::Tunnel {
            return true; // an answer that opened a tunnel came first: what follows is not HTTP
        }
        let state = match (into, skip) {
            (ResumeIn::Message, 0) => State::Head,
            (ResumeIn::Message, _) => State::Body,
            (ResumeIn::ChunkEnd, 0) => State::ChunkEnd,
            (ResumeIn::ChunkEnd, _) => State::ChunkData,
            (ResumeIn::ChunkSize, 0) => State::ChunkSize,
            (ResumeIn::Trailers, 0) => State::Trailers,
            (ResumeIn::ChunkSize | ResumeIn::Trailers, _) => return false,
        };
        self.buffer.clear();
        self.message = None;
        self.kept_starts_line = true;
        self.joined = Joined::Synced;
        self.remaining = skip;
        self.state = state;
        true
    }

    /// The other direction sent data: a request stream joined inside a request may be searched again.
    pub fn peer_spoke(&mut self) {
        self.joined = Joined::Synced;
    }

    /// The bytes held now (partial head, chunk line or resync window), for tests and the budget.
    pub fn buffered(&self) -> &[u8] {
        &self.buffer
    }

    /// Heap bytes this parser holds.
    pub fn held_bytes(&self) -> usize {
        self.buffer.capacity()
    }

    pub fn feed(&mut self, data: &[u8], time: f64, position: u64, peer_acked: i64, sink: &mut impl MessageSink) {
        let mut offset = 0;
        while offset < data.len() {
            if std::mem::take(&mut self.body_may_be_absent) && self.answer_starts_at(&data[offset..]) {
                // a status line where the body would begin: the answer to a lost HEAD (nginx's have the
                // length a GET's would), not a body that is a response
                self.remaining = 0;
                self.complete(time, sink);
            }
            offset = match self.state {
                State::Head => self.head(data, offset, time, position, peer_acked, sink),
                State::Body | State::ChunkData => {
                    let take = self.remaining.min((data.len() - offset) as u64);
                    self.grow(take);
                    self.remaining -= take;
                    if self.remaining == 0 {
                        if self.state == State::Body {
                            self.complete(time, sink);
                        } else {
                            self.state = State::ChunkEnd;
                        }
                    }
                    offset + take as usize
                }
                State::UntilClose => {
                    self.grow((data.len() - offset) as u64);
                    data.len()
                }
                State::Tunnel => data.len(),
                State::Resync => self.resync_at(data, offset, time, position, peer_acked, sink),
                State::ChunkSize | State::ChunkEnd | State::Trailers => self.chunk_line(data, offset, time, sink),
            };
        }
    }

    /// A response's start line at the start of `data` (all of it there: a shorter segment is taken for a
    /// body, as before).
    fn answer_starts_at(&self, data: &[u8]) -> bool {
        matches!(self.state, State::Body | State::ChunkSize) && Window { kept: &[], data }.response_start_at(0)
    }

    /// `size` bytes of this stream were not captured.
    pub fn gap(&mut self, mut size: u64, time: f64, sink: &mut impl MessageSink) {
        self.body_may_be_absent = false;
        let mut state = self.state;
        if state == State::Tunnel {
            return;
        }
        if state == State::Resync {
            // the bytes kept to find a head across segments were seen: billed before they go
            let kept = std::mem::take(&mut self.buffer).len() as u64;
            self.skip(kept, sink);
        }
        // (a body with no message: the end of one a previous run read, after `resume_after`)
        let resumed_body = matches!(state, State::Body | State::ChunkData | State::ChunkSize | State::ChunkEnd | State::Trailers);
        if (self.message.is_some() || resumed_body) && state != State::Head {
            if state == State::UntilClose {
                self.grow(size);
                return;
            }
            if (state == State::Body || state == State::ChunkData) && self.remaining >= size {
                self.grow(size); // still inside the body: the gap is only skipped
                self.remaining -= size;
                if self.remaining == 0 {
                    // it ends exactly where the body or the chunk's data does
                    if state == State::Body {
                        self.complete(time, sink);
                    } else {
                        self.state = State::ChunkEnd;
                    }
                }
                return;
            }
            if state == State::Body {
                // the body ends inside the gap; what follows it is (part of) a lost message head
                self.grow(self.remaining);
                size -= self.remaining;
                self.complete(time, sink);
                if size <= 2 {
                    // no head is that short: a stray CRLF after the body, which nginx skips
                    self.state = State::Resync;
                    return;
                }
                state = State::Head;
            } else {
                self.grow(size); // a chunked body whose end is now unknown: it ends where the next message starts
                sink.end_unseen();
            }
        }
        if state == State::Head {
            // the gap swallowed (the start of) a message head
            sink.counters().lost_heads += 1;
            self.message = None;
            sink.lost();
        }
        self.state = State::Resync;
        self.buffer = Vec::new();
    }

    /// The direction is over (FIN, RST, expiry): a close-delimited body ends here, anything else is cut short.
    pub fn end(&mut self, time: f64, sink: &mut impl MessageSink) {
        if self.state == State::Head {
            if !trim_ascii_whitespace(&self.buffer).is_empty() {
                // a head cut short, or bytes that never were one
                if self.starts_here(&self.buffer) {
                    sink.counters().lost_heads += 1;
                } else {
                    sink.counters().parse_errors += 1;
                }
                sink.lost();
            }
        } else if self.message.is_some() && self.state != State::Tunnel {
            if self.state != State::UntilClose {
                sink.cut_short();
            }
            self.complete(time, sink);
        }
        self.message = None;
        self.state = State::Tunnel;
        self.buffer = Vec::new();
    }

    /// Drop the message in progress and pick the stream up again at the next start line.
    pub fn resync(&mut self) {
        if self.state != State::Tunnel {
            self.message = None;
            self.buffer = Vec::new();
            self.state = State::Resync;
        }
    }

    /// Ignore the rest of the stream (an upgrade or CONNECT was answered). Returns the size so far of the
    /// message whose head was reported, if one is in progress: it never completes.
    pub fn tunnel(&mut self) -> Option<u64> {
        let in_body = self.state != State::Head && self.state != State::Tunnel;
        let size = self.message.take().filter(|_| in_body).map(|message| message.size);
        self.state = State::Tunnel;
        self.buffer = Vec::new();
        size
    }

    fn grow(&mut self, count: u64) {
        if let Some(message) = &mut self.message {
            message.size = message.size.saturating_add(count);
        }
    }

    fn head(
        &mut self,
        data: &[u8],
        mut offset: usize,
        time: f64,
        position: u64,
        peer_acked: i64,
        sink: &mut impl MessageSink,
    ) -> usize {
        if !self.buffer.is_empty() {
            return self.continue_head(data, offset, time, sink);
        }
        // blank lines between messages are allowed
        while matches!(data.get(offset), Some(b'\r' | b'\n')) {
            offset += 1;
        }
        let Some(rest) = data.get(offset..).filter(|rest| !rest.is_empty()) else { return data.len() };
        self.message = Some(Progress { start_time: time, position: position + offset as u64, peer_acked, size: 0 });
        match find_head_end(rest) {
            Some(end) => {
                if end > self.max_head_bytes {
                    self.lose_oversized_head(sink);
                } else {
                    self.take_head(Some(&rest[..end]), time, sink);
                }
                offset + end
            }
            None => {
                if rest.len() > self.max_head_bytes {
                    self.lose_oversized_head(sink);
                } else {
                    self.buffer.extend_from_slice(rest);
                }
                data.len()
            }
        }
    }

    /// The head began in an earlier segment: look for its end across the boundary. Only an end past the
    /// buffered bytes counts (the buffered ones were searched when they arrived), so the stream only
    /// moves forward.
    fn continue_head(&mut self, data: &[u8], offset: usize, time: f64, sink: &mut impl MessageSink) -> usize {
        let rest = data.get(offset..).unwrap_or_default();
        let buffered = self.buffer.len();
        let searched_from = buffered.saturating_sub(3);
        let tail = self.buffer.get(searched_from..).unwrap_or_default();
        let mut joined = [0u8; 6];
        let first = rest.get(..3).unwrap_or(rest);
        joined[..tail.len()].copy_from_slice(tail);
        joined[tail.len()..tail.len() + first.len()].copy_from_slice(first);
        let joined = &joined[..tail.len() + first.len()];
        let across = (0..tail.len())
            .filter_map(|newline| head_end_at(joined, newline))
            .find(|&end| end > tail.len())
            .map(|end| end - tail.len());
        match across.or_else(|| find_head_end(rest)) {
            Some(consumed) => {
                if buffered + consumed > self.max_head_bytes {
                    self.lose_oversized_head(sink);
                } else {
                    self.buffer.extend_from_slice(&rest[..consumed]);
                    self.take_head(None, time, sink);
                }
                offset + consumed
            }
            None => {
                if buffered + rest.len() > self.max_head_bytes {
                    self.lose_oversized_head(sink);
                } else {
                    self.buffer.extend_from_slice(rest);
                }
                data.len()
            }
        }
    }

    /// A head over the limit is lost however it was segmented: memory stays bounded, and it is counted.
    fn lose_oversized_head(&mut self, sink: &mut impl MessageSink) {
        sink.counters().oversized_heads += 1;
        self.lose_message(sink);
    }

    /// The head is `head`, or the buffer when `None` (a request's head is then moved, not copied).
    fn take_head(&mut self, head: Option<&[u8]>, time: f64, sink: &mut impl MessageSink) {
        let buffered = if head.is_none() { std::mem::take(&mut self.buffer) } else { Vec::new() };
        let bytes = head.unwrap_or(&buffered);
        let Some(parsed) = self.parse_head(bytes, sink) else {
            self.lose_message(sink);
            return;
        };
        let Some(progress) = &mut self.message else { return };
        progress.size = bytes.len() as u64;
        let slice = |(start, end): (usize, usize)| bytes.get(start..end).unwrap_or_default().to_vec();
        let mut message = Message {
            start_time: progress.start_time,
            position: progress.position,
            peer_acked: progress.peer_acked,
            size: progress.size,
            head_end: progress.position + progress.size,
            status: parsed.status,
            ..Message::default()
        };
        if self.is_request {
            message.method = slice(parsed.method);
            message.target = request_uri(slice(parsed.target));
            message.version = parsed.version.map(slice).unwrap_or_default();
            message.head = match head {
                Some(head) => head.to_vec(),
                None => buffered,
            };
        } else {
            message.proxied_by_kong = parsed.proxied_by_kong;
            message.answered_by_kong = parsed.answered_by_kong;
            message.closes = parsed.closes;
        }
        sink.head(message);
        self.remaining = parsed.remaining;
        if parsed.state == State::Head || parsed.state == State::Tunnel {
            self.complete(time, sink); // no body
        }
        self.state = parsed.state;
        self.body_may_be_absent = parsed.unknown_request && matches!(self.state, State::Body | State::ChunkSize);
    }

    /// The start line and framing of a head; `None` when it is lost (a request nginx would refuse, or a
    /// start line that is none).
    fn parse_head(&self, head: &[u8], sink: &mut impl MessageSink) -> Option<Parsed> {
        let mut parsed = Parsed {
            method: (0, 0),
            target: (0, 0),
            version: None,
            status: 0,
            state: State::Head,
            remaining: 0,
            proxied_by_kong: false,
            closes: false,
            unknown_request: false,
            answered_by_kong: false,
        };
        if self.is_request {
            let line = request_line(head)?;
            let lines = HeaderLines::read(head, true);
            if lines.bad || lines.hosts > 1 || memchr::memchr(0, head).is_some() || refused_line(head, &line) {
                return None; // (nginx: "client sent invalid header line", "duplicate host header", ...)
            }
            parsed.method = (0, line.method_end);
            parsed.target = line.target;
            parsed.version = line.version;
            let (start, end) = line.target;
            if line.version.is_none() && head.get(start..end).is_some_and(|target| target.starts_with(b"HTTP/")) {
                // "OPTIONS HTTP/1.1": no target
                parsed.target = (start, start);
                parsed.version = Some((start + 5, end));
            }
            let version = parsed.version.and_then(|(start, end)| head.get(start..end)).unwrap_or_default();
            (parsed.state, parsed.remaining) = request_framing(&lines, version)?;
        } else {
            parsed.status = status_line(head)?;
            let lines = HeaderLines::read(head, false);
            (parsed.proxied_by_kong, parsed.answered_by_kong) = (lines.proxied_by_kong, lines.answered_by_kong);
            parsed.closes = lines.closes;
            let (position, peer_acked) = self.message.as_ref().map_or((0, -1), |head| (head.position, head.peer_acked));
            let method = sink.answered_method(position, peer_acked);
            parsed.unknown_request = method == RequestMethod::Unknown;
            (parsed.state, parsed.remaining) = match response_framing(&lines, parsed.status, method) {
                Some(framing) => framing,
                None => {
                    sink.counters().parse_errors += 1;
                    (State::UntilClose, 0) // framing we cannot trust: it ends where the connection does
                }
            };
        }
        Some(parsed)
    }

    /// ChunkSize, ChunkEnd (the CRLF after chunk data) and Trailers all read one line at a time.
    fn chunk_line(&mut self, data: &[u8], offset: usize, time: f64, sink: &mut impl MessageSink) -> usize {
        let rest = data.get(offset..).unwrap_or_default();
        let Some(newline) = memchr::memchr(b'\n', rest) else {
            self.grow(rest.len() as u64);
            if self.buffer.len() + rest.len() > MAX_LINE {
                sink.counters().parse_errors += 1;
                self.state = State::Resync;
                self.buffer = Vec::new();
            } else {
                self.buffer.extend_from_slice(rest);
            }
            return data.len();
        };
        self.grow(newline as u64 + 1);
        let buffered = std::mem::take(&mut self.buffer);
        let joined;
        let line = if buffered.is_empty() {
            &rest[..newline]
        } else {
            joined = [&buffered[..], &rest[..newline]].concat();
            &joined[..]
        };
        let line = trim_ascii_whitespace(line);
        match self.state {
            State::ChunkSize => {
                let size_text = trim_ascii_whitespace(line.split(|&b| b == b';').next().unwrap_or_default());
                match chunk_size(size_text) {
                    None => {
                        sink.counters().parse_errors += 1;
                        self.state = State::Resync;
                    }
                    Some(0) => self.state = State::Trailers,
                    Some(size) => {
                        self.state = State::ChunkData;
                        self.remaining = size;
                    }
                }
            }
            State::ChunkEnd => {
                if line.is_empty() {
                    self.state = State::ChunkSize;
                } else {
                    // chunk data longer than announced: framing is lost
                    sink.counters().parse_errors += 1;
                    self.state = State::Resync;
                }
            }
            _ => {
                if line.is_empty() {
                    self.complete(time, sink); // the blank line that ends the trailers
                }
            }
        }
        offset + newline + 1
    }

    fn resync_at(
        &mut self,
        data: &[u8],
        offset: usize,
        time: f64,
        position: u64,
        peer_acked: i64,
        sink: &mut impl MessageSink,
    ) -> usize {
        let rest = data.get(offset..).unwrap_or_default();
        if self.joined != Joined::Synced {
            if self.joined == Joined::UntilAnswer || !self.starts_here(rest) {
                self.joined = Joined::UntilAnswer;
                self.skip(rest.len() as u64, sink);
                return data.len();
            }
            self.joined = Joined::Synced;
        }
        if self.starts_here(rest) {
            // messages usually begin where a segment does
            self.skip(self.buffer.len() as u64, sink);
            if self.message.is_some() {
                self.complete(time, sink);
            }
            self.buffer.clear();
            self.state = State::Head;
            return self.head(data, offset, time, position, peer_acked, sink);
        }
        let kept_before = self.buffer.len();
        let window = Window { kept: &self.buffer, data: rest };
        let found = window.find_start(self.is_request, self.kept_starts_line || kept_before == 0);
        let Some(start) = found else {
            let total = kept_before + rest.len();
            let keep = total.min(RESYNC_KEEP);
            if total > keep {
                self.kept_starts_line = window.at(total - keep - 1) == Some(b'\n');
            } else if kept_before == 0 {
                self.kept_starts_line = true;
            }
            self.skip((total - keep) as u64, sink);
            if rest.len() >= keep {
                self.buffer.clear();
                self.buffer.extend_from_slice(&rest[rest.len() - keep..]);
            } else {
                self.buffer.drain(..kept_before - (keep - rest.len()));
                self.buffer.extend_from_slice(rest);
            }
            return data.len();
        };
        self.skip(start as u64, sink);
        if self.message.is_some() {
            // a body cut by a gap ends where the next message starts
            self.complete(time, sink);
        }
        self.state = State::Head;
        self.kept_starts_line = true;
        if start >= kept_before {
            self.buffer.clear();
            return self.head(data, offset + (start - kept_before), time, position, peer_acked, sink);
        }
        // the start line began in the bytes kept from the previous segment
        let back = (kept_before - start) as u64;
        let begins = (position + offset as u64).saturating_sub(back);
        self.message = Some(Progress { start_time: time, position: begins, peer_acked: -1, size: 0 });
        self.buffer.drain(..start);
        self.continue_head(data, offset, time, sink)
    }

    /// REQUEST_START_HERE / RESPONSE_START_HERE: a start line right at the start of `bytes`.
    fn starts_here(&self, bytes: &[u8]) -> bool {
        if self.is_request {
            begins_a_request(bytes)
        } else {
            Window { kept: &[], data: bytes }.response_start_at(0)
        }
    }

    fn skip(&mut self, count: u64, sink: &mut impl MessageSink) {
        match &mut self.message {
            Some(message) => message.size = message.size.saturating_add(count),
            None => {
                let counters = sink.counters();
                counters.resync_skipped_bytes = counters.resync_skipped_bytes.saturating_add(count);
            }
        }
    }

    fn lose_message(&mut self, sink: &mut impl MessageSink) {
        sink.counters().parse_errors += 1;
        self.message = None;
        self.buffer = Vec::new();
        self.state = State::Resync;
        sink.lost();
    }

    fn complete(&mut self, time: f64, sink: &mut impl MessageSink) {
        self.state = State::Head;
        if let Some(message) = self.message.take() {
            sink.complete(message.size, time);
        }
    }
}

/// HEAD_END (`\r?\n\r?\n`), searched from the start: the end of the first blank line. The usual one is
/// CRLF, and the first `\n\r\n` finds it whatever the line before it ended with; only an earlier bare
/// `\n\n` ends the head sooner. (A `\n\r` at the very end is no end yet.)
fn find_head_end(bytes: &[u8]) -> Option<usize> {
    static CRLF: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\n\r\n"));
    static LF: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\n\n"));
    match CRLF.find(bytes) {
        Some(blank) => Some(LF.find(bytes.get(..=blank).unwrap_or_default()).map_or(blank + 3, |bare| bare + 2)),
        None => LF.find(bytes).map(|bare| bare + 2),
    }
}

fn head_end_at(bytes: &[u8], newline: usize) -> Option<usize> {
    if bytes.get(newline) != Some(&b'\n') {
        return None;
    }
    match (bytes.get(newline + 1), bytes.get(newline + 2)) {
        (Some(b'\n'), _) => Some(newline + 2),
        (Some(b'\r'), Some(b'\n')) => Some(newline + 3),
        _ => None,
    }
}

/// `\s` of Python's bytes patterns.
fn is_space(byte: u8) -> bool {
    matches!(byte, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// A token character of a method: `[!#$%&'*+.^_`|~0-9A-Za-z-]`.
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric()
        || matches!(byte, b'!' | b'#'..=b'\'' | b'*' | b'+' | b'-' | b'.' | b'^'..=b'`' | b'|' | b'~')
}

fn is_digits(bytes: &[u8]) -> bool {
    !bytes.is_empty() && bytes.iter().all(u8::is_ascii_digit)
}

/// A decimal length of at most 18 digits (the Python's bound), as `bytes.isdigit()` accepts it.
fn decimal_length(bytes: &[u8]) -> Option<u64> {
    if !is_digits(bytes) || bytes.len() > 18 {
        return None;
    }
    Some(bytes.iter().fold(0u64, |value, &digit| value * 10 + u64::from(digit - b'0')))
}

/// A chunk size: 1 to 16 hex digits and nothing else (nginx refuses "0x10", "+5", "1_0").
fn chunk_size(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() || bytes.len() > 16 {
        return None;
    }
    bytes.iter().try_fold(0u64, |value, &digit| Some(value << 4 | u64::from((digit as char).to_digit(16)?)))
}

struct RequestLine {
    method_end: usize,
    target: (usize, usize),
    version: Option<(usize, usize)>,
}

/// REQUEST_LINE, lenient on purpose (a server that answers a sloppy version still served a request):
/// `([!#$%&'*+.^_`|~0-9A-Za-z-]+) +(\S*)(?: +HTTP/([0-9.]*))? *\r?\n` matched at the start. Every
/// repetition in it is followed by something it cannot match, so reading greedily is its only match.
fn request_line(head: &[u8]) -> Option<RequestLine> {
    let at = |i: usize| head.get(i).copied();
    let spaces = |mut i: usize| {
        while at(i) == Some(b' ') {
            i += 1;
        }
        i
    };
    let method_end = head.iter().position(|&b| !is_tchar(b)).unwrap_or(head.len());
    let target_start = spaces(method_end);
    if method_end == 0 || target_start == method_end {
        return None;
    }
    let target_end = target_start + head.get(target_start..)?.iter().position(|&b| is_space(b)).unwrap_or(0);
    if head.get(target_start..target_end)?.iter().any(|&b| b < 0x20 || b == 0x7f) {
        return None; // nginx's 400 since 1.21.1
    }
    let line_end = |i: usize| {
        let i = spaces(i);
        matches!((at(i), at(i + 1)), (Some(b'\n'), _) | (Some(b'\r'), Some(b'\n')))
    };
    let version_at = spaces(target_end);
    if version_at > target_end && head.get(version_at..).is_some_and(|rest| rest.starts_with(b"HTTP/")) {
        let digits = head.get(version_at + 5..).unwrap_or_default();
        let version_end =
            version_at + 5 + digits.iter().position(|&b| !(b.is_ascii_digit() || b == b'.')).unwrap_or(digits.len());
        if line_end(version_end) {
            let version = Some((version_at + 5, version_end));
            return Some(RequestLine { method_end, target: (target_start, target_end), version });
        }
    }
    line_end(target_end).then_some(RequestLine { method_end, target: (target_start, target_end), version: None })
}

/// STATUS_LINE, `HTTP/\d\.\d +(\d{3})(?:[ \t][^\n]*)?\r?\n` matched at the start: the status.
fn status_line(head: &[u8]) -> Option<u16> {
    let digit = |i: usize| head.get(i).filter(|b| b.is_ascii_digit()).map(|b| u16::from(b - b'0'));
    if !head.starts_with(b"HTTP/") || digit(5).is_none() || head.get(6) != Some(&b'.') || digit(7).is_none() {
        return None;
    }
    let mut i = 8;
    while head.get(i) == Some(&b' ') {
        i += 1;
    }
    if i == 8 {
        return None;
    }
    let status = digit(i)? * 100 + digit(i + 1)? * 10 + digit(i + 2)?;
    match (head.get(i + 3), head.get(i + 4)) {
        // the reason phrase runs to the line's end, and a head always has one
        (Some(b' ' | b'\t'), _) => memchr::memchr(b'\n', &head[i + 3..]).map(|_| status),
        (Some(b'\n'), _) | (Some(b'\r'), Some(b'\n')) => Some(status),
        _ => None,
    }
}

/// What the header lines of a head say, read in one pass over them (every line after the first `\n`).
#[derive(Default)]
struct HeaderLines<'h> {
    /// BAD_HEADER_LINE (see `is_bad_header_line`) matched
    bad: bool,
    /// FRAMING_HEADERS matches, how many (up to 2) and the first
    framing_count: u8,
    first_framing: Option<(bool, &'h [u8])>,
    /// requests: `Host` lines, up to 2 (nginx refuses a second)
    hosts: u8,
    /// the last Transfer-Encoding's value
    transfer_encoding: Option<&'h [u8]>,
    /// the first Content-Length value (each comma-separated part counts), and whether another differs
    length: Option<&'h [u8]>,
    lengths_differ: bool,
    proxied_by_kong: bool,
    answered_by_kong: bool,
    /// responses: `Connection: close`, the gateway closes after this answer
    closes: bool,
}

impl<'h> HeaderLines<'h> {
    /// Requests are checked for bad lines, responses for Kong's headers.
    fn read(head: &'h [u8], is_request: bool) -> HeaderLines<'h> {
        let mut lines = HeaderLines::default();
        for newline in memchr::memchr_iter(b'\n', head) {
            let line = head.get(newline + 1..).unwrap_or_default();
            if is_request {
                // the name runs to the first control character, space or colon
                let name = line.iter().position(|&b| ENDS_NAME[usize::from(b)]).unwrap_or(line.len());
                lines.bad |= is_bad_header_line(line, name);
                if name == 4 && names(line, b"host") {
                    lines.hosts = lines.hosts.saturating_add(1).min(2);
                }
                if name == 14 || name == 17 {
                    if let Some(framing) = framing_header(line) {
                        lines.add_framing(framing);
                    }
                }
                continue;
            }
            match line.first().map(|&b| b | 0x20) {
                Some(b'c' | b't') => {
                    if let Some(framing) = framing_header(line) {
                        lines.add_framing(framing);
                    }
                    lines.closes |= names(line, b"connection")
                        && header_value(line, 10).is_some_and(|value| has_token(value, b"close"));
                }
                Some(b'x') => {
                    lines.proxied_by_kong |= names_header(line, b"x-kong-upstream-latency");
                    lines.answered_by_kong |= names_header(line, b"x-kong-response-latency");
                }
                _ => {}
            }
        }
        lines
    }

    fn add_framing(&mut self, (is_length, value): (bool, &'h [u8])) {
        if self.framing_count == 0 {
            self.first_framing = Some((is_length, value));
        }
        self.framing_count = self.framing_count.saturating_add(1).min(2);
        if !is_length {
            self.transfer_encoding = Some(trim_ascii_whitespace(value));
            return;
        }
        for part in value.split(|&b| b == b',').map(trim_ascii_whitespace) {
            match self.length {
                None => self.length = Some(part),
                Some(seen) => self.lengths_differ |= seen != part,
            }
        }
    }
}

/// BAD_HEADER_LINE at the start of `line` (just after a `\n`): a header line nginx answers 400, whose
/// name holds a space or a control character (`apikey : k`, obsolete line folding, `Bad Name`), or is
/// empty: `\n(?:[^:\x00-\x20\x7f]++(?!\r?\n)[\x00-\x20\x7f]|[\x00-\x09\x0b\x0c\x0e-\x20\x7f:]|\r(?!\n))`.
/// A line of name characters alone, without a colon, nginx ignores, and so does this.
/// `name` is where the line's first control character, space or colon is.
fn is_bad_header_line(line: &[u8], name: usize) -> bool {
    let control = |b: u8| b <= 0x20 || b == 0x7f;
    let line_break = |at: usize| match line.get(at) {
        Some(b'\n') => true,
        Some(b'\r') => line.get(at + 1) == Some(&b'\n'),
        _ => false,
    };
    match line.first().copied() {
        None | Some(b'\n') => false,
        Some(b'\r') => !line_break(0),
        Some(first) if control(first) || first == b':' => true,
        Some(_) => line.get(name).is_some_and(|&b| b != b':') && !line_break(name),
    }
}

/// FRAMING_HEADERS, `\n(content-length|transfer-encoding)[ \t]*:[ \t]*([^\r\n]*)` case-insensitively, at
/// the start of `line`: (is it Content-Length, its value).
fn framing_header(line: &[u8]) -> Option<(bool, &[u8])> {
    let (is_length, name) = if names(line, b"content-length") {
        (true, 14)
    } else if names(line, b"transfer-encoding") {
        (false, 17)
    } else {
        return None;
    };
    Some((is_length, header_value(line, name)?))
}

/// `line` begins with `name`, case-insensitively.
fn names(line: &[u8], name: &[u8]) -> bool {
    line.get(..name.len()).is_some_and(|start| start.eq_ignore_ascii_case(name))
}

/// `line` is a header `name` (case-insensitively), as `Message::header` finds it.
fn names_header(line: &[u8], name: &[u8]) -> bool {
    names(line, name) && header_after_name(line, name.len()).is_some()
}

/// The bytes that end a header name: controls, space, DEL and the colon.
static ENDS_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte <= 0x20 {
        table[byte] = true;
        byte += 1;
    }
    table[0x7f] = true;
    table[b':' as usize] = true;
    table
};

/// What follows `[ \t]*:[ \t]*` after the name's `length` bytes.
fn header_after_name(line: &[u8], length: usize) -> Option<&[u8]> {
    let blank = |b: &&u8| **b == b' ' || **b == b'\t';
    let rest = line.get(length..)?;
    let rest = rest.get(rest.iter().take_while(blank).count()..)?.strip_prefix(b":")?;
    rest.get(rest.iter().take_while(blank).count()..)
}

/// The value of the header line `line` whose name is its first `length` bytes, to the line's end.
fn header_value(line: &[u8], length: usize) -> Option<&[u8]> {
    let value = header_after_name(line, length)?;
    Some(&value[..value.iter().position(|&b| b == b'\r' || b == b'\n').unwrap_or(value.len())])
}

/// A request line nginx answers with an error (400, 505) before Kong runs, though this parser reads it:
/// a method not in capitals (`get`, nginx takes `A-Z`, `_` and `-`), a version past 1.x, an absolute-form
/// target with user information (`http://user@h/`), or a path with an escaped NUL (`%00`).
fn refused_line(head: &[u8], line: &RequestLine) -> bool {
    let method = &head[..line.method_end];
    let (start, end) = line.target;
    let target = &head[start..end];
    let path = &target[..memchr::memchr(b'?', target).unwrap_or(target.len())];
    let version = line.version.map_or(&b""[..], |(start, end)| &head[start..end]);
    let major = &version[..memchr::memchr(b'.', version).unwrap_or(version.len())];
    let authority = absolute_form_authority(target).map_or(&b""[..], |(start, end)| &target[start..end]);
    !method.iter().all(|&b| b.is_ascii_uppercase() || b == b'_' || b == b'-')
        || major.iter().skip_while(|&&b| b == b'0').count() > 1
        || major.iter().skip_while(|&&b| b == b'0').any(|&b| b > b'1')
        || memchr::memchr(b'@', authority).is_some()
        || memchr::memmem::find(path, b"%00").is_some()
}

/// Where the authority of an absolute-form target is (`h.example` of `http://h.example/a`).
fn absolute_form_authority(target: &[u8]) -> Option<(usize, usize)> {
    let scheme = target.iter().position(|b| !b.is_ascii_alphabetic()).unwrap_or(0);
    if scheme == 0 || !target[scheme..].starts_with(b"://") {
        return None;
    }
    let start = scheme + 3;
    Some((start, start + target[start..].iter().position(|&b| b == b'/' || b == b'?').unwrap_or(target.len() - start)))
}

/// nginx's `$request_uri` of a target, which Kong routes on and logs: an absolute-form one (`http://h/a?q`,
/// as a forward proxy's client sends it, and nginx accepts) from its path on, `/` when it has neither path
/// nor query.
fn request_uri(target: Vec<u8>) -> Vec<u8> {
    match absolute_form_authority(&target) {
        None => target,
        Some((_, end)) if end == target.len() => b"/".to_vec(),
        Some((_, end)) => target[end..].to_vec(),
    }
}

/// `token` among the comma-separated tokens of a header value, case-insensitively.
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value.split(|&b| b == b',').any(|part| trim_ascii_whitespace(part).eq_ignore_ascii_case(token))
}

/// A body of `length` bytes (none at 0).
fn body_of(length: u64) -> (State, u64) {
    if length == 0 {
        (State::Head, 0)
    } else {
        (State::Body, length)
    }
}

/// As strict as nginx, which answers 400 (501 for an unknown coding) before Kong runs: one framing header
/// at most, a Content-Length of digits only, and `chunked` alone on HTTP/1.1 and later.
fn request_framing(lines: &HeaderLines<'_>, version: &[u8]) -> Option<(State, u64)> {
    let Some((is_length, value)) = lines.first_framing else { return Some((State::Head, 0)) };
    if lines.framing_count > 1 {
        return None; // a repeated header, or both framings
    }
    let value = trim_ascii_whitespace(value);
    if is_length {
        return decimal_length(value).map(body_of);
    }
    if !at_least_http_1_1(version) {
        return None;
    }
    value.eq_ignore_ascii_case(b"chunked").then_some((State::ChunkSize, 0))
}

/// `major.minor` in ASCII digits, at least 1.1. (The Python took any Unicode digit of the Latin-1
/// decoded version, and `int()` then failed on `HTTP/²`: it is not a version.)
fn at_least_http_1_1(version: &[u8]) -> bool {
    let dot = version.iter().position(|&b| b == b'.').unwrap_or(version.len());
    let (major, minor) = (&version[..dot], version.get(dot + 1..).unwrap_or_default());
    if !is_digits(major) || !is_digits(minor) {
        return false;
    }
    let significant = |digits: &[u8]| {
        let zeros = digits.iter().take_while(|&&b| b == b'0').count();
        digits[zeros..].to_vec()
    };
    let major = significant(major);
    major.len() > 1 || major.first().is_some_and(|&b| b > b'1') || (major == b"1" && !significant(minor).is_empty())
}

/// Responses stay lenient: a repeated Content-Length with one value, the last Transfer-Encoding ending in
/// `chunked`; `None` when nothing can be trusted.
fn response_framing(lines: &HeaderLines<'_>, status: u16, method: RequestMethod) -> Option<(State, u64)> {
    if status == 101 || (method == RequestMethod::Connect && (200..300).contains(&status)) {
        return Some((State::Tunnel, 0));
    }
    if status < 200 || status == 204 || status == 304 || method == RequestMethod::Head {
        return Some((State::Head, 0));
    }
    if let Some(coding) = lines.transfer_encoding {
        let last = coding.rsplit(|&b| b == b',').next().unwrap_or_default();
        return trim_ascii_whitespace(last).eq_ignore_ascii_case(b"chunked").then_some((State::ChunkSize, 0));
    }
    match lines.length {
        None => Some((State::UntilClose, 0)),
        Some(_) if lines.lengths_differ => None,
        Some(length) => decimal_length(length).map(body_of),
    }
}

/// The methods nginx's request-line parser knows by name (it takes others too, where no loss came first).
const KNOWN_METHODS: [&[u8]; 16] = [
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT", b"MKCOL", b"COPY",
    b"MOVE", b"PROPFIND", b"PROPPATCH", b"LOCK", b"UNLOCK",
];

/// The bytes kept while resynchronising followed by the new ones, searched without joining them.
struct Window<'a> {
    kept: &'a [u8],
    data: &'a [u8],
}

impl Window<'_> {
    fn at(&self, i: usize) -> Option<u8> {
        match i.checked_sub(self.kept.len()) {
            None => self.kept.get(i).copied(),
            Some(i) => self.data.get(i).copied(),
        }
    }

    fn has(&self, i: usize, literal: &[u8]) -> bool {
        literal.iter().enumerate().all(|(k, &b)| self.at(i + k) == Some(b))
    }

    /// REQUEST_START (`^METHOD \S+ HTTP/1\.[019]\r?$`, multi-line, METHOD one nginx knows) at `i`, or with
    /// `newline`, REQUEST_START_HERE (the same ending in `\r?\n`). Only a method nginx knows is taken where a
    /// request is looked for (after a loss, in a stream joined mid-way): a loss that took a request's
    /// first letter leaves `ET /x HTTP/1.1`, and a request "ET" there would take the next one's answer.
    fn request_start_at(&self, mut i: usize, newline: bool) -> bool {
        let mut method = [0u8; 9];
        let mut length = 0;
        while let Some(b) = self.at(i).filter(|b| b.is_ascii_uppercase()) {
            if length == method.len() {
                return false;
            }
            (method[length], length, i) = (b, length + 1, i + 1);
        }
        if self.at(i) != Some(b' ') || !KNOWN_METHODS.contains(&&method[..length]) {
            return false;
        }
        i += 1;
        let target = i;
        while self.at(i).is_some_and(|b| !is_space(b)) {
            i += 1;
        }
        if i == target || !self.has(i, b" HTTP/1.") || !matches!(self.at(i + 8), Some(b'0' | b'1' | b'9')) {
            return false;
        }
        i += 9;
        match (self.at(i), self.at(i + 1)) {
            (Some(b'\n'), _) | (Some(b'\r'), Some(b'\n')) => true,
            (None, _) | (Some(b'\r'), None) => !newline,
            _ => false,
        }
    }

    /// RESPONSE_START(_HERE), `HTTP/1\.[019] \d{3}`, at `i`.
    fn response_start_at(&self, i: usize) -> bool {
        self.has(i, b"HTTP/1.")
            && matches!(self.at(i + 7), Some(b'0' | b'1' | b'9'))
            && self.at(i + 8) == Some(b' ')
            && (9..12).all(|k| self.at(i + k).is_some_and(|b| b.is_ascii_digit()))
    }

    /// The first start line beginning a line (or the window, when `from_first`).
    fn find_start(&self, is_request: bool, from_first: bool) -> Option<usize> {
        let matches = |i: usize| if is_request { self.request_start_at(i, false) } else { self.response_start_at(i) };
        if from_first && matches(0) {
            return Some(0);
        }
        let kept = memchr::memchr_iter(b'\n', self.kept).map(|newline| newline + 1);
        let data = memchr::memchr_iter(b'\n', self.data).map(|newline| self.kept.len() + newline + 1);
        kept.chain(data).find(|&i| matches(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the parser reported, in order.
    #[derive(Default)]
    struct Recorder {
        counters: ParserCounters,
        method: Option<RequestMethod>,
        heads: Vec<Message>,
        completed: Vec<(u64, f64)>,
        calls: Vec<&'static str>,
    }

    impl MessageSink for Recorder {
        fn counters(&mut self) -> &mut ParserCounters {
            &mut self.counters
        }
        fn answered_method(&mut self, _: u64, _: i64) -> RequestMethod {
            self.method.unwrap_or(RequestMethod::Other)
        }
        fn head(&mut self, message: Message) {
            self.calls.push("head");
            self.heads.push(message);
        }
        fn complete(&mut self, size: u64, end_time: f64) {
            self.calls.push("complete");
            self.completed.push((size, end_time));
        }
        fn lost(&mut self) {
            self.calls.push("lost");
        }
    }

    /// `wire` fed in pieces of `piece` bytes to a parser of one direction.
    fn parse(is_request: bool, synced: bool, wire: &[u8], piece: usize) -> (MessageParser, Recorder) {
        let mut parser = MessageParser::new(is_request, synced, MAX_HEAD_BYTES);
        let mut recorder = Recorder::default();
        for (index, chunk) in wire.chunks(piece.max(1)).enumerate() {
            parser.feed(chunk, 0.0, (index * piece) as u64, -1, &mut recorder);
        }
        (parser, recorder)
    }

    const GOOD: &[u8] = b"GET /good HTTP/1.1\r\nHost: x\r\n\r\n";

    #[test]
    fn content_length_body_is_counted_and_ends_the_message() {
        let first = b"POST /orders HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n{\"item\": 1}";
        let (_, recorder) = parse(true, true, &[&first[..], GOOD].concat(), 1 << 16);
        assert_eq!(recorder.calls, ["head", "complete", "head", "complete"]);
        let head = &recorder.heads[0];
        assert_eq!(
            (&head.method[..], &head.target[..], &head.version[..]),
            (&b"POST"[..], &b"/orders"[..], &b"1.1"[..])
        );
        assert_eq!(head.head_end, first.len() as u64 - 11);
        assert_eq!(recorder.completed[0].0, first.len() as u64);
        assert_eq!(recorder.heads[1].position, first.len() as u64);
    }

    #[test]
    fn a_chunked_response_is_framed_in_any_pieces() {
        let chunked: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;name=v\r\nhello\r\nA ; x\r\n0123456789\r\n0\r\nX-Sum: 1\r\n\r\n";
        for piece in [1, 2, 7, 1 << 16] {
            let (_, recorder) = parse(false, true, chunked, piece);
            assert_eq!(recorder.completed, [(chunked.len() as u64, 0.0)], "pieces of {piece}");
            assert_eq!(recorder.counters, ParserCounters::default());
        }
    }

    #[test]
    fn a_head_end_split_between_cr_and_lf_is_found() {
        let mut parser = MessageParser::new(true, true, MAX_HEAD_BYTES);
        let mut recorder = Recorder::default();
        parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r", 0.0, 0, -1, &mut recorder);
        parser.feed(b"\nGET /b HTTP/1.1\r\n\r\n", 0.0, 26, -1, &mut recorder);
        assert_eq!(recorder.heads.iter().map(|m| &m.target[..]).collect::<Vec<_>>(), [&b"/"[..], &b"/b"[..]]);
        assert_eq!(recorder.heads[1].position, 27);
        assert_eq!(recorder.heads[0].head, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    }

    #[test]
    fn a_space_in_a_header_name_loses_the_request() {
        let (_, recorder) =
            parse(true, true, &[&b"POST /x HTTP/1.1\r\napikey : k\r\n\r\n"[..], GOOD].concat(), 1 << 16);
        assert_eq!(recorder.calls, ["lost", "head", "complete"]);
        assert_eq!(recorder.counters.parse_errors, 1);
    }

    /// nginx answers 400 before Kong runs to a NUL anywhere in a request's head, and (since 1.21.1) to any
    /// control character in its target.
    #[test]
    fn a_nul_in_a_request_head_or_a_control_character_in_its_target_loses_the_request() {
        for head in [&b"GET /nul\0 HTTP/1.1\r\n\r\n"[..], b"GET /a\x01b HTTP/1.1\r\n\r\n",
                     b"GET /a\x7f HTTP/1.1\r\n\r\n", b"GET /a HTTP/1.1\r\napikey: k\0\r\n\r\n"] {
            let (_, recorder) = parse(true, true, &[head, GOOD].concat(), 1 << 16);
            assert_eq!(recorder.calls, ["lost", "head", "complete"], "{head:?}");
            assert_eq!(recorder.counters.parse_errors, 1);
        }
        let (_, response) = parse(false, true, b"HTTP/1.1 200 OK\r\nX: a\0b\r\nContent-Length: 0\r\n\r\n", 1 << 16);
        assert_eq!(response.calls, ["head", "complete"]);
    }

    /// As nginx's `$request_uri` (checked against nginx 1.22's access log): what Kong routes and logs.
    #[test]
    fn an_absolute_form_target_is_read_from_its_path() {
        for (target, expected) in [("http://h.example/a?apikey=k", "/a?apikey=k"), ("HTTP://h.example", "/"),
                                   ("http://h.example?x=1", "?x=1"), ("/plain?x=http://h/", "/plain?x=http://h/"),
                                   ("*", "*")] {
            let wire = format!("GET {target} HTTP/1.1\r\nHost: other\r\n\r\n");
            let (_, recorder) = parse(true, true, wire.as_bytes(), 1 << 16);
            assert_eq!(String::from_utf8_lossy(&recorder.heads[0].target), expected);
        }
    }

    /// What nginx answers 400 or 505 before Kong runs, though the request line reads: each is lost, and
    /// the request after it is read.
    #[test]
    fn a_request_line_nginx_refuses_loses_the_request() {
        for head in [&b"get /lower HTTP/1.1\r\n\r\n"[..], b"GET /x HTTP/2.0\r\n\r\n", b"GET /x HTTP/10.1\r\n\r\n",
                     b"GET /x HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", b"GET http://user@h/a HTTP/1.1\r\n\r\n",
                     b"GET /c8%00z HTTP/1.1\r\n\r\n"] {
            let (_, recorder) = parse(true, true, &[head, GOOD].concat(), 1 << 16);
            assert_eq!(recorder.calls, ["lost", "head", "complete"], "{:?}", String::from_utf8_lossy(head));
        }
        for head in [&b"M_SEARCH /x HTTP/1.1\r\n\r\n"[..], b"GET /x?q=%00 HTTP/1.1\r\n\r\n", b"GET /x HTTP/01.1\r\n\r\n",
                     b"GET /x HTTP/1.1\r\nHost: a\r\nX-Host: b\r\n\r\n"] {
            let (_, recorder) = parse(true, true, head, 1 << 16);
            assert_eq!(recorder.calls, ["head", "complete"], "{:?}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn a_repeated_content_length_loses_a_request_but_not_a_response() {
        let (_, request) =
            parse(true, true, b"POST /x HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok", 1 << 16);
        assert_eq!(request.calls, ["lost"]);
        let answer: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2, 2\r\n\r\nok";
        let (_, response) = parse(false, true, answer, 1 << 16);
        assert_eq!(response.completed, [(answer.len() as u64, 0.0)]);
    }

    #[test]
    fn a_version_with_a_non_ascii_digit_is_no_version() {
        // "HTTP/²" (Latin-1 0xB2): Python's str.isdigit() took it, then int() raised
        let wire = b"OPTIONS HTTP/\xb2.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let (_, recorder) = parse(true, true, wire, 1 << 16);
        assert_eq!(recorder.calls, ["lost"]);
        assert_eq!(recorder.counters.parse_errors, 1);
    }

    #[test]
    fn a_chunked_request_needs_http_1_1_or_later() {
        // (2.0 over HTTP/1 nginx answers 505, whatever its framing)
        for (version, calls) in [("1.0", &["lost"][..]), ("1.1", &["head", "complete"]), ("2.0", &["lost"])] {
            let wire = format!("POST /x HTTP/{version}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
            let (_, recorder) = parse(true, true, wire.as_bytes(), 1 << 16);
            assert_eq!(recorder.calls, calls, "HTTP/{version}");
        }
    }

    #[test]
    fn a_start_line_at_the_first_kept_byte_is_not_taken_mid_line() {
        // The resync window keeps the last 256 bytes; they begin here with "HTTP/1.1 200" in the middle of a
        // line. The Python took that for a start line, and with the head end inside the kept bytes it read
        // a byte twice.
        let mut junk = b"x".repeat(44);
        junk.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        junk.resize(300 - 3, b'y');
        junk.extend_from_slice(b"\n\ny");
        let mut parser = MessageParser::new(false, false, MAX_HEAD_BYTES);
        let mut recorder = Recorder::default();
        parser.feed(&junk, 0.0, 0, -1, &mut recorder);
        parser.feed(b"zz", 0.0, 300, -1, &mut recorder);
        assert!(recorder.calls.is_empty());
        parser.feed(b"HTTP/1.1 204 No Content\r\n\r\n", 0.0, 302, -1, &mut recorder);
        assert_eq!(recorder.calls, ["head", "complete"]);
        assert_eq!(recorder.heads[0].position, 302);
        assert_eq!(recorder.counters.resync_skipped_bytes, 302);
    }

    #[test]
    fn a_start_line_split_across_segments_is_found_while_resyncing() {
        let mut parser = MessageParser::new(true, false, MAX_HEAD_BYTES);
        parser.peer_spoke(); // the server answered the request the stream was joined inside
        let mut recorder = Recorder::default();
        let junk = b"...end of a previous body\r\n";
        parser.feed(&[&junk[..], b"GET /insi"].concat(), 0.0, 0, -1, &mut recorder);
        parser.feed(b"de HTTP/1.1\r\nHost: a\r\n\r\n", 0.0, junk.len() as u64 + 9, -1, &mut recorder);
        assert_eq!(recorder.calls, ["head", "complete"]);
        assert_eq!((&recorder.heads[0].target[..], recorder.heads[0].position), (&b"/inside"[..], junk.len() as u64));
    }

    #[test]
    fn a_start_line_begun_in_the_kept_bytes_is_found_though_its_rest_looks_like_one() {
        // after a gap, a request's first byte came in a segment of its own: the rest, "ET /x HTTP/1.1", is
        // no start line (no method nginx knows), and the request is "GET", one byte earlier
        let mut parser = MessageParser::new(true, true, MAX_HEAD_BYTES);
        let mut recorder = Recorder::default();
        parser.gap(61, 0.0, &mut recorder);
        parser.feed(b"ey: lost-with-its-request\r\n\r\n", 0.0, 61, -1, &mut recorder);
        parser.feed(b"G", 0.0, 90, -1, &mut recorder);
        parser.feed(b"ET /static HTTP/1.1\r\nHost: a\r\n\r\n", 0.0, 91, -1, &mut recorder);
        assert_eq!(recorder.calls, ["lost", "head", "complete"]);
        let head = &recorder.heads[0];
        assert_eq!((&head.method[..], &head.target[..], head.position), (&b"GET"[..], &b"/static"[..], 90));
        // the "G" lost with the gap: "ET" is no method nginx knows, and is not taken for a request
        let mut parser = MessageParser::new(true, true, MAX_HEAD_BYTES);
        let mut recorder = Recorder::default();
        parser.feed(GOOD, 0.0, 0, -1, &mut recorder);
        parser.gap(1, 0.0, &mut recorder);
        parser.feed(b"ET /static HTTP/1.1\r\nHost: a\r\n\r\n", 0.0, GOOD.len() as u64 + 1, -1, &mut recorder);
        assert_eq!(recorder.calls, ["head", "complete", "lost"]);
    }

    /// Joined inside an upload whose body holds request lines: none is taken for a request until the server
    /// has spoken; joined between two requests, the first bytes are the next request.
    #[test]
    fn a_request_stream_joined_inside_a_body_is_not_searched_until_the_server_speaks() {
        let phantom = b"GET /phantom HTTP/1.1\r\napikey: someone-elses\r\n\r\n";
        let mut parser = MessageParser::new(true, false, MAX_HEAD_BYTES);
        let mut recorder = Recorder::default();
        parser.feed(&[&b"...,\"log\": \""[..], phantom].concat(), 0.0, 0, -1, &mut recorder);
        parser.feed(phantom, 0.0, 60, -1, &mut recorder);
        assert!(recorder.calls.is_empty(), "{:?}", recorder.calls);
        parser.peer_spoke();
        parser.feed(GOOD, 0.0, 120, -1, &mut recorder);
        assert_eq!(recorder.calls, ["head", "complete"]);
        let mut between = MessageParser::new(true, false, MAX_HEAD_BYTES);
        let mut recorder = Recorder::default();
        between.feed(GOOD, 0.0, 0, -1, &mut recorder);
        assert_eq!(recorder.calls, ["head", "complete"]);
    }

    #[test]
    fn a_gap_in_a_head_loses_it_and_the_next_request_line_is_found() {
        let mut parser = MessageParser::new(true, true, MAX_HEAD_BYTES);
        let mut recorder = Recorder::default();
        parser.feed(b"GET /lost HTTP/1.1\r\nHo", 0.0, 0, -1, &mut recorder);
        parser.gap(10, 0.0, &mut recorder);
        parser.feed(b"rest of it\r\n\r\n", 0.0, 32, -1, &mut recorder);
        parser.feed(GOOD, 0.0, 46, -1, &mut recorder);
        assert_eq!(recorder.calls, ["lost", "head", "complete"]);
        assert_eq!(recorder.counters.lost_heads, 1);
    }

    #[test]
    fn a_head_over_the_limit_is_lost_and_never_buffered_past_it() {
        let mut parser = MessageParser::new(true, true, 1024);
        let mut recorder = Recorder::default();
        parser.feed(b"GET /huge HTTP/1.1\r\n", 0.0, 0, -1, &mut recorder);
        for _ in 0..200 {
            parser.feed(&[b"X-Pad: ".as_slice(), &[b'p'; 500], b"\r\n"].concat(), 0.0, 0, -1, &mut recorder);
            assert!(parser.buffered().len() <= 1024);
        }
        assert_eq!((recorder.counters.oversized_heads, &recorder.calls[..]), (1, &["lost"][..]));
    }

    #[test]
    fn a_chunk_line_over_the_limit_is_a_parse_error_and_never_buffered_past_it() {
        let mut parser = MessageParser::new(false, true, MAX_HEAD_BYTES);
        let mut recorder = Recorder::default();
        parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 0.0, 0, -1, &mut recorder);
        for _ in 0..10 {
            parser.feed(&[b'1'; 1000], 0.0, 0, -1, &mut recorder);
            assert!(parser.buffered().len() <= RESYNC_KEEP.max(MAX_LINE));
        }
        assert_eq!(recorder.counters.parse_errors, 1);
    }

    #[test]
    fn the_answer_to_head_has_no_body() {
        let mut parser = MessageParser::new(false, true, MAX_HEAD_BYTES);
        let mut recorder = Recorder { method: Some(RequestMethod::Head), ..Recorder::default() };
        let head_only = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n";
        parser.feed(head_only, 1.0, 0, -1, &mut recorder);
        assert_eq!(recorder.completed, [(head_only.len() as u64, 1.0)]);
    }

    /// The request of an answer was lost: a status line where its body would begin makes it a HEAD's
    /// (in the head's segment or the next one); a body that begins otherwise is its body, and the answer to
    /// a request seen to be a GET keeps a body that looks like a response.
    #[test]
    fn an_answer_to_a_lost_request_followed_by_a_status_line_has_no_body() {
        let head_only = b"HTTP/1.1 200 OK\r\nContent-Length: 90000\r\n\r\n";
        let next = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        for piece in [1 << 16, head_only.len()] {
            let mut parser = MessageParser::new(false, true, MAX_HEAD_BYTES);
            let mut recorder = Recorder { method: Some(RequestMethod::Unknown), ..Recorder::default() };
            for (index, chunk) in [&head_only[..], next].concat().chunks(piece).enumerate() {
                parser.feed(chunk, index as f64, (index * piece) as u64, -1, &mut recorder);
            }
            let sizes: Vec<u64> = recorder.completed.iter().map(|&(size, _)| size).collect();
            assert_eq!(sizes, [head_only.len() as u64, next.len() as u64], "in pieces of {piece}");
        }
        for method in [RequestMethod::Unknown, RequestMethod::Other] {
            let mut parser = MessageParser::new(false, true, MAX_HEAD_BYTES);
            let mut recorder = Recorder { method: Some(method), ..Recorder::default() };
            let with_body = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
            parser.feed(with_body, 0.0, 0, -1, &mut recorder);
            let body: &[u8] = if method == RequestMethod::Unknown { b"{\"a\"}" } else { b"HTTP/1.1 200 " };
            parser.feed(body, 0.0, with_body.len() as u64, -1, &mut recorder);
            assert_eq!(recorder.completed, [((with_body.len() + 5) as u64, 0.0)], "{method:?}");
        }
    }

    #[test]
    fn a_close_delimited_response_ends_with_the_stream() {
        let mut parser = MessageParser::new(false, true, MAX_HEAD_BYTES);
        let mut recorder = Recorder::default();
        parser.feed(b"HTTP/1.0 200 OK\r\n\r\n", 0.0, 0, -1, &mut recorder);
        parser.feed(&[b'x'; 5000], 0.0, 19, -1, &mut recorder);
        parser.gap(100, 0.0, &mut recorder);
        parser.end(2.0, &mut recorder);
        assert_eq!(recorder.completed, [(19 + 5000 + 100, 2.0)]);
    }

    #[test]
    fn kong_s_latency_headers_mark_a_response() {
        let (_, recorder) =
            parse(false, true, b"HTTP/1.1 401 No\r\nX-Kong-Response-Latency: 0\r\nContent-Length: 0\r\n\r\n", 1 << 16);
        assert!(recorder.heads[0].answered_by_kong && !recorder.heads[0].proxied_by_kong);
        assert!(recorder.heads[0].head.is_empty(), "a response's head is not kept");
    }
}
