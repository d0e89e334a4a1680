"""`--metrics-listen ADDR:PORT`: `/metrics`, `/healthz` and `/readyz` over HTTP, from threads of the parent process.

A small standard-library server rather than `prometheus_client.start_http_server`, because that one
answers every path with the metrics and has no place for the health endpoints; the exposition itself is
`prometheus_client`'s (text, or OpenMetrics when the scraper asks for it). The server's threads only
run when asked: the data plane never waits on them, and a scrape costs one report's worth of work.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from agent.observe.exposition import AgentCollector
from agent.observe.health import Health, Verdict
from agent.observe.status import LiveStatus
from agent.sink import Sink

log = logging.getLogger("agent.observe")


class ListenError(OSError):
    """The address cannot be listened on; the message is one line for the user."""


def listen_address(text: str) -> tuple[str, int]:
    """`127.0.0.1:9464`, `0.0.0.0:9464`, `[::1]:9464` (port 0: any free one, logged)."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not ADDR:PORT (e.g. 127.0.0.1:9464, [::1]:9464)")
    return host, int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("monitoring (live capture)")
    group.add_argument("--metrics-listen", metavar="ADDR:PORT", type=listen_address,
                       help="serve Prometheus metrics at /metrics and health at /healthz, /readyz on this address,"
                            " e.g. 127.0.0.1:9464 (default: off)")


class Monitor:
    """The status the capture loops report to, and the server that shows it, until `close()`."""

    def __init__(self, address: tuple[str, int], workers: int, sink: Sink, stopping) -> None:
        self.status = LiveStatus(workers)
        self.health = Health(self.status, sink, stopping)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(AgentCollector(self.status, sink))
        self._server = _server(address, self)
        # a forked worker must not keep the port open (it would outlive a killed parent for a few seconds)
        os.register_at_fork(after_in_child=self._server.socket.close)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="metrics-server", daemon=True)
        self._thread.start()
        host, port = self._server.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        log.info("metrics on http://%s:%d/metrics, health on /healthz and /readyz", shown, port)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _server(address: tuple[str, int], monitor: Monitor) -> ThreadingHTTPServer:
    host, port = address

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def handle_error(self, request: object, client_address: object) -> None:
            """A scraper that hangs up mid-answer (a scrape timeout) is routine; anything else is one line
            in the agent's own log, never a traceback on stderr."""
            error = sys.exc_info()[1]
            if not isinstance(error, (ConnectionError, TimeoutError)):
                log.warning("metrics: a request failed (%s: %s)", type(error).__name__, error)

    try:
        return Server((host, port), _handler(monitor))
    except OSError as error:
        raise ListenError(f"--metrics-listen {host}:{port}: cannot listen there"
                          f" ({error.strerror or error})") from None


def _handler(monitor: Monitor) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "kong-metering-agent"
        timeout = 5  # a client that sends half a request does not hold its thread for ever

        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._answer(200, content_type, encoder(monitor.registry))
            elif path == "/healthz":
                self._verdict(monitor.health.liveness())
            elif path == "/readyz":
                self._verdict(monitor.health.readiness())
            else:
                self._answer(404, "text/plain; charset=utf-8", b"not found: /metrics, /healthz, /readyz\n")

        def _verdict(self, verdict: Verdict) -> None:
            self._answer(200 if verdict.ok else 503, "application/json", orjson.dumps(verdict.body()) + b"\n")

        def _answer(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
            pass  # a scrape a second would drown the agent's own log

    return Handler
