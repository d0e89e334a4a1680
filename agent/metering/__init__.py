"""Metering's control-plane half: the subject rule as the flags state it. Key lookup, the billing rules
and the event itself run in the core (`core/src/metering/`)."""
