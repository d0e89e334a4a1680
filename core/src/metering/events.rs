//! The CloudEvent of one billed exchange, rendered as one JSON line, with the fields and names of Kong's
//! Metering & Billing plugin.
//!
//! The line is byte for byte what the Python sinks wrote (`orjson.dumps` of the event dict): keys in the
//! dict's order, no spaces, `"`, `\` and control characters escaped as orjson escapes them, everything
//! else as UTF-8. What the wire carries (method, target, host, user agent) is read as Latin-1, as the
//! Python stage decoded it, so a byte 0x80..0xFF is the UTF-8 of U+0080..U+00FF.

use sha2::{Digest, Sha256};

use crate::http::message::{Exchange, Message};
use crate::metering::key_lookup::hide_credentials;
use crate::source::frames::Address;
use crate::tcp::reassembly::ConnectionInfo;

pub const EVENT_TYPE: &str = "kong.api_request";

/// The latest time RFC 3339's four-digit year can say (9999-12-31T23:59:59Z).
const LAST_SECOND: i64 = 253_402_300_799;

/// What an event says beyond its exchange.
pub struct EventContext<'a> {
    pub source: &'a str,
    pub subject: &'a str,
    /// Kong's `look_up_value_in`: consumer, header or query
    pub subject_type: &'a str,
    pub key_names: &'a [String],
    /// the key the subject came from, which must not reach the event under any parameter name
    pub key: Option<&'a [u8]>,
    /// the matched route's six fields, rendered (`routes::Route::event_fields`); None: no routes known
    pub route: Option<&'a [u8]>,
    /// the plugin entry's attributes, rendered as `,"name":"value"...` (empty: none)
    pub attributes: &'a [u8],
}

/// nginx's `$request_length`, which counts the bytes it read as the request. A body nginx discards
/// unread is not counted, and nginx discards it whenever Kong answers before reading it: key-auth,
/// rate limiting, its error page for a 413 (`X-Kong-Response-Latency` marks all of these). Such a request
/// is as long as its head. A plugin that read the body before Kong answered (key-auth's `key_in_body`,
/// request validation) made nginx count it, which the wire does not show.
fn request_length(exchange: &Exchange) -> u64 {
    let request = &exchange.request;
    if exchange.answered_by_kong {
        request.size.min(request.head_end.saturating_sub(request.position))
    } else {
        request.size
    }
}

/// The connection a cached id prefix belongs to.
type FourTuple = (Address, u16, Address, u16);

/// Renders events, caching what repeats: the date and time of the current second (events come in bursts
/// within one), and the id's hash state after the connection's part of the name (requests come in runs
/// per connection).
#[derive(Default)]
pub struct EventWriter {
    second: Option<(i64, [u8; 19])>,
    connection: Option<(FourTuple, Sha256)>,
}

