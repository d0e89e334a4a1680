//! The PyO3 boundary: converts between Python objects and the stages' types, and does nothing else.
//! Python crosses into the core once per batch of frames (or ring block), never once per packet.

use pyo3::prelude::*;

// --- source: capture files, frames, the ring ---

use std::path::PathBuf;

use pyo3::exceptions::{PyOSError, PyProcessLookupError, PyValueError};
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

    /// The smallest snap length the file declares (None: it declares none); frames longer were cut.
    #[getter]
    fn snap_length(&self) -> Option<u32> {
        self.file.snap_length()
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
        dict.set_item("cut_short", counters.cut_short)?;
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

    fn current_sequence(&self) -> u64 {
        self.ring.current_sequence()
    }

    fn leave_read_blocks(&mut self) {
        self.ring.leave_read_blocks = true;
    }

    #[getter]
    fn last_sequence(&self) -> u64 {
        self.ring.last_sequence
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

mod tcp {
    use pyo3::prelude::*;
    use pyo3::IntoPyObjectExt;
    use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

    use crate::source::frames::{Address, Segment};
    use crate::tcp::reassembly::{self, ConnectionInfo, ReassemblyLimits, StreamEvent, StreamSink};

    pub const DATA: u8 = 0;
    pub const GAP: u8 = 1;
    pub const END: u8 = 2;
    pub const CLOSED: u8 = 3;

    /// The Python segment tuple: (src, sport, dst, dport, seq, ack, flags, payload).
    type SegmentTuple<'py> = (Bound<'py, PyBytes>, u16, Bound<'py, PyBytes>, u16, u32, u32, u8, Bound<'py, PyBytes>);

    /// The stage fed one segment at a time; events come back as the Python stage's tuples
    /// `(kind, connection_id, to_server, time, payload_or_lost, position, peer_acked)`.
    #[pyclass(name = "TcpReassembler", module = "agent._core")]
    pub struct PyTcpReassembler(reassembly::TcpReassembler);

    /// Collects events as tuples.
    struct Events<'py> {
        py: Python<'py>,
        tuples: Vec<Bound<'py, PyTuple>>,
        error: Option<PyErr>,
    }

    impl StreamSink for Events<'_> {
        fn event(&mut self, connection: &ConnectionInfo, to_server: bool, time: f64, event: StreamEvent<'_>) {
            match event_tuple(self.py, connection, to_server, time, event) {
                Ok(tuple) => self.tuples.push(tuple),
                Err(error) => self.error = Some(error),
            }
        }
    }

    fn event_tuple<'py>(
        py: Python<'py>,
        connection: &ConnectionInfo,
        to_server: bool,
        time: f64,
        event: StreamEvent<'_>,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let (kind, payload, position, peer_acked) = match event {
            StreamEvent::Data { payload, position, peer_acked } => {
                (DATA, PyBytes::new(py, payload).into_any(), position, peer_acked)
            }
            StreamEvent::Gap { lost, position } => (GAP, lost.into_bound_py_any(py)?, position, -1),
            StreamEvent::End { position } => (END, 0.into_bound_py_any(py)?, position, -1),
            StreamEvent::Closed => (CLOSED, 0.into_bound_py_any(py)?, 0, -1),
        };
        (kind, connection.id, to_server, time, payload, position, peer_acked).into_pyobject(py)
    }

    impl<'py> Events<'py> {
        fn new(py: Python<'py>) -> Self {
            Events { py, tuples: Vec::new(), error: None }
        }

        fn into_list(self) -> PyResult<Bound<'py, PyList>> {
            match self.error {
                Some(error) => Err(error),
                None => PyList::new(self.py, self.tuples),
            }
        }
    }

    #[pymethods]
    impl PyTcpReassembler {
        #[new]
        #[pyo3(signature = (server_ports, max_connections=None, max_pending_bytes_per_stream=None, idle_timeout=None))]
        fn new(
            server_ports: &Bound<'_, PyAny>,
            max_connections: Option<usize>,
            max_pending_bytes_per_stream: Option<usize>,
            idle_timeout: Option<f64>,
        ) -> PyResult<Self> {
            let ports: Vec<u16> = server_ports.try_iter()?.map(|port| port?.extract()).collect::<PyResult<_>>()?;
            let defaults = ReassemblyLimits::default();
            let limits = ReassemblyLimits {
                max_connections: max_connections.unwrap_or(defaults.max_connections),
                max_pending_bytes_per_stream: max_pending_bytes_per_stream
                    .unwrap_or(defaults.max_pending_bytes_per_stream),
                idle_timeout: idle_timeout.unwrap_or(defaults.idle_timeout),
            };
            Ok(PyTcpReassembler(reassembly::TcpReassembler::new(&ports, limits)))
        }

        fn feed<'py>(
            &mut self,
            py: Python<'py>,
            time: f64,
            segment: SegmentTuple<'py>,
        ) -> PyResult<Bound<'py, PyList>> {
            let (src, sport, dst, dport, seq, ack, flags, payload) = segment;
            let segment = Segment {
                src: Address::new(src.as_bytes()),
                sport,
                dst: Address::new(dst.as_bytes()),
                dport,
                seq,
                ack,
                flags,
                payload: payload.as_bytes(),
            };
            let mut events = Events::new(py);
            self.0.feed(time, &segment, &mut events);
            events.into_list()
        }

        fn expire<'py>(&mut self, py: Python<'py>, now: f64) -> PyResult<Bound<'py, PyList>> {
            let mut events = Events::new(py);
            self.0.expire(now, &mut events);
            events.into_list()
        }

        fn close_all<'py>(&mut self, py: Python<'py>, now: f64) -> PyResult<Bound<'py, PyList>> {
            let mut events = Events::new(py);
            self.0.close_all(now, &mut events);
            events.into_list()
        }

        /// The events of closing the least recently seen connection (empty when none is open).
        fn shed_oldest<'py>(&mut self, py: Python<'py>, now: f64) -> PyResult<Bound<'py, PyList>> {
            let mut events = Events::new(py);
            self.0.shed_oldest(now, &mut events);
            events.into_list()
        }

        /// The open connections, least recently seen first: `(id, client, client_port, server, server_port,
        /// saw_syn, to_server_base_seq, to_server_pending_bytes, to_client_pending_bytes)`.
        fn connections<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
            let rows = self.0.connections().map(|(info, to_server_pending, to_client_pending)| {
                (
                    info.id,
                    PyBytes::new(py, info.client.bytes()),
                    info.client_port,
                    PyBytes::new(py, info.server.bytes()),
                    info.server_port,
                    info.saw_syn,
                    info.to_server_base_seq,
                    to_server_pending,
                    to_client_pending,
                )
            });
            PyList::new(py, rows)
        }

        fn __len__(&self) -> usize {
            self.0.len()
        }

        fn held_bytes(&self) -> usize {
            self.0.held_bytes()
        }

        #[getter]
        fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
            let c = &self.0.counters;
            super::counters_dict(py, [
                ("connections", c.connections),
                ("other_ports", c.other_ports),
                ("duplicate_segments", c.duplicate_segments),
                ("gaps", c.gaps),
                ("gap_bytes", c.gap_bytes),
                ("pending_overflows", c.pending_overflows),
                ("expired_connections", c.expired_connections),
                ("evicted_connections", c.evicted_connections),
                ("shed_connections", c.shed_connections),
            ])
        }
    }
}

