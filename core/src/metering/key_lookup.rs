//! Where key-auth looks for the key, and how `hide_credentials` strips it from the URI.
//!
//! Kong's key-auth tries each name in `key_names` in turn: the request headers first (name
//! case-insensitive), then the query string (name case-sensitive, URL-decoded). Keys in the body
//! (`key_in_body`) are out of reach: bodies are counted, never kept. Keys are bytes, as Kong compares
//! them: the Python stage decoded them to text first, which changed the digest of a non-ASCII key.

use std::borrow::Cow;

use memchr::memmem;

use crate::http::message::Message;

/// key-auth's settings as the agent applies them (flags over the gateway's own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyAuth {
    pub key_names: Vec<String>,
    pub key_in_header: bool,
    pub key_in_query: bool,
}

impl Default for KeyAuth {
    fn default() -> Self {
        KeyAuth { key_names: vec!["apikey".to_string()], key_in_header: true, key_in_query: true }
    }
}

/// The query string of a target: after the first `?`, before the first `#`; None without a `?`.
fn query_string(target: &[u8]) -> Option<&[u8]> {
    let question = memchr::memchr(b'?', target)?;
    let query = &target[question + 1..];
    Some(memchr::memchr(b'#', query).map_or(query, |hash| &query[..hash]))
}

/// The (name, value) pairs of a query string as sent, not decoded, in order, as Python's
/// `parse_qsl(keep_blank_values=True)` splits them: on `&`, empty fields skipped, a field without `=`
/// has an empty value.
fn raw_parameters(query: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    query.split(|&b| b == b'&').filter(|field| !field.is_empty()).map(|field| match memchr::memchr(b'=', field) {
        Some(equals) => (&field[..equals], &field[equals + 1..]),
        None => (field, &field[field.len()..]),
    })
}

fn hex_digit(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// `+` as a space and `%XX` as its byte, as Python's `unquote_plus` does, but to bytes; anything else
/// (an incomplete `%`) as sent.
pub fn unquote_plus(part: &[u8]) -> Cow<'_, [u8]> {
    if !part.iter().any(|&b| b == b'%' || b == b'+') {
        return Cow::Borrowed(part);
    }
    let mut decoded = Vec::with_capacity(part.len());
    let mut i = 0;
    while let Some(&byte) = part.get(i) {
        let escaped =
            match (byte, part.get(i + 1).copied().and_then(hex_digit), part.get(i + 2).copied().and_then(hex_digit)) {
                (b'%', Some(high), Some(low)) => Some(high << 4 | low),
                _ => None,
            };
        match escaped {
            Some(value) => {
                decoded.push(value);
                i += 3;
            }
            None => {
                decoded.push(if byte == b'+' { b' ' } else { byte });
                i += 1;
            }
        }
    }
    Cow::Owned(decoded)
}

/// A query value as the Python stage's text saw it (`unquote_plus` of a Latin-1 target): the bytes sent
/// as such stand for Latin-1 characters, each run of ASCII is URL-decoded and read as UTF-8 (invalid
/// sequences as U+FFFD). The subject of `--subject query:NAME` is this text.
pub fn unquote_plus_text(part: &[u8]) -> String {
    let mut text = String::with_capacity(part.len());
    let mut rest = part;
    loop {
        let (run, tail) = rest.split_at(rest.iter().position(|&b| b >= 0x80).unwrap_or(rest.len()));
        text.push_str(&String::from_utf8_lossy(&unquote_plus(run)));
        match tail.split_first() {
            Some((&high, after)) => {
                text.push(char::from(high));
                rest = after;
            }
            None => return text,
        }
    }
}

/// The value of the first query parameter whose decoded name is `name`, not decoded yet.
pub fn raw_query_value<'t>(target: &'t [u8], name: &[u8]) -> Option<&'t [u8]> {
    raw_parameters(query_string(target)?).find(|(parameter, _)| unquote_plus(parameter) == name).map(|(_, value)| value)
}

/// The URL-decoded value of the first query parameter named `name` (name compared decoded, case-sensitive).
pub fn query_value<'t>(target: &'t [u8], name: &[u8]) -> Option<Cow<'t, [u8]>> {
    raw_query_value(target, name).map(unquote_plus)
}

/// The first non-empty key where key-auth looks: for each name in turn its header (case-insensitive; a
/// name with `_` also as the header with `-`, as OpenResty's header table reads it), then its query
/// parameter.
pub fn find_key<'r>(request: &'r Message, key_auth: &KeyAuth) -> Option<Cow<'r, [u8]>> {
    for name in &key_auth.key_names {
        if key_auth.key_in_header {
            let lower = name.to_ascii_lowercase();
            let mut value = request.header(lower.as_bytes());
            if value.is_none_or(<[u8]>::is_empty) && lower.contains('_') {
                value = request.header(lower.replace('_', "-").as_bytes());
            }
            if let Some(value) = value.filter(|value| !value.is_empty()) {
                return Some(Cow::Borrowed(value));
            }
        }
        if key_auth.key_in_query {
            if let Some(value) = query_value(&request.target, name.as_bytes()).filter(|value| !value.is_empty()) {
                return Some(value);
            }
        }
    }
    None
}

