"""The live source's set-up: the packet socket, its kernel filter and its ring. Capture files, frame
decoding and reading the ring run in the core (`core/src/source/`)."""