fn register_tcp(m: &Bound<'_, PyModule>) -> PyResult<()> {
    use crate::source::frames::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
    m.add_class::<tcp::PyTcpReassembler>()?;
    for (name, value) in [("DATA", tcp::DATA), ("GAP", tcp::GAP), ("END", tcp::END), ("CLOSED", tcp::CLOSED)] {
        m.add(name, value)?;
    }
    for (name, value) in [("TCP_FIN", TCP_FIN), ("TCP_SYN", TCP_SYN), ("TCP_RST", TCP_RST), ("TCP_ACK", TCP_ACK)] {
        m.add(name, value)?;
    }
    Ok(())
}

// --- http: framing and pairing (a test surface for the stage's own tests) ---

mod http {
    use pyo3::prelude::*;
    use pyo3::types::{PyBytes, PyList, PyTuple};

    use super::tcp::{CLOSED, DATA, END, GAP};
    use crate::http::exchanges::{self, ExchangeCounters};
    use crate::http::message::{self, Exchange, Message};
    use crate::http::parser::{self, MessageSink, ParserCounters, RequestMethod};
    use crate::source::frames::Address;
    use crate::tcp::reassembly::{ConnectionInfo, StreamEvent, StreamSink};

    /// Bytes as the Python stage's strings: Latin-1.
    fn latin1(bytes: &[u8]) -> String {
        bytes.iter().map(|&b| char::from(b)).collect()
    }

    #[pyclass(name = "ParserCounters", module = "agent._core", get_all, set_all)]
    #[derive(Clone, Default)]
    pub struct PyParserCounters {
        parse_errors: u64,
        lost_heads: u64,
        resync_skipped_bytes: u64,
        oversized_heads: u64,
    }

    #[pymethods]
    impl PyParserCounters {
        #[new]
        fn new() -> Self {
            PyParserCounters::default()
        }
    }

    impl PyParserCounters {
        fn of(c: &ParserCounters) -> Self {
            PyParserCounters {
                parse_errors: c.parse_errors,
                lost_heads: c.lost_heads,
                resync_skipped_bytes: c.resync_skipped_bytes,
                oversized_heads: c.oversized_heads,
            }
        }

        fn counters(&self) -> ParserCounters {
            ParserCounters {
                parse_errors: self.parse_errors,
                lost_heads: self.lost_heads,
                resync_skipped_bytes: self.resync_skipped_bytes,
                oversized_heads: self.oversized_heads,
            }
        }
    }

    #[pyclass(name = "ExchangeCounters", module = "agent._core", get_all)]
    pub struct PyExchangeCounters {
        requests: u64,
        lost_exchanges: u64,
        unmatched_responses: u64,
        unanswered: u64,
        client_closed: u64,
        late_responses: u64,
        unpaired_overflows: u64,
    }

    impl PyExchangeCounters {
        fn of(c: &ExchangeCounters) -> Self {
            PyExchangeCounters {
                requests: c.requests,
                lost_exchanges: c.lost_exchanges,
                unmatched_responses: c.unmatched_responses,
                unanswered: c.unanswered,
                client_closed: c.client_closed,
                late_responses: c.late_responses,
                unpaired_overflows: c.unpaired_overflows,
            }
        }
    }

    /// A message as the Python stage showed it: method, target and version as Latin-1 strings.
    #[pyclass(name = "Message", module = "agent._core")]
    pub struct PyMessage(Message);

    #[pymethods]
    impl PyMessage {
        #[getter]
        fn start_time(&self) -> f64 {
            self.0.start_time
        }
        #[getter]
        fn position(&self) -> u64 {
            self.0.position
        }
        #[getter]
        fn peer_acked(&self) -> i64 {
            self.0.peer_acked
        }
        #[getter]
        fn end_time(&self) -> f64 {
            self.0.end_time
        }
        #[getter]
        fn size(&self) -> u64 {
            self.0.size
        }
        #[getter]
        fn head_end(&self) -> u64 {
            self.0.head_end
        }
        #[getter]
        fn head<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
            PyBytes::new(py, &self.0.head)
        }
        #[getter]
        fn method(&self) -> String {
            latin1(&self.0.method)
        }
        #[getter]
        fn target(&self) -> String {
            latin1(&self.0.target)
        }
        #[getter]
        fn version(&self) -> String {
            latin1(&self.0.version)
        }
        #[getter]
        fn status(&self) -> u16 {
            self.0.status
        }
        #[getter]
        fn proxied_by_kong(&self) -> bool {
            self.0.proxied_by_kong
        }
        #[getter]
        fn answered_by_kong(&self) -> bool {
            self.0.answered_by_kong
        }

