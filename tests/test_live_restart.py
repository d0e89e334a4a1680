"""A restart under a service manager loses no request: the packet rings stay with the manager (systemd's
file-descriptor store; a double of it here, `tests/doubles/service_manager.py`), the kernel fills them
while no agent runs, and the next start reads what they hold. Real nginx (the key-auth stand-in), real
clients, real kernel capture; nginx's access log is the truth. Needs root (packet sockets).
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from kong_standin import KongStandin, billed_rows, free_loopback_port, metered_rows

from agent.live.ring_store import ANSWERS
from tests.doubles.service_manager import ServiceManagerDouble
from tests.test_live_e2e import ALICE, BOB, STOP_LIMIT, UNKNOWN, LiveAgent, curl, gateway, request  # noqa: F401

pytestmark = [pytest.mark.root, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: packet sockets")]


@pytest.fixture
def manager(tmp_path: Path):
    double = ServiceManagerDouble(tmp_path)
    yield double
    double.close()


class Load:
    """Keep-alive clients sending requests with unique targets until stopped; each answered request's
    target and the time its answer came."""

    def __init__(self, base_url: str, clients: int = 2) -> None:
        self.base_url = base_url
        self.answered: list[tuple[str, float]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(number,), daemon=True) for number in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self, number: int) -> None:
        keys = [ALICE, BOB, UNKNOWN]
        sent = 0
        with httpx.Client(base_url=self.base_url, timeout=20) as client:
            while not self._stop.is_set():
                target = f"/restart/{number}/{sent}"
                client.get(target, headers={"apikey": keys[sent % len(keys)]})
                self.answered.append((target, time.monotonic()))
                sent += 1

    def stop(self) -> int:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        return len(self.answered)


def rings_in(manager: ServiceManagerDouble) -> list[tuple[str, int]]:
    """The packet sockets the manager keeps, by name; beside each, its answers (a memory file)."""
    rings = [(name, fd) for name, fd in manager.store if not name.endswith(ANSWERS)]
    assert sorted(name for name, _ in manager.store) == sorted([name for name, _ in rings]
                                                               + [name + ANSWERS for name, _ in rings])
    return rings


def start(manager: ServiceManagerDouble, gateway: KongStandin, output: Path, *extra: str) -> LiveAgent:
    """The agent as the unit runs it, with a data directory."""
    state = ("--data-dir", str(output.parent / "state"))
    agent = LiveAgent(output, gateway.port, *state, *extra, launch=manager.start)
    agent.wait_for("capturing on lo")
    manager.wait_for("READY")
    agent.wait_for("credentials: loaded")
    return agent


def stop(manager: ServiceManagerDouble, agent: LiveAgent) -> None:
    code, took = agent.stop(signal.SIGTERM)
    assert code == 0, agent.stderr
    assert took < STOP_LIMIT
    manager.drain()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_restart_under_the_service_manager_bills_every_request_once(gateway, manager, tmp_path: Path,
                                                                      workers: int) -> None:
    first = start(manager, gateway, tmp_path / "first.jsonl", "--workers", str(workers))
    assert [name.split("-of-")[0] for name, _ in rings_in(manager)] == [f"agent-ring-{n}" for n in range(1, workers + 1)]
    load = Load(gateway.base_url)
    time.sleep(1.0)
    stop(manager, first)
    stopped = time.monotonic()
    time.sleep(1.5)  # the manager's RestartSec: the gateway serves on with no agent running
    second = start(manager, gateway, tmp_path / "second.jsonl", "--workers", str(workers))
    started = time.monotonic()
    time.sleep(1.0)
    sent = load.stop()
    entries = gateway.access_log_entries(expect=sent)
    stop(manager, second)

    served_while_no_agent_ran = [target for target, at in load.answered if stopped < at < started]
    assert len(served_while_no_agent_ran) > 100, "the test must have traffic while no agent runs"
    events = first.events() + second.events()
    assert len({event["id"] for event in events}) == len(events)
    # one event per billed log line, none missing, none twice, each with its answer: the requests in flight
    # at the stop are the first run's, which reads on for their answers; those begun after are the second's
    assert metered_rows(events) == billed_rows(entries)
    assert first.summary()["unanswered"] == 0 and second.summary()["unmatched_responses"] == 0
    assert sum(1 for entry in entries if entry["status"] == 401) == \
        first.summary()["rejected"] + second.summary()["rejected"]
    for agent in (first, second):
        counters = agent.summary()
        assert counters["kernel_drops"] == 0 and counters["gaps"] == 0 and counters["parse_errors"] == 0
    assert f"took over {workers} ring(s) from the previous run" in second.stderr
    assert manager.ignored == 0  # only the main process speaks to the manager, never a worker


@pytest.mark.parametrize("left_by", ["this version", "an earlier version"])
def test_a_request_in_flight_at_the_stop_is_billed_with_its_answer_and_those_after_it_by_the_next_run(
        gateway, manager, tmp_path: Path, left_by: str) -> None:
    """An earlier version left the answers owed in the data directory: an upgrade pairs as a restart does."""
    first = start(manager, gateway, tmp_path / "first.jsonl")
    body = b"x" * 1000
    upload = request("POST", "/uploads/in-flight", ALICE, body=body)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as connection:
        # the upload is in flight when the stop comes; then the rest of its body, and a request pipelined
        # behind it before its answer: the stopping run knows where the body ends and hands that over, so the
        # next run reads on in step from there
        behind = request("GET", "/behind-the-upload", BOB)
        across_the_stop(manager, first, connection, upload[:-600], upload[-600:] + behind, answers=2)
        if left_by == "an earlier version":
            earlier_file = as_an_earlier_version_left_them(manager, tmp_path / "state")
        connection.sendall(request("GET", "/after-the-answers", BOB))  # the next run's
        read_responses(connection, 1)
        second = restart_and_send_the_last(manager, gateway, connection, tmp_path)
    entries = gateway.access_log_entries(expect=4)
    stop(manager, second)
    assert metered_rows(first.events() + second.events()) == billed_rows(entries)
    by_run = [[event["data"]["request_uri"] for event in run.events()] for run in (first, second)]
    assert by_run == [["/uploads/in-flight"], ["/behind-the-upload", "/after-the-answers", "/after-the-restart"]]
    assert first.summary()["unanswered"] == 0
    if left_by == "an earlier version":
        assert not earlier_file.exists()


def as_an_earlier_version_left_them(manager: ServiceManagerDouble, data_dir: Path) -> Path:
    """The answers a stop left with the manager, moved where a version before that left them: a file in
    the data directory, where a client picked up in step was a bare sequence number."""
    [(name, _)] = rings_in(manager)
    [(index, fd)] = [(index, fd) for index, (stored, fd) in enumerate(manager.store) if stored == name + ANSWERS]
    owed = json.loads(os.pread(fd, 1 << 20, 0))
    assert [entry[5][1] for entry in owed] == ["message"]
    for entry in owed:
        entry[5] = entry[5][0]
    os.close(fd)
    del manager.store[index]
    data_dir.mkdir(exist_ok=True)
    path = data_dir / f"{name}.answers.json"
    path.write_text(json.dumps(owed))
    return path


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_an_upload_whose_body_past_the_stop_looks_like_requests_bills_none_of_them(gateway, manager, tmp_path: Path,
                                                                                   framing: str) -> None:
    """The stopping run knows where the upload's body goes on (its length, or where its chunk's data ends)
    and hands it over: the next run, which joins the connection inside the body, reads the client in step
    from there instead of searching the body."""
    first = start(manager, gateway, tmp_path / "first.jsonl")
    forged = b"".join(request("GET", f"/forged/{number}", ALICE) for number in range(20))  # alice's key
    if framing == "chunked":
        head = request("POST", "/uploads/timed", BOB).replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        data = b"0123456789" + forged
        before, after = head + b"%x\r\n" % len(data) + data[:10], forged + b"\r\n0\r\n\r\n"
    else:
        upload = request("POST", "/uploads/timed", BOB, body=b"0123456789" + forged)
        before, after = upload[:-len(forged)], forged
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as connection:
        # the head and 10 bytes of body before the stop; past the boundary, the body's rest, beginning with a
        # request line
        across_the_stop(manager, first, connection, before, after, answers=1)
        second = restart_and_send_the_last(manager, gateway, connection, tmp_path, "/after-the-upload", BOB)
    entries = gateway.access_log_entries(expect=2)
    stop(manager, second)
    assert metered_rows(first.events() + second.events()) == billed_rows(entries)
    assert [event["data"]["request_uri"] for event in second.events()] == ["/after-the-upload"]


def test_a_request_whose_head_straddles_the_stop_is_billed_once_with_its_answer(gateway, manager,
                                                                                 tmp_path: Path) -> None:
    first = start(manager, gateway, tmp_path / "first.jsonl")
    head = request("GET", "/split-head", ALICE)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as connection:
        connection.sendall(request("GET", "/before-the-stop", BOB))
        read_responses(connection, 1)
        # the head's first segment comes before the stop, its rest after
        across_the_stop(manager, first, connection, head[:25], head[25:], answers=1)
        second = restart_and_send_the_last(manager, gateway, connection, tmp_path)
    entries = gateway.access_log_entries(expect=3)
    stop(manager, second)
    assert metered_rows(first.events() + second.events()) == billed_rows(entries)
    by_run = [[event["data"]["request_uri"] for event in run.events()] for run in (first, second)]
    assert by_run == [["/before-the-stop", "/split-head"], ["/after-the-restart"]]
    # the split head's answer is in the blocks the second run read again: owed to the first, not taken
    assert second.summary()["unmatched_responses"] == 0


class SlowUpstream(http.server.BaseHTTPRequestHandler):
    """An upstream that answers `/slow/<ms>/...` after that many milliseconds."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        time.sleep(int(self.path.split("/")[2]) / 1000)
        body = b"slow answer " * 100
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("data_dir", ["writable", "read-only"])
def test_a_request_pipelined_behind_one_in_flight_at_the_stop_gets_its_own_answer(manager, tmp_path: Path,
                                                                                  data_dir: str) -> None:
    """The answers owed are kept by the service manager, in memory: a data directory that cannot be written
    (a full or read-only disk) does not lose them."""
    if data_dir == "read-only":
        (tmp_path / "state").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(tmp_path / "state")], check=True)
    try:
        pipelined_behind_a_slow_one(manager, tmp_path)
    finally:
        if data_dir == "read-only":
            subprocess.run(["umount", str(tmp_path / "state")], check=True)


