//! The billing rules: which exchanges become events.
//!
//! One event per request whose subject resolves and whose final status is not 401 (key-auth's rejection,
//! so a key the table still knows but the gateway has revoked is not billed; a 401 that Kong proxied from
//! the upstream service is billed). No subject: dropped and counted, as Kong's plugin drops it. While the
//! credential table has not loaded yet, exchanges are held (up to a bound) rather than dropped.
//!
//! Once the gateway's routes are known, a request no route matches is Kong's 404 and is not billed
//! (`no_route`); the route's key-auth says where its key is. Once the Metering & Billing plugin's entries
//! are known, the most specific entry that applies decides: none applies, or it does not meter API
//! requests (`out_of_scope`); its status filter (`status_filtered`); its subject and attributes.

use std::collections::VecDeque;

use crate::http::message::Exchange;
use crate::metering::credentials::CredentialTable;
use crate::metering::events::{EventContext, EventWriter};
use crate::metering::key_lookup::KeyAuth;
use crate::metering::plugins::{applicable, MeteringEntry};
use crate::metering::routes::{RouteSpec, Routes};
use crate::metering::subject::{identify, Resolution, SubjectResolver, SubjectRule};

pub struct MeterConfig {
    /// the events' CloudEvents `source`
    pub source: String,
    pub rule: SubjectRule,
    /// exchanges held while the credential table has not loaded; beyond it the oldest are dropped
    pub max_held: usize,
}

#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct MeterCounters {
    pub events: u64,
    /// answered 401 by the gateway
    pub rejected: u64,
    /// no subject
    pub unresolved: u64,
    /// no route of the gateway's matched (Kong answered 404)
    pub no_route: u64,
    /// no Metering & Billing entry applies, or the one that does meters no API requests
    pub out_of_scope: u64,
    /// a status the applicable entry's `allow_status_codes` leaves out
    pub status_filtered: u64,
    /// waiting for the credential table right now
    pub held: u64,
    /// dropped (and counted unresolved) because too many were waiting
    pub held_overflow: u64,
}

/// What the gateway's configuration says beyond credentials: its routes (empty: none known, so nothing
/// is attributed and everything is metered) and the Metering & Billing plugin's entries (none configured:
/// every request is metered by the command line's rule).
#[derive(Default)]
pub struct Gateway {
    pub routes: Vec<RouteSpec>,
    pub entries: Vec<MeteringEntry>,
    /// some entry exists, enabled or not (`entries` holds the enabled ones): only their scopes are
    /// metered, and with every entry disabled nothing is
    pub plugin_configured: bool,
}

pub struct Meter {
    source: String,
    max_held: usize,
    /// the command line's rule, for requests when no plugin entry is known
    resolver: SubjectResolver,
    key_auth: KeyAuth,
    gateway_key_names: Vec<String>,
    routes: Option<Routes>,
    entries: Vec<MeteringEntry>,
    plugin_configured: bool,
    /// each entry's subject rule, checked against the key names
    resolvers: Vec<SubjectResolver>,
    /// every key name anywhere (flags, the gateway's, each route's): hidden from every event's URI
    hidden_names: Vec<String>,
    /// some rule or scope needs the request's consumer, so requests wait for the credential table
    needs_table: bool,
    table: Option<CredentialTable>,
    held: VecDeque<Exchange>,
    held_bytes: usize,
    writer: EventWriter,
    attributes: Vec<u8>,
    pub counters: MeterCounters,
}

impl Meter {
    pub fn new(config: MeterConfig) -> Meter {
        let key_auth = KeyAuth::default();
        let needs_table = config.rule == SubjectRule::Consumer;
        let mut meter = Meter {
            source: config.source,
            max_held: config.max_held,
            resolver: SubjectResolver::new(config.rule, &key_auth),
            key_auth,
            gateway_key_names: Vec::new(),
            routes: None,
            entries: Vec::new(),
            plugin_configured: false,
            resolvers: Vec::new(),
            hidden_names: Vec::new(),
            needs_table,
            table: None,
            held: VecDeque::new(),
            held_bytes: 0,
            writer: EventWriter::default(),
            attributes: Vec::new(),
            counters: MeterCounters::default(),
        };
        meter.check_rules();
        meter
    }