        fn header(&self, name: &str) -> Option<String> {
            let name: Vec<u8> = name.chars().map(|c| u8::try_from(c).unwrap_or(b'?')).collect();
            self.0.header(&name).map(latin1)
        }
    }

    /// The parser's callbacks, as the Python stage's `on_head`, `on_complete`, `on_lost` and
    /// `method_of_response`; the first error a callback raises is raised once the call returns.
    struct Callbacks<'a, 'py> {
        py: Python<'py>,
        parser: &'a PyMessageParserCallbacks,
        counters: ParserCounters,
        current: Option<Py<PyMessage>>,
        error: Option<PyErr>,
    }

    impl Callbacks<'_, '_> {
        fn keep(&mut self, result: PyResult<Bound<'_, PyAny>>) {
            if let Err(error) = result {
                self.error.get_or_insert(error);
            }
        }
    }

    impl MessageSink for Callbacks<'_, '_> {
        fn counters(&mut self) -> &mut ParserCounters {
            &mut self.counters
        }

        fn answered_method(&mut self, _: u64, _: i64) -> RequestMethod {
            let Some(method_of_response) = &self.parser.method_of_response else { return RequestMethod::Other };
            match method_of_response.call0(self.py).and_then(|method| method.extract::<String>(self.py)) {
                Ok(method) => RequestMethod::of(method.as_bytes()),
                Err(error) => {
                    self.error.get_or_insert(error);
                    RequestMethod::Other
                }
            }
        }

        fn head(&mut self, message: Message) {
            match Py::new(self.py, PyMessage(message)) {
                Ok(message) => {
                    let result = self.parser.on_head.bind(self.py).call1((message.clone_ref(self.py),));
                    self.current = Some(message);
                    self.keep(result);
                }
                Err(error) => self.keep(Err(error)),
            }
        }

        fn complete(&mut self, size: u64, end_time: f64) {
            let Some(message) = self.current.take() else { return };
            if let Ok(mut reported) = message.bind(self.py).try_borrow_mut() {
                reported.0.size = size;
                reported.0.end_time = end_time;
            }
            let result = self.parser.on_complete.bind(self.py).call1((message,));
            self.keep(result);
        }

        fn lost(&mut self) {
            let result = self.parser.on_lost.bind(self.py).call0();
            self.keep(result);
        }
    }

    struct PyMessageParserCallbacks {
        on_head: Py<PyAny>,
        on_complete: Py<PyAny>,
        on_lost: Py<PyAny>,
        method_of_response: Option<Py<PyAny>>,
    }

    /// One direction's parser, reporting to Python callbacks and counting into a `ParserCounters`.
    #[pyclass(name = "MessageParser", module = "agent._core", unsendable)]
    pub struct PyMessageParser {
        parser: parser::MessageParser,
        counters: Py<PyParserCounters>,
        callbacks: PyMessageParserCallbacks,
        /// the message whose head was reported last, until it completes
        current: Option<Py<PyMessage>>,
    }

    impl PyMessageParser {
        fn call(&mut self, py: Python<'_>, work: impl FnOnce(&mut parser::MessageParser, &mut Callbacks<'_, '_>)) -> PyResult<()> {
            let counters = self.counters.bind(py).borrow().counters();
            let mut callbacks =
                Callbacks { py, parser: &self.callbacks, counters, current: self.current.take(), error: None };
            work(&mut self.parser, &mut callbacks);
            let Callbacks { counters, current, error, .. } = callbacks;
            self.current = current;
            *self.counters.bind(py).borrow_mut() = PyParserCounters::of(&counters);
            error.map_or(Ok(()), Err)
        }
    }

    #[pymethods]
    impl PyMessageParser {
        #[new]
        #[pyo3(signature = (is_request, synced, counters, on_head, on_complete, on_lost, max_head_bytes = parser::MAX_HEAD_BYTES, method_of_response = None))]
        #[allow(clippy::too_many_arguments)]
        fn new(
            is_request: bool,
            synced: bool,
            counters: Py<PyParserCounters>,
            on_head: Py<PyAny>,
            on_complete: Py<PyAny>,
            on_lost: Py<PyAny>,
            max_head_bytes: usize,
            method_of_response: Option<Py<PyAny>>,
        ) -> Self {
            PyMessageParser {
                parser: parser::MessageParser::new(is_request, synced, max_head_bytes),
                counters,
                callbacks: PyMessageParserCallbacks { on_head, on_complete, on_lost, method_of_response },
                current: None,
            }
        }

        #[pyo3(signature = (data, time, position, peer_acked = -1))]
        fn feed(&mut self, py: Python<'_>, data: &[u8], time: f64, position: u64, peer_acked: i64) -> PyResult<()> {
            self.call(py, |parser, sink| parser.feed(data, time, position, peer_acked, sink))
        }

        fn gap(&mut self, py: Python<'_>, size: u64, time: f64) -> PyResult<()> {
            self.call(py, |parser, sink| parser.gap(size, time, sink))
        }

        fn end(&mut self, py: Python<'_>, time: f64) -> PyResult<()> {
            self.call(py, |parser, sink| parser.end(time, sink))
        }

        fn resync(&mut self) {
            self.parser.resync();
        }

        fn peer_spoke(&mut self) {
            self.parser.peer_spoke();
        }

        /// The partial head, chunk line or resync window held now.
        #[getter]
        fn buffer<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
            PyBytes::new(py, self.parser.buffered())
        }
    }

    /// What an event told of its connection.
    #[pyclass(name = "ConnectionInfo", module = "agent._core", get_all)]
    pub struct PyConnectionInfo {
        id: u64,
        client: Py<PyBytes>,
        client_port: u16,
        server: Py<PyBytes>,
        server_port: u16,
        saw_syn: bool,
        to_server_base_seq: Option<u32>,
    }

    /// Any object with the attributes of `ConnectionInfo`.
    fn connection_of(connection: &Bound<'_, PyAny>) -> PyResult<ConnectionInfo> {
        let address = |name: &str| -> PyResult<Address> {
            Ok(Address::new(connection.getattr(name)?.cast::<PyBytes>()?.as_bytes()))
        };
        Ok(ConnectionInfo {
            id: connection.getattr("id")?.extract()?,
            client: address("client")?,
            client_port: connection.getattr("client_port")?.extract()?,
            server: address("server")?,
            server_port: connection.getattr("server_port")?.extract()?,
            saw_syn: connection.getattr("saw_syn")?.extract()?,
            to_server_base_seq: connection.getattr("to_server_base_seq")?.extract()?,
        })
    }

    #[pyclass(name = "Exchange", module = "agent._core", get_all)]
    pub struct PyExchange {
        connection: Py<PyConnectionInfo>,
        request: Py<PyMessage>,
        status: u16,
        proxied_by_kong: bool,
        answered_by_kong: bool,
        response_size: u64,
        response_end: f64,
    }

    fn py_exchange(py: Python<'_>, exchange: Exchange) -> PyResult<PyExchange> {
        let c = exchange.connection;
        let connection = PyConnectionInfo {
            id: c.id,
            client: PyBytes::new(py, c.client.bytes()).unbind(),
            client_port: c.client_port,
            server: PyBytes::new(py, c.server.bytes()).unbind(),
            server_port: c.server_port,
            saw_syn: c.saw_syn,
            to_server_base_seq: c.to_server_base_seq,
        };
        Ok(PyExchange {
            connection: Py::new(py, connection)?,
            request: Py::new(py, PyMessage(exchange.request))?,
            status: exchange.status,
            proxied_by_kong: exchange.proxied_by_kong,
            answered_by_kong: exchange.answered_by_kong,
            response_size: exchange.response_size,
            response_end: exchange.response_end,
        })
    }

    /// The stage fed the reassembler's events as the Python stage's tuples
    /// `(kind, connection, to_server, time, payload_or_lost, position, peer_acked)`.
    #[pyclass(name = "HttpExchanges", module = "agent._core")]
    pub struct PyHttpExchanges(exchanges::HttpExchanges);

    #[pymethods]
    impl PyHttpExchanges {
        #[new]
        #[pyo3(signature = (response_timeout = 60.0, max_head_bytes = parser::MAX_HEAD_BYTES))]
        fn new(response_timeout: f64, max_head_bytes: usize) -> Self {
            PyHttpExchanges(exchanges::HttpExchanges::new(response_timeout, max_head_bytes))
        }

        fn feed(&mut self, events: &Bound<'_, PyAny>) -> PyResult<()> {
            for event in events.try_iter()? {
                let event = event?;
                let event = event.cast::<PyTuple>()?;
                let kind: u8 = event.get_item(0)?.extract()?;
                let connection = connection_of(&event.get_item(1)?)?;
                let to_server: bool = event.get_item(2)?.extract()?;
                let time: f64 = event.get_item(3)?.extract()?;
                let payload = event.get_item(4)?;
                let position: u64 = event.get_item(5)?.extract()?;
                let peer_acked: i64 = event.get_item(6)?.extract()?;
                let payload = if kind == DATA { Some(payload.cast::<PyBytes>()?.clone()) } else { None };
                let stream_event = match kind {
                    DATA => StreamEvent::Data {
                        payload: payload.as_ref().map_or(&[][..], |payload| payload.as_bytes()),
                        position,
                        peer_acked,
                    },
                    GAP => StreamEvent::Gap { lost: event.get_item(4)?.extract()?, position },
                    END => StreamEvent::End { position },
                    CLOSED => StreamEvent::Closed,
                    _ => return Err(pyo3::exceptions::PyValueError::new_err(format!("no event kind {kind}"))),
                };
                self.0.event(&connection, to_server, time, stream_event);
            }
            Ok(())
        }

        fn expire(&mut self, now: f64) {
            self.0.expire(now);
        }

        fn take<'py>(&mut self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
            let exchanges: Vec<PyExchange> = self.0.take().map(|exchange| py_exchange(py, exchange)).collect::<PyResult<_>>()?;
            PyList::new(py, exchanges)
        }

        fn held_bytes(&self) -> usize {
            self.0.held_bytes()
        }

        /// `(connection id, requests waiting)` for each connection tracked.
        fn waiting(&self) -> Vec<(u64, usize)> {
            self.0.waiting().collect()
        }

        #[getter]
        fn counters(&self) -> PyExchangeCounters {
            PyExchangeCounters::of(&self.0.counters)
        }

        #[getter]
        fn parser_counters(&self) -> PyParserCounters {
            PyParserCounters::of(&self.0.parser_counters)
        }
    }

    /// The first value of a header in a raw head, as `Message.header` reads it.
    #[pyfunction]
    pub fn header_value<'py>(py: Python<'py>, head: &[u8], name: &[u8]) -> Option<Bound<'py, PyBytes>> {
        message::header_value(head, name).map(|value| PyBytes::new(py, value))
    }
}

