"""A real nginx on loopback that behaves like Kong Gateway with key-auth, for fixtures, tests and benchmarks.

Kong itself is not installable here, so this stand-in reproduces what the metering agent can observe on
Kong's proxy port: key-auth (the `apikey` header first, name case-insensitive, then the `apikey` query
parameter), Kong's 401 bodies and `WWW-Authenticate: Key`, Kong-like response headers, and an API upstream
behind it (JSON, 201/204/404/429/500, HEAD, 304, chunked responses, request bodies really read so that
`Expect: 100-continue` gets its interim response). nginx's JSON access log is the ground truth.

Known differences from Kong: nginx matches the query parameter name case-insensitively and does not
URL-decode its value, and a repeated `apikey` parameter uses the first value (Kong answers 401). Fixtures
avoid those inputs.

With `routes=True` it also routes as the decK file's services and routes say: one nginx location per
route path (`^~` prefixes, in a server block per host), so which route answered is in the access log
(`route_name`) and in an `X-Standin-Route` response header; a request no route matches is answered as
Kong answers it, `404 {"message":"no Route matched with those values"}`, before key-auth. Only what nginx
picks the way Kong does is accepted: plain path prefixes and exact hosts, and a host route wins over a
host-less one with a longer path (as Kong's "more fields first" has it).

    with KongStandin(port=8000) as gateway:
        ...  # send traffic to 127.0.0.1:8000 or [::1]:8000
        entries = gateway.access_log_entries(expect=3)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psutil
import yaml

DEFAULT_DECK_FILE = Path(__file__).resolve().parent.parent / "captures" / "kong.yaml"
KONG_VERSION = "3.9.1"

# Access-log fields and how to read them back; every value is logged as a JSON string by escape=json.
_LOG_FIELDS: dict[str, type] = {
    "msec": float,
    "remote_addr": str,
    "remote_port": int,
    "connection": int,
    "connection_requests": int,
    "server_protocol": str,
    "request_method": str,
    "request_uri": str,
    "status": int,
    "request_length": int,
    "bytes_sent": int,
    "body_bytes_sent": int,
    "request_time": float,
    "consumer": str,
    "consumer_id": str,
    "http_expect": str,
    "http_transfer_encoding": str,
    "upstream_status": str,
    "http_host": str,
    "http_user_agent": str,
    "route_name": str,
    "http_x_department": str,
    "http_x_tenant_id": str,
}

_STATUS_BODIES = {
    201: '{"created":true}',
    204: "",
    404: '{"message":"Not found"}',
    429: '{"message":"API rate limit exceeded"}',
    500: '{"message":"An unexpected error occurred"}',
}


class StandinError(RuntimeError):
    """The stand-in gateway could not be started or did not behave as expected."""


def load_consumers(deck_file: Path) -> dict[str, tuple[str, str]]:
    """Map each key-auth key in a decK file to (subject, consumer id); subject is the username, else the id."""
    try:
        state = yaml.safe_load(deck_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise StandinError(f"cannot read decK file {deck_file.name}: {error}") from None
    keys: dict[str, tuple[str, str]] = {}
    for consumer in state.get("consumers") or []:
        consumer_id = str(consumer.get("id") or "")
        subject = str(consumer.get("username") or consumer_id)
        if not subject:
            raise StandinError(f"{deck_file.name}: a consumer has neither username nor id")
        for credential in consumer.get("keyauth_credentials") or []:
            keys[str(credential["key"])] = (subject, consumer_id)
    return keys


@dataclass(frozen=True)
class StandinRoute:
    name: str
    service: str
    paths: tuple[str, ...]
    hosts: tuple[str, ...]


def load_routes(deck_file: Path) -> list[StandinRoute]:
    """The decK file's routes (nested in services, or top level naming one), as the stand-in can route them."""
    state = yaml.safe_load(deck_file.read_text(encoding="utf-8")) or {}
    found = []
    for service in state.get("services") or []:
        found += [(route, service["name"]) for route in service.get("routes") or []]
    found += [(route, route.get("service")) for route in state.get("routes") or []]
    routes = []
    for route, service in found:
        paths, hosts = tuple(route.get("paths") or ("/",)), tuple(route.get("hosts") or ())
        unsupported = set(route) - {"name", "id", "paths", "hosts", "service", "plugins", "protocols"}
        if unsupported or any(p.startswith("~") for p in paths) or any("*" in h for h in hosts):
            raise StandinError(f"{deck_file.name}: route {route.get('name')}: the stand-in routes only plain path "
                               "prefixes and exact hosts")
        routes.append(StandinRoute(route["name"], str(service), paths, hosts))
    return routes


