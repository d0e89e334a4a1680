//! The CloudEvent of one billed exchange, rendered as one JSON line, with the fields and names of Kong's
//! Metering & Billing plugin. (Ported from the Python `agent/metering/events.py`.)