fn register_http(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<http::PyParserCounters>()?;
    m.add_class::<http::PyExchangeCounters>()?;
    m.add_class::<http::PyMessage>()?;
    m.add_class::<http::PyMessageParser>()?;
    m.add_class::<http::PyConnectionInfo>()?;
    m.add_class::<http::PyExchange>()?;
    m.add_class::<http::PyHttpExchanges>()?;
    m.add_function(wrap_pyfunction!(http::header_value, m)?)?;
    m.add("MAX_PENDING", crate::http::exchanges::MAX_PENDING)?;
    m.add("MAX_LINE", crate::http::parser::MAX_LINE)?;
    m.add("MAX_HEAD_BYTES", crate::http::parser::MAX_HEAD_BYTES)?;
    Ok(())
}

// --- conversions the sections share ---

/// (SHA-256 digest of a key, the subject or None, the consumer's id, when the key expires on the table's
/// clock), as Python's `CredentialTable.entries` gives them.
type CredentialEntry = (Vec<u8>, Option<String>, String, Option<f64>);

/// The core's credential table from `CredentialTable.entries`; None: no table (yet).
fn credential_table(entries: Option<Vec<CredentialEntry>>) -> PyResult<Option<crate::metering::credentials::CredentialTable>> {
    let Some(entries) = entries else {
        return Ok(None);
    };
    let mut checked = Vec::with_capacity(entries.len());
    for (digest, subject, consumer, expires_at) in entries {
        let digest: [u8; 32] =
            digest.try_into().map_err(|_| PyValueError::new_err("a key digest is 32 bytes (SHA-256)"))?;
        checked.push((digest, subject, consumer, expires_at));
    }
    Ok(Some(crate::metering::credentials::CredentialTable::new(checked)))
}

/// `look_up_value_in` (consumer, header, query) and, for a header or query, its name.
fn subject_rule(kind: &str, field: &str) -> PyResult<crate::metering::subject::SubjectRule> {
    use crate::metering::subject::SubjectRule;
    match kind {
        "consumer" => Ok(SubjectRule::Consumer),
        "header" => Ok(SubjectRule::Header(field.to_ascii_lowercase())),
        "query" => Ok(SubjectRule::Query(field.to_string())),
        _ => Err(PyValueError::new_err(format!("a subject is looked up in consumer, header or query, not {kind:?}"))),
    }
}

/// `dict[name]` converted, or `default` when absent or None.
fn field_or<'py, T: for<'a> pyo3::FromPyObject<'a, 'py>>(dict: &Bound<'py, PyDict>, name: &str, default: T) -> PyResult<T> {
    match dict.get_item(name)? {
        Some(value) if !value.is_none() => value
            .extract::<T>()
            .map_err(|_| PyValueError::new_err(format!("gateway configuration: {name} has the wrong type"))),
        _ => Ok(default),
    }
}

fn key_auth_of(dict: &Bound<'_, PyDict>) -> PyResult<crate::metering::key_lookup::KeyAuth> {
    Ok(crate::metering::key_lookup::KeyAuth {
        key_names: field_or(dict, "key_names", vec!["apikey".to_string()])?,
        key_in_header: field_or(dict, "key_in_header", true)?,
        key_in_query: field_or(dict, "key_in_query", true)?,
    })
}

fn route_spec(route: &Bound<'_, PyDict>) -> PyResult<crate::metering::routes::RouteSpec> {
    use crate::metering::routes::{RouteSpec, ServiceSpec};
    let service = match route.get_item("service")? {
        Some(service) if !service.is_none() => {
            let service = service.cast_into::<PyDict>().map_err(|_| PyValueError::new_err("a route's service is a dict"))?;
            Some(ServiceSpec {
                id: field_or(&service, "id", String::new())?,
                name: field_or(&service, "name", None)?,
                port: field_or(&service, "port", None)?,
                protocol: field_or(&service, "protocol", None)?,
            })
        }
        _ => None,
    };
    let key_auth = match route.get_item("key_auth")? {
        Some(key_auth) if !key_auth.is_none() => Some(key_auth_of(
            &key_auth.cast_into::<PyDict>().map_err(|_| PyValueError::new_err("a route's key_auth is a dict"))?,
        )?),
        _ => None,
    };
    let headers: std::collections::BTreeMap<String, Vec<String>> = field_or(route, "headers", Default::default())?;
    Ok(RouteSpec {
        id: field_or(route, "id", String::new())?,
        name: field_or(route, "name", None)?,
        service,
        expression: field_or(route, "expression", None)?,
        priority: field_or(route, "priority", 0)?,
        methods: field_or(route, "methods", Vec::new())?,
        hosts: field_or(route, "hosts", Vec::new())?,
        paths: field_or(route, "paths", Vec::new())?,
        headers: headers.into_iter().collect(),
        snis: field_or(route, "snis", Vec::new())?,
        regex_priority: field_or(route, "regex_priority", 0)?,
        protocols: field_or(route, "protocols", Vec::new())?,
        key_auth,
    })
}

