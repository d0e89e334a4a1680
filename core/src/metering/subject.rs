//! The event subject, as Kong's plugin chooses it with `subject.look_up_value_in` and `subject.field`.

use std::borrow::Cow;

use crate::http::message::Message;
use crate::metering::credentials::CredentialTable;
use crate::metering::key_lookup::{find_key, raw_query_value, unquote_plus_text, KeyAuth};

/// Where the subject comes from. The consumer's field (username, id, custom_id) was chosen when the
/// control plane built the table's subjects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubjectRule {
    Consumer,
    /// a header's value (name case-insensitive)
    Header(String),
    /// a query parameter's URL-decoded value (name case-sensitive)
    Query(String),
}

impl SubjectRule {
    /// The events' `subject_type`: Kong's `look_up_value_in`.
    pub fn look_up_value_in(&self) -> &'static str {
        match self {
            SubjectRule::Consumer => "consumer",
            SubjectRule::Header(_) => "header",
            SubjectRule::Query(_) => "query",
        }
    }
}

/// Whose key a request carries, as the credential table says (looked up once per request, when a rule
/// or a plugin's scope needs the consumer).
pub struct Caller<'r> {
    pub key: Cow<'r, [u8]>,
    /// the key's consumer: its id, and its subject under `--subject-field` (None: it has none)
    pub owner: Option<(Option<&'r str>, &'r str)>,
}

/// The key a request carries and its owner; None without a key.
pub fn identify<'r>(request: &'r Message, key_auth: &KeyAuth, table: &'r CredentialTable, now: f64) -> Option<Caller<'r>> {
    let key = find_key(request, key_auth)?;
    let owner = table.lookup(&key, now);
    Some(Caller { key, owner })
}

/// What the resolver made of one request.
pub enum Resolution<'r> {
    Unresolved,
    /// the subject, and the key it came from (None for a header or query subject), so that the event
    /// can be kept clear of that key
    Resolved {
        subject: Cow<'r, str>,
        key: Option<&'r [u8]>,
    },
}

pub struct SubjectResolver {
    pub rule: SubjectRule,
    /// the header or query field is one of key-auth's key names: its value is an API key, never a subject
    names_a_key: bool,
}

impl SubjectResolver {
    pub fn new(rule: SubjectRule, key_auth: &KeyAuth) -> SubjectResolver {
        let mut resolver = SubjectResolver { rule, names_a_key: false };
        resolver.check(key_auth);
        resolver
    }

    /// Checks the rule again against new key-auth settings (the gateway's own arrive after the start and
    /// may change): a subject must never be an API key.
    pub fn check(&mut self, key_auth: &KeyAuth) {
        self.names_a_key = match &self.rule {
            SubjectRule::Consumer => false,
            SubjectRule::Header(field) => {
                // key-auth also reads a key named `api_key` from the header `api-key` (as OpenResty does)
                let header = |name: &str| name.to_lowercase().replace('_', "-");
                key_auth.key_names.iter().any(|name| header(name) == header(field))
            }
            SubjectRule::Query(field) => {
                let field = field.to_lowercase();
                key_auth.key_names.iter().any(|name| name.to_lowercase() == field)
            }
        };
    }

    /// Requests are left unresolved because the rule's field names a key (the caller logs it once).
    pub fn names_a_key(&self) -> bool {
        self.names_a_key
    }