impl EventWriter {
    /// Appends the event's JSON and a newline to `out`.
    pub fn write(&mut self, exchange: &Exchange, context: &EventContext<'_>, out: &mut Vec<u8>) {
        let request = &exchange.request;
        out.extend_from_slice(b"{\"id\":\"");
        out.extend_from_slice(&self.event_id(&exchange.connection, request.position));
        out.extend_from_slice(b"\",\"source\":");
        push_string(out, context.source.as_bytes(), false);
        out.extend_from_slice(b",\"type\":\"");
        out.extend_from_slice(EVENT_TYPE.as_bytes());
        out.extend_from_slice(b"\",\"subject\":");
        push_string(out, context.subject.as_bytes(), false);
        out.extend_from_slice(b",\"time\":\"");
        self.push_rfc3339(out, request.start_time);
        out.extend_from_slice(b"\",\"datacontenttype\":\"application/json\",\"specversion\":\"1.0\"");
        out.extend_from_slice(b",\"data\":{\"request_method\":");
        push_string(out, &request.method, true);
        out.extend_from_slice(b",\"request_uri\":");
        push_string(out, &hide_credentials(&request.target, context.key_names, context.key), true);
        out.extend_from_slice(b",\"request_host\":");
        push_request_host(out, exchange);
        out.extend_from_slice(b",\"client_ip\":\"");
        push_ip_text(out, &exchange.connection.client);
        out.extend_from_slice(b"\",\"request_user_agent\":");
        match request.header(b"user-agent") {
            Some(agent) => push_string(out, agent, true),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"request_size_bytes\":");
        push_u64(out, request_length(exchange));
        out.extend_from_slice(b",\"response_http_status\":");
        push_u64(out, exchange.status.into());
        out.extend_from_slice(b",\"response_size_bytes\":");
        push_u64(out, exchange.response_size);
        out.extend_from_slice(b",\"upstream_status\":");
        if exchange.status != 0 && exchange.response_size > 0 && !exchange.answered_by_kong {
            // as nginx's $upstream_status, a string; null when Kong answered itself or nothing answered
            out.push(b'"');
            push_u64(out, exchange.status.into());
            out.push(b'"');
        } else {
            out.extend_from_slice(b"null");
        }
        out.push(b',');
        match context.route {
            Some(fields) => out.extend_from_slice(fields),
            None => out.extend_from_slice(
                b"\"route_id\":null,\"route_name\":null,\"service_id\":null,\"service_name\":null,\
                  \"service_port\":null,\"service_protocol\":null",
            ),
        }
        out.extend_from_slice(b",\"subject_type\":");
        push_string(out, context.subject_type.as_bytes(), false);
        out.extend_from_slice(context.attributes);
        out.extend_from_slice(b",\"latency_ms\":");
        match latency_ms(exchange) {
            Some(latency) => push_u64(out, latency),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b"}}\n");
    }

    /// Deterministic and unique per request: a name-based UUID (version 8) of the connection and the
    /// sequence number of the request's first byte, `sha256("<client hex>:<port>><server hex>:<port>/<seq>")`.
    /// Replaying a capture, or capturing the same traffic live, gives the same id, so the ingest side's
    /// de-duplication on (source, id) counts a re-sent event once.
    pub fn event_id(&mut self, connection: &ConnectionInfo, position: u64) -> [u8; 36] {
        let tuple = (connection.client, connection.client_port, connection.server, connection.server_port);
        let mut hasher = match &self.connection {
            Some((cached, hasher)) if *cached == tuple => hasher.clone(),
            _ => {
                let mut prefix = Vec::with_capacity(80);
                push_hex(&mut prefix, connection.client.bytes());
                prefix.push(b':');
                push_u64(&mut prefix, connection.client_port.into());
                prefix.push(b'>');
                push_hex(&mut prefix, connection.server.bytes());
                prefix.push(b':');
                push_u64(&mut prefix, connection.server_port.into());
                prefix.push(b'/');
                let hasher = Sha256::new_with_prefix(&prefix);
                self.connection = Some((tuple, hasher.clone()));
                hasher
            }
        };
        // a request always follows client data, which sets the base; as on the wire, modulo 2^32
        let first_byte = connection.to_server_base_seq.unwrap_or(0).wrapping_add(position as u32);
        let mut number = Vec::with_capacity(10);
        push_u64(&mut number, first_byte.into());
        hasher.update(&number);
        let digest = hasher.finalize();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        bytes[6] = (bytes[6] & 0x0F) | 0x80;
        bytes[8] = (bytes[8] & 0x3F) | 0x80;
        uuid_text(&bytes)
    }

    /// RFC 3339 in UTC with microseconds, as Python's `rfc3339`: microseconds rounded half to even, at
    /// most 999999. A time outside what the format can say (Python raised) is clamped into it.
    pub fn push_rfc3339(&mut self, out: &mut Vec<u8>, timestamp: f64) {
        let timestamp = if timestamp.is_nan() { 0.0 } else { timestamp.clamp(0.0, LAST_SECOND as f64) };
        let second = timestamp.floor();
        let microseconds = (((timestamp - second) * 1_000_000.0).round_ties_even() as u64).min(999_999);
        let second = second as i64;
        let text = match self.second {
            Some((cached, text)) if cached == second => text,
            _ => {
                let text = second_text(second);
                self.second = Some((second, text));
                text
            }
        };
        out.extend_from_slice(&text);
        out.push(b'.');
        push_padded(out, microseconds, 6);
        out.push(b'Z');
    }
}