def pipelined_behind_a_slow_one(manager: ServiceManagerDouble, tmp_path: Path) -> None:
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowUpstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    with KongStandin(port=free_loopback_port(), other_upstreams={"/slow/": upstream.server_address[1]}) as gateway:
        first = start(manager, gateway, tmp_path / "first.jsonl")
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as connection:
            # a request answered a second later; past the boundary, before its answer, one pipelined behind it:
            # the next run's, which sees the slow answer first
            slow, behind = request("GET", "/slow/1000/in-flight", BOB), request("GET", "/pipelined-behind", ALICE)
            across_the_stop(manager, first, connection, slow, behind, answers=2)
            second = restart_and_send_the_last(manager, gateway, connection, tmp_path)
        entries = gateway.access_log_entries(expect=3)
        stop(manager, second)
    upstream.shutdown()
    assert metered_rows(first.events() + second.events()) == billed_rows(entries)
    by_run = [[event["data"]["request_uri"] for event in run.events()] for run in (first, second)]
    assert by_run == [["/slow/1000/in-flight"], ["/pipelined-behind", "/after-the-restart"]]
    assert first.summary()["after_stop"] == 1 and second.summary()["unmatched_responses"] == 0


def across_the_stop(manager: ServiceManagerDouble, agent: LiveAgent, connection: socket.socket, before: bytes,
                    after: bytes, answers: int) -> None:
    """`before` is sent while the agent runs; then the stop comes, and `after` is sent while the stopping
    agent finishes what is in flight (well within its 2 s); the `answers` are read and the stop awaited."""
    connection.sendall(before)
    time.sleep(0.2)
    stopping = threading.Thread(target=stop, args=(manager, agent))
    stopping.start()
    time.sleep(0.5)
    connection.sendall(after)
    read_responses(connection, answers)
    stopping.join(30)