    /// The gateway's key-auth settings (as the agent applies them); true if they changed, and then the
    /// subject rule is checked again against the new key names (see `subject_names_a_key`).
    pub fn set_key_auth(&mut self, key_auth: KeyAuth) -> bool {
        if key_auth == self.key_auth {
            return false;
        }
        self.key_auth = key_auth;
        self.check_rules();
        true
    }

    /// The key names the gateway's key-auth itself reads, where flags (`--key-names`) changed where the
    /// agent looks: a subject that is one of them still carries API keys. True if they changed.
    pub fn set_gateway_key_names(&mut self, names: Vec<String>) -> bool {
        if names == self.gateway_key_names {
            return false;
        }
        self.gateway_key_names = names;
        self.check_rules();
        true
    }

    /// Swaps in the gateway's routes and plugin entries whole (None: none known); returns one line for
    /// each route Kong's router would refuse too, which is left out.
    pub fn set_gateway(&mut self, gateway: Option<Gateway>) -> Vec<String> {
        let gateway = gateway.unwrap_or_default();
        let (routes, refused) = if gateway.routes.is_empty() { (None, Vec::new()) } else {
            let (routes, refused) = Routes::new(gateway.routes);
            (Some(routes), refused)
        };
        self.routes = routes;
        self.resolvers = gateway.entries.iter().map(|entry| SubjectResolver::new(entry.rule.clone(), &self.key_auth)).collect();
        self.entries = gateway.entries;
        self.plugin_configured = gateway.plugin_configured || !self.entries.is_empty();
        self.needs_table = if !self.plugin_configured {
            self.resolver.rule == SubjectRule::Consumer
        } else {
            self.entries.iter().any(|entry| entry.consumer.is_some() || entry.rule == SubjectRule::Consumer)
        };
        self.check_rules();
        refused
    }

    fn check_rules(&mut self) {
        let mut key_names: Vec<String> = self.key_auth.key_names.iter().chain(&self.gateway_key_names).cloned().collect();
        if let Some(routes) = &self.routes {
            for index in 0..routes.len() {
                if let Some(key_auth) = &routes.route(index).key_auth {
                    key_names.extend(key_auth.key_names.iter().cloned());
                }
            }
        }
        key_names.sort_unstable();
        key_names.dedup();
        let all = KeyAuth { key_names, ..self.key_auth.clone() };
        self.resolver.check(&all);
        for resolver in &mut self.resolvers {
            resolver.check(&all);
        }
        self.hidden_names = all.key_names;
    }

    /// A header or query subject names one of key-auth's key names, so its requests stay unresolved: a
    /// subject is never an API key. The caller says so once per change of the settings.
    pub fn subject_names_a_key(&self) -> bool {
        if !self.plugin_configured {
            return self.resolver.names_a_key();
        }
        self.resolvers.iter().any(SubjectResolver::names_a_key)
    }

    /// Swaps in a new credential table whole (None: not loaded, or lost).
    pub fn set_credentials(&mut self, table: Option<CredentialTable>) {
        self.table = table;
    }

    /// Appends the events of these exchanges to `out`, one JSON line each, after those of any held ones
    /// the credential table now resolves (with no exchanges, it only releases those: live capture calls
    /// it every second even when idle). `now` is on the clock of the table's expiries.
    pub fn meter(&mut self, exchanges: impl IntoIterator<Item = Exchange>, now: f64, out: &mut Vec<u8>) {
        if !self.held.is_empty() && (self.table.is_some() || !self.needs_table) {
            let held = std::mem::take(&mut self.held);
            self.held_bytes = 0;
            self.counters.held = 0;
            for exchange in held {
                self.meter_one(exchange, now, out);
            }
        }
        for exchange in exchanges {
            self.meter_one(exchange, now, out);
        }
    }

