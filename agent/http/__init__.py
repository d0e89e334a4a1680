"""HTTP/1.x: byte streams in, request/response exchanges out. No sockets, no bodies kept."""
