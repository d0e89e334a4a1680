"""Live capture end to end: nginx configured like Kong's key-auth on loopback, the agent capturing it from
the kernel, real clients, and nginx's own JSON access log as the truth, one log line for one event.

Everything here runs the agent as a user does (`python -m agent --iface lo ...` in its own process),
stops it with a signal and reads its output file, exit code and stderr. Needs root (packet sockets).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from kong_standin import KongStandin, billed_rows, free_loopback_port, load_consumers, metered_rows

from agent.live.cpu_share import CATCH_UP_NICE
from conftest import CAPTURES, REPO, read_events, run_agent, summary
from tests.doubles.ingest import IngestDouble

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: packet sockets")]

DECK = CAPTURES / "kong.yaml"
KEYS: dict[str, list[str]] = {}
for _key, (_subject, _) in load_consumers(DECK).items():
    KEYS.setdefault(_subject, []).append(_key)
ALICE, BOB = KEYS["alice"][0], KEYS["bob"][0]
CAROL_OLD, CAROL_NEW = KEYS["carol"]
MACHINE = next(keys[0] for subject, keys in KEYS.items() if subject not in ("alice", "bob", "carol"))
UNKNOWN = "not-a-known-key-000"
INGEST_TOKEN = "spat_live_test_0123456789"
STOP_LIMIT = 10.0  # seconds from the stop signal to the exit, as promised


class LiveAgent:
    """`agent --iface lo` in its own process; stderr is collected as it comes."""

    def __init__(self, output: Path | None, port: int, *extra: str, user: str | None = None,
                 deck: Path = DECK, launch: Callable[..., subprocess.Popen] = subprocess.Popen) -> None:
        """`launch` starts the command (Popen's arguments): a service manager's double can stand in."""
        self.output = output
        command = [sys.executable, "-m", "agent", "--iface", "lo", "--port", str(port), "--credentials", str(deck),
                   *(["--output", str(output)] if output else []), *extra]
        self.process = launch(command, cwd=REPO, stderr=subprocess.PIPE, text=True,
                              **({"user": user} if user else {}))
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the agent never logged {text!r}: {self.stderr}")
            time.sleep(0.05)

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, float]:
        """Send the signal; (exit code, seconds it took to exit)."""
        started = time.monotonic()
        self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout=STOP_LIMIT + 20)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        took = time.monotonic() - started
        self._reader.join(5)
        return code, took

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def summary(self) -> dict[str, int]:
        return summary(self.stderr)

    def events(self) -> list[dict]:
        return read_events(self.output)


@pytest.fixture
def gateway():
    with KongStandin(port=free_loopback_port()) as standin:
        yield standin


@pytest.fixture
def start_agent(tmp_path: Path):
    agents: list[LiveAgent] = []

    def start(port: int, *extra: str, user: str | None = None, deck: Path = DECK, to_file: bool = True) -> LiveAgent:
        output = tmp_path / f"events-{len(agents)}.jsonl" if to_file else None
        agent = LiveAgent(output, port, *extra, user=user, deck=deck)
        agents.append(agent)
        agent.wait_for("capturing on lo")
        if deck.exists() and deck.stat().st_size:  # an empty one is a file not written yet
            agent.wait_for("credentials: loaded")
        return agent

    yield start
    for agent in agents:
        agent.kill()


def packet_sockets(pid: int) -> set[str]:
    """The packet sockets a process holds (their inodes), from /proc."""
    lines = Path("/proc/net/packet").read_text().splitlines()[1:]
    inodes = {line.split()[-1] for line in lines}
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            held.add(target[8:-1])
    return held


# -- traffic -------------------------------------------------------------------------------------------


def curl(*args: str) -> None:
    subprocess.run(["curl", "-sS", "-o", "/dev/null", "--max-time", "20", *args], check=True, timeout=30)


def raw_exchange(port: int, payload: bytes, host: str = "127.0.0.1") -> None:
    """Send everything in one write, read until the server closes (the last request says close)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as connection:
        connection.settimeout(20)
        connection.connect((host, port))
        connection.sendall(payload)
        while connection.recv(65536):
            pass


def request(method: str, target: str, key: str | None, body: bytes = b"", close: bool = False) -> bytes:
    headers = [f"{method} {target} HTTP/1.1", "Host: gateway"]
    if key is not None:
        headers.append(f"apikey: {key}")
    if body:
        headers.append(f"Content-Length: {len(body)}")
    if close:
        headers.append("Connection: close")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


def drive_clients(gateway: KongStandin, workdir: Path) -> int:
    """Every kind of client the issue names; returns how many requests were sent."""
    base, port = gateway.base_url, gateway.port
    sent = 0
    # curl, one connection each: key in the header or the query, HEAD, chunked and gzip responses
    curl("-H", f"apikey: {ALICE}", f"{base}/orders/1")
    curl(f"{base}/orders?page=2&apikey={BOB}&sort=asc")
    curl("-I", "-H", f"apikey: {CAROL_NEW}", f"{base}/static/catalog.json")
    curl("-H", f"apikey: {MACHINE}", f"{base}/stream")
    curl("--compressed", "-H", f"apikey: {BOB}", f"{base}/reports/export")
    sent += 5
    # invalid and missing keys: answered 401, never billed
    curl("-H", f"apikey: {UNKNOWN}", f"{base}/orders")
    curl(f"{base}/orders?page=1")
    sent += 2
    # a keep-alive client with a different key on every request
    with httpx.Client(base_url=base, timeout=20) as client:
        for number, key in enumerate([ALICE, BOB, CAROL_OLD, CAROL_NEW, MACHINE, UNKNOWN, ALICE]):
            client.get(f"/items/{number}", headers={"apikey": key})
        client.post("/orders", headers={"apikey": BOB}, json={"sku": "SKU-0001", "quantity": 3})
        client.delete("/orders/9", headers={"apikey": CAROL_OLD})
        client.get("/status/429", headers={"apikey": ALICE})
        # over quota: Kong answers 429 itself and nginx discards the body unread, so its request_length,
        # and the billed size, is the head's; the next request on the connection follows the body
        client.post("/over-quota/uploads", headers={"apikey": BOB}, content=os.urandom(100_000))
        client.get("/items/after-quota", headers={"apikey": BOB})
        sent += 12
    # pipelining: three requests in one write, answered in order on one connection
    raw_exchange(port, request("GET", "/pipelined/1", ALICE) + request("GET", "/pipelined/2", UNKNOWN)
                 + request("POST", "/pipelined/3", BOB, body=b'{"n":3}', close=True))
    sent += 3
    # IPv6
    curl("-g", "-H", f"apikey: {MACHINE}", f"{gateway.base_url_ipv6}/v6/orders")
    curl("-g", f"{gateway.base_url_ipv6}/v6/orders?apikey={UNKNOWN}")
    raw_exchange(port, request("GET", "/v6/pipelined/1", CAROL_NEW)
                 + request("GET", "/v6/pipelined/2", ALICE, close=True), host="::1")
    sent += 4
    # a multi-megabyte upload (curl sends Expect: 100-continue; nginx's interim answer counts in bytes_sent)
    upload = workdir / "upload.bin"
    upload.write_bytes(os.urandom(6 << 20))
    curl("-H", f"apikey: {ALICE}", "--data-binary", f"@{upload}", f"{base}/uploads")
    sent += 1
    return sent


# -- the truth -----------------------------------------------------------------------------------------


def assert_one_for_one(entries: list[dict], agent: LiveAgent) -> None:
    """Each billed log line is exactly one event with the same subject, request and sizes; 401s are counted."""
    assert metered_rows(agent.events()) == billed_rows(entries)
    counters = agent.summary()
    assert counters["rejected"] == sum(1 for e in entries if e["status"] == 401)
    assert counters["kernel_drops"] == 0
    assert counters["gaps"] == 0 and counters["parse_errors"] == 0


# -- tests ---------------------------------------------------------------------------------------------


def test_events_match_the_gateways_access_log_one_for_one(gateway, start_agent, tmp_path: Path) -> None:
    agent = start_agent(gateway.port)
    sent = drive_clients(gateway, tmp_path)
    entries = gateway.access_log_entries(expect=sent)
    code, took = agent.stop(signal.SIGTERM)
    assert code == 0, agent.stderr
    assert took < STOP_LIMIT
    assert len(entries) == sent
    assert_one_for_one(entries, agent)
    assert any(f"port {gateway.port}: nginx: master process" in line for line in agent.lines)
    assert all(key not in agent.stderr for keys in KEYS.values() for key in keys)


def test_live_and_replay_of_the_same_packets_give_the_same_events(gateway, start_agent, tmp_path: Path) -> None:
    """Event ids are made from the connection and sequence numbers: capturing live, or replaying tcpdump's
    capture of the same traffic, must give the same events (so a backfill never double-bills)."""
    capture = tmp_path / "same.pcap"
    # a buffer as big as the agent's ring: the 6 MB upload comes in one burst, and a reference that
    # dropped some of it (tcpdump's default is 2 MiB) would differ from the agent for its own reason.
    # Immediate mode: otherwise libpcap hands over a ring block only once it is full or a second old, and
    # a SIGINT before then loses the block's packets (the upload's end, its 201) without counting a drop
    tcpdump = subprocess.Popen(["tcpdump", "-i", "lo", "-s", "0", "-B", str(256 << 10), "-U", "--immediate-mode",
                                "-w", str(capture), "tcp", "port", str(gateway.port)],
                               stderr=subprocess.PIPE, text=True)
    try:
        assert tcpdump.stderr is not None
        assert "listening on" in tcpdump.stderr.readline()
        agent = start_agent(gateway.port)
        sent = drive_clients(gateway, tmp_path)
        entries = gateway.access_log_entries(expect=sent)
        code, _ = agent.stop(signal.SIGTERM)
        assert code == 0, agent.stderr
    finally:
        time.sleep(0.5)
        tcpdump.send_signal(signal.SIGINT)
        tcpdump.wait(10)
    assert tcpdump.stderr is not None
    tcpdump_summary = tcpdump.stderr.read()
    assert "\n0 packets dropped by kernel" in tcpdump_summary, tcpdump_summary
    replayed = tmp_path / "replayed.jsonl"
    run_agent("--read", str(capture), "--port", str(gateway.port), "--credentials", str(DECK),
              "--output", str(replayed))

    def comparable(events: list[dict]) -> list[tuple]:
        """The time, and so the latency, is each capture's own reading of the clock (below)."""
        return sorted((e["id"], e["subject"], json.dumps({**e["data"], "latency_ms": None}, sort_keys=True))
                      for e in events)

    def clock(events: list[dict]) -> dict[str, tuple[float, int | None]]:
        """Each event's request time (µs) and latency (ms), by id."""
        return {e["id"]: (datetime.fromisoformat(e["time"].replace("Z", "+00:00")).timestamp(),
                          e["data"]["latency_ms"]) for e in events}

    live, replay = comparable(agent.events()), comparable(read_events(replayed))
    differing = [(one, other) for one, other in zip(live, replay) if one != other][:2]
    # what differs, field by field (live, replayed): pytest cuts a long event's middle out of the message
    fields = []
    for (one_id, one_subject, one_data), (other_id, other_subject, other_data) in differing:
        one, other = json.loads(one_data), json.loads(other_data)
        fields.append({"id": (one_id, other_id), "subject": (one_subject, other_subject),
                       **{key: (value, other.get(key)) for key, value in one.items() if other.get(key) != value}})
    assert live == replay, (len(live), len(replay), fields, agent.summary())
    # Two packet sockets each read the clock as the kernel hands them a packet (on loopback TCP leaves the
    # packet no receive time to share), a few µs apart; a stall of the host between the two hand-overs of
    # one packet parts them by as long (CI once saw a latency more than 1 ms apart). So a few may differ;
    # a misread ring time (seconds, nanoseconds) would part them all.
    live_clock, replay_clock = clock(agent.events()), clock(read_events(replayed))
    apart = {key: (live_clock[key], replay_clock[key]) for key in live_clock
             if abs(live_clock[key][0] - replay_clock[key][0]) > 0.001
             or (live_clock[key][1] is None) != (replay_clock[key][1] is None)
             or abs((live_clock[key][1] or 0) - (replay_clock[key][1] or 0)) > 1}
    assert len(apart) <= len(live_clock) // 10, apart
    assert len(agent.events()) == sum(1 for e in entries if e["consumer"] and e["status"] != 401)


def test_sigint_stops_it_the_same_way(gateway, start_agent) -> None:
    agent = start_agent(gateway.port)
    curl("-H", f"apikey: {ALICE}", f"{gateway.base_url}/a")
    curl("-H", f"apikey: {UNKNOWN}", f"{gateway.base_url}/b")
    entries = gateway.access_log_entries(expect=2)
    code, took = agent.stop(signal.SIGINT)
    assert code == 0, agent.stderr
    assert took < STOP_LIMIT
    assert_one_for_one(entries, agent)


def test_exchanges_in_flight_at_the_stop_are_closed_out(gateway, start_agent) -> None:
    agent = start_agent(gateway.port)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as answered, \
            socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as waiting:
        answered.sendall(request("GET", "/answered", BOB))  # keep-alive: the connection stays open
        assert answered.recv(65536).startswith(b"HTTP/1.1 200")
        waiting.sendall(request("POST", "/waiting", ALICE, body=b"x" * 100)[:-90])  # the body never completes
        time.sleep(0.3)
        code, took = agent.stop(signal.SIGTERM)
    assert code == 0, agent.stderr
    assert took < STOP_LIMIT
    events = {event["data"]["request_uri"]: event for event in agent.events()}
    assert events["/answered"]["subject"] == "bob"
    assert events["/answered"]["data"]["response_http_status"] == 200
    # no response was seen: emitted with status 0, as replay does for a capture that ends there
    assert events["/waiting"]["subject"] == "alice"
    assert events["/waiting"]["data"]["response_http_status"] == 0
    assert agent.summary()["unanswered"] == 1


def test_an_answer_still_arriving_at_the_stop_is_billed_with_the_bytes_seen_and_counted(gateway, start_agent) -> None:
    (gateway.prefix / "html/static/big.bin").write_bytes(os.urandom(32 << 20))
    agent = start_agent(gateway.port)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # a slow reader holds nginx back
        client.sendall(request("GET", "/static/big.bin", ALICE, close=True))
        assert client.recv(65536).startswith(b"HTTP/1.1 200")
        code, _ = agent.stop(signal.SIGTERM)
        while client.recv(1 << 20):
            pass
    assert code == 0, agent.stderr
    [entry] = gateway.access_log_entries(expect=1)
    [event] = agent.events()
    assert event["data"]["response_http_status"] == 200
    assert 0 < event["data"]["response_size_bytes"] < entry["bytes_sent"]
    assert agent.summary()["cut_at_end"] == 1


def test_two_workers_share_the_traffic_and_match_the_log_one_for_one(gateway, start_agent, tmp_path: Path) -> None:
    agent = start_agent(gateway.port, "--workers", "2")
    children = psutil.Process(agent.process.pid).children()
    capturing = [child for child in children if packet_sockets(child.pid)]
    assert len(capturing) == 2 and all(len(packet_sockets(child.pid)) == 1 for child in capturing)
    assert not packet_sockets(agent.process.pid)  # the parent only collects
    sent = drive_clients(gateway, tmp_path)
    entries = gateway.access_log_entries(expect=sent)
    code, took = agent.stop(signal.SIGTERM)
    assert code == 0, agent.stderr
    assert took < STOP_LIMIT
    assert_one_for_one(entries, agent)
    assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)