fn metering_entry(entry: &Bound<'_, PyDict>) -> PyResult<crate::metering::plugins::MeteringEntry> {
    use crate::metering::plugins::{Attribute, AttributeSource, MeteringEntry};
    let subject: std::collections::HashMap<String, Option<String>> = field_or(entry, "subject", Default::default())?;
    let kind = subject.get("look_up_value_in").cloned().flatten().unwrap_or_else(|| "consumer".to_string());
    let field = subject.get("field").cloned().flatten().unwrap_or_default();
    let mut attributes = Vec::new();
    for attribute in field_or::<Vec<std::collections::HashMap<String, String>>>(entry, "attributes", Vec::new())? {
        let get = |name: &str| {
            attribute.get(name).cloned().ok_or_else(|| PyValueError::new_err(format!("an attribute has no {name}")))
        };
        let source = match get("source")?.as_str() {
            "header" => AttributeSource::Header,
            "query" => AttributeSource::Query,
            other => return Err(PyValueError::new_err(format!("an attribute's source is header or query, not {other:?}"))),
        };
        let name = get("name")?;
        let name = if source == AttributeSource::Header { name.to_ascii_lowercase() } else { name };
        attributes.push(Attribute { source, name, property: get("property")? });
    }
    Ok(MeteringEntry {
        route: field_or(entry, "route", None)?,
        service: field_or(entry, "service", None)?,
        consumer: field_or(entry, "consumer", None)?,
        meter_api_requests: field_or(entry, "meter_api_requests", true)?,
        rule: subject_rule(&kind, &field)?,
        attributes,
        allow_status_codes: field_or(entry, "allow_status_codes", None)?,
    })
}

/// The gateway's routes and Metering & Billing entries, from the dict the control plane builds (see
/// `agent.gateway`); None: nothing known, so everything is metered by the command line's rule.
fn gateway(config: Option<Bound<'_, PyDict>>) -> PyResult<Option<crate::metering::billing::Gateway>> {
    let Some(config) = config else {
        return Ok(None);
    };
    let routes: Vec<Bound<'_, PyDict>> = field_or(&config, "routes", Vec::new())?;
    let entries: Vec<Bound<'_, PyDict>> = field_or(&config, "metering", Vec::new())?;
    Ok(Some(crate::metering::billing::Gateway {
        routes: routes.iter().map(route_spec).collect::<PyResult<_>>()?,
        entries: entries.iter().map(metering_entry).collect::<PyResult<_>>()?,
        plugin_configured: field_or(&config, "plugin_configured", false)?,
    }))
}

/// Counters as a dict, in the order given.
fn counters_dict<'py>(py: Python<'py>, counters: impl IntoIterator<Item = (&'static str, u64)>) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (name, value) in counters {
        dict.set_item(name, value)?;
    }
    Ok(dict)
}

// --- metering: key lookup, subject, billing, events ---

mod metering {
    use pyo3::conversion::FromPyObjectOwned;
    use pyo3::exceptions::{PyKeyError, PyValueError};
    use pyo3::prelude::*;
    use pyo3::types::{PyBytes, PyDict};

    use crate::http::message::{Exchange, Message};
    use crate::metering::billing::{Meter, MeterConfig};
    use crate::metering::events::push_ip_text;
    use crate::metering::key_lookup::{self, KeyAuth};
    use crate::source::frames::Address;
    use crate::tcp::reassembly::ConnectionInfo;

    fn key_auth(key_names: Vec<String>, key_in_header: bool, key_in_query: bool) -> KeyAuth {
        KeyAuth { key_names, key_in_header, key_in_query }
    }

    /// Whether a header or query subject would be an API key under these key names (`kind`: consumer,
    /// header or query).
    #[pyfunction]
    pub fn names_a_key(kind: &str, field: &str, key_names: Vec<String>) -> PyResult<bool> {
        let key_auth = KeyAuth { key_names, ..KeyAuth::default() };
        Ok(crate::metering::subject::SubjectResolver::new(super::subject_rule(kind, field)?, &key_auth).names_a_key())
    }