/// First request byte to last response byte, rounded half to even, never negative (capture clocks can
/// step back); None for a request that saw no response (unanswered, or given up on by its client: 499).
fn latency_ms(exchange: &Exchange) -> Option<u64> {
    if exchange.status == 0 || exchange.response_size == 0 {
        return None;
    }
    let milliseconds = ((exchange.response_end - exchange.request.start_time) * 1000.0).round_ties_even();
    Some(milliseconds.max(0.0) as u64)
}

/// "YYYY-MM-DDTHH:MM:SS" of a second since the epoch (0..=LAST_SECOND), proleptic Gregorian.
fn second_text(second: i64) -> [u8; 19] {
    let (days, in_day) = (second.div_euclid(86_400), second.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    let mut text = Vec::with_capacity(19);
    for (value, width, separator) in [
        (year, 4, b'-'),
        (month, 2, b'-'),
        (day, 2, b'T'),
        (in_day / 3600, 2, b':'),
        (in_day / 60 % 60, 2, b':'),
        (in_day % 60, 2, 0),
    ] {
        push_padded(&mut text, value.unsigned_abs(), width);
        if separator != 0 {
            text.push(separator);
        }
    }
    let mut fixed = [b'0'; 19];
    fixed.iter_mut().zip(&text).for_each(|(slot, &byte)| *slot = byte);
    fixed
}

/// Like Kong's `request_host` (nginx's $host): from an absolute URI or the Host header (else the server's
/// address), lower case, no port.
fn push_request_host(out: &mut Vec<u8>, exchange: &Exchange) {
    let request: &Message = &exchange.request;
    let target = &request.target;
    if let Some(scheme_end) = memchr::memmem::find(target, b"://") {
        let rest = &target[scheme_end + 3..];
        let authority = memchr::memchr(b'/', rest).map_or(rest, |slash| &rest[..slash]);
        let host = memchr::memrchr(b'@', authority).map_or(authority, |at| &authority[at + 1..]);
        return push_lower_string(out, bare_host(host));
    }
    match request.header(b"host").filter(|host| !host.is_empty()) {
        Some(host) => push_lower_string(out, bare_host(host)),
        None => {
            let mut address = Vec::with_capacity(45);
            push_ip_text(&mut address, &exchange.connection.server);
            push_lower_string(out, bare_host(&address));
        }
    }
}

/// A host without its port: `[v6]:port` -> `v6`, `name:port` -> `name`; more than one colon is an IPv6
/// address without brackets, kept whole.
fn bare_host(host: &[u8]) -> &[u8] {
    if host.first() == Some(&b'[') {
        let inside = memchr::memchr(b']', host).map_or(host, |close| &host[..close]);
        let start = inside.iter().position(|&b| b != b'[').unwrap_or(inside.len());
        return &inside[start..];
    }
    match memchr::memchr_iter(b':', host).count() {
        1 => memchr::memrchr(b':', host).map_or(host, |colon| &host[..colon]),
        _ => host,
    }
}

/// A JSON string of Latin-1 text lowered as Python's `str.lower` lowers it (A-Z and U+00C0..U+00DE but
/// U+00D7).
fn push_lower_string(out: &mut Vec<u8>, text: &[u8]) {
    let lowered: Vec<u8> = text
        .iter()
        .map(|&b| if b.is_ascii_uppercase() || ((0xC0..=0xDE).contains(&b) && b != 0xD7) { b + 0x20 } else { b })
        .collect();
    push_string(out, &lowered, true);
}

/// An address as `inet_ntop` writes it (glibc's rules: the first longest run of two or more zero groups
/// as `::`, and `::a.b.c.d` / `::ffff:a.b.c.d` for IPv4-compatible and IPv4-mapped addresses).
pub fn push_ip_text(out: &mut Vec<u8>, address: &Address) {
    let bytes = address.bytes();
    let Ok(v6) = <[u8; 16]>::try_from(bytes) else {
        return push_ipv4(out, bytes);
    };
    let mut words = [0u16; 8];
    for (word, pair) in words.iter_mut().zip(v6.chunks_exact(2)) {
        *word = u16::from_be_bytes([pair[0], pair[1]]);
    }
    let (mut best, mut current): (Option<ZeroRun>, Option<ZeroRun>) = (None, None);
    for (i, &word) in words.iter().enumerate() {
        if word == 0 {
            current = Some(current.map_or((i, 1), |(base, len)| (base, len + 1)));
        } else if let Some(run) = current.take() {
            if best.is_none_or(|(_, len)| run.1 > len) {
                best = Some(run);
            }
        }
    }
    if let Some(run) = current {
        if best.is_none_or(|(_, len)| run.1 > len) {
            best = Some(run);
        }
    }
    let best = best.filter(|&(_, len)| len >= 2);
    let embeds_v4 = best == Some((0, 6)) || (best == Some((0, 5)) && words[5] == 0xffff);
    for (i, &word) in words.iter().enumerate() {
        if let Some((base, len)) = best {
            if (base..base + len).contains(&i) {
                if i == base {
                    out.push(b':');
                }
                continue;
            }
        }
        if i != 0 {
            out.push(b':');
        }
        if i == 6 && embeds_v4 {
            return push_ipv4(out, &v6[12..]);
        }
        push_hex_word(out, word);
    }
    if best.is_some_and(|(base, len)| base + len == 8) {
        out.push(b':');
    }
}

fn push_ipv4(out: &mut Vec<u8>, octets: &[u8]) {
    for (i, &octet) in octets.iter().enumerate() {
        if i != 0 {
            out.push(b'.');
        }
        push_u64(out, octet.into());
    }
}

/// A run of zero groups: (first group, groups).
type ZeroRun = (usize, usize);

const HEX: &[u8; 16] = b"0123456789abcdef";

/// `%x`: lower case, no leading zeros.
fn push_hex_word(out: &mut Vec<u8>, word: u16) {
    let digits = [(word >> 12) as usize, (word >> 8 & 0xF) as usize, (word >> 4 & 0xF) as usize, (word & 0xF) as usize];
    let first = digits.iter().position(|&digit| digit != 0).unwrap_or(3);
    out.extend(digits[first..].iter().map(|&digit| HEX[digit]));
}

fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    for &byte in bytes {
        out.extend_from_slice(&[HEX[usize::from(byte >> 4)], HEX[usize::from(byte & 0xF)]]);
    }
}

