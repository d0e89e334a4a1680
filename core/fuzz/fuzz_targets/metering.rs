//! Hostile request heads and targets through key lookup, `hide_credentials` and the meter: the key found
//! is never empty, no query part that names or carries a key survives, and every event is one line of
//! UTF-8 without control characters.
#![no_main]

use _core::http::message::{Exchange, Message};
use _core::metering::billing::{Meter, MeterConfig};
use _core::metering::credentials::{key_digest, CredentialTable};
use _core::metering::key_lookup::{find_key, hide_credentials, unquote_plus, KeyAuth};
use _core::metering::subject::SubjectRule;
use _core::source::frames::Address;
use _core::tcp::reassembly::ConnectionInfo;
use libfuzzer_sys::fuzz_target;

/// `flags`, then up to three key names, the head and the target, separated by 0xFF.
fn split(data: &[u8]) -> (u8, Vec<String>, Vec<u8>, Vec<u8>) {
    let mut parts = data.split(|&b| b == 0xFF);
    let flags = parts.next().and_then(|first| first.first().copied()).unwrap_or(0);
    let names: Vec<String> = (0..usize::from(flags % 4))
        .filter_map(|_| parts.next())
        .map(|name| String::from_utf8_lossy(name).into_owned())
        .filter(|name| !name.is_empty())
        .collect();
    let head = parts.next().unwrap_or_default().to_vec();
    let target = parts.next().unwrap_or_default().to_vec();
    (flags, names, head, target)
}

fn check_hidden(target: &[u8], hidden: &[u8], names: &[String], key: Option<&[u8]>) {
    let question = target.iter().position(|&b| b == b'?');
    let path_end = question.unwrap_or(target.len());
    assert_eq!(&hidden[..path_end.min(hidden.len())], &target[..path_end]);
    let Some(question) = question else {
        assert_eq!(hidden, target);
        return;
    };
    let query: Vec<&[u8]> = target[question + 1..].split(|&b| b == b'&').collect();
    if hidden.len() <= path_end {
        return;
    }
    for part in hidden[path_end + 1..].split(|&b| b == b'&') {
        assert!(query.contains(&part), "a part that was not sent");
        let name = part.split(|&b| b == b'=').next().unwrap_or_default();
        assert!(!names.iter().any(|key_name| key_name.as_bytes() == &*unquote_plus(name)), "a key name kept");
        if let Some(key) = key.filter(|key| !key.is_empty()) {
            let carries = |text: &[u8]| text.windows(key.len()).any(|window| window == key);
            assert!(!carries(part) && !carries(&unquote_plus(part)), "the key kept");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let (flags, names, head, target) = split(data);
    let key_auth = KeyAuth {
        key_names: if names.is_empty() { KeyAuth::default().key_names } else { names },
        key_in_header: flags & 0x10 == 0,
        key_in_query: flags & 0x20 == 0,
    };
    let request =
        Message { head, target, size: data.len() as u64, start_time: f64::from(flags) * 1e8, ..Message::default() };
    let key = find_key(&request, &key_auth).map(|key| key.into_owned());
    assert!(key.as_ref().is_none_or(|key| !key.is_empty()));
    let hidden = hide_credentials(&request.target, &key_auth.key_names, key.as_deref());
    check_hidden(&request.target, &hidden, &key_auth.key_names, key.as_deref());

    let rule = match flags >> 6 {
        0 | 1 => SubjectRule::Consumer,
        2 => SubjectRule::Header("host".into()),
        _ => SubjectRule::Query(key_auth.key_names[0].clone()),
    };
    let mut meter = Meter::new(MeterConfig { source: "fuzz".into(), rule, max_held: 2 });
    meter.set_key_auth(key_auth);
    let v6 = flags & 1 == 1;
    let address: &[u8] = if v6 { &data[..data.len().min(16)] } else { &data[..data.len().min(4)] };
    let connection = ConnectionInfo {
        id: 0,
        client: Address::new(address),
        client_port: u16::from(flags),
        server: Address::new(&[0; 16][..if v6 { 16 } else { 4 }]),
        server_port: 8000,
        saw_syn: true,
        to_server_base_seq: Some(u32::from(flags) << 24),
    };
    let exchange = Exchange {
        connection,
        request,
        status: [0, 200, 401, 500][usize::from(flags >> 2 & 3)],
        proxied_by_kong: flags & 2 != 0,
        answered_by_kong: flags & 4 != 0,
        response_size: data.len() as u64,
        response_end: f64::from(flags) * 1e8 + 0.5,
    };
    let mut out = Vec::new();
    meter.meter([exchange.clone()], 0.0, &mut out);
    let digest = key.as_deref().map(key_digest).unwrap_or([0; 32]);
    meter.set_credentials(Some(CredentialTable::new([(digest, Some("subject".to_string()), "consumer".to_string(), None)])));
    meter.meter([exchange], 0.0, &mut out);
    let text = std::str::from_utf8(&out).expect("events are UTF-8");
    assert_eq!(text.lines().count() as u64, meter.counters.events);
    for line in text.split_terminator('\n') {
        assert!(line.starts_with("{\"id\":\"") && line.ends_with("}}"));
        assert!(!line.bytes().any(|b| b < 0x20), "a control character in an event");
        if let Some(key) = key.as_deref().filter(|key| key.len() >= 4 && key.iter().all(u8::is_ascii_alphanumeric)) {
            let uri_start = line.find("\"request_uri\":").unwrap_or(0);
            let uri_end = line.find(",\"request_host\"").unwrap_or(line.len());
            let uri = &line.as_bytes()[uri_start..uri_end];
            let query = uri.iter().position(|&b| b == b'?').map_or(&uri[..0], |at| &uri[at..]);
            assert!(!query.windows(key.len()).any(|window| window == key), "the key in the event's query");
        }
    }
});
