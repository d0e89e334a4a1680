"""A stand-in for Kong's Admin API, read side: a real HTTP server on loopback.

It answers what `kong-admin-read.openapi.yaml` describes: `GET /consumers`, `/consumers/{id or username}`,
`/consumers/{id or username}/key-auth`, `/key-auths`, `/key-auths/{id}`, `/plugins`, `/services`, `/routes`
(traditional and expression routes, each with the fields Kong returns), each also under a
`/{workspace}/` prefix; Kong's pages (`data`, `offset`, `next` null on the last page, `size` 100 by
default and at most 1000, keyset offsets so a change between pages does not shift them); an optional
RBAC token in `Kong-Admin-Token` (401 with Kong's error body without it). Tests change its state while it
runs (add, rotate and delete keys and consumers) and make it fail: stop listening, answer 503, serve a
malformed page, or stall.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

DEFAULT_SIZE = 100
MAX_SIZE = 1000
MISSING_TOKEN = "Invalid credentials. Token or User credentials required"
WRONG_TOKEN = "Invalid RBAC credentials"


class FakeClock:
    """A clock tests move by hand, shared by the double and the agent, so `ttl` needs no waiting."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased


@dataclass
class _Workspace:
    consumers: dict[str, dict] = field(default_factory=dict)
    key_auths: dict[str, dict] = field(default_factory=dict)
    key_expiry: dict[str, float] = field(default_factory=dict)  # key-auth id -> time on the double's clock
    plugins: dict[str, dict] = field(default_factory=dict)
    services: dict[str, dict] = field(default_factory=dict)
    routes: dict[str, dict] = field(default_factory=dict)