/// The target without any key parameter, as key-auth's `hide_credentials` strips it, and without any
/// other parameter that carries the key the gateway used (`?APIKEY=<key>`, `?x=1;apikey=<key>`): a key
/// never reaches an event, whatever else the client sent. The rest stays byte for byte as sent.
pub fn hide_credentials<'t>(target: &'t [u8], key_names: &[String], key: Option<&[u8]>) -> Cow<'t, [u8]> {
    let Some(question) = memchr::memchr(b'?', target) else {
        return Cow::Borrowed(target);
    };
    let (path, query) = (&target[..question], &target[question + 1..]);
    let key = key.filter(|key| !key.is_empty()).map(memmem::Finder::new);
    let hidden = |part: &[u8]| {
        let name = memchr::memchr(b'=', part).map_or(part, |equals| &part[..equals]);
        let decoded_name = unquote_plus(name);
        key_names.iter().any(|key_name| key_name.as_bytes() == &*decoded_name)
            || key.as_ref().is_some_and(|key| key.find(part).is_some() || key.find(&unquote_plus(part)).is_some())
    };
    if !query.split(|&b| b == b'&').any(hidden) {
        return Cow::Borrowed(target);
    }
    let mut kept = Vec::with_capacity(target.len());
    kept.extend_from_slice(path);
    for part in query.split(|&b| b == b'&').filter(|part| !hidden(part)) {
        kept.push(if kept.len() == path.len() { b'?' } else { b'&' });
        kept.extend_from_slice(part);
    }
    Cow::Owned(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(target: &str, headers: &[&str]) -> Message {
        let mut head = format!("GET {target} HTTP/1.1\r\nHost: api.example.com\r\n");
        for header in headers {
            head.push_str(header);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        Message { head: head.into_bytes(), target: target.as_bytes().to_vec(), ..Message::default() }
    }

    fn key_auth(names: &[&str], key_in_header: bool, key_in_query: bool) -> KeyAuth {
        KeyAuth { key_names: names.iter().map(|name| name.to_string()).collect(), key_in_header, key_in_query }
    }

    fn found(target: &str, headers: &[&str], key_auth: &KeyAuth) -> Option<Vec<u8>> {
        find_key(&request(target, headers), key_auth).map(Cow::into_owned)
    }

    fn hide(target: &str, names: &[&str], key: Option<&str>) -> String {
        let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        String::from_utf8(hide_credentials(target.as_bytes(), &names, key.map(str::as_bytes)).into_owned()).unwrap()
    }

    #[test]
    fn header_key_wins_over_query_key() {
        assert_eq!(found("/a?apikey=q", &["apikey: h"], &KeyAuth::default()), Some(b"h".to_vec()));
    }

    #[test]
    fn header_name_is_case_insensitive() {
        assert_eq!(found("/a", &["APIKEY: upper"], &KeyAuth::default()), Some(b"upper".to_vec()));
    }

    #[test]
    fn query_name_is_case_sensitive() {
        assert_eq!(found("/a?APIKEY=wrong-case", &[], &KeyAuth::default()), None);
    }

    #[test]
    fn query_value_is_url_decoded_with_plus_as_space() {
        assert_eq!(found("/a?x=1&apikey=a%2Bb%20c%2F+d", &[], &KeyAuth::default()), Some(b"a+b c/ d".to_vec()));
    }

    #[test]
    fn query_name_is_compared_decoded() {
        assert_eq!(found("/a?api%6Bey=encoded-name", &[], &KeyAuth::default()), Some(b"encoded-name".to_vec()));
    }

    #[test]
    fn first_query_parameter_of_a_name_wins() {
        assert_eq!(found("/a?apikey=first&apikey=second", &[], &KeyAuth::default()), Some(b"first".to_vec()));
    }

    #[test]
    fn each_name_is_looked_up_everywhere_before_the_next() {
        let both = key_auth(&["apikey", "token"], true, true);
        assert_eq!(found("/a?apikey=q1", &["token: h2"], &both), Some(b"q1".to_vec()));
    }

    #[test]
    fn empty_values_are_no_key() {
        assert_eq!(found("/a?apikey=&apikey=second", &["apikey: "], &KeyAuth::default()), None);
    }

    #[test]
    fn places_turned_off_are_not_looked_at() {
        assert_eq!(found("/a?apikey=q", &["apikey: h"], &key_auth(&["apikey"], false, true)), Some(b"q".to_vec()));
        assert_eq!(found("/a?apikey=q", &[], &key_auth(&["apikey"], true, false)), None);
    }

    #[test]
    fn underscore_name_matches_the_dashed_header() {
        let underscored = key_auth(&["x_api_key"], true, true);
        assert_eq!(found("/a", &["x-api-key: dashed"], &underscored), Some(b"dashed".to_vec()));
        assert_eq!(found("/a", &["x_api_key: under"], &underscored), Some(b"under".to_vec()));
    }

    #[test]
    fn a_non_ascii_key_stays_the_bytes_sent() {
        let mut message = request("/a?apikey=%C3%A9%FF", &[]);
        assert_eq!(find_key(&message, &KeyAuth::default()).as_deref(), Some(&b"\xc3\xa9\xff"[..]));
        message.head = b"GET / HTTP/1.1\r\napikey: \xe9t\xe9\r\n\r\n".to_vec();
        assert_eq!(find_key(&message, &KeyAuth::default()).as_deref(), Some(&b"\xe9t\xe9"[..]));
    }

    #[test]
    fn a_target_without_query_has_no_query_value() {
        assert_eq!(query_value(b"/a#apikey=x", b"apikey"), None);
        assert_eq!(query_value(b"/a?b=1#&apikey=x", b"apikey"), None);
        assert_eq!(query_value(b"/a?apikey", b"apikey").as_deref(), Some(&b""[..]));
    }

    #[test]
    fn incomplete_escapes_stay_as_sent() {
        assert_eq!(&*unquote_plus(b"%4%zz%"), b"%4%zz%");
        assert_eq!(&*unquote_plus(b"%4a%4A"), b"JJ");
    }

    #[test]
    fn query_text_reads_escapes_as_utf8_and_raw_bytes_as_latin1() {
        assert_eq!(unquote_plus_text(b"acme%20corp"), "acme corp");
        assert_eq!(unquote_plus_text(b"%C3%A9"), "\u{e9}");
        assert_eq!(unquote_plus_text(b"\xc3\xa9"), "\u{c3}\u{a9}");
        assert_eq!(unquote_plus_text(b"%FFx\xe9%41"), "\u{fffd}x\u{e9}A");
        assert_eq!(unquote_plus_text(b"\xe9"), "\u{e9}");
    }

    #[test]
    fn hide_credentials_removes_key_parameters_and_keeps_the_rest_as_sent() {
        assert_eq!(hide("/a?apikey=k&x=1", &["apikey"], None), "/a?x=1");
        assert_eq!(hide("/a?apikey=k", &["apikey"], None), "/a");
        assert_eq!(hide("/a?x=%20&apikey=k&y", &["apikey"], None), "/a?x=%20&y");
        assert_eq!(hide("/a?x=1&apikey=k1&apikey=k2&z=3", &["apikey"], None), "/a?x=1&z=3");
        assert_eq!(hide("/a?api%6Bey=k&x=1", &["apikey"], None), "/a?x=1");
        assert_eq!(hide("/a?APIKEY=not-a-key-name&x=1", &["apikey"], None), "/a?APIKEY=not-a-key-name&x=1");
        assert_eq!(hide("/a?x=1", &["apikey"], None), "/a?x=1");
        assert_eq!(hide("/a", &["apikey"], None), "/a");
    }

    #[test]
    fn hide_credentials_keeps_empty_parts_and_the_fragment_as_sent() {
        assert_eq!(hide("/a?&x=1&&apikey=k#f", &["apikey"], None), "/a?&x=1&");
        assert_eq!(hide("/a?apikey=k&", &["apikey"], None), "/a?");
    }

    #[test]
    fn hide_credentials_removes_a_parameter_carrying_the_key_used() {
        let key = Some("K-123");
        assert_eq!(hide("/a?APIKEY=K-123&x=1", &["apikey"], key), "/a?x=1");
        assert_eq!(hide("/a?y=2&x=1;apikey=K-123", &["apikey"], key), "/a?y=2");
        assert_eq!(hide("/a?x=1&other=K%2D123", &["apikey"], key), "/a?x=1");
        assert_eq!(hide("/a?x=1&apikey%3DK-123", &["apikey"], key), "/a?x=1");
        assert_eq!(hide("/a?x=K-12", &["apikey"], key), "/a?x=K-12");
        assert_eq!(hide("/a?x=1", &["apikey"], Some("")), "/a?x=1");
    }

    #[test]
    fn hide_credentials_removes_every_configured_name() {
        assert_eq!(hide("/a?token=t&keep=1&apikey=k", &["apikey", "token"], None), "/a?keep=1");
    }

    #[test]
    fn a_target_without_key_parameters_is_not_copied() {
        assert!(matches!(hide_credentials(b"/a?x=1&y=2", &["apikey".to_string()], Some(b"k9")), Cow::Borrowed(_)));
    }
}