def test_user_switch_keeps_capturing_without_privileges(gateway, start_agent) -> None:
    nobody = pwd.getpwnam("nobody")
    agent = start_agent(gateway.port, "--user", "nobody")
    process = psutil.Process(agent.process.pid)
    assert set(process.uids()) == {nobody.pw_uid}  # real, effective and saved: no way back to root
    assert set(process.gids()) == {nobody.pw_gid}
    if any("capturing at normal priority" in line for line in agent.lines):  # it could not keep the right
        assert os.sched_getscheduler(process.pid) == os.SCHED_OTHER
    else:  # it yields to the gateway, and can still take priority back when its ring fills
        assert process.rlimit(psutil.RLIMIT_NICE)[0] >= 20 - CATCH_UP_NICE
    curl("-H", f"apikey: {CAROL_OLD}", f"{gateway.base_url}/as-nobody")
    entries = gateway.access_log_entries(expect=1)
    code, _ = agent.stop(signal.SIGTERM)
    assert code == 0, agent.stderr
    assert_one_for_one(entries, agent)


def test_user_switch_hands_the_spool_over_and_delivery_goes_on(gateway, start_agent, monkeypatch,
                                                               tmp_path: Path) -> None:
    monkeypatch.setenv("METERING_API_TOKEN", INGEST_TOKEN)
    data_dir = Path(tempfile.mkdtemp(prefix="agent-data-"))  # as /var/lib/...: root's, reachable by others
    try:
        with IngestDouble(INGEST_TOKEN) as double:
            agent = start_agent(gateway.port, "--user", "nobody", "--ingest-endpoint", double.url,
                                "--data-dir", str(data_dir), "--flush-interval", "0.1", to_file=False)
            sent = drive_clients(gateway, tmp_path)
            entries = gateway.access_log_entries(expect=sent)
            billed = sum(billed_rows(entries).values())
            deadline = time.monotonic() + 20
            while len(double.accepted_counts()) < billed and time.monotonic() < deadline:
                time.sleep(0.1)
            code, _ = agent.stop(signal.SIGTERM)
            delivered = len(double.accepted_counts())
        nobody = pwd.getpwnam("nobody").pw_uid
        owners = {path.stat().st_uid for path in [data_dir, *data_dir.rglob("*")]}
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    assert code == 0, agent.stderr
    assert delivered == billed > 0, agent.stderr
    assert owners == {nobody}
    assert "ERROR" not in agent.stderr