def restart_and_send_the_last(manager: ServiceManagerDouble, gateway: KongStandin, connection: socket.socket,
                              tmp_path: Path, target: str = "/after-the-restart", key: str = ALICE) -> LiveAgent:
    """The next run starts; the connection's last request (it asks to close) is sent and answered."""
    second = start(manager, gateway, tmp_path / "second.jsonl")
    connection.sendall(request("GET", target, key, close=True))
    read_responses(connection, 1)
    return second


def read_responses(connection: socket.socket, count: int) -> None:
    """Until `count` responses (each with a Content-Length) are in."""
    data = b""
    while True:
        complete = 0
        rest = data
        while b"\r\n\r\n" in rest:
            head, rest = rest.split(b"\r\n\r\n", 1)
            length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), b"0"))
            if len(rest) < length:
                break
            rest = rest[length:]
            complete += 1
        if complete >= count:
            return
        chunk = connection.recv(65536)
        assert chunk, f"the connection closed after {complete} of {count} responses"
        data += chunk


def test_a_ring_too_small_for_the_restart_counts_what_the_kernel_dropped(gateway, manager, tmp_path: Path) -> None:
    first = start(manager, gateway, tmp_path / "first.jsonl", "--ring-mb", "4")
    stop(manager, first)
    upload = tmp_path / "upload.bin"
    upload.write_bytes(os.urandom(48 << 20))  # twelve times what the ring holds, while no agent runs
    curl("-H", f"apikey: {ALICE}", "--data-binary", f"@{upload}", f"{gateway.base_url}/uploads")
    second = start(manager, gateway, tmp_path / "second.jsonl", "--ring-mb", "4")
    stop(manager, second)
    assert "the kernel dropped" in second.stderr and "while no agent ran" in second.stderr
    assert second.summary()["kernel_drops"] > 0