    /// Bytes held by exchanges waiting for the credential table, for the memory budget.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Drops the oldest exchange waiting for the credential table (counted as an overflow, unresolved),
    /// for the memory budget; false when none waits.
    pub fn drop_oldest_held(&mut self) -> bool {
        let Some(oldest) = self.held.pop_front() else {
            return false;
        };
        self.held_bytes = self.held_bytes.saturating_sub(footprint(&oldest));
        self.counters.held = self.held.len() as u64;
        self.counters.held_overflow += 1;
        self.counters.unresolved += 1;
        true
    }

    fn meter_one(&mut self, exchange: Exchange, now: f64, out: &mut Vec<u8>) {
        if exchange.status == 401 && !exchange.proxied_by_kong {
            self.counters.rejected += 1;
            return;
        }
        if self.needs_table && self.table.is_none() {
            self.hold(exchange);
            return;
        }
        let Meter {
            routes, entries, resolvers, resolver, table, counters, writer, attributes, key_auth, source, hidden_names,
            needs_table, plugin_configured, ..
        } = self;
        let route = match routes {
            None => None,
            Some(routes) => match routes.route_of(&exchange.request, exchange.connection.server_port) {
                Some(index) => Some(routes.route(index)),
                None => {
                    counters.no_route += 1;
                    return;
                }
            },
        };
        // the key-auth of the route (none: no consumer there), or, with no routes known, the gateway's; a
        // route that takes only HTTPS is answered 426 before its plugins run: no consumer, global entries only
        let routed = route.filter(|route| route.plain_http);
        let key_auth = match route {
            Some(route) => routed.and(route.key_auth.as_ref()),
            None => Some(&*key_auth),
        };
        // whose key it is, only when a rule or a scope asks for the consumer
        let caller = match (key_auth, table.as_ref()) {
            (Some(key_auth), Some(table)) if *needs_table => identify(&exchange.request, key_auth, table, now),
            _ => None,
        };
        let (entry, resolver) = if !*plugin_configured {
            (None, &*resolver)
        } else {
            let consumer = caller.as_ref().and_then(|caller| caller.owner).map(|(_, consumer)| consumer);
            let route_id = routed.map(|route| route.id.as_str());
            let service_id = routed.and_then(|route| route.service_id.as_deref());
            match applicable(entries, route_id, service_id, consumer) {
                Some(index) if entries[index].meter_api_requests => (Some(&entries[index]), &resolvers[index]),
                _ => {
                    counters.out_of_scope += 1;
                    return;
                }
            }
        };
        if entry.is_some_and(|entry| !entry.bills_status(exchange.status)) {
            counters.status_filtered += 1;
            return;
        }
        match resolver.resolve(&exchange.request, caller.as_ref()) {
            Resolution::Unresolved => counters.unresolved += 1,
            Resolution::Resolved { subject, key } => {
                attributes.clear();
                if let Some(entry) = entry {
                    entry.push_attributes(&exchange.request, caller.as_ref().map(|caller| &caller.key[..]), attributes);
                }
                let context = EventContext {
                    source,
                    subject: &subject,
                    subject_type: resolver.rule.look_up_value_in(),
                    key_names: hidden_names,
                    key,
                    route: route.map(|route| &route.event_fields[..]),
                    attributes,
                };
                writer.write(&exchange, &context, out);
                counters.events += 1;
            }
        }
    }

    fn hold(&mut self, exchange: Exchange) {
        if self.held.len() >= self.max_held {
            self.counters.held_overflow += 1;
            self.counters.unresolved += 1;
            // the oldest goes; with no room at all (max_held 0), this one
            match self.held.pop_front() {
                Some(oldest) => self.held_bytes -= footprint(&oldest),
                None => return,
            }
        }
        self.held_bytes += footprint(&exchange);
        self.held.push_back(exchange);
        self.counters.held = self.held.len() as u64;
    }
}

