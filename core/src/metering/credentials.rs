//! The credential table as the control plane pushes it in: SHA-256 digests of keys, never keys.
//! (The lookup half of the Python `agent/credentials/table.py`; building it stays in Python.)
//!
//! A lookup hashes the key's bytes as sent. The Python table hashed the key's text (the Latin-1 decoded
//! header, or the UTF-8 decoded query value) encoded as UTF-8, so a non-ASCII key in a header never
//! matched the key Kong stores; both agree on every ASCII key.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use sha2::{Digest, Sha256};

pub type KeyDigest = [u8; 32];

/// A key's digest as the table holds it.
pub fn key_digest(key: &[u8]) -> KeyDigest {
    Sha256::digest(key).into()
}

/// Digests are uniform already and the table's contents are the control plane's, not the traffic's:
/// their first eight bytes are the hash.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes.iter().take(8) {
            self.0 = self.0 << 8 | u64::from(byte);
        }
    }

    // the array's length, which `Hash` for `[u8; 32]` does not write, but slices do
    fn write_usize(&mut self, _: usize) {}
}

struct Entry {
    /// None: the consumer has no subject under `--subject-field`, but is known for plugins' scopes
    subject: Option<String>,
    consumer: String,
    /// on the clock the caller's `now` is read from (the Python table's, `time.monotonic` by default)
    expires_at: Option<f64>,
}

/// Immutable once built: a refresh builds a new table and swaps it in whole.
pub struct CredentialTable {
    by_digest: HashMap<KeyDigest, Entry, BuildHasherDefault<DigestHasher>>,
}

impl CredentialTable {
    /// From `(digest of the key, subject, consumer id, expiry)`; a digest given twice keeps the last, as a
    /// dict would.
    pub fn new(entries: impl IntoIterator<Item = (KeyDigest, Option<String>, String, Option<f64>)>) -> CredentialTable {
        let by_digest = entries
            .into_iter()
            .map(|(digest, subject, consumer, expires_at)| (digest, Entry { subject, consumer, expires_at }))
            .collect();
        CredentialTable { by_digest }
    }

    /// The subject (if it has one) and the consumer id of a key, unless unknown or expired
    /// (`now >= expires_at`).
    pub fn lookup(&self, key: &[u8], now: f64) -> Option<(Option<&str>, &str)> {
        let entry = self.by_digest.get(&key_digest(key))?;
        match entry.expires_at {
            Some(expires_at) if now >= expires_at => None,
            _ => Some((entry.subject.as_deref(), &entry.consumer)),
        }
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

/// Only the size: neither digests nor subjects belong in a log line.
impl fmt::Debug for CredentialTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialTable").field("keys", &self.by_digest.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> CredentialTable {
        CredentialTable::new([
            (key_digest(b"alice-key"), Some("alice".to_string()), "c-1".to_string(), None),
            (key_digest(b"short-lived"), Some("bob".to_string()), "c-2".to_string(), Some(100.0)),
        ])
    }

    #[test]
    fn a_known_key_gives_its_subject() {
        assert_eq!(table().lookup(b"alice-key", 0.0), Some((Some("alice"), "c-1")));
    }

    #[test]
    fn an_unknown_key_gives_nothing() {
        assert_eq!(table().lookup(b"alice-kez", 0.0), None);
        assert_eq!(table().lookup(b"", 0.0), None);
    }

    #[test]
    fn a_key_expires_at_its_expiry() {
        let table = table();
        assert_eq!(table.lookup(b"short-lived", 99.9), Some((Some("bob"), "c-2")));
        assert_eq!(table.lookup(b"short-lived", 100.0), None);
        assert!(table.lookup(b"alice-key", f64::INFINITY).is_some());
    }

    #[test]
    fn the_digest_is_sha256_of_the_key_bytes() {
        let digest = key_digest(b"abc");
        assert_eq!(digest[..4], [0xba, 0x78, 0x16, 0xbf]);
        let non_ascii = CredentialTable::new([(key_digest("ключ".as_bytes()), None, "ivan".to_string(), None)]);
        assert_eq!(non_ascii.lookup("ключ".as_bytes(), 0.0), Some((None, "ivan")));
    }

    #[test]
    fn a_digest_given_twice_keeps_the_last() {
        let twice = CredentialTable::new([
            (key_digest(b"k"), None, "first".to_string(), None),
            (key_digest(b"k"), None, "second".to_string(), None),
        ]);
        assert_eq!((twice.len(), twice.lookup(b"k", 0.0)), (1, Some((None, "second"))));
    }

    #[test]
    fn debug_shows_only_the_size() {
        assert_eq!(format!("{:?}", table()), "CredentialTable { keys: 2 }");
    }
}