    /// The key key-auth would take from a request (its raw head and target), or None.
    #[pyfunction]
    #[pyo3(signature = (head, target, key_names, key_in_header=true, key_in_query=true))]
    pub fn find_key<'py>(
        py: Python<'py>,
        head: &[u8],
        target: &[u8],
        key_names: Vec<String>,
        key_in_header: bool,
        key_in_query: bool,
    ) -> Option<Bound<'py, PyBytes>> {
        let request = Message { head: head.to_vec(), target: target.to_vec(), ..Message::default() };
        let key_auth = key_auth(key_names, key_in_header, key_in_query);
        key_lookup::find_key(&request, &key_auth).map(|key| PyBytes::new(py, &key))
    }

    #[pyfunction]
    #[pyo3(signature = (target, key_names, key=None))]
    pub fn hide_credentials<'py>(
        py: Python<'py>,
        target: &[u8],
        key_names: Vec<String>,
        key: Option<&[u8]>,
    ) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &key_lookup::hide_credentials(target, &key_names, key))
    }

    /// A query parameter's value as a `query:NAME` subject reads it (text), or None.
    #[pyfunction]
    pub fn query_value(target: &[u8], name: &str) -> Option<String> {
        key_lookup::raw_query_value(target, name.as_bytes()).map(key_lookup::unquote_plus_text)
    }

    /// An address (4 or 16 bytes) as the events write it.
    #[pyfunction]
    pub fn ip_text(address: &[u8]) -> PyResult<String> {
        if address.len() != 4 && address.len() != 16 {
            return Err(PyValueError::new_err("an address is 4 or 16 bytes"));
        }
        let mut text = Vec::new();
        push_ip_text(&mut text, &Address::new(address));
        Ok(String::from_utf8_lossy(&text).into_owned())
    }

    fn item<'py, T: FromPyObjectOwned<'py>>(dict: &Bound<'py, PyDict>, name: &str) -> PyResult<T> {
        match dict.get_item(name)? {
            Some(value) => value.extract::<T>().map_err(Into::into),
            None => Err(PyKeyError::new_err(name.to_string())),
        }
    }

    fn item_or<'py, T: FromPyObjectOwned<'py>>(dict: &Bound<'py, PyDict>, name: &str, default: T) -> PyResult<T> {
        match dict.get_item(name)? {
            Some(value) => value.extract::<T>().map_err(Into::into),
            None => Ok(default),
        }
    }

    /// An exchange from a dict of its fields (the names of `Exchange`, `Message` and `ConnectionInfo`).
    fn exchange(dict: &Bound<'_, PyDict>) -> PyResult<Exchange> {
        let address = |name: &str| -> PyResult<Address> {
            let bytes: Vec<u8> = item(dict, name)?;
            match bytes.len() {
                4 | 16 => Ok(Address::new(&bytes)),
                _ => Err(PyValueError::new_err(format!("{name}: an address is 4 or 16 bytes"))),
            }
        };
        let connection = ConnectionInfo {
            id: item_or(dict, "connection_id", 0)?,
            client: address("client")?,
            client_port: item(dict, "client_port")?,
            server: address("server")?,
            server_port: item(dict, "server_port")?,
            saw_syn: item_or(dict, "saw_syn", true)?,
            to_server_base_seq: item(dict, "base_seq")?,
        };
        let request = Message {
            start_time: item(dict, "start_time")?,
            position: item(dict, "position")?,
            size: item(dict, "size")?,
            head: item(dict, "head")?,
            method: item(dict, "method")?,
            target: item(dict, "target")?,
            version: item(dict, "version")?,
            ..Message::default()
        };
        Ok(Exchange {
            connection,
            request,
            status: item(dict, "status")?,
            proxied_by_kong: item_or(dict, "proxied_by_kong", false)?,
            answered_by_kong: item_or(dict, "answered_by_kong", false)?,
            response_size: item(dict, "response_size")?,
            response_end: item(dict, "response_end")?,
        })
    }

    /// The billing rules and the events: exchanges (dicts) in, JSON lines out.
    #[pyclass(name = "Meter", module = "agent._core")]
    pub struct PyMeter(Meter);

    #[pymethods]
    impl PyMeter {
        /// `rule`: consumer, header or query; `field`: the header's or parameter's name.
        #[new]
        #[pyo3(signature = (source, rule="consumer", field="", max_held=100_000))]
        fn new(source: String, rule: &str, field: &str, max_held: usize) -> PyResult<Self> {
            let rule = super::subject_rule(rule, field)?;
            Ok(PyMeter(Meter::new(MeterConfig { source, rule, max_held })))
        }

        /// True if the settings changed.
        fn set_key_auth(&mut self, key_names: Vec<String>, key_in_header: bool, key_in_query: bool) -> bool {
            self.0.set_key_auth(key_auth(key_names, key_in_header, key_in_query))
        }

        #[getter]
        fn subject_names_a_key(&self) -> bool {
            self.0.subject_names_a_key()
        }

        /// `entries`: `(sha256 digest of the key, subject, expiry or None)`, as `CredentialTable.entries`
        /// gives them; None: no table.
        fn set_credentials(&mut self, entries: Option<Vec<super::CredentialEntry>>) -> PyResult<()> {
            self.0.set_credentials(super::credential_table(entries)?);
            Ok(())
        }

        /// The gateway's routes and plugin entries (see `gateway`); the lines of routes left out.
        fn set_gateway(&mut self, config: Option<Bound<'_, PyDict>>) -> PyResult<Vec<String>> {
            Ok(self.0.set_gateway(super::gateway(config)?))
        }

        /// The JSON lines of these exchanges' events (after any released held ones).
        fn meter<'py>(
            &mut self,
            py: Python<'py>,
            exchanges: Vec<Bound<'py, PyDict>>,
            now: f64,
        ) -> PyResult<Bound<'py, PyBytes>> {
            let exchanges = exchanges.iter().map(exchange).collect::<PyResult<Vec<_>>>()?;
            let mut out = Vec::new();
            self.0.meter(exchanges, now, &mut out);
            Ok(PyBytes::new(py, &out))
        }

        fn held_bytes(&self) -> usize {
            self.0.held_bytes()
        }

        #[getter]
        fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
            let c = &self.0.counters;
            super::counters_dict(py, [
                ("events", c.events),
                ("rejected", c.rejected),
                ("unresolved", c.unresolved),
                ("no_route", c.no_route),
                ("out_of_scope", c.out_of_scope),
                ("status_filtered", c.status_filtered),
                ("held", c.held),
                ("held_overflow", c.held_overflow),
            ])
        }
    }
}

/// The gateway's routes as the core matches them (a test surface for the routing rules).
#[pyclass(name = "Routes", module = "agent._core", unsendable)]
struct PyRoutes {
    routes: crate::metering::routes::Routes,
    #[pyo3(get)]
    refused: Vec<String>,
}

#[pymethods]
impl PyRoutes {
    #[new]
    fn new(routes: Vec<Bound<'_, PyDict>>) -> PyResult<Self> {
        let specs = routes.iter().map(route_spec).collect::<PyResult<Vec<_>>>()?;
        let (routes, refused) = crate::metering::routes::Routes::new(specs);
        Ok(PyRoutes { routes, refused })
    }

    /// The id of the route a request hits (`head`: the request's raw head), or None (Kong's 404).
    fn route_of(&mut self, head: &[u8], server_port: u16) -> Option<String> {
        let request = crate::http::message::Message {
            head: head.to_vec(),
            method: head.split(|&b| b == b' ').next().unwrap_or_default().to_vec(),
            target: head.split(|&b| b == b' ').nth(1).unwrap_or_default().to_vec(),
            ..Default::default()
        };
        let index = self.routes.route_of(&request, server_port)?;
        Some(self.routes.route(index).id.clone())
    }
}

fn register_metering(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<metering::PyMeter>()?;
    m.add_class::<PyRoutes>()?;
    m.add_function(wrap_pyfunction!(metering::find_key, m)?)?;
    m.add_function(wrap_pyfunction!(metering::names_a_key, m)?)?;
    m.add_function(wrap_pyfunction!(metering::hide_credentials, m)?)?;
    m.add_function(wrap_pyfunction!(metering::query_value, m)?)?;
    m.add_function(wrap_pyfunction!(metering::ip_text, m)?)?;
    m.add("EVENT_TYPE", crate::metering::events::EVENT_TYPE)?;
    Ok(())
}

// --- pipeline ---

mod pipeline {
    use pyo3::prelude::*;
    use pyo3::types::{PyBytes, PyDict};

    use super::{PyCaptureFile, PyRing};
    use crate::http::hand_over::ConnectionHandOver;
    use crate::http::parser::{RequestMethod, ResumeIn};
    use crate::metering::billing::MeterConfig;
    use crate::metering::key_lookup::KeyAuth;
    use crate::pipeline::{Pipeline, PipelineConfig};
    use crate::source::frames::Address;
    use crate::tcp::reassembly::ReassemblyLimits;