fn footprint(exchange: &Exchange) -> usize {
    let request = &exchange.request;
    std::mem::size_of::<Exchange>()
        + request.head.capacity()
        + request.method.capacity()
        + request.target.capacity()
        + request.version.capacity()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::message::Message;
    use crate::metering::plugins::entry;
    use crate::metering::credentials::key_digest;
    use crate::source::frames::Address;
    use crate::tcp::reassembly::ConnectionInfo;

    const START: f64 = 1714557600.25;

    fn table() -> CredentialTable {
        CredentialTable::new([(key_digest(b"alice-key"), Some("alice".to_string()), "c-alice".to_string(), None)])
    }

    fn exchange(target: &str, headers: &[&str], status: u16) -> Exchange {
        let mut head = format!("GET {target} HTTP/1.1\r\nHost: api.example.com\r\n");
        for header in headers {
            head.push_str(header);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let request = Message {
            start_time: START,
            size: head.len() as u64,
            head: head.into_bytes(),
            method: b"GET".to_vec(),
            target: target.as_bytes().to_vec(),
            version: b"1.1".to_vec(),
            ..Message::default()
        };
        let connection = ConnectionInfo {
            id: 1,
            client: Address::new(&[10, 0, 0, 1]),
            client_port: 40000,
            server: Address::new(&[10, 0, 0, 2]),
            server_port: 8000,
            saw_syn: true,
            to_server_base_seq: Some(1001),
        };
        Exchange {
            connection,
            request,
            status,
            proxied_by_kong: false,
            answered_by_kong: false,
            response_size: 312,
            response_end: START + 0.25,
        }
    }

    fn keyed(target: &str, status: u16) -> Exchange {
        exchange(target, &["apikey: alice-key"], status)
    }

    fn meter() -> Meter {
        Meter::new(meter_config())
    }

    fn uris(out: &[u8]) -> Vec<String> {
        let text = std::str::from_utf8(out).unwrap();
        text.lines()
            .map(|line| {
                let start = line.find("\"request_uri\":\"").unwrap() + 15;
                line[start..start + line[start..].find('"').unwrap()].to_string()
            })
            .collect()
    }

    fn metered(meter: &mut Meter, exchanges: Vec<Exchange>) -> Vec<String> {
        let mut out = Vec::new();
        meter.meter(exchanges, 0.0, &mut out);
        assert!(out.is_empty() || out.ends_with(b"\n"));
        uris(&out)
    }

    #[test]
    fn a_header_subject_of_one_of_the_gateways_own_key_names_stays_unresolved() {
        let mut meter = Meter::new(MeterConfig {
            source: "gw".to_string(),
            rule: SubjectRule::Header("apikey".to_string()),
            max_held: 10,
        });
        meter.set_key_auth(KeyAuth { key_names: vec!["x".to_string()], ..KeyAuth::default() });
        assert!(!meter.subject_names_a_key());
        assert!(meter.set_gateway_key_names(vec!["apikey".to_string()]));
        assert!(meter.subject_names_a_key());
    }

    #[test]
    fn a_resolved_request_becomes_one_event() {
        let mut billing = meter();
        billing.set_credentials(Some(table()));
        assert_eq!(metered(&mut billing, vec![exchange("/o?page=2&apikey=alice-key", &[], 200)]), ["/o?page=2"]);
        assert_eq!(billing.counters.events, 1);
    }

    #[test]
    fn a_401_from_key_auth_is_rejected_and_one_from_upstream_billed() {
        let mut billing = meter();
        billing.set_credentials(Some(table()));
        let mut by_upstream = keyed("/upstream", 401);
        by_upstream.proxied_by_kong = true;
        let mut by_kong = keyed("/kong", 401);
        by_kong.answered_by_kong = true;
        assert_eq!(metered(&mut billing, vec![by_kong, by_upstream]), ["/upstream"]);
        assert_eq!((billing.counters.rejected, billing.counters.events), (1, 1));
    }

    #[test]
    fn a_401_is_rejected_before_the_table_has_loaded() {
        let mut billing = meter();
        assert!(metered(&mut billing, vec![keyed("/a", 401)]).is_empty());
        assert_eq!((billing.counters.rejected, billing.counters.held), (1, 0));
    }

    #[test]
    fn unresolved_requests_are_counted_and_dropped() {
        let mut billing = meter();
        billing.set_credentials(Some(table()));
        let exchanges = vec![exchange("/a", &[], 200), exchange("/a", &["apikey: unknown"], 200)];
        assert!(metered(&mut billing, exchanges).is_empty());
        assert_eq!((billing.counters.unresolved, billing.counters.events), (2, 0));
    }

    #[test]
    fn requests_wait_for_the_table_and_go_out_first_when_it_arrives() {
        let mut billing = meter();
        assert!(metered(&mut billing, vec![keyed("/held/0", 200), keyed("/held/1", 200)]).is_empty());
        assert_eq!(billing.counters.held, 2);
        assert!(billing.held_bytes() > 2 * std::mem::size_of::<Exchange>());
        assert!(metered(&mut billing, vec![]).is_empty());
        billing.set_credentials(Some(table()));
        assert_eq!(metered(&mut billing, vec![keyed("/new", 200)]), ["/held/0", "/held/1", "/new"]);
        assert_eq!((billing.counters.held, billing.counters.events, billing.held_bytes()), (0, 3, 0));
    }

    #[test]
    fn too_many_held_requests_drop_the_oldest_and_count_them() {
        let mut billing = Meter::new(MeterConfig { max_held: 2, ..meter_config() });
        metered(&mut billing, (0..3).map(|n| keyed(&format!("/held/{n}"), 200)).collect());
        assert_eq!((billing.counters.held_overflow, billing.counters.unresolved, billing.counters.held), (1, 1, 2));
        billing.set_credentials(Some(table()));
        assert_eq!(metered(&mut billing, vec![]), ["/held/1", "/held/2"]);
    }

    #[test]
    fn with_no_room_to_hold_a_request_is_dropped_and_counted() {
        let mut billing = Meter::new(MeterConfig { max_held: 0, ..meter_config() });
        metered(&mut billing, vec![keyed("/a", 200)]);
        assert_eq!((billing.counters.held_overflow, billing.counters.unresolved, billing.counters.held), (1, 1, 0));
        assert_eq!(billing.held_bytes(), 0);
    }

    #[test]
    fn header_subjects_are_never_held() {
        let mut billing = Meter::new(MeterConfig { rule: SubjectRule::Header("x-tenant".into()), ..meter_config() });
        assert_eq!(metered(&mut billing, vec![exchange("/a", &["X-Tenant: acme"], 200)]), ["/a"]);
        assert_eq!(billing.counters.held, 0);
    }

    #[test]
    fn new_key_auth_settings_are_reported_and_checked_against_the_rule() {
        let mut billing = Meter::new(MeterConfig { rule: SubjectRule::Header("x-api-key".into()), ..meter_config() });
        assert!(!billing.subject_names_a_key());
        let gateways = KeyAuth { key_names: vec!["x-api-key".into()], ..KeyAuth::default() };
        assert!(billing.set_key_auth(gateways.clone()));
        assert!(!billing.set_key_auth(gateways));
        assert!(billing.subject_names_a_key());
        assert!(metered(&mut billing, vec![exchange("/a", &["X-Api-Key: SECRET"], 200)]).is_empty());
        assert_eq!(billing.counters.unresolved, 1);
    }

    #[test]
    fn the_key_used_never_reaches_the_event() {
        let mut billing = meter();
        billing.set_credentials(Some(table()));
        let mut out = Vec::new();
        billing.meter([keyed("/o?APIKEY=alice-key&x=alice-key", 200)], 0.0, &mut out);
        assert!(!out.windows(9).any(|window| window == b"alice-key"));
        assert_eq!(uris(&out), ["/o"]);
    }

    #[test]
    fn an_expired_key_is_unresolved() {
        let mut billing = meter();
        billing.set_credentials(Some(CredentialTable::new([(key_digest(b"alice-key"), Some("alice".into()), "c-alice".into(), Some(5.0))])));
        let mut out = Vec::new();
        billing.meter([keyed("/a", 200)], 4.0, &mut out);
        billing.meter([keyed("/b", 200)], 5.0, &mut out);
        assert_eq!(uris(&out), ["/a"]);
        assert_eq!(billing.counters.unresolved, 1);
    }

    fn service(id: &str) -> crate::metering::routes::ServiceSpec {
        crate::metering::routes::ServiceSpec {
            id: id.to_string(),
            name: Some(format!("{id}-name")),
            port: Some(80),
            protocol: Some("http".to_string()),
        }
    }

    fn gateway_route(id: &str, path: &str, service_id: &str, key_auth: Option<KeyAuth>) -> RouteSpec {
        RouteSpec {
            id: id.to_string(),
            name: Some(id.to_string()),
            service: Some(service(service_id)),
            paths: vec![path.to_string()],
            key_auth,
            ..RouteSpec::default()
        }
    }

    fn lines(meter: &mut Meter, exchanges: Vec<Exchange>) -> Vec<String> {
        let mut out = Vec::new();
        meter.meter(exchanges, 0.0, &mut out);
        String::from_utf8(out).unwrap().lines().map(str::to_string).collect()
    }

    fn seeded() -> Meter {
        let mut billing = meter();
        billing.set_credentials(Some(table()));
        let refused = billing.set_gateway(Some(Gateway {
            routes: vec![
                gateway_route("r-any", "/anything", "s-example", Some(KeyAuth::default())),
                gateway_route("r-open", "/open", "s-other", None),
                gateway_route("r-other", "/other", "s-other", Some(KeyAuth::default())),
            ],
            entries: vec![entry(None, Some("s-example"), None)],
            plugin_configured: true,
        }));
        assert!(refused.is_empty());
        billing
    }

    #[test]
    fn events_name_the_route_and_service_and_unmatched_requests_are_not_billed() {
        let mut billing = seeded();
        let events = lines(&mut billing, vec![keyed("/anything/x", 200), keyed("/nowhere", 404)]);
        assert_eq!(events.len(), 1);
        assert!(events[0].contains(r#""route_id":"r-any","route_name":"r-any","service_id":"s-example","service_name":"s-example-name","service_port":80,"service_protocol":"http""#), "{}", events[0]);
        assert_eq!((billing.counters.events, billing.counters.no_route), (1, 1));
    }

    #[test]
    fn a_service_without_the_plugin_is_out_of_scope() {
        let mut billing = seeded();
        assert!(lines(&mut billing, vec![keyed("/other", 200), keyed("/open", 200)]).is_empty());
        assert_eq!(billing.counters.out_of_scope, 2);
    }

    #[test]
    fn the_routes_key_auth_says_where_the_key_is() {
        let mut billing = meter();
        billing.set_credentials(Some(table()));
        let header_only = KeyAuth { key_names: vec!["x-key".to_string()], key_in_query: false, ..KeyAuth::default() };
        billing.set_gateway(Some(Gateway {
            routes: vec![gateway_route("r", "/", "s", Some(header_only)), gateway_route("bare", "/bare", "s", None)],
            entries: Vec::new(),
            ..Gateway::default()
        }));
        let by_header = exchange("/a", &["x-key: alice-key"], 200);
        let by_query = exchange("/a?x-key=alice-key", &[], 200);
        let default_name = exchange("/a", &["apikey: alice-key"], 200);
        let no_key_auth = keyed("/bare", 200);
        assert_eq!(lines(&mut billing, vec![by_header, by_query, default_name, no_key_auth]).len(), 1);
        assert_eq!(billing.counters.unresolved, 3);
    }

    #[test]
    fn a_consumer_scoped_entry_beats_the_service_one() {
        let mut billing = meter();
        billing.set_credentials(Some(table()));
        let mut by_tenant = entry(None, None, Some("c-alice"));
        by_tenant.rule = SubjectRule::Header("x-tenant".to_string());
        billing.set_gateway(Some(Gateway {
            routes: vec![gateway_route("r", "/", "s", Some(KeyAuth::default()))],
            entries: vec![entry(None, Some("s"), None), by_tenant],
            ..Gateway::default()
        }));
        let events = lines(&mut billing, vec![exchange("/a", &["apikey: alice-key", "X-Tenant: acme"], 200)]);
        assert!(events[0].contains(r#""subject":"acme""#) && events[0].contains(r#""subject_type":"header""#));
    }

    #[test]
    fn an_entry_that_meters_no_api_requests_and_status_filters() {
        let mut billing = meter();
        billing.set_credentials(Some(table()));
        let mut quiet = entry(Some("r-quiet"), None, None);
        quiet.meter_api_requests = false;
        let mut successes = entry(None, None, None);
        successes.allow_status_codes = Some(vec![(200, 299)]);
        billing.set_gateway(Some(Gateway {
            routes: vec![
                gateway_route("r-quiet", "/quiet", "s", Some(KeyAuth::default())),
                gateway_route("r", "/", "s", Some(KeyAuth::default())),
            ],
            entries: vec![quiet, successes],
            ..Gateway::default()
        }));
        let events = lines(&mut billing, vec![keyed("/quiet", 200), keyed("/a", 200), keyed("/a", 500), keyed("/a", 0)]);
        assert_eq!(events.len(), 1);
        assert_eq!((billing.counters.out_of_scope, billing.counters.status_filtered), (1, 2));
    }

    #[test]
    fn attributes_land_in_data_and_keys_stay_out_of_uris_on_every_route() {
        let mut billing = meter();
        billing.set_credentials(Some(table()));
        let mut with_attributes = entry(None, None, None);
        with_attributes.rule = SubjectRule::Header("x-tenant".to_string());
        with_attributes.attributes = vec![crate::metering::plugins::Attribute {
            source: crate::metering::plugins::AttributeSource::Header,
            name: "x-plan".to_string(),
            property: "plan".to_string(),
        }];
        billing.set_gateway(Some(Gateway {
            routes: vec![gateway_route("bare", "/", "s", None)],
            entries: vec![with_attributes],
            ..Gateway::default()
        }));
        let events = lines(&mut billing, vec![exchange("/a?apikey=alice-key", &["X-Tenant: acme", "X-Plan: gold"], 200)]);
        assert!(events[0].contains(r#""subject_type":"header","plan":"gold","latency_ms""#), "{}", events[0]);
        assert!(!events[0].contains("alice-key"));
    }

    #[test]
    fn consumer_scopes_make_requests_wait_for_the_table() {
        let mut billing = meter();
        let mut by_tenant = entry(None, None, Some("c-alice"));
        by_tenant.rule = SubjectRule::Header("x-tenant".to_string());
        billing.set_gateway(Some(Gateway { entries: vec![by_tenant], ..Gateway::default() }));
        assert!(lines(&mut billing, vec![exchange("/a", &["apikey: alice-key", "X-Tenant: acme"], 200)]).is_empty());
        assert_eq!(billing.counters.held, 1);
        billing.set_credentials(Some(table()));
        assert_eq!(lines(&mut billing, vec![]).len(), 1);
    }

    #[test]
    fn a_route_for_https_only_gets_only_global_entries_and_no_consumer() {
        let mut billing = meter();
        billing.set_credentials(Some(table()));
        let secure = RouteSpec { protocols: vec!["https".to_string()], ..gateway_route("secure", "/", "s", Some(KeyAuth::default())) };
        billing.set_gateway(Some(Gateway { routes: vec![secure], entries: vec![entry(None, Some("s"), None)], ..Gateway::default() }));
        assert!(lines(&mut billing, vec![keyed("/a", 426)]).is_empty());
        assert_eq!(billing.counters.out_of_scope, 1);
        let mut global = entry(None, None, None);
        global.rule = SubjectRule::Header("x-tenant".to_string());
        let secure = RouteSpec { protocols: vec!["https".to_string()], ..gateway_route("secure", "/", "s", Some(KeyAuth::default())) };
        billing.set_gateway(Some(Gateway { routes: vec![secure], entries: vec![global], ..Gateway::default() }));
        assert_eq!(lines(&mut billing, vec![exchange("/a", &["X-Tenant: acme"], 426)]).len(), 1);
    }

    #[test]
    fn with_every_entry_disabled_nothing_is_metered() {
        let mut billing = meter();
        billing.set_credentials(Some(table()));
        billing.set_gateway(Some(Gateway { plugin_configured: true, ..Gateway::default() }));
        assert!(lines(&mut billing, vec![keyed("/a", 200)]).is_empty());
        assert_eq!(billing.counters.out_of_scope, 1);
    }

    #[test]
    fn without_gateway_configuration_everything_is_metered_as_before() {
        let mut billing = seeded();
        billing.set_gateway(None);
        let events = lines(&mut billing, vec![keyed("/nowhere", 200)]);
        assert!(events[0].contains(r#""route_id":null"#));
    }

    fn meter_config() -> MeterConfig {
        MeterConfig { source: "gateway-1".into(), rule: SubjectRule::Consumer, max_held: 100_000 }
    }

    /// ns per event for lookup and render, without routes and with 50 (the request hitting the last
    /// prefix tried): `cargo test --release -q metering_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn metering_speed() {
        // (routes, distinct request paths): with 100_000 distinct paths no match is ever remembered
        for (routes, paths) in [(0, 1000), (50, 1000), (50, 100_000)] {
            metering_speed_with(routes, paths);
        }
    }

    fn metering_speed_with(routes: usize, paths: usize) {
        let keys: Vec<String> = (0..10_000).map(|n| format!("key-{n:05}")).collect();
        let entries = keys.iter().map(|key| (key_digest(key.as_bytes()), Some(format!("consumer-{key}")), format!("id-{key}"), None));
        let mut billing = meter();
        billing.set_credentials(Some(CredentialTable::new(entries)));
        if routes > 0 {
            let specs = (0..routes)
                .map(|n| {
                    let path = if n == 0 { "/orders".to_string() } else { format!("/api/v{n}/items") };
                    let mut route = gateway_route(&format!("r-{n}"), &path, &format!("s-{}", n % 10), Some(KeyAuth::default()));
                    if n % 5 == 1 {
                        route.hosts = vec![format!("h{n}.example.com")];
                    }
                    route
                })
                .collect();
            billing.set_gateway(Some(Gateway { routes: specs, entries: vec![entry(None, None, None)], ..Gateway::default() }));
        }
        let exchanges: Vec<Exchange> = (0..100_000)
            .map(|n| {
                let mut exchange = exchange(
                    &format!("/orders/{}?page=2&sort=asc", n % paths),
                    &["User-Agent: curl/8.5.0", "Accept: */*", &format!("apikey: {}", keys[n % keys.len()])],
                    200,
                );
                exchange.connection.client_port = 40000 + (n / 10) as u16; // ten requests per connection
                exchange.request.start_time = START + n as f64 * 1e-5;
                exchange.request.position = (n % 10 * 200) as u64;
                exchange
            })
            .collect();
        let mut out = Vec::with_capacity(exchanges.len() * 700);
        let started = std::time::Instant::now();
        billing.meter(exchanges, 0.0, &mut out);
        let elapsed = started.elapsed();
        assert_eq!(billing.counters.events, 100_000);
        println!(
            "{routes} routes, {paths} paths: {:.0} ns per event ({} bytes per line)",
            elapsed.as_nanos() as f64 / 1e5,
            out.len() / 100_000
        );
    }
}
