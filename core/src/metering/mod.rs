//! From a finished exchange to an event: where the key is (`key_lookup`), whose it is (`credentials`,
//! `subject`), whether it is billed (`billing`) and the CloudEvent's JSON (`events`).

pub mod billing;
pub mod credentials;
pub mod events;
pub mod key_lookup;
pub mod plugins;
pub mod routes;
pub mod subject;
