//! Which of the gateway's routes a request hit, decided as Kong 3.x decides it.
//!
//! Kong's matching engine is the `atc-router` crate, and so is ours. A route written as an `expression`
//! (the `expressions` flavor) goes in as written, with its `priority`. A traditional route is translated
//! into an expression and a 64-bit priority the way Kong's `traditional_compatible` flavor (the 3.x
//! default) translates it (`kong/router/transform.lua`): methods, hosts (exact, one leading or trailing
//! `*` label, `host:port` also requiring the port), paths (prefix, or `~` regex anchored at the start),
//! headers (names ANDed, values ORed, compared lower-cased, `~*` for a regex) and SNIs (ignored for plain
//! HTTP). A route whose paths mix regexes and prefixes of several lengths becomes one matcher per group,
//! as Kong splits it, each with its own priority. Each request is matched on what Kong reads of it: the
//! method, the normalized path, the `Host` header's host and port (else the server's port), its headers.

use std::collections::HashMap;
use std::sync::OnceLock;

use atc_router::ast::{Type, Value};
use atc_router::context::Context;
use atc_router::router::Router;
use atc_router::schema::Schema;
use uuid::Uuid;

use crate::http::message::Message;
use crate::metering::events::push_string;
use crate::metering::key_lookup::KeyAuth;

/// A route's service, as its events name it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceSpec {
    pub id: String,
    pub name: Option<String>,
    pub port: Option<u16>,
    pub protocol: Option<String>,
}

/// One route as the control plane describes it (Kong's fields and defaults).
#[derive(Clone, Debug, Default)]
pub struct RouteSpec {
    pub id: String,
    pub name: Option<String>,
    pub service: Option<ServiceSpec>,
    /// an `expressions`-flavor route: matched as written, with `priority`
    pub expression: Option<String>,
    pub priority: u64,
    pub methods: Vec<String>,
    pub hosts: Vec<String>,
    pub paths: Vec<String>,
    /// header name, and the values any one of which matches
    pub headers: Vec<(String, Vec<String>)>,
    pub snis: Vec<String>,
    pub regex_priority: i64,
    /// Kong's protocols (empty: Kong's default, http and https)
    pub protocols: Vec<String>,
    /// the key-auth instance that applies to this route; None: none does, so no consumer is known here
    pub key_auth: Option<KeyAuth>,
}

/// A route as metering needs it once matched.
#[derive(Debug)]
pub struct Route {
    pub id: String,
    pub service_id: Option<String>,
    pub key_auth: Option<KeyAuth>,
    /// the route takes plain HTTP; if not (`https` only), Kong answers such a request 426 before any
    /// plugin of the route's or its service's runs, key-auth included: only global entries apply
    pub plain_http: bool,
    /// the event's six route and service fields, rendered once: `"route_id":...,"service_protocol":...`
    pub event_fields: Vec<u8>,
}

/// Kong's fields for HTTP routes, with their types.
fn schema() -> &'static Schema {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let mut schema = Schema::default();
        for field in ["net.protocol", "tls.sni", "http.method", "http.host", "http.path", "http.headers.*"] {
            schema.add_field(field, Type::String);
        }
        for field in ["net.src.port", "net.dst.port"] {
            schema.add_field(field, Type::Int);
        }
        for field in ["net.src.ip", "net.dst.ip"] {
            schema.add_field(field, Type::IpAddr);
        }
        schema
    })
}

/// Which request fields the routes read, so a request gives only those.
#[derive(Default)]
struct Reads {
    method: bool,
    path: bool,
    host: bool,
    port: bool,
    protocol: bool,
    /// (the context field, the header's name with dashes) of every header a route reads
    headers: Vec<(String, Vec<u8>)>,
}

/// The gateway's routes, ready to match requests.
pub struct Routes {
    router: Router<'static>,
    routes: Vec<Route>,
    /// matcher uuid -> route index
    owners: HashMap<Uuid, usize>,
    reads: Reads,
    context: Context<'static>,
    /// what recent requests matched, by what the routes read of them (Kong's router caches the same way)
    cache: HashMap<Vec<u8>, Option<usize>>,
    key: Vec<u8>,
}

/// Requests whose match is remembered; beyond it the cache starts afresh (bounded, and cheap to keep).
const CACHED_MATCHES: usize = 4096;
/// Longer requests (by what the match depends on) are matched afresh each time: the cache stays within
/// 4096 x 512 bytes, whatever the targets' lengths.
const MAX_CACHED_KEY: usize = 512;

