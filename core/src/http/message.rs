//! What the HTTP stage knows of one message, and of one request/response exchange.

use crate::tcp::reassembly::ConnectionInfo;

/// One HTTP message as framed on the wire. Requests keep their raw head (headers are looked up in it
/// when metering asks); responses keep only what metering needs of theirs.
#[derive(Clone, Debug, Default)]
pub struct Message {
    pub start_time: f64,
    /// stream position of the message's first byte
    pub position: u64,
    /// peer stream position acknowledged when it began (-1: unknown)
    pub peer_acked: i64,
    pub end_time: f64,
    /// bytes on the wire: start line, headers, body with its framing
    pub size: u64,
    /// stream position just past the head
    pub head_end: u64,
    /// requests: the raw head, start line included (empty for responses)
    pub head: Vec<u8>,
    /// requests: method, target and version as sent (bytes; metering decodes them)
    pub method: Vec<u8>,
    pub target: Vec<u8>,
    pub version: Vec<u8>,
    /// responses: the status code
    pub status: u16,
    /// responses: Kong marked it as proxied (`X-Kong-Upstream-Latency`)
    pub proxied_by_kong: bool,
    /// responses: Kong answered it itself (`X-Kong-Response-Latency`)
    pub answered_by_kong: bool,
}

impl Message {
    /// First value of a header (name case-insensitive, ASCII whitespace trimmed), as key-auth reads it:
    /// the first line of the head that starts with the name, optional blanks, then a colon.
    pub fn header(&self, name: &[u8]) -> Option<&[u8]> {
        header_value(&self.head, name)
    }
}

/// The first value of header `name` in a raw head (see `Message::header`).
pub fn header_value<'h>(head: &'h [u8], name: &[u8]) -> Option<&'h [u8]> {
    let mut start = 0;
    while let Some(newline) = memchr::memchr(b'\n', &head[start..]) {
        let line = start + newline + 1;
        start = line;
        let rest = &head[line..];
        if rest.len() < name.len() || !rest[..name.len()].eq_ignore_ascii_case(name) {
            continue;
        }
        let mut i = name.len();
        while i < rest.len() && (rest[i] == b' ' || rest[i] == b'\t') {
            i += 1;
        }
        if i >= rest.len() || rest[i] != b':' {
            continue;
        }
        i += 1;
        while i < rest.len() && (rest[i] == b' ' || rest[i] == b'\t') {
            i += 1;
        }
        let end = rest[i..].iter().position(|&b| b == b'\r' || b == b'\n').map_or(rest.len(), |p| i + p);
        return Some(trim_ascii_whitespace(&rest[i..end]));
    }
    None
}

/// As Python's `bytes.strip()`: space, \t, \n, \r, \x0b and \x0c at either end.
pub fn trim_ascii_whitespace(mut value: &[u8]) -> &[u8] {
    let blank = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c);
    while let [first, rest @ ..] = value {
        if !blank(*first) {
            break;
        }
        value = rest;
    }
    while let [rest @ .., last] = value {
        if !blank(*last) {
            break;
        }
        value = rest;
    }
    value
}

/// A request and what is known of its answer, handed to metering once finished.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub connection: ConnectionInfo,
    pub request: Message,
    /// the final response's status; 0 while none was seen
    pub status: u16,
    /// the final response was proxied by Kong / answered by Kong itself (see `Message`)
    pub proxied_by_kong: bool,
    pub answered_by_kong: bool,
    /// every byte sent for this request, interim 1xx responses included
    pub response_size: u64,
    pub response_end: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_lookup_is_case_insensitive_and_trimmed() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\nApiKey :  k1 \r\nX: y\r\n\r\n";
        assert_eq!(header_value(head, b"apikey"), Some(&b"k1"[..]));
        assert_eq!(header_value(head, b"host"), Some(&b"a"[..]));
        assert_eq!(header_value(head, b"missing"), None);
    }

    #[test]
    fn header_lookup_wants_the_colon_after_the_whole_name() {
        let head = b"GET / HTTP/1.1\r\napikeyx: no\r\napikey: yes\r\n\r\n";
        assert_eq!(header_value(head, b"apikey"), Some(&b"yes"[..]));
    }
}
