//! What the HTTP stage knows of one message, and of one request/response exchange.

use crate::tcp::reassembly::ConnectionInfo;

/// One HTTP message as framed on the wire. Requests keep their raw head (headers are looked up in it
/// when metering asks); responses keep only what metering needs of theirs.
#[derive(Clone, Default)]
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
    /// responses: `Connection: close`, after which the gateway reads no more of the connection's requests
    pub closes: bool,
}

impl Message {
    /// First value of a header (name case-insensitive, ASCII whitespace trimmed), as key-auth reads it:
    /// the first line of the head that starts with the name, optional blanks, then a colon.
    pub fn header(&self, name: &[u8]) -> Option<&[u8]> {
        header_value(&self.head, name)
    }
}

/// Without the head and the target: either may carry an API key.
impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("start_time", &self.start_time)
            .field("position", &self.position)
            .field("peer_acked", &self.peer_acked)
            .field("end_time", &self.end_time)
            .field("size", &self.size)
            .field("head_end", &self.head_end)
            .field("head_bytes", &self.head.len())
            .field("method", &String::from_utf8_lossy(&self.method))
            .field("version", &String::from_utf8_lossy(&self.version))
            .field("status", &self.status)
            .field("proxied_by_kong", &self.proxied_by_kong)
            .field("answered_by_kong", &self.answered_by_kong)
            .field("closes", &self.closes)
            .finish_non_exhaustive()
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
#[derive(Clone)]
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

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("connection", &self.connection)
            .field("request", &self.request)
            .field("status", &self.status)
            .field("proxied_by_kong", &self.proxied_by_kong)
            .field("answered_by_kong", &self.answered_by_kong)
            .field("response_size", &self.response_size)
            .field("response_end", &self.response_end)
            .finish()
    }
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
    fn debug_output_leaves_out_the_head_and_the_target() {
        let head = b"GET /x?apikey=secret-1 HTTP/1.1\r\napikey: secret-2\r\n\r\n".to_vec();
        let request =
            Message { head, method: b"GET".to_vec(), target: b"/x?apikey=secret-1".to_vec(), ..Message::default() };
        let connection = ConnectionInfo {
            id: 1,
            client: crate::source::frames::Address::new(&[10, 0, 0, 1]),
            client_port: 40000,
            server: crate::source::frames::Address::new(&[10, 0, 0, 2]),
            server_port: 8000,
            saw_syn: true,
            to_server_base_seq: None,
        };
        let exchange = Exchange {
            connection,
            request,
            status: 200,
            proxied_by_kong: false,
            answered_by_kong: false,
            response_size: 0,
            response_end: 0.0,
        };
        let shown = format!("{exchange:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("GET"));
    }

    #[test]
    fn header_lookup_wants_the_colon_after_the_whole_name() {
        let head = b"GET / HTTP/1.1\r\napikeyx: no\r\napikey: yes\r\n\r\n";
        assert_eq!(header_value(head, b"apikey"), Some(&b"yes"[..]));
    }
}
