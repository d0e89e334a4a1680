//! The PyO3 boundary: converts between Python objects and the stages' types, and does nothing else.
//! Python crosses into the core once per batch of frames (or ring block), never once per packet.

use pyo3::prelude::*;

// --- source: capture files, frames, the ring ---

use std::path::PathBuf;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::types::{PyBytes, PyDict, PyFrozenSet};

use crate::source::capture_file::{CaptureFile, Frame};
use crate::source::frames::{self, FrameDecoder, Segment};
use crate::source::ring::Ring;

pyo3::create_exception!(
    agent._core,
    CaptureError,
    PyValueError,
    "A capture that cannot be read at all; its message is one line meant for the user."
);

type PyFrame<'py> = (f64, u32, Bound<'py, PyBytes>);

fn py_frame<'py>(py: Python<'py>, frame: &Frame<'_>) -> PyFrame<'py> {
    (frame.time, frame.linktype, PyBytes::new(py, frame.data))
}

/// A capture file; the pipeline takes frames from `file` itself, Python callers iterate it or its batches.
#[pyclass(name = "CaptureFile")]
pub(crate) struct PyCaptureFile {
    pub(crate) file: CaptureFile,
}

#[pymethods]
impl PyCaptureFile {
    #[new]
    fn new(path: PathBuf) -> PyResult<Self> {
        CaptureFile::open(&path).map(|file| PyCaptureFile { file }).map_err(|error| CaptureError::new_err(error.0))
    }

    #[getter]
    fn truncated_records(&self) -> u64 {
        self.file.truncated_records()
    }

    fn losses(&self) -> Vec<(String, u64)> {
        self.file.losses()
    }

    fn close(&mut self) {
        self.file.close();
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&mut self, py: Python<'py>) -> Option<PyFrame<'py>> {
        self.file.next_frame().map(|frame| py_frame(py, &frame))
    }

    /// Lists of up to `size` frames.
    #[pyo3(signature = (size = 8192))]
    fn batches(slf: Py<Self>, size: usize) -> CaptureBatches {
        CaptureBatches { capture: slf, size: size.max(1) }
    }
}

#[pyclass]
struct CaptureBatches {
    capture: Py<PyCaptureFile>,
    size: usize,
}

#[pymethods]
impl CaptureBatches {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Vec<PyFrame<'py>>>> {
        let mut capture = self.capture.bind(py).try_borrow_mut()?;
        let mut batch = Vec::new();
        while batch.len() < self.size {
            match capture.file.next_frame() {
                Some(frame) => batch.push(py_frame(py, &frame)),
                None => break,
            }
        }
        Ok((!batch.is_empty()).then_some(batch))
    }
}

/// The frame decoder's test surface: `decode` gives the Python stage's tuple
/// `(src, sport, dst, dport, seq, ack, flags, payload)` or None.
#[pyclass(name = "FrameDecoder")]
struct PyFrameDecoder {
    decoder: FrameDecoder,
}

type PySegment<'py> = (Bound<'py, PyBytes>, u16, Bound<'py, PyBytes>, u16, u32, u32, u8, Bound<'py, PyBytes>);

#[pymethods]
impl PyFrameDecoder {
    #[new]
    fn new() -> Self {
        PyFrameDecoder { decoder: FrameDecoder::default() }
    }

    fn decode<'py>(&mut self, py: Python<'py>, linktype: u32, frame: &[u8]) -> Option<PySegment<'py>> {
        let Segment { src, sport, dst, dport, seq, ack, flags, payload } = self.decoder.decode(linktype, frame)?;
        let bytes = |data: &[u8]| PyBytes::new(py, data);
        Some((bytes(src.bytes()), sport, bytes(dst.bytes()), dport, seq, ack, flags, bytes(payload)))
    }

    #[getter]
    fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let counters = &self.decoder.counters;
        let dict = PyDict::new(py);
        dict.set_item("corrupt", counters.corrupt)?;
        dict.set_item("fragments", counters.fragments)?;
        dict.set_item("not_tcp", counters.not_tcp)?;
        dict.set_item("unsupported_link", counters.unsupported_link)?;
        Ok(dict)
    }
}

/// The same number for both directions of a connection; -1 for a frame that is not TCP over IP.
#[pyfunction]
fn flow_hash(linktype: u32, frame: &[u8]) -> i64 {
    frames::flow_hash(linktype, frame).map_or(-1, i64::from)
}

/// The kernel's receive ring, mapped from the packet socket `fd` that Python set up.
#[pyclass(name = "Ring")]
pub(crate) struct PyRing {
    pub(crate) ring: Ring,
}

#[pymethods]
impl PyRing {
    #[new]
    fn new(fd: i32, block_bytes: usize, block_count: usize, linktype: u32) -> PyResult<Self> {
        let ring = Ring::map(fd, block_bytes, block_count, linktype).map_err(|error| match error.raw_os_error() {
            Some(code) => PyOSError::new_err((code, crate::source::os_message(&error))),
            None => PyOSError::new_err(error.to_string()),
        })?;
        Ok(PyRing { ring })
    }

    /// The frames of the next ready block as `(time, linktype, frame)`, or None if none is ready.
    fn next_block<'py>(&mut self, py: Python<'py>) -> Option<Vec<PyFrame<'py>>> {
        let mut frames = Vec::new();
        self.ring.next_block(|frame| frames.push(py_frame(py, &frame)))?;
        Some(frames)
    }

    fn ready_fraction(&self) -> f64 {
        self.ring.ready_fraction()
    }

    fn pending_packets(&self) -> u64 {
        self.ring.pending_packets()
    }

    #[getter]
    fn truncated(&self) -> u64 {
        self.ring.truncated
    }

    fn close(&mut self) {
        self.ring.unmap();
    }
}

fn register_source(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("CaptureError", py.get_type::<CaptureError>())?;
    m.add_class::<PyCaptureFile>()?;
    m.add_class::<PyFrameDecoder>()?;
    m.add_class::<PyRing>()?;
    m.add_function(wrap_pyfunction!(flow_hash, m)?)?;
    for (name, linktype) in [("DLT_NULL", frames::DLT_NULL), ("DLT_EN10MB", frames::DLT_EN10MB),
                             ("DLT_LOOP", frames::DLT_LOOP), ("DLT_LINUX_SLL", frames::DLT_LINUX_SLL),
                             ("DLT_IPV4", frames::DLT_IPV4), ("DLT_IPV6", frames::DLT_IPV6),
                             ("DLT_LINUX_SLL2", frames::DLT_LINUX_SLL2)] {
        m.add(name, linktype)?;
    }
    m.add("DLT_RAW_ALIASES", frames::DLT_RAW_ALIASES)?;
    for (name, flag) in [("TCP_FIN", frames::TCP_FIN), ("TCP_SYN", frames::TCP_SYN), ("TCP_RST", frames::TCP_RST),
                         ("TCP_ACK", frames::TCP_ACK)] {
        m.add(name, flag)?;
    }
    m.add("SUPPORTED_LINK_TYPES", PyFrozenSet::new(py, frames::SUPPORTED_LINK_TYPES)?)?;
    m.add("SUPPORTED_LINKS", frames::SUPPORTED_LINKS)?;
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