def test_nothing_listening_is_a_warning_and_a_gateway_started_later_is_metered(start_agent) -> None:
    port = free_loopback_port()
    agent = start_agent(port)
    assert f"agent: WARNING: nothing is listening on port {port} yet; capturing anyway" in agent.lines
    with KongStandin(port=port) as late_gateway:
        curl("-H", f"apikey: {MACHINE}", f"{late_gateway.base_url}/late")
        entries = late_gateway.access_log_entries(expect=1)
        code, _ = agent.stop(signal.SIGTERM)
    assert code == 0, agent.stderr
    assert_one_for_one(entries, agent)


def test_credentials_arriving_after_the_start_release_the_requests_held_meanwhile(gateway, start_agent,
                                                                                  tmp_path: Path) -> None:
    deck = tmp_path / "kong.yaml"  # not written yet: the agent captures anyway and holds what it cannot meter
    deck.write_text("")  # (a path that does not exist at all is a mistake, refused at start)
    agent = start_agent(gateway.port, deck=deck)
    curl("-H", f"apikey: {BOB}", f"{gateway.base_url}/before-credentials")
    entries = gateway.access_log_entries(expect=1)
    agent.wait_for("credentials: ")  # the failed first load is logged, the capture goes on
    deck.write_text(DECK.read_text())
    agent.wait_for("credentials: loaded")
    code, _ = agent.stop(signal.SIGTERM)
    assert code == 0, agent.stderr
    assert_one_for_one(entries, agent)