def _nginx_string(value: str) -> str:
    """Quote a value for nginx.conf; keys and names are plain tokens, anything else is refused."""
    if any(ch in value for ch in "'\\$;{}\n\r\"") or not value:
        raise StandinError(f"unsupported character in decK value {value!r}")
    return f'"{value}"'


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def strip_key_params(target: str, key_name: str = "apikey") -> str:
    """The target with every key parameter removed, as key-auth's hide_credentials does."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    kept = [param for param in query.split("&") if param and param.partition("=")[0] != key_name]
    return f"{path}?{'&'.join(kept)}" if kept else path


def billed_rows(entries: list[dict]) -> Counter:
    """What the agent must emit, from the gateway's own log: every request with a consumer, not answered 401."""
    return Counter((e["consumer"], e["request_method"], strip_key_params(e["request_uri"]), e["status"],
                    e["request_length"], e["bytes_sent"]) for e in entries if e["consumer"] and e["status"] != 401)


def metered_rows(events: list[dict]) -> Counter:
    """The agent's events in the shape of billed_rows, to compare one for one."""
    return Counter((ev["subject"], ev["data"]["request_method"], ev["data"]["request_uri"],
                    ev["data"]["response_http_status"], ev["data"]["request_size_bytes"],
                    ev["data"]["response_size_bytes"]) for ev in events)


