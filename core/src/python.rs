//! The PyO3 boundary: converts between Python objects and the stages' types, and does nothing else.
//! Python crosses into the core once per batch of frames (or ring block), never once per packet.

use pyo3::prelude::*;

// --- source: capture files, frames, the ring ---

fn register_source(_m: &Bound<'_, PyModule>) -> PyResult<()> {
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
            let dict = PyDict::new(py);
            for (name, value) in [
                ("connections", c.connections),
                ("other_ports", c.other_ports),
                ("duplicate_segments", c.duplicate_segments),
                ("gaps", c.gaps),
                ("gap_bytes", c.gap_bytes),
                ("pending_overflows", c.pending_overflows),
                ("expired_connections", c.expired_connections),
                ("evicted_connections", c.evicted_connections),
                ("shed_connections", c.shed_connections),
            ] {
                dict.set_item(name, value)?;
            }
            Ok(dict)
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