impl Routes {
    /// The routes, in the order Kong created them; also one line for each route that could not be used
    /// (Kong logs the same and leaves such a route out of its router).
    pub fn new(specs: Vec<RouteSpec>) -> (Routes, Vec<String>) {
        let mut router = Router::new(schema());
        let mut routes = Vec::with_capacity(specs.len());
        let mut owners = HashMap::new();
        let mut refused = Vec::new();
        for spec in specs {
            let matchers = match &spec.expression {
                // as Kong's router ranks an expression route beside traditional ones
                Some(expression) => vec![(EXPRESSION_ONLY | (spec.priority & !EXPRESSION_ONLY), expression.clone())],
                None => traditional_matchers(&spec),
            };
            if matchers.is_empty() {
                refused.push(format!("route {}: no methods, hosts, paths or headers to match on", label(&spec)));
                continue;
            }
            let index = routes.len();
            let mut added = Vec::new();
            let split = matchers.len() > 1;
            let failed = matchers.iter().enumerate().find_map(|(group, (priority, expression))| {
                let uuid = matcher_uuid(&spec.id, split.then_some(group + 1));
                match router.add_matcher(*priority as usize, uuid, expression) {
                    Ok(()) => {
                        added.push((*priority, uuid));
                        None
                    }
                    Err(error) => Some(error),
                }
            });
            if let Some(error) = failed {
                for (priority, uuid) in added {
                    router.remove_matcher(priority as usize, uuid);
                }
                let reason: Vec<&str> = error.lines().map(str::trim).filter(|line| !line.is_empty()).collect();
                let reason: String = reason.join(" ").chars().take(300).collect();
                refused.push(format!("route {}: Kong's router refuses it ({reason})", label(&spec)));
                continue;
            }
            for (_, uuid) in added {
                owners.insert(uuid, index);
            }
            let plain_http = spec.protocols.is_empty() || spec.protocols.iter().any(|p| p == "http" || p == "grpc");
            routes.push(Route {
                plain_http,
                event_fields: event_fields(&spec),
                id: spec.id,
                service_id: spec.service.map(|service| service.id),
                key_auth: spec.key_auth,
            });
        }
        let reads = reads_of(&router);
        let context = Context::new(schema());
        let routes = Routes { router, routes, owners, reads, context, cache: HashMap::new(), key: Vec::new() };
        (routes, refused)
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn route(&self, index: usize) -> &Route {
        &self.routes[index]
    }

    /// The index of the route this request hits; None is Kong's `404 no Route matched`.
    pub fn route_of(&mut self, request: &Message, server_port: u16) -> Option<usize> {
        self.cache_key(request, server_port);
        if let Some(&cached) = self.cache.get(&self.key[..]) {
            return cached;
        }
        let matched = self.matching(request, server_port);
        if self.key.len() <= MAX_CACHED_KEY {
            if self.cache.len() >= CACHED_MATCHES {
                self.cache.clear();
            }
            self.cache.insert(self.key.clone(), matched);
        }
        matched
    }

    /// Everything of the request the match depends on: method, target up to its query, `Host`, the
    /// server's port, and the values of the headers the routes read.
    fn cache_key(&mut self, request: &Message, server_port: u16) {
        let key = &mut self.key;
        key.clear();
        let target = &request.target;
        key.extend_from_slice(&request.method);
        key.push(0);
        key.extend_from_slice(&target[..memchr::memchr(b'?', target).unwrap_or(target.len())]);
        key.push(0);
        key.extend_from_slice(request.header(b"host").unwrap_or_default());
        key.push(0);
        key.extend_from_slice(&server_port.to_be_bytes());
        for (_, name) in &self.reads.headers {
            for value in header_values(&request.head, name) {
                key.push(0);
                key.extend_from_slice(value);
            }
            key.push(1);
        }
    }

    fn matching(&mut self, request: &Message, server_port: u16) -> Option<usize> {
        let context = &mut self.context;
        context.reset();
        let reads = &self.reads;
        if reads.method {
            context.add_value("http.method", Value::String(String::from_utf8(request.method.clone()).ok()?));
        }
        if reads.path {
            context.add_value("http.path", Value::String(normalized_path(&request.target)?));
        }
        let (host, host_port) = match request.header(b"host") {
            Some(host) => split_host_port(host),
            None => (None, None),
        };
        if reads.host {
            if let Some(host) = host {
                context.add_value("http.host", Value::String(String::from_utf8(host.to_vec()).ok()?));
            }
        }
        if reads.port {
            context.add_value("net.dst.port", Value::Int(host_port.unwrap_or(server_port).into()));
        }
        if reads.protocol {
            context.add_value("net.protocol", Value::String("http".to_string()));
        }
        for (field, name) in &reads.headers {
            for value in header_values(&request.head, name) {
                if let Ok(value) = std::str::from_utf8(value) {
                    context.add_value(field, Value::String(value.to_string()));
                }
            }
        }
        if !self.router.execute(context) {
            return None;
        }
        let uuid = context.result.as_ref()?.uuid;
        self.owners.get(&uuid).copied()
    }
}

fn label(spec: &RouteSpec) -> &str {
    spec.name.as_deref().unwrap_or(&spec.id)
}

/// Kong's namespace for the ids of the parts of a route split by its paths.
const SPLIT_NAMESPACE: Uuid = Uuid::from_u128(0x7f145bf9_0dce_4f91_98eb_debbce4b9f6b);

/// Kong's bit that ranks expression routes above traditional ones in one router.
const EXPRESSION_ONLY: u64 = 0xFF << 56;

/// The matcher's uuid, which orders matchers of equal priority as Kong's router orders them: the route's
/// own id, or for the `part`-th (from 1) of a route split by its paths the name-based id Kong gives it.
fn matcher_uuid(route_id: &str, part: Option<usize>) -> Uuid {
    match (part, Uuid::parse_str(route_id)) {
        (None, Ok(uuid)) => uuid,
        (None, Err(_)) => Uuid::new_v5(&SPLIT_NAMESPACE, route_id.as_bytes()),
        (Some(part), _) => Uuid::new_v5(&SPLIT_NAMESPACE, format!("{route_id}#{part}").as_bytes()),
    }
}

fn reads_of(router: &Router<'_>) -> Reads {
    let mut reads = Reads::default();
    for field in router.fields.keys() {
        match field.as_str() {
            "http.method" => reads.method = true,
            "http.path" => reads.path = true,
            "http.host" => reads.host = true,
            "net.dst.port" => reads.port = true,
            "net.protocol" => reads.protocol = true,
            other => {
                if let Some(name) = other.strip_prefix("http.headers.") {
                    reads.headers.push((other.to_string(), name.replace('_', "-").into_bytes()));
                }
            }
        }
    }
    reads
}

/// A string literal of the expression language: raw unless it holds `"#`.
fn literal(text: &str) -> String {
    if !text.contains("\"#") {
        return format!("r#\"{text}\"#");
    }
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `(a || b || ...)` of one predicate per value.
fn any_of(values: &[String], predicate: impl Fn(&str) -> String) -> String {
    let alternatives: Vec<String> = values.iter().map(|value| predicate(value)).collect();
    format!("({})", alternatives.join(" || "))
}

fn is_regex(path: &str) -> bool {
    path.starts_with('~')
}

/// Kong's split of a host entry: `host:port` when what follows the first colon is a number.
fn split_route_host(host: &str) -> (&str, Option<u16>) {
    match host.split_once(':') {
        Some((name, port)) => match port.parse::<u16>() {
            Ok(port) => (name, Some(port)),
            Err(_) => (host, None),
        },
        None => (host, None),
    }
}

/// One (priority, expression) per group of paths: regex paths together, prefixes by their length.
fn traditional_matchers(spec: &RouteSpec) -> Vec<(u64, String)> {
    let mut groups: Vec<Vec<String>> = Vec::new();
    for path in &spec.paths {
        let same = |group: &Vec<String>| {
            let first = &group[0];
            if is_regex(path) { is_regex(first) } else { !is_regex(first) && first.len() == path.len() }
        };
        match groups.iter_mut().find(|group| same(group)) {
            Some(group) => group.push(path.clone()),
            None => groups.push(vec![path.clone()]),
        }
    }
    if groups.is_empty() {
        groups.push(Vec::new());
    }
    groups
        .into_iter()
        .filter_map(|paths| {
            let expression = traditional_expression(spec, &paths)?;
            Some((traditional_priority(spec, &paths), expression))
        })
        .collect()
}

fn traditional_expression(spec: &RouteSpec, paths: &[String]) -> Option<String> {
    let mut parts = Vec::new();
    if !spec.snis.is_empty() {
        let snis = any_of(&spec.snis, |sni| {
            let sni = if sni.len() > 1 { sni.strip_suffix('.').unwrap_or(sni) } else { sni };
            format!("tls.sni == {}", literal(sni))
        });
        parts.push(format!("(net.protocol != r#\"https\"# || {snis})"));
    }
    if !spec.methods.is_empty() {
        parts.push(any_of(&spec.methods, |method| format!("http.method == {}", literal(method))));
    }
    if !spec.hosts.is_empty() {
        parts.push(any_of(&spec.hosts, |entry| {
            let (host, port) = split_route_host(entry);
            let predicate = if let Some(suffix) = host.strip_prefix('*') {
                format!("http.host =^ {}", literal(suffix))
            } else if let Some(prefix) = host.strip_suffix('*') {
                format!("http.host ^= {}", literal(prefix))
            } else {
                format!("http.host == {}", literal(host))
            };
            match port {
                Some(port) => format!("({predicate} && net.dst.port == {port})"),
                None => predicate,
            }
        }));
    }
    if !paths.is_empty() {
        parts.push(any_of(paths, |path| match path.strip_prefix('~') {
            // anchored as the traditional router anchors it; named groups in the regex crate's spelling
            Some(regex) => format!("http.path ~ {}", literal(&format!("^{}", regex.replace("?<", "?P<")))),
            None => format!("http.path ^= {}", literal(path)),
        }));
    }
    for (name, values) in &spec.headers {
        let field = format!("any(lower(http.headers.{}))", name.to_lowercase().replace('-', "_"));
        parts.push(any_of(values, |value| match value.strip_prefix("~*") {
            Some(regex) => format!("{field} ~ {}", literal(&regex.to_lowercase())),
            None => format!("{field} == {}", literal(&value.to_lowercase())),
        }));
    }
    if parts.is_empty() {
        return None;
    }
    Some(parts.join(" && "))
}

const MAX_HEADER_COUNT: u64 = 255;

/// Kong's 64-bit priority of a traditional route (one group of its paths): from the top bit down, how
/// many kinds of field it sets, whether its hosts are all plain, how many headers, whether its paths are
/// regexes, their `regex_priority`, and the prefix's length.
fn traditional_priority(spec: &RouteSpec, paths: &[String]) -> u64 {
    let headers = (spec.headers.len() as u64).min(MAX_HEADER_COUNT);
    let weight = [!spec.methods.is_empty(), !spec.hosts.is_empty(), headers > 0, !spec.snis.is_empty(), !paths.is_empty()]
        .iter()
        .filter(|&&set| set)
        .count() as u64;
    let plain_hosts_only = !spec.hosts.is_empty() && spec.hosts.iter().all(|host| !host.contains('*'));
    let regex = paths.first().is_some_and(|path| is_regex(path));
    let prefix_length = if regex { 0 } else { paths.first().map_or(0, |path| path.len() as u64) };
    let regex_priority = if regex { (spec.regex_priority as u64) & 0xFFFF_FFFF } else { 0 };
    weight << 61
        | u64::from(plain_hosts_only) << 60
        | headers << 52
        | u64::from(regex) << 51
        | regex_priority << 19
        | (prefix_length & 0x7FFFF)
}

fn event_fields(spec: &RouteSpec) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    let optional = |out: &mut Vec<u8>, value: Option<&str>| match value {
        Some(value) => push_string(out, value.as_bytes(), false),
        None => out.extend_from_slice(b"null"),
    };
    out.extend_from_slice(b"\"route_id\":");
    push_string(&mut out, spec.id.as_bytes(), false);
    out.extend_from_slice(b",\"route_name\":");
    optional(&mut out, spec.name.as_deref());
    let service = spec.service.as_ref();
    out.extend_from_slice(b",\"service_id\":");
    optional(&mut out, service.map(|service| service.id.as_str()));
    out.extend_from_slice(b",\"service_name\":");
    optional(&mut out, service.and_then(|service| service.name.as_deref()));
    out.extend_from_slice(b",\"service_port\":");
    match service.and_then(|service| service.port) {
        Some(port) => out.extend_from_slice(port.to_string().as_bytes()),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"service_protocol\":");
    optional(&mut out, service.and_then(|service| service.protocol.as_deref()));
    out
}

/// The `Host` header's host, and its port when what follows the first colon is a number (Kong's split).
fn split_host_port(host: &[u8]) -> (Option<&[u8]>, Option<u16>) {
    match memchr::memchr(b':', host) {
        Some(colon) => match std::str::from_utf8(&host[colon + 1..]).ok().and_then(|port| port.parse::<u16>().ok()) {
            Some(port) => (Some(&host[..colon]), Some(port)),
            None => (Some(host), None),
        },
        None => (Some(host), None),
    }
}

/// Every value of a header (name compared case-insensitively), one per header line.
fn header_values<'h>(head: &'h [u8], name: &'h [u8]) -> impl Iterator<Item = &'h [u8]> + 'h {
    head.split(|&byte| byte == b'\n').skip(1).filter_map(move |line| {
        let colon = memchr::memchr(b':', line)?;
        let field = crate::http::message::trim_ascii_whitespace(&line[..colon]);
        field.eq_ignore_ascii_case(name).then(|| crate::http::message::trim_ascii_whitespace(&line[colon + 1..]))
    })
}

