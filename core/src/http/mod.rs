//! HTTP/1.x: framing of each direction (`parser`) and in-order request/response pairing (`exchanges`);
//! at a stop, which run bills which request (`hand_over`).

pub mod exchanges;
pub mod hand_over;
pub mod message;
pub mod parser;