class KongStandin:
    """A private nginx (own prefix in a temp dir) acting as Kong's proxy port with key-auth.

    The gateway listens on 127.0.0.1:port (and [::1]:port when ipv6 is on); the upstream API is a second
    server block of the same nginx on 127.0.0.1:upstream_port (a free port when not given).
    """

    def __init__(
        self,
        port: int = 8000,
        *,
        workers: int = 2,
        deck_file: Path | str | None = None,
        upstream_port: int | None = None,
        ipv6: bool = True,
        routes: bool = False,
        keepalive_requests: int = 100000,
        startup_timeout: float = 10.0,
        nginx_binary: str = "nginx",
        tls_port: int | None = None,
        http2: bool = False,
        upstream_tls: bool = False,
        other_upstreams: dict[str, int] | None = None,
    ) -> None:
        self.port = port
        self.workers = workers
        self.deck_file = Path(deck_file) if deck_file else DEFAULT_DECK_FILE
        self.upstream_port = upstream_port
        self.ipv6 = ipv6
        self.keepalive_requests = keepalive_requests
        self.startup_timeout = startup_timeout
        self.nginx_binary = nginx_binary
        self.tls_port = tls_port  # HTTPS too, with a self-signed certificate made at start (openssl)
        self.http2 = http2  # ALPN offers h2 on the TLS port, as Kong's 8443 does
        self.upstream_tls = upstream_tls  # the gateway reaches the API over HTTPS, as a Kong service may
        # path prefix -> the port of an HTTP upstream the caller runs on 127.0.0.1 (one that answers slowly)
        self.other_upstreams = other_upstreams or {}
        self.consumers = load_consumers(self.deck_file)
        self.routes = load_routes(self.deck_file) if routes else None
        self._prefix: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._ready_token = secrets.token_hex(8)

    # -- public API -----------------------------------------------------------------------------------

    @property
    def prefix(self) -> Path:
        """The nginx prefix directory (config, logs, static files); exists while running."""
        if self._prefix is None:
            raise StandinError("the stand-in is not started")
        return self._prefix

    @property
    def access_log_path(self) -> Path:
        return self.prefix / "logs" / "access.json"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url_ipv6(self) -> str:
        return f"http://[::1]:{self.port}"

    @property
    def pid(self) -> int:
        """The nginx master's process id."""
        if self._process is None:
            raise StandinError("the stand-in is not started")
        return self._process.pid

    def start(self) -> KongStandin:
        """Write the config, start nginx in the foreground and wait until it answers on its ports."""
        if self._process is not None:
            raise StandinError("the stand-in is already started")
        if shutil.which(self.nginx_binary) is None:
            raise StandinError(f"{self.nginx_binary} not found on PATH")
        if self.upstream_port is None:
            self.upstream_port = free_loopback_port()
        self._prefix = Path(tempfile.mkdtemp(prefix="kong-standin-"))
        self._write_site()
        if self.tls_port is not None or self.upstream_tls:
            self._make_certificate()
        conf = self._prefix / "nginx.conf"
        conf.write_text(self._render_config(), encoding="utf-8")
        error_log = self._prefix / "logs" / "error.log"
        self._process = subprocess.Popen(
            [self.nginx_binary, "-p", str(self._prefix), "-c", str(conf), "-e", str(error_log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop nginx gracefully (SIGQUIT), kill it and its workers after `timeout`, remove the prefix.

        The access log goes with the prefix: read `access_log_entries()` before stopping.
        """
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            workers = psutil.Process(process.pid).children()
            process.send_signal(signal.SIGQUIT)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                for worker in workers:
                    worker.kill()
                process.kill()
                process.wait(timeout=timeout)
        if self._prefix is not None:
            shutil.rmtree(self._prefix, ignore_errors=True)
            self._prefix = None

    def reload(self, deck_file: Path | str) -> None:
        """Take the consumers and keys from `deck_file` now, as Kong does when its credentials change:
        nginx re-reads its config (SIGHUP); this returns once only workers with the new one are left."""
        self.deck_file = Path(deck_file)
        self.consumers = load_consumers(self.deck_file)
        (self.prefix / "nginx.conf").write_text(self._render_config(), encoding="utf-8")
        master = psutil.Process(self.pid)
        old_workers = {worker.pid for worker in master.children()}
        master.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            workers = {worker.pid for worker in master.children()}
            if len(workers) >= self.workers and not workers & old_workers:
                return
            if time.monotonic() > deadline:
                raise StandinError(f"nginx did not take the new configuration: {self._error_tail()}")
            time.sleep(0.05)

    def access_log_entries(self, expect: int | None = None, timeout: float = 5.0) -> list[dict]:
        """The gateway's access-log lines, parsed and typed, in log order.

        nginx writes a line when a request is finished, a moment after the client has its response; with
        `expect`, wait (up to `timeout` seconds) until at least that many lines are there.
        """
        deadline = time.monotonic() + timeout
        while True:
            entries = self._read_access_log()
            if expect is None or len(entries) >= expect:
                return entries
            if time.monotonic() >= deadline:
                raise StandinError(f"access log has {len(entries)} lines, expected {expect}")
            time.sleep(0.02)

    def __enter__(self) -> KongStandin:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals ------------------------------------------------------------------------------------

    def _read_access_log(self) -> list[dict]:
        path = self.access_log_path
        if not path.exists():
            return []
        entries = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.endswith("}"):
                continue  # a line nginx is still writing
            raw = json.loads(line)
            entries.append({name: _typed(convert, raw[name]) for name, convert in _LOG_FIELDS.items()})
        return entries

    def _wait_ready(self) -> None:
        """Poll both servers with a request only this instance answers, so a foreign listener is not mistaken."""
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        # (an upstream over TLS opened its port with the rest of this nginx's listeners: not probed in plain HTTP)
        targets = [("127.0.0.1", self.port)] + ([] if self.upstream_tls else [("127.0.0.1", self.upstream_port)])
        if self.ipv6:
            targets.append(("::1", self.port))
        for host, port in targets:
            while not self._answers_token(host, port):
                if self._process.poll() is not None:
                    raise StandinError(f"nginx exited with {self._process.returncode}: {self._error_tail()}")
                if time.monotonic() >= deadline:
                    raise StandinError(f"nginx not answering on {host}:{port}: {self._error_tail()}")
                time.sleep(0.05)

    def _answers_token(self, host: str, port: int) -> bool:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                probe.connect((host, port))
                probe.sendall(b"GET /__standin/ready HTTP/1.0\r\n\r\n")
                reply = b""
                while chunk := probe.recv(4096):
                    reply += chunk
                    if len(reply) > 65536:
                        break
        except OSError:
            return False
        return self._ready_token.encode() in reply

    def _error_tail(self) -> str:
        try:
            lines = (self.prefix / "logs" / "error.log").read_text(errors="replace").splitlines()
        except OSError:
            return "no error log"
        return " | ".join(lines[-3:]) or "error log empty"

    @property
    def tls_url(self) -> str:
        return f"https://127.0.0.1:{self.tls_port}"

    def _make_certificate(self) -> None:
        """A self-signed certificate for 127.0.0.1 and localhost, as a test gateway has."""
        if shutil.which("openssl") is None:
            raise StandinError("openssl not found on PATH (the TLS port needs a certificate)")
        made = subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(self.prefix / "key.pem"),
             "-out", str(self.prefix / "cert.pem")],
            stdin=subprocess.DEVNULL, capture_output=True, check=False)
        if made.returncode != 0:
            raise StandinError(f"openssl could not make a certificate: {made.stderr.decode(errors='replace')[-200:]}")

    def _write_site(self) -> None:
        """Static files the upstream serves: one for ETag/304, one large enough to be gzipped (chunked)."""
        prefix = self.prefix
        for name in ("logs", "html/static", "html/reports", "temp"):
            (prefix / name).mkdir(parents=True, exist_ok=True)
        catalog = {"items": [{"sku": f"SKU-{n:04d}", "price": n * 3 % 97} for n in range(40)]}
        (prefix / "html/static/catalog.json").write_text(json.dumps(catalog), encoding="utf-8")
        rows = [{"day": f"2024-01-{day % 28 + 1:02d}", "orders": day * 7 % 113} for day in range(300)]
        (prefix / "html/reports/export").write_text(json.dumps({"rows": rows}), encoding="utf-8")
        os.chmod(prefix, 0o755)

    def _render_config(self) -> str:
        prefix = self.prefix
        key_map = "\n".join(
            f"        {_nginx_string(key)} {_nginx_string(subject)};" for key, (subject, _) in self.consumers.items()
        )
        id_map = "\n".join(
            f"        {_nginx_string(key)} {_nginx_string(cid)};" for key, (_, cid) in self.consumers.items() if cid
        )
        log_format = ",".join(f'"{name}":"${name}"' for name in _LOG_FIELDS)
        status_locations = "\n".join(_status_location(code, body) for code, body in _STATUS_BODIES.items())
        upstream_ssl = (f" ssl;\n        ssl_certificate {prefix}/cert.pem;\n        ssl_certificate_key {prefix}/key.pem"
                        if self.upstream_tls else "")
        user = "user root root;\n" if os.geteuid() == 0 else ""
        return f"""# Generated by kong_standin.py: nginx standing in for Kong Gateway with key-auth.
{user}worker_processes {self.workers};
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log notice;
events {{ worker_connections 1024; }}

http {{
    client_body_temp_path {prefix}/temp/body;
    proxy_temp_path {prefix}/temp/proxy;
    fastcgi_temp_path {prefix}/temp/fastcgi;
    uwsgi_temp_path {prefix}/temp/uwsgi;
    scgi_temp_path {prefix}/temp/scgi;
    types {{ application/json json; text/plain txt; }}
    default_type application/json;
    server_tokens off;
    keepalive_timeout 75s;
    keepalive_requests {self.keepalive_requests};
    client_max_body_size 64m;
    access_log off;

    log_format kong_json escape=json '{{{log_format}}}';

    # key-auth: the header wins, the query parameter is the fallback (Kong's key_in_header, key_in_query).
    map $http_apikey $apikey_value {{
        "" $arg_apikey;
        default $http_apikey;
    }}
    map $apikey_value $consumer {{
        default "";
{key_map}
    }}
    map $apikey_value $consumer_id {{
        default "";
{id_map}
    }}

    # Kong reports whole milliseconds; nginx has seconds with a millisecond fraction.
    map $upstream_header_time $kong_upstream_latency {{
        "~^0\\.0*(?<ms>\\d+)$" $ms;
        default $upstream_header_time;
    }}

    upstream api_upstream {{
        server 127.0.0.1:{self.upstream_port};
        keepalive 16;
    }}

{self._gateway_servers()}
    # The API behind the gateway.
    server {{
        listen 127.0.0.1:{self.upstream_port}{upstream_ssl};
        root {prefix}/html;
        etag on;
        gzip on;
        gzip_types application/json;
        gzip_min_length 256;
        gzip_proxied any;

        location = /__standin/ready {{ return 200 "{self._ready_token}"; }}
{status_locations}
        location /static/ {{ }}
        location /reports/ {{ }}
        # No Content-Length once sub_filter rewrites the body, so this one is always chunked (HTTP/1.1).
        location /stream {{
            sub_filter_types *;
            sub_filter_once off;
            sub_filter '"x"' '"y"';
            return 200 '{{"events":[{{"x":1}},{{"x":2}},{{"x":3}}]}}';
        }}
        location / {{
            if ($request_method ~ ^(POST|PUT|PATCH)$) {{
                return 201 '{{"created":true,"path":"$uri","bytes":"$content_length"}}';
            }}
            if ($request_method = DELETE) {{
                return 204;
            }}
            return 200 '{{"path":"$uri","method":"$request_method","consumer":"$http_x_consumer_username"}}';
        }}
    }}
}}
"""


    def _gateway_servers(self) -> str:
        """The proxy port: one location for everything (key-auth only), or the decK file's routes."""
        if self.routes is None:
            return self._server("", [self._proxy_location("location /", "")])
        hosts = sorted({host for route in self.routes for host in route.hosts})
        blocks = [self._server("", self._route_locations(None))]
        blocks += [self._server(host, self._route_locations(host)) for host in hosts]
        return "\n".join(blocks)

    def _route_locations(self, host: str | None) -> list[str]:
        """A host's routes, then the host-less routes a host route does not win over, then Kong's 404."""
        own = [(path, route) for route in self.routes if (host in route.hosts if host else not route.hosts)
               for path in route.paths]
        if host:
            claimed = [path for path, _ in own]
            own += [(path, route) for route in self.routes if not route.hosts for path in route.paths
                    if not any(path.startswith(prefix) for prefix in claimed)]
        locations = [self._proxy_location(f"location ^~ {path}", route.name) for path, route in own]
        if "/" not in {path for path, _ in own}:
            locations.append("""        location / {
            add_header X-Kong-Response-Latency 0 always;
            return 404 '{"message":"no Route matched with those values"}';
        }""")
        return locations

    def _server(self, host: str, locations: list[str]) -> str:
        listen_v6 = f"        listen [::1]:{self.port};\n" if self.ipv6 else ""
        tls = ""
        if self.tls_port is not None:
            h2 = " http2" if self.http2 else ""
            tls = (f"        listen 127.0.0.1:{self.tls_port} ssl{h2};\n"
                          f"        ssl_certificate {self.prefix}/cert.pem;\n"
                          f"        ssl_certificate_key {self.prefix}/key.pem;\n")
        name = f"        server_name {host};\n" if host else ""
        body = "\n".join(locations)
        return f"""    server {{
        listen 127.0.0.1:{self.port};
{listen_v6}{tls}{name}        access_log {self.prefix}/logs/access.json kong_json;
        set $route_name "";

        location = /__standin/ready {{ access_log off; return 200 "{self._ready_token}"; }}
        # Kong's rate limiting: key-auth passes, then Kong answers 429 itself, the body unread
        location ^~ /over-quota/ {{
{_KEY_AUTH}
            add_header X-Kong-Response-Latency 0 always;
            return 429 '{{"message":"API rate limit exceeded"}}';
        }}
        # a plugin's ngx.exit(444): key-auth passes, then the connection is closed without an answer
        location ^~ /no-answer/ {{
{_KEY_AUTH}
            return 444;
        }}
{self._other_upstream_locations()}

{body}
    }}"""

    def _other_upstream_locations(self) -> str:
        return "".join(f"""        location ^~ {path} {{
{_KEY_AUTH}
            proxy_pass http://127.0.0.1:{port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            add_header X-Kong-Upstream-Latency $kong_upstream_latency always;
        }}
""" for path, port in self.other_upstreams.items())

    def _proxy_location(self, location: str, route: str) -> str:
        """Kong's key-auth in front of the upstream, as one route (or all of them, unnamed)."""
        named = f"            set $route_name {_nginx_string(route)};\n" if route else ""
        header = "            add_header X-Standin-Route $route_name always;\n" if route else ""
        return f"""        {location} {{
{named}{_KEY_AUTH}
            proxy_pass {"https" if self.upstream_tls else "http"}://api_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Consumer-Username $consumer;
            proxy_set_header X-Consumer-ID $consumer_id;
{header}            add_header X-Kong-Upstream-Latency $kong_upstream_latency always;
            add_header X-Kong-Proxy-Latency 0 always;
            add_header X-Kong-Request-Id $request_id always;
            add_header Via "1.1 kong/{KONG_VERSION}" always;
        }}"""


# key-auth's two refusals, the first lines of a gateway location
_KEY_AUTH = """            if ($apikey_value = "") {
                add_header WWW-Authenticate Key always;
                add_header X-Kong-Response-Latency 0 always;
                return 401 '{"message":"No API key found in request"}';
            }
            if ($consumer = "") {
                add_header WWW-Authenticate Key always;
                add_header X-Kong-Response-Latency 0 always;
                return 401 '{"message":"Unauthorized"}';
            }"""


def _status_location(code: int, body: str) -> str:
    answer = f"return {code} '{body}';" if body else f"return {code};"
    return f"        location = /status/{code} {{ {answer} }}"


def _typed(convert: type, value: str) -> object:
    """Convert a logged string; nginx logs `-` for an unset numeric variable."""
    if convert is str:
        return value
    if value in ("", "-"):
        return None
    return convert(value)