/// Characters RFC 3986 reserves, and `%`: their escapes are kept (upper-cased), as Kong's normalization
/// keeps them.
fn is_reserved(byte: u8) -> bool {
    b":/?#[]@!$&'()*+,;=%".contains(&byte)
}

fn hex_value(byte: u8) -> Option<u8> {
    (byte as char).to_digit(16).map(|digit| digit as u8)
}

/// The path Kong's router matches: the target without its query, percent-escapes of unreserved
/// characters decoded, dot segments removed, runs of slashes merged (`kong.tools.uri.normalize`). None
/// when the result is not UTF-8 text, which Kong's router cannot match either.
pub fn normalized_path(target: &[u8]) -> Option<String> {
    let path = &target[..memchr::memchr(b'?', target).unwrap_or(target.len())];
    let mut decoded = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        let escape = match (path[i], path.get(i + 1).copied().and_then(hex_value), path.get(i + 2).copied().and_then(hex_value)) {
            (b'%', Some(high), Some(low)) => Some(high << 4 | low),
            _ => None,
        };
        match escape {
            Some(byte) if is_reserved(byte) => {
                decoded.push(b'%');
                decoded.extend(path[i + 1..i + 3].iter().map(u8::to_ascii_uppercase));
                i += 3;
            }
            Some(byte) => {
                decoded.push(byte);
                i += 3;
            }
            None => {
                decoded.push(path[i]);
                i += 1;
            }
        }
    }
    // slashes merged as dot segments are removed (Kong does both in one pass): `/a//../b` is `/b`
    decoded.dedup_by(|next, previous| *next == b'/' && *previous == b'/');
    let path = if memchr::memmem::find(&decoded, b"/.").is_some() { remove_dot_segments(&decoded) } else { decoded };
    String::from_utf8(path).ok()
}