class KongAdminDouble:
    def __init__(self, token: str | None = None, workspaces: tuple[str, ...] = ("team-a",),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.token = token
        self.clock = clock
        self.requests: list[RecordedRequest] = []
        self._workspaces = {"default": _Workspace(), **{name: _Workspace() for name in workspaces}}
        self._lock = threading.Lock()
        self._fail_next: list[int] = []
        self._malformed_next = 0
        self._stall_next = 0
        self._stall_seconds = 0.0
        self._release = threading.Event()
        # Called with each request before it is answered: lets a test change state or arm a failure at an
        # exact point, e.g. between the pages of one read.
        self.before_answer: Callable[[RecordedRequest], None] | None = None
        self._server: ThreadingHTTPServer | None = None
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "KongAdminDouble":
        """Listen (again, on the same port after `stop()`)."""
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler_for(self))
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._release.clear()
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening: connections are refused until `start()`."""
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "KongAdminDouble":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state -------------------------------------------------------------------------------------
    def add_consumer(self, username: str | None = None, custom_id: str | None = None,
                     id: str | None = None, workspace: str = "default") -> dict:
        now = int(time.time())
        consumer = {"id": id or str(uuid.uuid4()), "username": username, "custom_id": custom_id,
                    "created_at": now, "updated_at": now, "tags": None}
        with self._lock:
            self._workspaces[workspace].consumers[consumer["id"]] = consumer
        return consumer

    def add_key(self, consumer: str, key: str, ttl: int | None = None, workspace: str = "default") -> dict:
        """A key-auth credential for the consumer with this id or username."""
        with self._lock:
            ws = self._workspaces[workspace]
            owner = _find_consumer(ws, consumer)
            if owner is None:
                raise KeyError(f"no consumer {consumer}")
            credential = {"id": str(uuid.uuid4()), "key": key, "consumer": {"id": owner["id"]},
                          "created_at": int(time.time()), "ttl": None, "tags": None}
            ws.key_auths[credential["id"]] = credential
            if ttl is not None:
                ws.key_expiry[credential["id"]] = self.clock() + ttl
        return credential

    def delete_key(self, key: str, workspace: str = "default") -> None:
        with self._lock:
            ws = self._workspaces[workspace]
            for credential_id in [i for i, c in ws.key_auths.items() if c["key"] == key]:
                del ws.key_auths[credential_id]
                ws.key_expiry.pop(credential_id, None)

    def rotate_key(self, consumer: str, old_key: str, new_key: str, workspace: str = "default") -> None:
        self.add_key(consumer, new_key, workspace=workspace)
        self.delete_key(old_key, workspace=workspace)

    def delete_consumer(self, consumer: str, workspace: str = "default") -> None:
        """Deletes the consumer and, as Kong does, its credentials."""
        with self._lock:
            ws = self._workspaces[workspace]
            owner = _find_consumer(ws, consumer)
            if owner is None:
                raise KeyError(f"no consumer {consumer}")
            del ws.consumers[owner["id"]]
            for credential_id in [i for i, c in ws.key_auths.items() if c["consumer"]["id"] == owner["id"]]:
                del ws.key_auths[credential_id]
                ws.key_expiry.pop(credential_id, None)

    def add_plugin(self, name: str, config: dict, enabled: bool = True, workspace: str = "default",
                   route: str | None = None, service: str | None = None, consumer: str | None = None) -> dict:
        """A plugin, scoped as Kong stores it (`{"id": ...}` references) to the route, service and consumer
        with these ids or names."""
        now = int(time.time())
        with self._lock:
            ws = self._workspaces[workspace]
            refs = {"route": _ref(ws.routes, route), "service": _ref(ws.services, service),
                    "consumer": None if consumer is None else {"id": _find_consumer(ws, consumer)["id"]}}
            plugin = {"id": str(uuid.uuid4()), "name": name, "instance_name": None, "config": config,
                      "enabled": enabled, "protocols": ["grpc", "grpcs", "http", "https"], **refs,
                      "consumer_group": None, "ordering": None, "partials": None, "condition": None,
                      "created_at": now, "updated_at": now, "tags": None}
            ws.plugins[plugin["id"]] = plugin
        return plugin

    def add_service(self, name: str | None, host: str = "example.internal", port: int = 80, protocol: str = "http",
                    enabled: bool = True, id: str | None = None, workspace: str = "default") -> dict:
        """A service as Kong returns it (`url` is write-only: Kong answers with protocol, host, port, path)."""
        now = int(time.time())
        service = {"id": id or str(uuid.uuid4()), "name": name, "protocol": protocol, "host": host, "port": port,
                   "path": None, "retries": 5, "connect_timeout": 60000, "write_timeout": 60000,
                   "read_timeout": 60000, "tags": None, "client_certificate": None, "tls_verify": None,
                   "tls_verify_depth": None, "ca_certificates": None, "enabled": enabled, "created_at": now,
                   "updated_at": now}
        with self._lock:
            self._workspaces[workspace].services[service["id"]] = service
        return service

    def add_route(self, service: str | None, name: str | None = None, created_at: int | None = None,
                  id: str | None = None, workspace: str = "default", expression: str | None = None,
                  priority: int = 0, **fields: object) -> dict:
        """A route of the service with this id or name; `fields` are the traditional ones (paths, hosts,
        methods, headers, snis, protocols, regex_priority). With `expression`, an expression route."""
        now = created_at if created_at is not None else int(time.time())
        with self._lock:
            ws = self._workspaces[workspace]
            common = {"id": id or str(uuid.uuid4()), "name": name, "service": _ref(ws.services, service),
                      "protocols": fields.pop("protocols", ["http", "https"]), "https_redirect_status_code": 426,
                      "strip_path": True, "path_handling": "v0", "preserve_host": False, "request_buffering": True,
                      "response_buffering": True, "tags": None, "created_at": now, "updated_at": now}
            if expression is not None:
                route = {**common, "expression": expression, "priority": priority}
            else:
                traditional = {field: None for field in ("methods", "hosts", "paths", "headers", "snis", "sources",
                                                         "destinations")}
                route = {**common, **traditional, "regex_priority": 0, **fields}
            ws.routes[route["id"]] = route
        return route

    # -- failures ----------------------------------------------------------------------------------
    def fail_next(self, count: int, status: int = 503) -> None:
        """Answer the next requests with this status (403: RBAC denies reading the resource)."""
        with self._lock:
            self._fail_next.extend([status] * count)

    def malform_next(self, count: int) -> None:
        with self._lock:
            self._malformed_next += count

    def stall_next(self, count: int, seconds: float) -> None:
        """Hold the next requests this long before answering (released at once by `stop()`)."""
        with self._lock:
            self._stall_next += count
            self._stall_seconds = seconds

    # -- serving -----------------------------------------------------------------------------------
    def answer(self, method: str, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
        parts = urlsplit(target)
        query = {name: values[-1] for name, values in parse_qs(parts.query, keep_blank_values=True).items()}
        request = RecordedRequest(method, parts.path, query, headers)
        with self._lock:
            self.requests.append(request)
        if self.before_answer is not None:
            self.before_answer(request)
        with self._lock:
            failure = self._fail_next.pop(0) if self._fail_next else None
            malformed = failure is None and self._malformed_next > 0  # one armed failure per request
            self._malformed_next -= malformed
            stall = self._stall_seconds if self._stall_next > 0 else 0.0
            self._stall_next -= bool(stall)
        if stall:
            self._release.wait(stall)
        if self.token is not None:
            given = headers.get("kong-admin-token")
            if given != self.token:
                return _json(401, {"message": WRONG_TOKEN if given else MISSING_TOKEN, "status": 401})
        if failure == 403:
            return _json(403, {"message": "You cannot read this resource", "status": 403})
        if failure is not None:
            return _json(failure, {"message": "An unexpected error occurred", "status": failure})
        if method != "GET":
            return _json(405, {"message": "Method not allowed", "status": 405})
        if malformed:
            return 200, b'{"data": [{"id": "'
        with self._lock:
            return self._route(parts.path, query)

    def _route(self, path: str, query: dict[str, str]) -> tuple[int, bytes]:
        segments = [unquote(s) for s in path.strip("/").split("/") if s]
        prefix = ""
        if len(segments) > 1 and segments[0] in self._workspaces:
            prefix = "/" + segments[0]
            ws = self._workspaces[segments.pop(0)]
        else:
            ws = self._workspaces["default"]
        self._expire(ws)
        match segments:
            case ["consumers"]:
                items = [c for c in ws.consumers.values()
                         if "custom_id" not in query or c["custom_id"] == query["custom_id"]]
                return self._page(items, query, f"{prefix}/consumers")
            case ["consumers", ref]:
                owner = _find_consumer(ws, ref)
                return _json(200, owner) if owner else _not_found()
            case ["consumers", ref, "key-auth"]:
                owner = _find_consumer(ws, ref)
                if owner is None:
                    return _not_found()
                items = [self._key_view(ws, c) for c in ws.key_auths.values() if c["consumer"]["id"] == owner["id"]]
                return self._page(items, query, f"{prefix}/consumers/{quote(ref)}/key-auth")
            case ["key-auths"]:
                items = [self._key_view(ws, c) for c in ws.key_auths.values()]
                return self._page(items, query, f"{prefix}/key-auths")
            case ["key-auths", credential_id]:
                credential = ws.key_auths.get(credential_id)
                return _json(200, self._key_view(ws, credential)) if credential else _not_found()
            case ["plugins"]:
                return self._page(list(ws.plugins.values()), query, f"{prefix}/plugins")
            case ["services"]:
                return self._page(list(ws.services.values()), query, f"{prefix}/services")
            case ["routes"]:
                return self._page(list(ws.routes.values()), query, f"{prefix}/routes")
        return _not_found()

    def _expire(self, ws: _Workspace) -> None:
        now = self.clock()
        for credential_id in [i for i, at in ws.key_expiry.items() if at <= now]:
            del ws.key_expiry[credential_id]
            del ws.key_auths[credential_id]

    def _key_view(self, ws: _Workspace, credential: dict) -> dict:
        """As Kong shows it: `ttl` is what is left, in whole seconds."""
        expires_at = ws.key_expiry.get(credential["id"])
        if expires_at is None:
            return credential
        return {**credential, "ttl": max(0, int(expires_at - self.clock()))}

    @staticmethod
    def _page(items: list[dict], query: dict[str, str], path: str) -> tuple[int, bytes]:
        try:
            size = int(query.get("size") or DEFAULT_SIZE)
        except ValueError:
            size = 0
        if not 1 <= size <= MAX_SIZE:
            return _json(400, {"code": 9, "name": "invalid size",
                               "message": f"size must be an integer between 1 and {MAX_SIZE}"})
        items = sorted(items, key=lambda item: item["id"])
        if query.get("offset"):
            try:
                after = base64.urlsafe_b64decode(query["offset"].encode()).decode()
            except (ValueError, UnicodeDecodeError):
                return _json(400, {"code": 9, "name": "invalid offset",
                                   "message": "'offset' is not a valid offset for this strategy"})
            items = [item for item in items if item["id"] > after]
        page, rest = items[:size], items[size:]
        if not rest:
            return _json(200, {"data": page, "next": None})
        offset = base64.urlsafe_b64encode(page[-1]["id"].encode()).decode()
        next_path = f"{path}?offset={quote(offset)}" + (f"&size={size}" if "size" in query else "")
        return _json(200, {"data": page, "offset": offset, "next": next_path})


def _find_consumer(ws: _Workspace, ref: str) -> dict | None:
    """By id, then by username, as Kong resolves `{ConsumerIdOrUsername}`."""
    if ref in ws.consumers:
        return ws.consumers[ref]
    return next((c for c in ws.consumers.values() if c["username"] == ref), None)


def _ref(entities: dict[str, dict], ref: str | None) -> dict | None:
    """`{"id": ...}` for the entity with this id or name, as Kong's foreign keys read."""
    if ref is None:
        return None
    if ref in entities:
        return {"id": ref}
    found = next((e for e in entities.values() if e.get("name") == ref), None)
    if found is None:
        raise KeyError(f"no entity {ref}")
    return {"id": found["id"]}


def _json(status: int, body: object) -> tuple[int, bytes]:
    return status, json.dumps(body).encode()


def _not_found() -> tuple[int, bytes]:
    return _json(404, {"message": "Not found", "status": 404})


def _handler_for(double: KongAdminDouble) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "kong/3.15.0.0-enterprise-edition"
        sys_version = ""

        def do_GET(self) -> None:
            self._respond()

        def do_POST(self) -> None:
            self._respond()

        def _respond(self) -> None:
            headers = {name.lower(): value for name, value in self.headers.items()}
            status, body = double.answer(self.command, self.path, headers)
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Quiet: tests read `double.requests` instead."""

    return Handler
