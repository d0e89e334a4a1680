//! Incremental HTTP/1.x message framing for one direction of a connection.
//! (Ported from the Python `agent/http/parser.py`; its regular expressions are written out by hand here,
//! each function saying which one it is.)
//!
//! Fed bytes (and gaps) in stream order, it reports where each message's head ends and where the message
//! ends, counting body bytes without keeping them. After a gap it cannot bridge, or a message it cannot
//! frame, it resynchronises at the next start line instead of giving up on the connection. Requests are
//! judged as the gateway's nginx judges them (what it answers 400 or 501 never reaches Kong, so is never
//! billed); responses stay lenient (the server sent them, so what it answered is billed).

use crate::http::message::{header_value, trim_ascii_whitespace, Message};

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

/// What a response's framing needs to know of the request it answers: the answer to HEAD has no body,
/// a 2xx answer to CONNECT opens a tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestMethod {
    Head,
    Connect,
    Other,
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
    /// Responses: how the request being answered was sent.
    fn answered_method(&mut self) -> RequestMethod;
    fn head(&mut self, message: Message);
    fn complete(&mut self, size: u64, end_time: f64);
    fn lost(&mut self);
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
    message: Option<Progress>,
    remaining: u64,
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
            message: None,
            remaining: 0,
        }
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

    /// `size` bytes of this stream were not captured.
    pub fn gap(&mut self, mut size: u64, time: f64, sink: &mut impl MessageSink) {
        let mut state = self.state;
        if state == State::Tunnel {
            return;
        }
        if self.message.is_some() && state != State::Head {
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
            message.target = slice(parsed.target);
            message.version = parsed.version.map(slice).unwrap_or_default();
            message.head = match head {
                Some(head) => head.to_vec(),
                None => buffered,
            };
        } else {
            message.proxied_by_kong = header_value(bytes, b"x-kong-upstream-latency").is_some();
            message.answered_by_kong = header_value(bytes, b"x-kong-response-latency").is_some();
        }
        sink.head(message);
        self.remaining = parsed.remaining;
        if parsed.state == State::Head || parsed.state == State::Tunnel {
            self.complete(time, sink); // no body
        }
        self.state = parsed.state;
    }

    /// The start line and framing of a head; `None` when it is lost (a request nginx would refuse, or a
    /// start line that is none).
    fn parse_head(&self, head: &[u8], sink: &mut impl MessageSink) -> Option<Parsed> {
        let mut parsed =
            Parsed { method: (0, 0), target: (0, 0), version: None, status: 0, state: State::Head, remaining: 0 };
        if self.is_request {
            let line = request_line(head)?;
            if has_bad_header_line(head, line.end - 1) {
                return None;
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
            (parsed.state, parsed.remaining) = request_framing(head, version)?;
        } else {
            parsed.status = status_line(head)?;
            (parsed.state, parsed.remaining) = match response_framing(head, parsed.status, sink.answered_method()) {
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
        let window = Window { kept: &[], data: bytes };
        if self.is_request {
            window.request_start_at(0, true)
        } else {
            window.response_start_at(0)
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

/// HEAD_END (`\r?\n\r?\n`), searched from the start: the end of the first blank line. A candidate is a
/// `\n` followed by `\n` or `\r\n`; one whose continuation has not arrived yet is no end.
fn find_head_end(bytes: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(found) = bytes.get(from..).and_then(|rest| memchr::memchr(b'\n', rest)) {
        let newline = from + found;
        if let Some(end) = head_end_at(bytes, newline) {
            return Some(end);
        }
        from = newline + 1;
    }
    None
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
    byte.is_ascii_alphanumeric() || b"!#$%&'*+.^_`|~-".contains(&byte)
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
    /// just past the line's `\n`
    end: usize,
}

/// REQUEST_LINE, lenient on purpose (a server that answers a sloppy version still served a request):
/// `([!#$%&'*+.^_`|~0-9A-Za-z-]+) +(\S*)(?: +HTTP/([0-9.]*))? *\r?\n` matched at the start. Every
/// repetition in it is followed by something it cannot match, so reading greedily is its only match.
fn request_line(head: &[u8]) -> Option<RequestLine> {
    let at = |i: usize| head.get(i).copied();
    let run = |mut i: usize, keep: &dyn Fn(u8) -> bool| {
        while at(i).is_some_and(keep) {
            i += 1;
        }
        i
    };
    let method_end = run(0, &is_tchar);
    let target_start = run(method_end, &|b| b == b' ');
    if method_end == 0 || target_start == method_end {
        return None;
    }
    let target_end = run(target_start, &|b| !is_space(b));
    let line_end = |i: usize| {
        let i = run(i, &|b| b == b' ');
        match (at(i), at(i + 1)) {
            (Some(b'\n'), _) => Some(i + 1),
            (Some(b'\r'), Some(b'\n')) => Some(i + 2),
            _ => None,
        }
    };
    let version_at = run(target_end, &|b| b == b' ');
    if version_at > target_end && head.get(version_at..).is_some_and(|rest| rest.starts_with(b"HTTP/")) {
        let version_end = run(version_at + 5, &|b| b.is_ascii_digit() || b == b'.');
        if let Some(end) = line_end(version_end) {
            let version = Some((version_at + 5, version_end));
            return Some(RequestLine { method_end, target: (target_start, target_end), version, end });
        }
    }
    let end = line_end(target_end)?;
    Some(RequestLine { method_end, target: (target_start, target_end), version: None, end })
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

/// BAD_HEADER_LINE searched from the request line's `\n`: a header line nginx answers 400, whose name
/// holds a space or a control character (`apikey : k`, obsolete line folding, `Bad Name`), or is empty:
/// `\n(?:[^:\x00-\x20\x7f]++(?!\r?\n)[\x00-\x20\x7f]|[\x00-\x09\x0b\x0c\x0e-\x20\x7f:]|\r(?!\n))`.
/// A line of name characters alone, without a colon, nginx ignores, and so does this.
fn has_bad_header_line(head: &[u8], from: usize) -> bool {
    let control = |b: u8| b <= 0x20 || b == 0x7f;
    let mut start = from;
    while let Some(found) = head.get(start..).and_then(|rest| memchr::memchr(b'\n', rest)) {
        let line = start + found + 1;
        start = line;
        let bad = match head.get(line).copied() {
            None | Some(b'\n') => false,
            Some(b'\r') => head.get(line + 1) != Some(&b'\n'),
            Some(first) if control(first) || first == b':' => true,
            Some(_) => {
                let mut end = line;
                while head.get(end).is_some_and(|&b| !control(b) && b != b':') {
                    end += 1;
                }
                match head.get(end).copied() {
                    None | Some(b':') | Some(b'\n') => false,
                    Some(b'\r') => head.get(end + 1) != Some(&b'\n'),
                    Some(_) => true,
                }
            }
        };
        if bad {
            return true;
        }
    }
    false
}

/// FRAMING_HEADERS, `\n(content-length|transfer-encoding)[ \t]*:[ \t]*([^\r\n]*)` case-insensitively:
/// (is it Content-Length, its value) for each.
fn framing_headers(head: &[u8]) -> impl Iterator<Item = (bool, &[u8])> {
    memchr::memchr_iter(b'\n', head).filter_map(move |newline| {
        let line = head.get(newline + 1..)?;
        let is_length = match line.first()? | 0x20 {
            b'c' if line.len() >= 14 && line[..14].eq_ignore_ascii_case(b"content-length") => true,
            b't' if line.len() >= 17 && line[..17].eq_ignore_ascii_case(b"transfer-encoding") => false,
            _ => return None,
        };
        let blank = |b: &u8| *b == b' ' || *b == b'\t';
        let mut rest = &line[if is_length { 14 } else { 17 }..];
        rest = &rest[rest.iter().take_while(|b| blank(b)).count()..];
        rest = rest.strip_prefix(b":")?;
        rest = &rest[rest.iter().take_while(|b| blank(b)).count()..];
        let end = rest.iter().position(|&b| b == b'\r' || b == b'\n').unwrap_or(rest.len());
        Some((is_length, &rest[..end]))
    })
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
fn request_framing(head: &[u8], version: &[u8]) -> Option<(State, u64)> {
    let mut found = framing_headers(head);
    let Some((is_length, value)) = found.next() else { return Some((State::Head, 0)) };
    if found.next().is_some() {
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
fn response_framing(head: &[u8], status: u16, method: RequestMethod) -> Option<(State, u64)> {
    if status == 101 || (method == RequestMethod::Connect && (200..300).contains(&status)) {
        return Some((State::Tunnel, 0));
    }
    if status < 200 || status == 204 || status == 304 || method == RequestMethod::Head {
        return Some((State::Head, 0));
    }
    let mut transfer_encoding = None;
    let mut length: Option<&[u8]> = None;
    let mut lengths_differ = false;
    for (is_length, value) in framing_headers(head) {
        if !is_length {
            transfer_encoding = Some(trim_ascii_whitespace(value));
            continue;
        }
        for part in value.split(|&b| b == b',').map(trim_ascii_whitespace) {
            match length {
                None => length = Some(part),
                Some(seen) => lengths_differ |= seen != part,
            }
        }
    }
    if let Some(coding) = transfer_encoding {
        let last = coding.rsplit(|&b| b == b',').next().unwrap_or_default();
        return trim_ascii_whitespace(last).eq_ignore_ascii_case(b"chunked").then_some((State::ChunkSize, 0));
    }
    match length {
        None => Some((State::UntilClose, 0)),
        Some(_) if lengths_differ => None,
        Some(length) => decimal_length(length).map(body_of),
    }
}

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

    /// REQUEST_START (`^[A-Z][A-Za-z_-]{0,19} \S+ HTTP/1\.[019]\r?$`, multi-line) at `i`, or with
    /// `newline`, REQUEST_START_HERE (the same ending in `\r?\n`).
    fn request_start_at(&self, mut i: usize, newline: bool) -> bool {
        if !self.at(i).is_some_and(|b| b.is_ascii_uppercase()) {
            return false;
        }
        i += 1;
        let mut letters = 0;
        while letters < 19 && self.at(i).is_some_and(|b| b.is_ascii_alphabetic() || b == b'_' || b == b'-') {
            i += 1;
            letters += 1;
        }
        if self.at(i) != Some(b' ') {
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