def test_rings_of_another_shape_are_not_taken_over_and_leave_the_store(gateway, manager, tmp_path: Path) -> None:
    first = start(manager, gateway, tmp_path / "first.jsonl", "--ring-mb", "8")
    [(old_name, _)] = rings_in(manager)
    stop(manager, first)
    second = start(manager, gateway, tmp_path / "second.jsonl", "--ring-mb", "16")
    curl("-H", f"apikey: {BOB}", f"{gateway.base_url}/after-the-change")
    entries = gateway.access_log_entries(expect=1)
    stop(manager, second)
    assert "have another shape" in second.stderr and "took over" not in second.stderr
    assert {"FDSTOREREMOVE": "1", "FDNAME": old_name} in manager.messages
    assert {"FDSTOREREMOVE": "1", "FDNAME": old_name + ANSWERS} in manager.messages
    assert [name for name, _ in rings_in(manager)] != [old_name] and len(rings_in(manager)) == 1
    assert metered_rows(second.events()) == billed_rows(entries)



def test_a_kept_descriptor_that_is_not_a_ring_is_said_replaced_and_capture_goes_on(gateway, manager,
                                                                                    tmp_path: Path) -> None:
    first = start(manager, gateway, tmp_path / "first.jsonl")
    stop(manager, first)
    [(name, ring)] = rings_in(manager)
    os.close(ring)
    not_a_ring = socket.socket(socket.AF_INET, socket.SOCK_DGRAM).detach()
    manager.store = [(name, not_a_ring) if stored == name else (stored, fd) for stored, fd in manager.store]
    second = start(manager, gateway, tmp_path / "second.jsonl")
    curl("-H", f"apikey: {BOB}", f"{gateway.base_url}/after-a-bad-descriptor")
    entries = gateway.access_log_entries(expect=1)
    stop(manager, second)
    assert "cannot take over the rings kept from the previous run (not a packet socket" in second.stderr
    assert {"FDSTOREREMOVE": "1", "FDNAME": name} in manager.messages
    [(stored_name, stored)] = rings_in(manager)
    with socket.socket(fileno=os.dup(stored)) as kept:
        assert (stored_name, kept.family) == (name, socket.AF_PACKET)
    assert metered_rows(second.events()) == billed_rows(entries)