    /// What a stop leaves the next run about one connection (see `answers_owed`).
    type HandedOver = (Vec<u8>, u16, Vec<u8>, u16, Vec<String>, Option<(u32, String)>, u8);

    /// How a resume's `ResumeIn` is named across the boundary (and in the file a stop leaves).
    const RESUMES: [(ResumeIn, &str); 4] = [
        (ResumeIn::Message, "message"),
        (ResumeIn::ChunkEnd, "chunk-end"),
        (ResumeIn::ChunkSize, "chunk-size"),
        (ResumeIn::Trailers, "trailers"),
    ];

    /// The whole data plane. Each call takes a batch (a capture file's next frames, a ring's ready blocks)
    /// and returns the JSON Lines of the events it completed, as one `bytes`; the GIL is released while
    /// it reads a capture or a ring. `now` is the credential table's clock (key expiry).
    #[pyclass(name = "Pipeline", module = "agent._core")]
    pub struct PyPipeline {
        pipeline: Pipeline,
        out: Vec<u8>,
    }

    impl PyPipeline {
        fn take_lines<'py>(&mut self, py: Python<'py>) -> Bound<'py, PyBytes> {
            let lines = PyBytes::new(py, &self.out);
            self.out.clear();
            lines
        }
    }

    #[pymethods]
    impl PyPipeline {
        #[new]
        #[pyo3(signature = (*, ports, source, subject = "consumer", subject_field = "", max_connections = 1_000_000,
                            idle_timeout = 300.0, response_timeout = 60.0, max_head_bytes = 65536,
                            max_memory = 256 << 20, max_held = 100_000, share = 0, shares = 1))]
        #[allow(clippy::too_many_arguments)]
        fn new(ports: Vec<u16>, source: String, subject: &str, subject_field: &str, max_connections: usize,
               idle_timeout: f64, response_timeout: f64, max_head_bytes: usize, max_memory: usize, max_held: usize,
               share: u32, shares: u32) -> PyResult<Self> {
            let limits = ReassemblyLimits { max_connections, idle_timeout, ..ReassemblyLimits::default() };
            let meter = MeterConfig { source, rule: super::subject_rule(subject, subject_field)?, max_held };
            let config =
                PipelineConfig { ports, limits, response_timeout, max_head_bytes, max_memory, meter, share, shares };
            Ok(PyPipeline { pipeline: Pipeline::new(config), out: Vec::new() })
        }

        /// Up to `max_frames` of the capture's next frames; returns the lines and whether frames remain.
        fn feed_capture<'py>(&mut self, py: Python<'py>, mut capture: PyRefMut<'py, PyCaptureFile>, max_frames: usize,
                             now: f64) -> (Bound<'py, PyBytes>, bool) {
            let (file, pipeline, out) = (&mut capture.file, &mut self.pipeline, &mut self.out);
            let more = py.detach(|| {
                pipeline.begin_batch(now);
                let mut read = 0;
                while read < max_frames {
                    let Some(frame) = file.next_frame() else { break };
                    pipeline.feed_frame(&frame);
                    read += 1;
                }
                pipeline.end_batch(out);
                read == max_frames
            });
            (self.take_lines(py), more)
        }

        /// Up to `max_blocks` of the ring's ready blocks; returns the lines and the blocks read.
        fn feed_ring<'py>(&mut self, py: Python<'py>, mut ring: PyRefMut<'py, PyRing>, max_blocks: usize,
                          now: f64) -> (Bound<'py, PyBytes>, usize) {
            let (ring, pipeline, out) = (&mut ring.ring, &mut self.pipeline, &mut self.out);
            let blocks = py.detach(|| {
                pipeline.begin_batch(now);
                let mut blocks = 0;
                while blocks < max_blocks && ring.next_block(|frame| pipeline.feed_frame(&frame)).is_some() {
                    blocks += 1;
                }
                pipeline.end_batch(out);
                blocks
            });
            (self.take_lines(py), blocks)
        }

        /// Up to `max_records` of the TLS probes' ring; returns the lines, how many records there were, and
        /// the processes the probes saw exit (to forget) since the last call.
        fn feed_tls<'py>(&mut self, py: Python<'py>, mut probes: PyRefMut<'py, super::PyTlsProbes>, max_records: usize,
                         now: f64) -> (Bound<'py, PyBytes>, usize, Vec<u32>) {
            let (probes, pipeline, out) = (&mut probes.probes, &mut self.pipeline, &mut self.out);
            pipeline.begin_batch(now);
            let records = probes.drain(max_records, |record| pipeline.feed_tls(record));
            pipeline.end_batch(out);
            let exited = pipeline.tls_exited();
            (self.take_lines(py), records, exited)
        }

        /// No packets for a while: `capture_time` has passed all the same (timeouts, idle expiry).
        fn tick<'py>(&mut self, py: Python<'py>, capture_time: f64, now: f64) -> Bound<'py, PyBytes> {
            self.pipeline.begin_batch(now);
            self.pipeline.tick(capture_time, &mut self.out);
            self.take_lines(py)
        }

        fn leave_new_requests(&mut self, resume: bool) {
            self.pipeline.leave_new_requests(resume);
        }

        fn requests_in_flight(&self) -> usize {
            self.pipeline.requests_in_flight()
        }

        /// `(client address, client port, server address, server port, [method], client resume, restarts)`
        /// per connection, the methods as "HEAD", "CONNECT" or "OTHER", the resume None or (a sequence number,
        /// what begins there: "message", "chunk-end", "chunk-size" or "trailers").
        fn answers_owed(&self) -> Vec<HandedOver> {
            let name = |method: &RequestMethod| match method {
                RequestMethod::Head => "HEAD",
                RequestMethod::Connect => "CONNECT",
                RequestMethod::Other | RequestMethod::Unknown => "OTHER",
            };
            let owed = self.pipeline.answers_owed().into_iter();
            owed.map(|ConnectionHandOver { key: (client, client_port, server, server_port), answers, client_resume, restarts }| {
                let methods = answers.iter().map(|method| name(method).to_string()).collect();
                let resume = client_resume.and_then(|(seq, into)| {
                    RESUMES.iter().find(|(known, _)| *known == into).map(|(_, named)| (seq, named.to_string()))
                });
                (client.bytes().to_vec(), client_port, server.bytes().to_vec(), server_port, methods, resume, restarts)
            })
            .collect()
        }

        fn expect_answers(&mut self, owed: Vec<HandedOver>) {
            let owed = owed.into_iter().map(|(client, client_port, server, server_port, methods, resume, restarts)| {
                let answers = methods.iter().map(|method| RequestMethod::of(method.as_bytes())).collect();
                let key = (Address::new(&client), client_port, Address::new(&server), server_port);
                // (an unknown name is no resume: the control plane checks them first)
                let client_resume = resume.and_then(|(seq, named)| {
                    RESUMES.iter().find(|(_, known)| *known == named).map(|(into, _)| (seq, *into))
                });
                ConnectionHandOver { key, answers, client_resume, restarts }
            });
            self.pipeline.expect_answers(owed.collect());
        }

        fn finish<'py>(&mut self, py: Python<'py>, now: f64) -> Bound<'py, PyBytes> {
            self.pipeline.begin_batch(now);
            self.pipeline.finish(&mut self.out);
            self.take_lines(py)
        }

        /// key-auth's settings as they apply now; true if they changed.
        fn set_key_auth(&mut self, key_names: Vec<String>, key_in_header: bool, key_in_query: bool) -> bool {
            self.pipeline.meter.set_key_auth(KeyAuth { key_names, key_in_header, key_in_query })
        }

        /// The key names the gateway's key-auth reads (where flags override the agent's); true if changed.
        fn set_gateway_key_names(&mut self, key_names: Vec<String>) -> bool {
            self.pipeline.meter.set_gateway_key_names(key_names)
        }

        /// Whether a header or query subject is one of the key names (its requests stay unresolved).
        #[getter]
        fn subject_names_a_key(&self) -> bool {
            self.pipeline.meter.subject_names_a_key()
        }

        /// The credential table (see `CredentialEntry`), or None while it has not loaded (consumer
        /// subjects are then held).
        fn set_credentials(&mut self, entries: Option<Vec<super::CredentialEntry>>) -> PyResult<()> {
            self.pipeline.meter.set_credentials(super::credential_table(entries)?);
            Ok(())
        }

        /// The gateway's routes and Metering & Billing entries (see `gateway`), or None; returns one line
        /// for each route Kong's router would refuse too (left out).
        fn set_gateway(&mut self, config: Option<Bound<'_, PyDict>>) -> PyResult<Vec<String>> {
            Ok(self.pipeline.meter.set_gateway(super::gateway(config)?))
        }

        /// Requests waiting for the credential table right now.
        #[getter]
        fn held(&self) -> u64 {
            self.pipeline.meter.counters.held
        }

        /// Bytes the pipeline's state holds now (what `max_memory` limits).
        #[getter]
        fn held_bytes(&self) -> usize {
            self.pipeline.held_bytes()
        }

        /// Every counter, in the summary line's order.
        fn counters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
            super::counters_dict(py, self.pipeline.counters())
        }
    }
}

