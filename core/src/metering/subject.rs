//! The event subject, as Kong's plugin chooses it with `subject.look_up_value_in` and `subject.field`.
//! (Ported from the Python `agent/metering/subject.py`.)