def test_a_key_rotated_at_the_gateway_follows_without_restarting_the_agent(start_agent, tmp_path: Path) -> None:
    deck = tmp_path / "kong.yaml"
    deck.write_text(DECK.read_text())
    rotated_key = "carol-rotated-key-2f81"
    with KongStandin(port=free_loopback_port(), deck_file=deck) as gateway:
        agent = start_agent(gateway.port, "--credentials-refresh", "1", deck=deck)
        curl("-H", f"apikey: {CAROL_OLD}", f"{gateway.base_url}/before-rotation")
        deck.write_text(DECK.read_text().replace(CAROL_OLD, rotated_key))
        gateway.reload(deck)
        agent.wait_for("credentials: table changed")
        curl("-H", f"apikey: {CAROL_OLD}", f"{gateway.base_url}/old-key")  # the gateway now refuses it: 401
        curl("-H", f"apikey: {rotated_key}", f"{gateway.base_url}/new-key")
        entries = gateway.access_log_entries(expect=3)
        code, _ = agent.stop(signal.SIGTERM)
    assert code == 0, agent.stderr
    assert [(e["request_uri"], e["status"]) for e in entries] == [
        ("/before-rotation", 200), ("/old-key", 401), ("/new-key", 200)]
    assert_one_for_one(entries, agent)
    assert [(event["subject"], event["data"]["request_uri"]) for event in agent.events()] == [
        ("carol", "/before-rotation"), ("carol", "/new-key")]
    written = agent.stderr + agent.output.read_text()
    assert CAROL_OLD not in written and rotated_key not in written


