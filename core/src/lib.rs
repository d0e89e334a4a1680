//! The agent's data plane: every per-packet and per-request step, as plain state machines fed data and
//! returning results (no I/O but the file and ring readers at the source edge). The stages, in order:
//! `source` (capture files, the live ring, frame decoding) -> `tcp` (reassembly) -> `http` (framing and
//! pairing) -> `metering` (key lookup, subject, billing rules, the event). `pipeline` wires them under one
//! memory budget; `python` is the PyO3 boundary, which converts and does nothing else.

pub mod http;
pub mod metering;
pub mod pipeline;
pub mod source;
pub mod tcp;

#[cfg(feature = "python")]
mod python;