def test_kept_answers_that_are_not_a_file_are_said_and_replaced(gateway, manager, tmp_path: Path) -> None:
    first = start(manager, gateway, tmp_path / "first.jsonl")
    stop(manager, first)
    [(name, _)] = rings_in(manager)
    not_a_file = socket.socket(socket.AF_INET, socket.SOCK_DGRAM).detach()
    for index, (stored, fd) in enumerate(manager.store):
        if stored == name + ANSWERS:
            os.close(fd)
            manager.store[index] = (stored, not_a_file)
    second = start(manager, gateway, tmp_path / "second.jsonl")
    curl("-H", f"apikey: {BOB}", f"{gateway.base_url}/after-bad-answers")
    entries = gateway.access_log_entries(expect=1)
    stop(manager, second)
    assert "took over 1 ring(s)" in second.stderr
    assert "the answers kept beside the previous run's ring are not a file; ignored" in second.stderr
    assert {"FDSTOREREMOVE": "1", "FDNAME": name + ANSWERS} in manager.messages
    [answers] = [fd for stored, fd in manager.store if stored == name + ANSWERS]
    assert stat.S_ISREG(os.fstat(answers).st_mode)
    assert metered_rows(second.events()) == billed_rows(entries)


def test_a_restart_the_ring_did_not_outlive_says_how_long_nothing_was_captured(gateway, manager, tmp_path: Path) -> None:
    data = ("--data-dir", str(tmp_path / "state"))  # the record is kept with the sink's state
    plain = LiveAgent(None, gateway.port, *data)  # no service manager: its ring closes with it
    plain.wait_for("capturing on lo")
    plain.stop(signal.SIGTERM)
    time.sleep(1.0)
    fresh = LiveAgent(None, gateway.port, *data, launch=manager.start)
    fresh.wait_for("capturing on lo")
    stop(manager, fresh)
    kept = LiveAgent(None, gateway.port, *data, launch=manager.start)  # takes the ring over: nothing to say
    kept.wait_for("capturing on lo")
    kept.process.kill()  # and leaves no record of its stop
    kept.process.wait(10)
    after_a_kill = LiveAgent(None, gateway.port, *data)
    after_a_kill.wait_for("capturing on lo")
    after_a_kill.stop(signal.SIGTERM)

    said = [line for line in fresh.lines if "nothing was captured for" in line]
    assert len(said) == 1 and 1.0 <= float(said[0].split("nothing was captured for ")[1].split()[0]) < 10
    assert "took over 1 ring(s)" in kept.stderr and "nothing was captured" not in kept.stderr
    assert f"the previous run (pid {kept.process.pid}) did not record its stop" in after_a_kill.stderr
    assert "nothing was captured for" not in after_a_kill.stderr


def test_a_restart_that_kept_the_ring_says_how_long_no_https_was_captured(manager, tmp_path: Path) -> None:
    """The ring holds plain HTTP only; the TLS probes are attached anew at each start, so the HTTPS the
    gateway served meanwhile is not billed: said, with how long, never silent."""
    with KongStandin(port=free_loopback_port(), tls_port=free_loopback_port()) as tls_gateway:
        options = ("--data-dir", str(tmp_path / "state"), "--tls-port", str(tls_gateway.tls_port))
        agents = []
        for _ in range(2):
            agents.append(LiveAgent(None, tls_gateway.port, *options, launch=manager.start))
            agents[-1].wait_for("metering HTTPS on port")
            manager.wait_for("READY")
            stop(manager, agents[-1])
            time.sleep(1.0)
    second = agents[1]
    assert "took over 1 ring(s) from the previous run" in second.stderr
    said = [line for line in second.lines if "no HTTPS (--tls-port) was captured for" in line]
    assert len(said) == 1, second.stderr
    assert 1.0 <= float(said[0].split("was captured for ")[1].split()[0]) < 10
    assert "nothing was captured" not in second.stderr