    /// The subject of a request whose caller (for a consumer subject) is known as far as it can be; an
    /// empty one is no subject (a CloudEvent's subject is never empty).
    pub fn resolve<'r>(&self, request: &'r Message, caller: Option<&'r Caller<'r>>) -> Resolution<'r> {
        if self.names_a_key {
            return Resolution::Unresolved;
        }
        let (subject, key) = match &self.rule {
            SubjectRule::Header(name) => (
                request.header(name.as_bytes()).map(|value| Cow::Owned(value.iter().map(|&b| char::from(b)).collect())),
                None,
            ),
            SubjectRule::Query(name) => (
                raw_query_value(&request.target, name.as_bytes()).map(|value| Cow::Owned(unquote_plus_text(value))),
                None,
            ),
            SubjectRule::Consumer => {
                let Some(caller) = caller else {
                    return Resolution::Unresolved;
                };
                (caller.owner.and_then(|(subject, _)| subject).map(Cow::Borrowed), Some(&caller.key[..]))
            }
        };
        match subject {
            Some(subject) if !subject.is_empty() => Resolution::Resolved { subject, key },
            _ => Resolution::Unresolved,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metering::credentials::key_digest;

    #[test]
    fn a_header_subject_of_a_key_name_with_underscores_names_a_key() {
        let key_auth = KeyAuth { key_names: vec!["api_key".to_string()], ..KeyAuth::default() };
        assert!(SubjectResolver::new(SubjectRule::Header("api-key".to_string()), &key_auth).names_a_key());
        assert!(SubjectResolver::new(SubjectRule::Header("API_KEY".to_string()), &key_auth).names_a_key());
        assert!(!SubjectResolver::new(SubjectRule::Query("api-key".to_string()), &key_auth).names_a_key());
    }

    fn request(target: &str, headers: &[&str]) -> Message {
        let mut head = format!("GET {target} HTTP/1.1\r\n");
        for header in headers {
            head.push_str(header);
            head.push_str("\r\n");
        }
        Message { head: head.into_bytes(), target: target.as_bytes().to_vec(), ..Message::default() }
    }

    fn table() -> CredentialTable {
        CredentialTable::new([
            (key_digest(b"alice-key"), Some("alice".to_string()), "c-alice".to_string(), None),
            (key_digest(b"empty-subject-key"), Some(String::new()), "c-empty".to_string(), None),
            (key_digest(b"no-subject-key"), None, "c-none".to_string(), None),
        ])
    }

    fn subject(resolver: &SubjectResolver, request: &Message, table: Option<&CredentialTable>) -> Option<String> {
        let caller = table.and_then(|table| identify(request, &KeyAuth::default(), table, 0.0));
        match resolver.resolve(request, caller.as_ref()) {
            Resolution::Resolved { subject, .. } => Some(subject.into_owned()),
            Resolution::Unresolved => None,
        }
    }

    #[test]
    fn consumer_subject_comes_from_the_table_with_its_key() {
        let resolver = SubjectResolver::new(SubjectRule::Consumer, &KeyAuth::default());
        let table = table();
        let request = request("/a", &["apikey: alice-key"]);
        let caller = identify(&request, &KeyAuth::default(), &table, 0.0).unwrap();
        assert_eq!(caller.owner, Some((Some("alice"), "c-alice")));
        match resolver.resolve(&request, Some(&caller)) {
            Resolution::Resolved { subject, key } => assert_eq!((&*subject, key), ("alice", Some(&b"alice-key"[..]))),
            _ => panic!("not resolved"),
        }
    }

    #[test]
    fn a_consumer_without_a_subject_is_unresolved() {
        let resolver = SubjectResolver::new(SubjectRule::Consumer, &KeyAuth::default());
        assert_eq!(subject(&resolver, &request("/a", &["apikey: no-subject-key"]), Some(&table())), None);
    }

    #[test]
    fn unknown_or_missing_keys_are_unresolved() {
        let resolver = SubjectResolver::new(SubjectRule::Consumer, &KeyAuth::default());
        let table = table();
        assert_eq!(subject(&resolver, &request("/a", &["apikey: other"]), Some(&table)), None);
        assert_eq!(subject(&resolver, &request("/a", &[]), Some(&table)), None);
    }

    #[test]
    fn an_empty_subject_is_unresolved() {
        let resolver = SubjectResolver::new(SubjectRule::Consumer, &KeyAuth::default());
        let table = table();
        assert_eq!(subject(&resolver, &request("/a", &["apikey: empty-subject-key"]), Some(&table)), None);
        let by_header = SubjectResolver::new(SubjectRule::Header("x-tenant".into()), &KeyAuth::default());
        assert_eq!(subject(&by_header, &request("/a", &["X-Tenant: "]), None), None);
        let by_query = SubjectResolver::new(SubjectRule::Query("tenant".into()), &KeyAuth::default());
        assert_eq!(subject(&by_query, &request("/a?tenant=", &[]), None), None);
    }

    #[test]
    fn header_and_query_subjects_need_no_table() {
        let request = request("/a?tenant=acme%20corp", &["X-Tenant: globex"]);
        let by_header = SubjectResolver::new(SubjectRule::Header("x-tenant".into()), &KeyAuth::default());
        let by_query = SubjectResolver::new(SubjectRule::Query("tenant".into()), &KeyAuth::default());
        let wrong_case = SubjectResolver::new(SubjectRule::Query("Tenant".into()), &KeyAuth::default());
        assert_eq!(subject(&by_header, &request, None).as_deref(), Some("globex"));
        assert_eq!(subject(&by_query, &request, None).as_deref(), Some("acme corp"));
        assert_eq!(subject(&wrong_case, &request, None), None);
    }

    #[test]
    fn a_header_subject_reads_its_bytes_as_latin1() {
        let by_header = SubjectResolver::new(SubjectRule::Header("x-tenant".into()), &KeyAuth::default());
        let request = Message { head: b"GET / HTTP/1.1\r\nX-Tenant: caf\xe9\r\n".to_vec(), ..Message::default() };
        assert_eq!(subject(&by_header, &request, None).as_deref(), Some("caf\u{e9}"));
    }

    #[test]
    fn a_field_that_names_a_key_is_never_a_subject() {
        let mut by_header = SubjectResolver::new(SubjectRule::Header("x-api-key".into()), &KeyAuth::default());
        let request = request("/a", &["X-Api-Key: SECRET-KEY-1"]);
        assert_eq!(subject(&by_header, &request, None).as_deref(), Some("SECRET-KEY-1"));
        let gateways = KeyAuth { key_names: vec!["X-API-Key".into()], ..KeyAuth::default() };
        by_header.check(&gateways);
        assert!(by_header.names_a_key());
        assert_eq!(subject(&by_header, &request, None), None);
    }

    #[test]
    fn a_consumer_rule_never_names_a_key() {
        let resolver = SubjectResolver::new(SubjectRule::Consumer, &KeyAuth::default());
        assert!(!resolver.names_a_key());
    }
}
