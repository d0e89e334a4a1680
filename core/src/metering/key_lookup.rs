//! Where key-auth looks for the key, and how `hide_credentials` strips it from the URI.
//! (Ported from the Python `agent/metering/key_lookup.py`.)

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
