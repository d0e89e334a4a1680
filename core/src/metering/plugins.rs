//! The Metering & Billing plugin's entries: which one applies to a request, and what it asks for.
//!
//! An entry is scoped to a route, a service, a consumer, a combination, or nothing (global). As Kong
//! picks among instances of one plugin, the most specific entry wins: consumer+route+service, then
//! consumer+route, consumer+service, route+service, consumer, route, service, and global last. An entry
//! says whether API requests are metered, where the subject comes from, which request values become
//! attributes of the event, and which statuses are billed.

use crate::http::message::Message;
use crate::metering::events::push_string;
use crate::metering::key_lookup::{raw_query_value, unquote_plus};
use crate::metering::subject::SubjectRule;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttributeSource {
    Header,
    Query,
}

/// A request value put into the event's `data` under `property`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attribute {
    pub source: AttributeSource,
    pub name: String,
    pub property: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeteringEntry {
    pub route: Option<String>,
    pub service: Option<String>,
    pub consumer: Option<String>,
    pub meter_api_requests: bool,
    pub rule: SubjectRule,
    pub attributes: Vec<Attribute>,
    /// inclusive status ranges that are billed; None: every status
    pub allow_status_codes: Option<Vec<(u16, u16)>>,
}

impl MeteringEntry {
    /// How specific the entry is for this request (1 the most), or None when it does not apply.
    fn rank(&self, route: Option<&str>, service: Option<&str>, consumer: Option<&str>) -> Option<u8> {
        let applies = |scope: &Option<String>, of: Option<&str>| scope.as_deref().is_none_or(|scope| Some(scope) == of);
        if !(applies(&self.route, route) && applies(&self.service, service) && applies(&self.consumer, consumer)) {
            return None;
        }
        Some(match (self.consumer.is_some(), self.route.is_some(), self.service.is_some()) {
            (true, true, true) => 1,
            (true, true, false) => 2,
            (true, false, true) => 3,
            (false, true, true) => 4,
            (true, false, false) => 5,
            (false, true, false) => 6,
            (false, false, true) => 7,
            (false, false, false) => 8,
        })
    }

    /// Whether a final status is billed under `allow_status_codes`.
    pub fn bills_status(&self, status: u16) -> bool {
        match &self.allow_status_codes {
            None => true,
            Some(ranges) => ranges.iter().any(|&(low, high)| (low..=high).contains(&status)),
        }
    }

    /// Appends `,"property":"value"` for each attribute the request carries; a value that is the key the
    /// subject came from is left out, so a key never becomes an attribute.
    pub fn push_attributes(&self, request: &Message, key: Option<&[u8]>, out: &mut Vec<u8>) {
        for attribute in &self.attributes {
            let value = match attribute.source {
                AttributeSource::Header => request.header(attribute.name.as_bytes()).map(std::borrow::Cow::Borrowed),
                AttributeSource::Query => raw_query_value(&request.target, attribute.name.as_bytes()).map(unquote_plus),
            };
            let Some(value) = value else { continue };
            if key.is_some_and(|key| key == &value[..]) {
                continue;
            }
            out.push(b',');
            push_string(out, attribute.property.as_bytes(), false);
            out.push(b':');
            push_string(out, &value, true);
        }
    }
}

/// The index of the entry that applies to a request on `route` of `service` by `consumer`: the most
/// specific one, the first listed among equals; None when no entry's scope takes the request in.
pub fn applicable(entries: &[MeteringEntry], route: Option<&str>, service: Option<&str>, consumer: Option<&str>) -> Option<usize> {
    let mut best: Option<(u8, usize)> = None;
    for (index, entry) in entries.iter().enumerate() {
        if let Some(rank) = entry.rank(route, service, consumer) {
            if best.is_none_or(|(best_rank, _)| rank < best_rank) {
                best = Some((rank, index));
            }
        }
    }
    best.map(|(_, index)| index)
}

/// An entry with the plugin's defaults (consumer subject, every status), scoped as given: for tests.
#[cfg(test)]
pub fn entry(route: Option<&str>, service: Option<&str>, consumer: Option<&str>) -> MeteringEntry {
    MeteringEntry {
        route: route.map(str::to_string),
        service: service.map(str::to_string),
        consumer: consumer.map(str::to_string),
        meter_api_requests: true,
        rule: SubjectRule::Consumer,
        attributes: Vec::new(),
        allow_status_codes: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_specific_entry_wins_in_kongs_order() {
        let entries = [
            entry(None, None, None),
            entry(None, Some("s"), None),
            entry(Some("r"), None, None),
            entry(None, None, Some("c")),
            entry(Some("r"), Some("s"), None),
            entry(None, Some("s"), Some("c")),
            entry(Some("r"), None, Some("c")),
            entry(Some("r"), Some("s"), Some("c")),
        ];
        // each entry in turn is the most specific left once those after it are gone
        for kept in (1..=entries.len()).rev() {
            assert_eq!(applicable(&entries[..kept], Some("r"), Some("s"), Some("c")), Some(kept - 1));
        }
    }

    #[test]
    fn an_entry_scoped_elsewhere_does_not_apply() {
        let entries = [entry(None, Some("other"), None), entry(Some("r2"), None, None), entry(None, None, Some("bob"))];
        assert_eq!(applicable(&entries, Some("r"), Some("s"), Some("alice")), None);
        assert_eq!(applicable(&entries, Some("r"), Some("s"), None), None);
        assert_eq!(applicable(&entries, Some("r2"), None, None), Some(1));
    }

    #[test]
    fn status_ranges() {
        let mut filtered = entry(None, None, None);
        filtered.allow_status_codes = Some(vec![(200, 299), (404, 404)]);
        assert!(filtered.bills_status(200) && filtered.bills_status(299) && filtered.bills_status(404));
        assert!(!filtered.bills_status(300) && !filtered.bills_status(500) && !filtered.bills_status(0));
        assert!(entry(None, None, None).bills_status(503));
    }

    #[test]
    fn attributes_from_headers_and_queries_but_never_the_key() {
        let mut e = entry(None, None, None);
        e.attributes = vec![
            Attribute { source: AttributeSource::Header, name: "x-team".into(), property: "team".into() },
            Attribute { source: AttributeSource::Query, name: "plan".into(), property: "plan".into() },
            Attribute { source: AttributeSource::Header, name: "x-missing".into(), property: "missing".into() },
            Attribute { source: AttributeSource::Header, name: "x-echo".into(), property: "echo".into() },
        ];
        let head = b"GET /a?plan=gold+plus HTTP/1.1\r\nX-Team: \"blue\"\r\nX-Echo: k-1\r\n\r\n".to_vec();
        let request = Message { head, target: b"/a?plan=gold+plus".to_vec(), ..Message::default() };
        let mut out = Vec::new();
        e.push_attributes(&request, Some(b"k-1"), &mut out);
        assert_eq!(String::from_utf8(out).unwrap(), r#","team":"\"blue\"","plan":"gold plus""#);
    }
}