/// The canonical lower-case 8-4-4-4-12 form.
fn uuid_text(bytes: &[u8; 16]) -> [u8; 36] {
    let mut text = [b'-'; 36];
    let mut at = 0;
    for (i, &byte) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            at += 1;
        }
        text[at] = HEX[usize::from(byte >> 4)];
        text[at + 1] = HEX[usize::from(byte & 0xF)];
        at += 2;
    }
    text
}

fn push_u64(out: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

fn push_padded(out: &mut Vec<u8>, value: u64, width: usize) {
    let mut digits = Vec::with_capacity(20);
    push_u64(&mut digits, value);
    out.extend(std::iter::repeat_n(b'0', width.saturating_sub(digits.len())));
    out.extend_from_slice(&digits);
}

/// A JSON string as orjson writes it: `"` and `\` escaped, control characters as `\b \t \n \f \r` or
/// `\u00xx`, the rest as is. `latin1`: the bytes are Latin-1 text, so 0x80..0xFF become two UTF-8 bytes;
/// otherwise they are UTF-8 already.
pub(crate) fn push_string(out: &mut Vec<u8>, bytes: &[u8], latin1: bool) {
    out.push(b'"');
    let mut plain_from = 0;
    for (i, &byte) in bytes.iter().enumerate() {
        if byte >= 0x20 && byte != b'"' && byte != b'\\' && (byte < 0x80 || !latin1) {
            continue;
        }
        out.extend_from_slice(&bytes[plain_from..i]);
        plain_from = i + 1;
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            b'\t' => out.extend_from_slice(b"\\t"),
            b'\n' => out.extend_from_slice(b"\\n"),
            0x0c => out.extend_from_slice(b"\\f"),
            b'\r' => out.extend_from_slice(b"\\r"),
            0..=0x1f => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0xF)],
            ]),
            _ => out.extend_from_slice(&[0xC0 | byte >> 6, 0x80 | (byte & 0x3F)]),
        }
    }
    out.extend_from_slice(&bytes[plain_from..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: f64 = 1714557600.25;

    fn connection(client: &[u8], server: &[u8], base_seq: u32) -> ConnectionInfo {
        ConnectionInfo {
            id: 1,
            client: Address::new(client),
            client_port: 40000,
            server: Address::new(server),
            server_port: 8000,
            saw_syn: true,
            to_server_base_seq: Some(base_seq),
        }
    }

    fn exchange(target: &[u8], headers: &[&[u8]]) -> Exchange {
        let mut head = [b"GET ", target, b" HTTP/1.1\r\n"].concat();
        for header in headers {
            head.extend_from_slice(header);
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        let request = Message {
            start_time: START,
            size: head.len() as u64,
            head_end: head.len() as u64,
            head,
            method: b"GET".to_vec(),
            target: target.to_vec(),
            version: b"1.1".to_vec(),
            ..Message::default()
        };
        Exchange {
            connection: connection(&[10, 0, 0, 1], &[10, 0, 0, 2], 1001),
            request,
            status: 200,
            proxied_by_kong: false,
            answered_by_kong: false,
            response_size: 312,
            response_end: START + 0.25,
        }
    }

    fn line(exchange: &Exchange) -> String {
        let key_names = ["apikey".to_string()];
        let context = EventContext {
            source: "gateway-1",
            subject: "alice",
            subject_type: "consumer",
            key_names: &key_names,
            key: None,
            route: None,
            attributes: b"",
        };
        let mut out = Vec::new();
        EventWriter::default().write(exchange, &context, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn field(line: &str, name: &str) -> String {
        let start = line.find(&format!("\"{name}\":")).unwrap() + name.len() + 3;
        let rest = &line[start..];
        rest[..rest.find([',', '}']).unwrap()].to_string()
    }

    fn ip(bytes: &[u8]) -> String {
        let mut out = Vec::new();
        push_ip_text(&mut out, &Address::new(bytes));
        String::from_utf8(out).unwrap()
    }

    fn v6(text: &str) -> Vec<u8> {
        text.parse::<std::net::Ipv6Addr>().unwrap().octets().to_vec()
    }

    fn time(timestamp: f64) -> String {
        let mut out = Vec::new();
        EventWriter::default().push_rfc3339(&mut out, timestamp);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_line_is_what_the_python_sink_wrote() {
        let exchange = exchange(
            b"/orders?page=2&apikey=x",
            &[b"Host: API.Example.com:8000", b"User-Agent: curl/8.5.0", b"User-Agent2: x"],
        );
        assert_eq!(
            line(&exchange),
            concat!(
                r#"{"id":"e5dd52c5-9fae-837d-9423-e7577bff33c7","source":"gateway-1","type":"kong.api_request","#,
                r#""subject":"alice","time":"2024-05-01T10:00:00.250000Z","datacontenttype":"application/json","#,
                r#""specversion":"1.0","data":{"request_method":"GET","request_uri":"/orders?page=2","#,
                r#""request_host":"api.example.com","client_ip":"10.0.0.1","request_user_agent":"curl/8.5.0","#,
                r#""request_size_bytes":108,"response_http_status":200,"response_size_bytes":312,"#,
                r#""upstream_status":"200","route_id":null,"route_name":null,"service_id":null,"service_name":null,"#,
                r#""service_port":null,"service_protocol":null,"subject_type":"consumer","latency_ms":250}}"#,
                "\n"
            )
        );
    }

    #[test]
    fn unanswered_has_no_latency_and_no_upstream_status() {
        let mut unanswered = exchange(b"/a", &[]);
        unanswered.status = 0;
        let line = line(&unanswered);
        assert_eq!((field(&line, "latency_ms"), field(&line, "upstream_status")), ("null".into(), "null".into()));
    }

    #[test]
    fn answered_by_kong_has_no_upstream_status() {
        let mut by_kong = exchange(b"/a", &[]);
        (by_kong.status, by_kong.answered_by_kong) = (429, true);
        assert_eq!(field(&line(&by_kong), "upstream_status"), "null");
    }

    #[test]
    fn a_body_is_counted_unless_kong_answered_before_reading_it() {
        let mut upload = exchange(b"/a", &[b"Content-Length: 5000"]);
        let head = upload.request.size;
        upload.request.size += 5000;
        assert_eq!(field(&line(&upload), "request_size_bytes"), (head + 5000).to_string());
        (upload.status, upload.answered_by_kong) = (413, true);
        assert_eq!(field(&line(&upload), "request_size_bytes"), head.to_string());
    }

    #[test]
    fn latency_rounds_half_to_even_and_never_goes_negative() {
        let mut exchange = exchange(b"/a", &[]);
        for (elapsed, expected) in [(0.2565, "256"), (0.0005, "0"), (0.0015, "2"), (0.0025, "2"), (0.2575, "258")] {
            exchange.request.start_time = 0.0;
            exchange.response_end = elapsed;
            assert_eq!(field(&line(&exchange), "latency_ms"), expected, "{elapsed}");
        }
        exchange.response_end = -3600.0;
        assert_eq!(field(&line(&exchange), "latency_ms"), "0");
    }

    #[test]
    fn time_is_rfc3339_with_microseconds_as_python_rounds_them() {
        for (timestamp, expected) in [
            (START, "2024-05-01T10:00:00.250000Z"),
            (0.0, "1970-01-01T00:00:00.000000Z"),
            (1714557600.000001, "2024-05-01T10:00:00.000001Z"),
            (1714557659.5, "2024-05-01T10:00:59.500000Z"),
            (0.0000005, "1970-01-01T00:00:00.000000Z"),
            (0.0000015, "1970-01-01T00:00:00.000002Z"),
            (1714557600.9999996, "2024-05-01T10:00:00.999999Z"),
            (1714557600.0000025, "2024-05-01T10:00:00.000002Z"),
            (951782400.5, "2000-02-29T00:00:00.500000Z"),
            (4102444800.0, "2100-01-01T00:00:00.000000Z"),
            (1e10, "2286-11-20T17:46:40.000000Z"),
        ] {
            assert_eq!(time(timestamp), expected, "{timestamp}");
        }
    }

    #[test]
    fn a_time_outside_rfc3339_is_clamped_into_it() {
        assert_eq!(time(f64::NAN), "1970-01-01T00:00:00.000000Z");
        assert_eq!(time(-1.0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(time(1e300), "9999-12-31T23:59:59.000000Z");
    }

    #[test]
    fn the_cached_second_is_renewed_when_the_second_changes() {
        let mut writer = EventWriter::default();
        let mut out = Vec::new();
        for timestamp in [START, START + 0.5, START + 1.0] {
            writer.push_rfc3339(&mut out, timestamp);
            out.push(b' ');
        }
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2024-05-01T10:00:00.250000Z 2024-05-01T10:00:00.750000Z 2024-05-01T10:00:01.250000Z "
        );
    }

    #[test]
    fn ipv4_is_dotted_decimal() {
        assert_eq!(ip(&[10, 0, 0, 1]), "10.0.0.1");
        assert_eq!(ip(&[255, 255, 0, 255]), "255.255.0.255");
    }

    #[test]
    fn ipv6_is_written_as_inet_ntop_writes_it() {
        for (address, expected) in [
            ("::", "::"),
            ("::1", "::1"),
            ("::ffff:1.2.3.4", "::ffff:1.2.3.4"),
            ("::1.2.3.4", "::1.2.3.4"),
            ("::ffff:0:1.2.3.4", "::ffff:0:102:304"),
            ("2001:db8::1", "2001:db8::1"),
            ("2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"),
            ("2001:0:0:1:0:0:0:1", "2001:0:0:1::1"),
            ("1:0:0:0:0:0:0:0", "1::"),
            ("0:0:0:0:0:0:0:2", "::2"),
            ("1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8"),
            ("1:0:3:4:5:6:7:8", "1:0:3:4:5:6:7:8"),
            ("fe80::abcd:0:0:12", "fe80::abcd:0:0:12"),
            ("::ffff:0.0.0.0", "::ffff:0.0.0.0"),
            ("0:0:0:0:0:1:1.2.3.4", "::1:102:304"),
        ] {
            assert_eq!(ip(&v6(address)), expected, "{address}");
        }
    }

    #[test]
    fn request_host_comes_from_an_absolute_uri_first() {
        let absolute = exchange(b"http://user@Example.COM:8080/x", &[b"Host: other"]);
        assert_eq!(field(&line(&absolute), "request_host"), "\"example.com\"");
    }

    #[test]
    fn request_host_drops_the_port_and_brackets() {
        for (host, expected) in [
            (&b"Host: [2001:DB8::1]:8000"[..], "\"2001:db8::1\""),
            (b"Host: [[v6", "\"v6\""),
            (b"Host: 2001:db8::1", "\"2001:db8::1\""),
            (b"Host: A.b:80", "\"a.b\""),
            (b"Host: caf\xc9:1", "\"caf\u{e9}\""),
            (b"Host: \xd7", "\"\u{d7}\""),
        ] {
            assert_eq!(field(&line(&exchange(b"/a", &[host])), "request_host"), expected);
        }
    }

    #[test]
    fn request_host_without_a_host_header_is_the_server_address() {
        let mut no_host = exchange(b"/a", &[b"Host: "]);
        assert_eq!(field(&line(&no_host), "request_host"), "\"10.0.0.2\"");
        no_host.connection.server = Address::new(&v6("::1"));
        assert_eq!(field(&line(&no_host), "request_host"), "\"::1\"");
    }

    #[test]
    fn strings_are_escaped_as_orjson_escapes_them_and_read_as_latin1() {
        let odd = exchange(b"/a\"\\\x01\x1f\x7f\xe9", &[b"User-Agent: \x08\t\x0c\x0b/\xff"]);
        let line = line(&odd);
        assert!(line.contains(r#""request_uri":"/a\"\\\u0001\u001f"#), "{line}");
        assert!(line.contains("\u{7f}\u{e9}\""));
        assert!(line.contains(r#""request_user_agent":"\b\t\f\u000b/"#));
        assert!(line.contains("/\u{ff}\""));
    }

    #[test]
    fn no_user_agent_is_null() {
        assert_eq!(field(&line(&exchange(b"/a", &[])), "request_user_agent"), "null");
    }

    #[test]
    fn event_id_is_a_version_8_uuid_of_the_connection_and_first_byte() {
        let mut writer = EventWriter::default();
        let id = writer.event_id(&connection(&[10, 0, 0, 1], &[10, 0, 0, 2], 1001), 0);
        assert_eq!(&id, b"e5dd52c5-9fae-837d-9423-e7577bff33c7");
    }

    #[test]
    fn event_id_does_not_depend_on_where_the_capture_began() {
        let mut writer = EventWriter::default();
        for isn in [1000u32, 0xFFFF_FF00] {
            let first = isn.wrapping_add(1);
            let from_syn = writer.event_id(&connection(&[10, 0, 0, 1], &[10, 0, 0, 2], first), 300);
            let mid_stream = writer.event_id(&connection(&[10, 0, 0, 1], &[10, 0, 0, 2], first.wrapping_add(300)), 0);
            assert_eq!(from_syn, mid_stream);
        }
    }

    #[test]
    fn event_ids_differ_across_requests_and_connections() {
        let mut writer = EventWriter::default();
        let one = connection(&[10, 0, 0, 1], &[10, 0, 0, 2], 1001);
        let mut other = one;
        other.client_port += 1;
        let ids = [
            writer.event_id(&one, 0),
            writer.event_id(&one, 100),
            writer.event_id(&other, 0),
            writer.event_id(&one, 0),
        ];
        assert!(ids[0] != ids[1] && ids[0] != ids[2] && ids[1] != ids[2]);
        assert_eq!(ids[0], ids[3]);
    }
}
