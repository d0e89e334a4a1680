//! Hostile routes (paths, hosts, headers and regexes as a gateway's configuration could hold them) and
//! hostile requests through Kong's router: a route Kong's router refuses is left out, never a panic; the
//! match is the same whether it was remembered or not; and a normalized path never keeps a dot segment.
#![no_main]

use _core::http::message::Message;
use _core::metering::routes::{normalized_path, RouteSpec, Routes};
use libfuzzer_sys::fuzz_target;

/// Route fields, then the request's head, separated by 0xFF: each field's first byte says what it is.
fn routes_and_head(data: &[u8]) -> (Vec<RouteSpec>, Vec<u8>) {
    let mut parts: Vec<&[u8]> = data.split(|&b| b == 0xFF).collect();
    let head = parts.pop().unwrap_or_default().to_vec();
    let mut routes = Vec::new();
    for (index, part) in parts.iter().take(16).enumerate() {
        let Some((&kind, value)) = part.split_first() else { continue };
        let value = String::from_utf8_lossy(value).into_owned();
        let mut route = RouteSpec { id: format!("route-{index}"), ..RouteSpec::default() };
        match kind % 6 {
            0 => route.paths = value.split(' ').map(str::to_string).collect(),
            1 => route.hosts = vec![value],
            2 => route.methods = vec![value],
            3 => route.headers = vec![(value.clone(), vec![value])],
            4 => (route.paths, route.regex_priority) = (vec![format!("~{value}")], i64::from(kind)),
            _ => (route.expression, route.priority) = (Some(value), u64::from(kind)),
        }
        routes.push(route);
    }
    (routes, head)
}

fuzz_target!(|data: &[u8]| {
    let (specs, head) = routes_and_head(data);
    let (mut routes, _refused) = Routes::new(specs);
    let mut words = head.split(|&b| b == b' ');
    let method = words.next().unwrap_or_default().to_vec();
    let target = words.next().unwrap_or_default().to_vec();
    if let Some(path) = normalized_path(&target) {
        assert!(!path.contains("/./") && !path.contains("/../") && !path.contains("//"), "{path:?}");
    }
    let request = Message { head, method, target, ..Message::default() };
    let first = routes.route_of(&request, 8000);
    let remembered = routes.route_of(&request, 8000);
    assert_eq!(first, remembered);
    assert!(first.is_none_or(|index| index < routes.len()));
});