/// RFC 3986, 5.2.4.
fn remove_dot_segments(path: &[u8]) -> Vec<u8> {
    let mut input = path;
    let mut output: Vec<u8> = Vec::with_capacity(path.len());
    let pop_segment = |output: &mut Vec<u8>| {
        let last = output.iter().rposition(|&byte| byte == b'/').unwrap_or(0);
        output.truncate(last);
    };
    while !input.is_empty() {
        if let Some(rest) = input.strip_prefix(b"../").or_else(|| input.strip_prefix(b"./")) {
            input = rest;
        } else if input.starts_with(b"/./") {
            input = &input[2..];
        } else if input == b"/." {
            input = b"/";
        } else if input.starts_with(b"/../") {
            input = &input[3..];
            pop_segment(&mut output);
        } else if input == b"/.." {
            input = b"/";
            pop_segment(&mut output);
        } else if input == b"." || input == b".." {
            input = b"";
        } else {
            let start = usize::from(input[0] == b'/');
            let end = input[start..].iter().position(|&byte| byte == b'/').map_or(input.len(), |p| p + start);
            output.extend_from_slice(&input[..end]);
            input = &input[end..];
        }
    }
    output
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(id: &str) -> RouteSpec {
        RouteSpec { id: id.to_string(), name: Some(id.to_string()), ..RouteSpec::default() }
    }

    fn request(method: &str, target: &str, headers: &[&str]) -> Message {
        let mut head = format!("{method} {target} HTTP/1.1\r\n");
        for header in headers {
            head.push_str(header);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        Message {
            head: head.into_bytes(),
            method: method.as_bytes().to_vec(),
            target: target.as_bytes().to_vec(),
            ..Message::default()
        }
    }

    fn hit(routes: &mut Routes, method: &str, target: &str, headers: &[&str]) -> Option<String> {
        let index = routes.route_of(&request(method, target, headers), 8000)?;
        Some(routes.route(index).id.clone())
    }

    fn routes(specs: Vec<RouteSpec>) -> Routes {
        let (routes, refused) = Routes::new(specs);
        assert!(refused.is_empty(), "{refused:?}");
        routes
    }

    fn paths(id: &str, paths: &[&str]) -> RouteSpec {
        RouteSpec { paths: paths.iter().map(|p| p.to_string()).collect(), ..route(id) }
    }

    #[test]
    fn the_longest_prefix_wins() {
        let mut r = routes(vec![paths("short", &["/a"]), paths("long", &["/a/b"])]);
        assert_eq!(hit(&mut r, "GET", "/a/b/c", &[]).as_deref(), Some("long"));
        assert_eq!(hit(&mut r, "GET", "/a/x", &[]).as_deref(), Some("short"));
        assert_eq!(hit(&mut r, "GET", "/b", &[]), None);
    }

    #[test]
    fn paths_are_prefixes_of_the_normalized_path_and_case_sensitive() {
        let mut r = routes(vec![paths("anything", &["/anything"])]);
        assert_eq!(hit(&mut r, "GET", "/anything?apikey=x", &[]).as_deref(), Some("anything"));
        assert_eq!(hit(&mut r, "GET", "/%61nything", &[]).as_deref(), Some("anything"));
        assert_eq!(hit(&mut r, "GET", "/x/../anything/", &[]).as_deref(), Some("anything"));
        assert_eq!(hit(&mut r, "GET", "//anything", &[]).as_deref(), Some("anything"));
        assert_eq!(hit(&mut r, "GET", "/Anything", &[]), None);
    }

    #[test]
    fn reserved_escapes_stay_escaped() {
        assert_eq!(normalized_path(b"/a%2fb%3F").as_deref(), Some("/a%2Fb%3F"));
        assert_eq!(normalized_path(b"/a/./b/../c").as_deref(), Some("/a/c"));
        assert_eq!(normalized_path(b"/%ff").as_deref(), None);
    }

    #[test]
    fn a_regex_path_is_anchored_and_beats_a_prefix_by_regex_priority() {
        let regex = RouteSpec { regex_priority: 10, ..paths("regex", &[r"~/users/\d+$"]) };
        let mut r = routes(vec![paths("prefix", &["/users"]), regex]);
        assert_eq!(hit(&mut r, "GET", "/users/42", &[]).as_deref(), Some("regex"));
        assert_eq!(hit(&mut r, "GET", "/users/me", &[]).as_deref(), Some("prefix"));
        assert_eq!(hit(&mut r, "GET", "/v1/users/42", &[]), None);
    }

    #[test]
    fn higher_regex_priority_wins_between_regexes() {
        let low = RouteSpec { regex_priority: 1, ..paths("low", &[r"~/items/\w+"]) };
        let high = RouteSpec { regex_priority: 5, ..paths("high", &[r"~/items/(?<id>\d+)"]) };
        let mut r = routes(vec![low, high]);
        assert_eq!(hit(&mut r, "GET", "/items/7", &[]).as_deref(), Some("high"));
        assert_eq!(hit(&mut r, "GET", "/items/x", &[]).as_deref(), Some("low"));
    }

    #[test]
    fn hosts_exact_wildcards_and_ports() {
        let host = |id: &str, hosts: &[&str]| RouteSpec { hosts: hosts.iter().map(|h| h.to_string()).collect(), ..route(id) };
        let mut r = routes(vec![
            host("exact", &["api.example.com"]),
            host("suffix", &["*.example.com"]),
            host("prefix", &["api.example.*"]),
            host("ported", &["admin.example.org:9000"]),
        ]);
        assert_eq!(hit(&mut r, "GET", "/", &["Host: api.example.com"]).as_deref(), Some("exact"));
        assert_eq!(hit(&mut r, "GET", "/", &["Host: api.example.com:8000"]).as_deref(), Some("exact"));
        assert_eq!(hit(&mut r, "GET", "/", &["Host: www.example.com"]).as_deref(), Some("suffix"));
        assert_eq!(hit(&mut r, "GET", "/", &["Host: api.example.net"]).as_deref(), Some("prefix"));
        assert_eq!(hit(&mut r, "GET", "/", &["Host: admin.example.org:9000"]).as_deref(), Some("ported"));
        // without a port in Host, the server's port (8000) is the one compared
        assert_eq!(hit(&mut r, "GET", "/", &["Host: admin.example.org"]), None);
        assert_eq!(hit(&mut r, "GET", "/", &[]), None);
    }

    #[test]
    fn plain_hosts_beat_wildcards_with_the_same_fields() {
        let both = |id: &str, host: &str| RouteSpec { hosts: vec![host.to_string()], ..paths(id, &["/"]) };
        let mut r = routes(vec![both("wild", "*.example.com"), both("plain", "a.example.com")]);
        assert_eq!(hit(&mut r, "GET", "/x", &["Host: a.example.com"]).as_deref(), Some("plain"));
        assert_eq!(hit(&mut r, "GET", "/x", &["Host: b.example.com"]).as_deref(), Some("wild"));
    }

    #[test]
    fn more_fields_beat_a_longer_prefix() {
        let method = RouteSpec { methods: vec!["POST".to_string()], ..paths("post", &["/"]) };
        let mut r = routes(vec![paths("long", &["/orders/new"]), method]);
        assert_eq!(hit(&mut r, "POST", "/orders/new", &[]).as_deref(), Some("post"));
        assert_eq!(hit(&mut r, "GET", "/orders/new", &[]).as_deref(), Some("long"));
        assert_eq!(hit(&mut r, "GET", "/", &[]), None);
    }

    #[test]
    fn headers_are_anded_by_name_and_ored_by_value_case_insensitively() {
        let spec = RouteSpec {
            headers: vec![
                ("X-Version".to_string(), vec!["v1".to_string(), "v2".to_string()]),
                ("x-region".to_string(), vec!["~*^eu-".to_string()]),
            ],
            ..route("versioned")
        };
        let mut r = routes(vec![spec, paths("rest", &["/"])]);
        assert_eq!(hit(&mut r, "GET", "/", &["x-version: V2", "X-Region: EU-west"]).as_deref(), Some("versioned"));
        assert_eq!(hit(&mut r, "GET", "/", &["x-version: v3", "X-Region: eu-west"]).as_deref(), Some("rest"));
        assert_eq!(hit(&mut r, "GET", "/", &["x-version: v1"]).as_deref(), Some("rest"));
    }

    #[test]
    fn snis_do_not_matter_for_plain_http() {
        let spec = RouteSpec { snis: vec!["api.example.com".to_string()], ..paths("tls", &["/"]) };
        let mut r = routes(vec![spec]);
        assert_eq!(hit(&mut r, "GET", "/", &[]).as_deref(), Some("tls"));
    }

    #[test]
    fn paths_of_several_lengths_each_keep_their_own_priority() {
        let mixed = paths("mixed", &["/a", "/abc/def"]);
        let middle = paths("middle", &["/abc"]);
        let mut r = routes(vec![mixed, middle]);
        assert_eq!(hit(&mut r, "GET", "/abc/def/x", &[]).as_deref(), Some("mixed"));
        assert_eq!(hit(&mut r, "GET", "/abc/x", &[]).as_deref(), Some("middle"));
        assert_eq!(hit(&mut r, "GET", "/ax", &[]).as_deref(), Some("mixed"));
    }

    #[test]
    fn expression_routes_go_in_as_written() {
        let expression = RouteSpec {
            expression: Some(r#"http.path ^= "/v2" && http.method == "GET""#.to_string()),
            priority: 100,
            ..route("expr")
        };
        let other = RouteSpec { expression: Some(r#"http.path ^= "/""#.to_string()), ..route("other") };
        let mut r = routes(vec![other, expression]);
        assert_eq!(hit(&mut r, "GET", "/v2/x", &[]).as_deref(), Some("expr"));
        assert_eq!(hit(&mut r, "POST", "/v2/x", &[]).as_deref(), Some("other"));
    }

    #[test]
    fn a_route_the_router_refuses_is_named_and_left_out() {
        let broken = RouteSpec { expression: Some("http.path ^^ nope".to_string()), ..route("broken") };
        let empty = route("empty");
        let (mut r, refused) = Routes::new(vec![broken, empty, paths("fine", &["/"])]);
        assert_eq!(refused.len(), 2, "{refused:?}");
        assert!(refused[0].contains("broken") && refused[1].contains("empty"));
        assert_eq!(hit(&mut r, "GET", "/x", &[]).as_deref(), Some("fine"));
    }

    #[test]
    fn event_fields_name_the_route_and_its_service() {
        let service = ServiceSpec {
            id: "s-1".to_string(),
            name: Some("example-service".to_string()),
            port: Some(80),
            protocol: Some("http".to_string()),
        };
        let spec = RouteSpec { service: Some(service), ..paths("r-1", &["/"]) };
        assert_eq!(
            String::from_utf8(event_fields(&spec)).unwrap(),
            r#""route_id":"r-1","route_name":"r-1","service_id":"s-1","service_name":"example-service","service_port":80,"service_protocol":"http""#
        );
        let bare = RouteSpec { name: None, ..paths("r-2", &["/"]) };
        assert_eq!(
            String::from_utf8(event_fields(&bare)).unwrap(),
            r#""route_id":"r-2","route_name":null,"service_id":null,"service_name":null,"service_port":null,"service_protocol":null"#
        );
    }

    #[test]
    fn remembered_matches_tell_apart_what_the_routes_read() {
        let spec = RouteSpec { headers: vec![("x-version".to_string(), vec!["v2".to_string()])], ..paths("v2", &["/"]) };
        let mut r = routes(vec![spec, paths("rest", &["/"])]);
        for _ in 0..3 {
            assert_eq!(hit(&mut r, "GET", "/a?x=1", &["X-Version: v2"]).as_deref(), Some("v2"));
            assert_eq!(hit(&mut r, "GET", "/a?x=2", &["X-Version: v1"]).as_deref(), Some("rest"));
            assert_eq!(hit(&mut r, "GET", "/a", &[]).as_deref(), Some("rest"));
        }
        for n in 0..(CACHED_MATCHES + 10) {
            assert_eq!(hit(&mut r, "GET", &format!("/n/{n}"), &["X-Version: v2"]).as_deref(), Some("v2"));
        }
        assert!(r.cache.len() <= CACHED_MATCHES);
    }

    #[test]
    fn normalization_keeps_escaped_percents_and_merges_slashes_before_dot_segments() {
        assert_eq!(normalized_path(b"/x%2541").as_deref(), Some("/x%2541"));
        assert_eq!(normalized_path(b"/a//../b").as_deref(), Some("/b"));
    }

    #[test]
    fn expression_routes_rank_above_traditional_ones_as_in_kongs_router() {
        let traditional = RouteSpec { methods: vec!["GET".to_string()], ..paths("trad", &["/v2"]) };
        let expression = RouteSpec { expression: Some(r#"http.path ^= "/v2""#.to_string()), priority: 1, ..route("expr") };
        let mut r = routes(vec![traditional, expression]);
        assert_eq!(hit(&mut r, "GET", "/v2/x", &[]).as_deref(), Some("expr"));
    }

    #[test]
    fn a_split_route_breaks_ties_with_the_ids_kong_gives_its_parts() {
        // Kong's id for the first part of `a` (split: `/a` and `/bb`) is above `b`'s own id
        let a = RouteSpec { paths: vec!["/a".into(), "/bb".into()], ..route("00000000-0000-0000-0000-00000000000a") };
        let b = RouteSpec { paths: vec!["/a".into()], ..route("0a000000-0000-0000-0000-000000000000") };
        assert!(matcher_uuid(&a.id, Some(1)) > Uuid::parse_str(&b.id).unwrap());
        let mut r = routes(vec![b, a]);
        assert_eq!(hit(&mut r, "GET", "/a/x", &[]).as_deref(), Some("00000000-0000-0000-0000-00000000000a"));
    }

    #[test]
    fn long_requests_are_matched_but_not_remembered() {
        let mut r = routes(vec![paths("root", &["/"])]);
        let long = format!("/{}", "x".repeat(MAX_CACHED_KEY));
        assert_eq!(hit(&mut r, "GET", &long, &[]).as_deref(), Some("root"));
        assert!(r.cache.is_empty());
    }

    #[test]
    fn hostile_targets_do_not_panic() {
        let mut r = routes(vec![paths("root", &["/"])]);
        for target in ["", "%", "%zz", "/..", "../../..", "/%2e%2e/", "?", "/\u{7f}"] {
            let _ = hit(&mut r, "GET", target, &["Host: :", "Host: a:99999"]);
        }
    }
}
