//! Incremental HTTP/1.x message framing for one direction of a connection.
//! (Ported from the Python `agent/http/parser.py`.)
