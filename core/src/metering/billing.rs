//! The billing rules: which exchanges become events.
//!
//! One event per request whose subject resolves and whose final status is not 401 (key-auth's rejection,
//! so a key the table still knows but the gateway has revoked is not billed; a 401 that Kong proxied from
//! the upstream service is billed). No subject: dropped and counted, as Kong's plugin drops it. While the
//! credential table has not loaded yet, exchanges are held (up to a bound) rather than dropped.

use std::collections::VecDeque;

use crate::http::message::Exchange;
use crate::metering::credentials::CredentialTable;
use crate::metering::events::{EventContext, EventWriter};
use crate::metering::key_lookup::KeyAuth;
use crate::metering::subject::{Resolution, SubjectResolver, SubjectRule};

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
    /// waiting for the credential table right now
    pub held: u64,
    /// dropped (and counted unresolved) because too many were waiting
    pub held_overflow: u64,
}

pub struct Meter {
    source: String,
    max_held: usize,
    resolver: SubjectResolver,
    key_auth: KeyAuth,
    gateway_key_names: Vec<String>,
    table: Option<CredentialTable>,
    held: VecDeque<Exchange>,
    held_bytes: usize,
    writer: EventWriter,
    pub counters: MeterCounters,
}

impl Meter {
    pub fn new(config: MeterConfig) -> Meter {
        let key_auth = KeyAuth::default();
        Meter {
            source: config.source,
            max_held: config.max_held,
            resolver: SubjectResolver::new(config.rule, &key_auth),
            key_auth,
            gateway_key_names: Vec::new(),
            table: None,
            held: VecDeque::new(),
            held_bytes: 0,
            writer: EventWriter::default(),
            counters: MeterCounters::default(),
        }
    }

    /// The gateway's key-auth settings (as the agent applies them); true if they changed, and then the
    /// subject rule is checked again against the new key names (see `subject_names_a_key`).
    pub fn set_key_auth(&mut self, key_auth: KeyAuth) -> bool {
        if key_auth == self.key_auth {
            return false;
        }
        self.key_auth = key_auth;
        self.check_rule();
        true
    }

    /// The key names the gateway's key-auth itself reads, where flags (`--key-names`) changed where the
    /// agent looks: a subject that is one of them still carries API keys. True if they changed.
    pub fn set_gateway_key_names(&mut self, names: Vec<String>) -> bool {
        if names == self.gateway_key_names {
            return false;
        }
        self.gateway_key_names = names;
        self.check_rule();
        true
    }

    fn check_rule(&mut self) {
        let key_names = self.key_auth.key_names.iter().chain(&self.gateway_key_names).cloned().collect();
        self.resolver.check(&KeyAuth { key_names, ..self.key_auth.clone() });
    }

    /// The header or query subject names one of key-auth's key names, so requests stay unresolved: a
    /// subject is never an API key. The caller says so once per change of the settings.
    pub fn subject_names_a_key(&self) -> bool {
        self.resolver.names_a_key()
    }

    /// Swaps in a new credential table whole (None: not loaded, or lost).
    pub fn set_credentials(&mut self, table: Option<CredentialTable>) {
        self.table = table;
    }

    /// Appends the events of these exchanges to `out`, one JSON line each, after those of any held ones
    /// the credential table now resolves (with no exchanges, it only releases those: live capture calls
    /// it every second even when idle). `now` is on the clock of the table's expiries.
    pub fn meter(&mut self, exchanges: impl IntoIterator<Item = Exchange>, now: f64, out: &mut Vec<u8>) {
        if !self.held.is_empty() && self.resolver.ready(self.table.as_ref()) {
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
        match self.resolver.resolve(&exchange.request, &self.key_auth, self.table.as_ref(), now) {
            Resolution::NotReady => self.hold(exchange),
            Resolution::Unresolved => self.counters.unresolved += 1,
            Resolution::Resolved { subject, key } => {
                let context = EventContext {
                    source: &self.source,
                    subject: &subject,
                    subject_type: self.resolver.rule.look_up_value_in(),
                    key_names: &self.key_auth.key_names,
                    key: key.as_deref(),
                };
                self.writer.write(&exchange, &context, out);
                self.counters.events += 1;
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
    use crate::metering::credentials::key_digest;
    use crate::source::frames::Address;
    use crate::tcp::reassembly::ConnectionInfo;

    const START: f64 = 1714557600.25;

    fn table() -> CredentialTable {
        CredentialTable::new([(key_digest(b"alice-key"), "alice".to_string(), None)])
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
        billing.set_credentials(Some(CredentialTable::new([(key_digest(b"alice-key"), "alice".into(), Some(5.0))])));
        let mut out = Vec::new();
        billing.meter([keyed("/a", 200)], 4.0, &mut out);
        billing.meter([keyed("/b", 200)], 5.0, &mut out);
        assert_eq!(uris(&out), ["/a"]);
        assert_eq!(billing.counters.unresolved, 1);
    }

    fn meter_config() -> MeterConfig {
        MeterConfig { source: "gateway-1".into(), rule: SubjectRule::Consumer, max_held: 100_000 }
    }

    /// ns per event for lookup and render: `cargo test --release -q metering_speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn metering_speed() {
        let keys: Vec<String> = (0..10_000).map(|n| format!("key-{n:05}")).collect();
        let entries = keys.iter().map(|key| (key_digest(key.as_bytes()), format!("consumer-{key}"), None));
        let mut billing = meter();
        billing.set_credentials(Some(CredentialTable::new(entries)));
        let exchanges: Vec<Exchange> = (0..100_000)
            .map(|n| {
                let mut exchange = exchange(
                    "/orders/1234?page=2&sort=asc",
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
        println!("{:.0} ns per event ({} bytes per line)", elapsed.as_nanos() as f64 / 1e5, out.len() / 100_000);
    }
}
