"""Live mode: `run.py` starts it, `capture.py` reads one ring, `fanout.py` runs several workers."""
