//! The PyO3 boundary: converts between Python objects and the stages' types, and does nothing else.
//! Python crosses into the core once per batch of frames (or ring block), never once per packet.

use pyo3::prelude::*;

// --- source: capture files, frames, the ring ---

fn register_source(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}

// --- tcp: reassembly (a test surface for the stage's own tests) ---

fn register_tcp(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}

// --- http: framing and pairing (a test surface for the stage's own tests) ---

fn register_http(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}

// --- metering: key lookup, subject, billing, events ---

fn register_metering(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}

// --- pipeline ---

fn register_pipeline(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    register_source(m)?;
    register_tcp(m)?;
    register_http(m)?;
    register_metering(m)?;
    register_pipeline(m)?;
    Ok(())
}