def test_each_event_carries_the_route_that_answered_and_only_the_plugins_scopes_are_metered(
        start_agent, tmp_path: Path) -> None:
    """Kong's metering tutorial plus a longer-prefix route on its own service, behind nginx locations made
    from the same decK file: the location that answered (in nginx's log) is the route each event names."""
    tutorial = yaml.safe_load((CAPTURES / "kong-tutorial.yaml").read_text())
    tutorial["services"].append({
        "name": "premium", "id": "9a3c1e5f-2b4d-4f6a-8c0e-1d3f5a7b9c11", "url": "https://premium.internal:8443",
        "routes": [{"name": "premium-route", "id": "0b4d2f60-3c5e-4a7b-9d1f-2e4a6b8c0d12",
                    "paths": ["/anything/premium"]}],
        "plugins": [{"name": "metering-and-billing", "config": {"subject": {"look_up_value_in": "consumer"}}}]})
    deck = tmp_path / "kong.yaml"
    deck.write_text(yaml.safe_dump(tutorial))
    alice, bob = "apikey: alice-key", "apikey: bob-key-41d2e8"
    with KongStandin(port=free_loopback_port(), deck_file=deck, routes=True) as gateway:
        agent = start_agent(gateway.port, deck=deck)
        url = gateway.base_url
        curl("-H", alice, "-H", "X-Department: finance", f"{url}/anything/one?project=atlas")
        curl("-H", bob, f"{url}/anything/premium/two")
        curl("-H", alice, f"{url}/anything/premiumish")  # a plain prefix: still /anything/premium's
        curl("-H", alice, f"{url}/status/404")
        curl("-H", alice, f"{url}/status/500")  # filtered by allow_status_codes
        curl("-H", bob, f"{url}/orders/3")  # no plugin on orders
        curl("-H", alice, f"{url}/elsewhere")  # no route
        curl("-H", bob, "-H", "Host: billing.example.com", "-H", "X-Tenant-Id: acme", f"{url}/anything/billing")
        entries = gateway.access_log_entries(expect=8)
        code, _ = agent.stop(signal.SIGTERM)
    assert code == 0, agent.stderr
    answered = {e["request_uri"]: e["route_name"] for e in entries}
    assert answered["/anything/premiumish"] == "premium-route" and answered["/elsewhere"] == ""
    events = {e["data"]["request_uri"]: e for e in agent.events()}
    assert set(events) == {"/anything/one?project=atlas", "/anything/premium/two", "/anything/premiumish",
                           "/status/404", "/anything/billing"}
    for uri, event in events.items():
        assert event["data"]["route_name"] == answered[uri], uri
    services = {service["name"]: service for service in tutorial["services"]}
    premium = events["/anything/premium/two"]["data"]
    assert (premium["service_name"], premium["service_id"], premium["service_port"], premium["service_protocol"]) == (
        "premium", services["premium"]["id"], 8443, "https")
    assert events["/anything/one?project=atlas"]["data"]["department"] == "finance"
    assert events["/anything/one?project=atlas"]["data"]["project"] == "atlas"
    assert events["/anything/billing"]["subject"] == "acme"
    counters = agent.summary()
    assert (counters["no_route"], counters["out_of_scope"]) == (1, 1)


def test_a_worker_killed_still_counts_in_the_summary_up_to_its_last_report(gateway, start_agent):
    """A worker the kernel kills (OOM) sends no final counters: the summary keeps what it last reported
    (once a second), so its requests are not lost from the count, and the agent says so and stops."""
    agent = start_agent(gateway.port, "--workers", "2")
    for number in range(40):
        curl("-H", f"apikey: {ALICE}", f"{gateway.base_url}/orders/{number}")  # a new connection each: both workers
    gateway.access_log_entries(expect=40)
    time.sleep(2.5)  # two reports at least since the last request
    workers = [child for child in psutil.Process(agent.process.pid).children() if packet_sockets(child.pid)]
    assert len(workers) == 2
    workers[0].kill()
    code = agent.process.wait(STOP_LIMIT + 20)
    agent._reader.join(5)
    assert code == 1, agent.stderr
    assert "ended unexpectedly" in agent.stderr
    counted = agent.summary()
    assert (counted["requests"], counted["events"]) == (40, 40), agent.stderr
    assert len(agent.events()) == 40
