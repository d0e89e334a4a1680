//! HTTP/1.x: framing of each direction (`parser`) and in-order request/response pairing (`exchanges`).

pub mod exchanges;
pub mod message;
pub mod parser;