/// Which replay share a frame's connection was dealt to (the pipeline deals by itself; a test surface).
#[pyclass(name = "ConnectionDealer", module = "agent._core")]
struct PyConnectionDealer(crate::pipeline::ConnectionDealer);

#[pymethods]
impl PyConnectionDealer {
    #[new]
    fn new(shares: u32) -> Self {
        PyConnectionDealer(crate::pipeline::ConnectionDealer::new(shares))
    }

    fn __call__(&mut self, linktype: u32, frame: &[u8]) -> u32 {
        self.0.owner(linktype, frame, frame.len())
    }
}

/// The TLS probes (`--tls-port`): loaded once, attached per gateway process, read by `Pipeline.feed_tls`.
#[pyclass(name = "TlsProbes", module = "agent._core", unsendable)]
pub(crate) struct PyTlsProbes {
    probes: crate::source::tls_probes::TlsProbes,
}

#[pymethods]
impl PyTlsProbes {
    /// Raises OSError with one line saying what this host refused.
    #[new]
    fn new(ring_bytes: u32, ports: Vec<u16>) -> PyResult<Self> {
        let probes = crate::source::tls_probes::TlsProbes::load(ring_bytes, &ports).map_err(PyOSError::new_err)?;
        Ok(PyTlsProbes { probes })
    }

    /// Attaches the probes to `pid`'s copy of `library`: (how its reads are probed, whether its executable
    /// is an nginx); OSError with one line when refused, ProcessLookupError when the process exited meanwhile.
    fn attach(&mut self, pid: u32, library: &str) -> PyResult<(&'static str, bool)> {
        use crate::source::tls_probes::AttachError;
        let attached = self.probes.attach(pid, library).map_err(|error| match error {
            AttachError::Exited(line) => PyProcessLookupError::new_err(line),
            AttachError::Refused(line) => PyOSError::new_err(line),
        })?;
        Ok((attached.reads.name(), attached.nginx))
    }

    fn forget(&mut self, pid: u32) {
        self.probes.forget(pid);
    }

    fn is_attached(&self, pid: u32) -> bool {
        self.probes.is_attached(pid)
    }

    /// The children the gateway's processes forked since the last call, and the parents to attach again:
    /// each to pass to `attach` (most children inherited their parent's probes, and are attached already).
    fn forked(&mut self) -> Vec<u32> {
        self.probes.forked()
    }

    /// The processes that exec'd another program since the last call: no longer attached (to look for
    /// again among the listeners).
    fn execed(&mut self) -> Vec<u32> {
        self.probes.execed()
    }

    /// The processes taken as attached that the probes no longer watch (an exit or exec whose record was
    /// lost): forgotten, to forget too.
    fn unwatched(&mut self) -> Vec<u32> {
        self.probes.unwatched()
    }

    /// Whether the agent mounted tracefs (nothing had).
    fn mounted_tracefs(&self) -> bool {
        self.probes.mounted_tracefs()
    }

    /// How full the ring buffer is, 0 to 1 (for the CPU-share watcher).
    fn ready_fraction(&self) -> f64 {
        self.probes.ready_fraction()
    }

    /// The ring buffer's file descriptor (readable when records wait).
    fn fileno(&self) -> i32 {
        self.probes.fd()
    }

    /// (records the ring had no room for, plaintext bytes the probes could not copy, calls they saw but
    /// could not follow)
    fn losses(&self) -> (u64, u64, u64) {
        self.probes.losses()
    }
}

/// (nginx's read site in `executable`, the write worker in `library`): file offsets of the probes a
/// keep-alive request hits, or None each; for the HTTPS benchmark's floor.
#[pyfunction]
fn nginx_request_sites(executable: &[u8], library: &[u8]) -> (Option<u64>, Option<u64>) {
    crate::source::tls_probes::nginx_request_sites(executable, library)
}

fn register_pipeline(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<pipeline::PyPipeline>()?;
    m.add_function(wrap_pyfunction!(nginx_request_sites, m)?)?;
    m.add_class::<PyTlsProbes>()?;
    m.add_class::<PyConnectionDealer>()?;
    Ok(())
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    crate::pipeline::quiet_panics();
    register_source(m)?;
    register_tcp(m)?;
    register_http(m)?;
    register_metering(m)?;
    register_pipeline(m)?;
    Ok(())
}
