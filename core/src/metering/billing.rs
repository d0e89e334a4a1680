//! The billing rules: which exchanges become events. (Ported from the Python `agent/metering/meter.py`.)
