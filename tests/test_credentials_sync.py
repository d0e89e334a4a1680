"""The table follows the gateway while the agent runs: rotation, deletion, outages at start and during a
refresh, a decK file edited in place; outages are reported once, changes as counts, keys never."""

import logging
import os
import time

import pytest

from agent.credentials.admin_api import AdminApiSource
from agent.credentials.deck import DeckFileSource
from agent.credentials.errors import CredentialError
from agent.credentials.sync import CredentialSync
from tests.doubles.kong_admin import KongAdminDouble

REFRESH = 0.2


def wait_until(predicate, timeout: float = 10.0) -> None:
    """Poll; the deadline only keeps a broken test from hanging."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def records(caplog, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("agent.credentials") and r.levelno == level]


def changes_logged(caplog) -> list[str]:
    """The table-change lines, once one is there: the new table is in use a moment before it is logged."""
    def changes() -> list[str]:
        return [m.split(" from ")[0].removeprefix("credentials: ") for m in records(caplog, logging.INFO)
                if "table changed" in m]
    wait_until(lambda: bool(changes()))
    return changes()


def failed_tries(caplog) -> int:
    return 1 + sum(m.startswith("credentials: try ") for m in records(caplog, logging.DEBUG)) \
        if records(caplog, logging.WARNING) else 0


@pytest.fixture
def kong():
    with KongAdminDouble() as double:
        double.add_consumer(username="alice", custom_id="cust-alice")
        double.add_key("alice", "alice-old-key")
        double.add_consumer(username="bob")
        double.add_key("bob", "bob-key-1")
        double.add_key("bob", "bob-key-2")
        yield double


@pytest.fixture
def running():
    started = []

    def start(source, **kwargs) -> CredentialSync:
        sync = CredentialSync(source, **{"refresh_seconds": REFRESH, **kwargs})
        started.append(sync)
        sync.start()
        return sync

    yield start
    for sync in started:
        assert sync.stop()


def test_rotated_key_maps_within_one_refresh(kong, running, caplog):
    caplog.set_level(logging.INFO)
    sync = running(AdminApiSource(kong.url), refresh_seconds=1.0)  # a slow test thread still sees one read
    assert sync.wait_ready(10)
    assert sync.lookup("alice-old-key").username == "alice"
    kong.rotate_key("alice", "alice-old-key", "alice-new-key")
    rotated_at = len(kong.requests)
    wait_until(lambda: sync.lookup("alice-new-key") is not None)
    key_reads_since_rotation = sum(r.path == "/key-auths" for r in kong.requests[rotated_at:])
    assert key_reads_since_rotation <= 1  # the first read of the keys after the rotation already has it
    assert sync.lookup("alice-new-key").username == "alice" and sync.lookup("alice-old-key") is None
    assert changes_logged(caplog) == [
        "table changed: 2 consumers (+0 -0), 3 keys (+1 -1, 0 now mapping to another or renamed consumer)"]


def test_deleted_consumer_stops_mapping(kong, running, caplog):
    caplog.set_level(logging.INFO)
    sync = running(AdminApiSource(kong.url))
    assert sync.wait_ready(10)
    kong.delete_consumer("bob")
    wait_until(lambda: sync.lookup("bob-key-1") is None)
    assert sync.lookup("bob-key-2") is None
    assert sync.lookup("alice-old-key").username == "alice"
    [change] = changes_logged(caplog)
    assert "1 consumers (+0 -1), 1 keys (+0 -2" in change


def test_admin_api_down_at_start(running, caplog):
    caplog.set_level(logging.DEBUG)
    kong = KongAdminDouble().start()
    kong.stop()  # known port, nobody listening
    kong.add_consumer(username="alice")
    kong.add_key("alice", "alice-key")
    sync = running(AdminApiSource(kong.url))
    wait_until(lambda: failed_tries(caplog) >= 3)
    assert not sync.ready and sync.table is None and sync.lookup("alice-key") is None
    assert not sync.wait_ready(0.01)
    kong.start()
    try:
        assert sync.wait_ready(10)
        assert sync.lookup("alice-key").username == "alice"
    finally:
        kong.stop()
    warnings = records(caplog, logging.WARNING)
    assert len(warnings) == 1 and "failed (" in warnings[0] and "no table yet; retrying with backoff" in warnings[0]
    assert any("read again after" in m for m in records(caplog, logging.INFO))


def test_admin_api_down_during_refresh_keeps_the_last_table(kong, running, caplog):
    caplog.set_level(logging.DEBUG)
    sync = running(AdminApiSource(kong.url))
    assert sync.wait_ready(10)
    kong.stop()
    wait_until(lambda: failed_tries(caplog) >= 4)
    assert sync.ready and sync.lookup("alice-old-key").username == "alice"
    kong.rotate_key("alice", "alice-old-key", "alice-new-key")  # changed while the agent could not see
    kong.start()
    wait_until(lambda: sync.lookup("alice-new-key") is not None)
    assert sync.lookup("alice-old-key") is None
    warnings = records(caplog, logging.WARNING)
    assert len(warnings) == 1 and "keeping the last good table (3 keys)" in warnings[0]
    recovered = [m for m in records(caplog, logging.INFO) if "read again after" in m]
    assert len(recovered) == 1 and f"after {failed_tries(caplog)} failed tries" in recovered[0]


@pytest.mark.parametrize("arm, reason", [
    (lambda kong: kong.fail_next(4, 503), "answered HTTP 503"),
    (lambda kong: kong.malform_next(4), "malformed page from GET /consumers page 1: not JSON"),
], ids=["503", "malformed"])
def test_failing_refresh_is_retried_and_reported_once(kong, running, caplog, arm, reason):
    caplog.set_level(logging.INFO)
    sync = running(AdminApiSource(kong.url))
    assert sync.wait_ready(10)
    arm(kong)
    wait_until(lambda: any("read again" in m for m in records(caplog, logging.INFO)))
    warnings = records(caplog, logging.WARNING)
    assert len(warnings) == 1 and reason in warnings[0]
    assert "after 4 failed tries" in records(caplog, logging.INFO)[-1]
    assert sync.lookup("bob-key-1").username == "bob"


def test_token_revoked_during_refresh(kong, running, caplog):
    caplog.set_level(logging.DEBUG)
    kong.token = "token-1"
    sync = running(AdminApiSource(kong.url, environ={"KONG_ADMIN_TOKEN": "token-1"}))
    assert sync.wait_ready(10)
    kong.token = "token-2"
    wait_until(lambda: failed_tries(caplog) >= 2)
    kong.token = "token-1"
    wait_until(lambda: any("read again" in m for m in records(caplog, logging.INFO)))
    warnings = records(caplog, logging.WARNING)
    assert len(warnings) == 1 and "answered HTTP 401 (the admin token was refused)" in warnings[0]


DECK = '_format_version: "3.0"\nconsumers:\n- username: alice\n  id: 8d8a7f1e-2f6b-4c0a-9a51-0f3c1d2e4a01\n' \
       '  keyauth_credentials:\n  - key: {key}\n'


def test_deck_file_edited_while_running(tmp_path, running, caplog):
    caplog.set_level(logging.INFO)
    path = tmp_path / "kong.yaml"
    path.write_text(DECK.format(key="deck-key-1"))
    # A refresh far away: only the file watch can notice the edits.
    sync = running(DeckFileSource(path), refresh_seconds=3600, poll_seconds=0.02)
    assert sync.wait_ready(10)
    assert sync.lookup("deck-key-1").username == "alice"

    path.write_text(DECK.format(key="deck-key-rotated-2"))
    wait_until(lambda: sync.lookup("deck-key-rotated-2") is not None)
    assert sync.lookup("deck-key-1") is None

    path.write_text(DECK.format(key="deck-key-3: broken"))  # an edit that does not parse
    wait_until(lambda: records(caplog, logging.WARNING))
    assert sync.lookup("deck-key-rotated-2").username == "alice"

    replacement = tmp_path / "kong.yaml.new"  # editors and config tools write aside, then rename
    replacement.write_text(DECK.format(key="deck-key-4"))
    os.replace(replacement, path)
    wait_until(lambda: sync.lookup("deck-key-4") is not None)
    assert sync.lookup("deck-key-rotated-2") is None
    warnings = records(caplog, logging.WARNING)
    assert len(warnings) == 1 and "not valid YAML" in warnings[0] and "deck-key" not in warnings[0]


def test_deck_file_missing_at_start_is_loaded_when_it_appears(tmp_path, running, caplog):
    caplog.set_level(logging.INFO)
    path = tmp_path / "kong.yaml"
    sync = running(DeckFileSource(path), refresh_seconds=3600, poll_seconds=0.02)
    wait_until(lambda: records(caplog, logging.WARNING))
    assert not sync.ready
    path.write_text(DECK.format(key="late-key"))
    assert sync.wait_ready(10)
    assert sync.lookup("late-key").username == "alice"
    assert "kong.yaml: no such file; no table yet" in records(caplog, logging.WARNING)[0]


def test_load_once_for_replay(tmp_path):
    path = tmp_path / "kong.yaml"
    with pytest.raises(CredentialError, match="kong.yaml: no such file$"):
        CredentialSync(DeckFileSource(path)).load_once()
    path.write_text(DECK.format(key="replay-key"))
    sync = CredentialSync(DeckFileSource(path))
    snapshot = sync.load_once()
    assert sync.ready and sync.table is snapshot.table and sync.key_auth is None
    assert sync.lookup("replay-key") is not None


def test_stop_returns_promptly_while_waiting(kong):
    sync = CredentialSync(AdminApiSource(kong.url), refresh_seconds=3600)
    sync.start()
    assert sync.wait_ready(10)
    assert sync.stop(timeout=5)


def test_nothing_written_contains_a_key_or_the_token(tmp_path, running, caplog):
    """Rotation, outages, 401s, malformed pages and a broken decK file, with every logger at DEBUG writing
    to a file; then grep that file and every error message for the keys and the token."""
    keys = ["grep-alice-k1", "grep-alice-k2", "grep-bob-k1", "grep-deck-k1", "grep-deck-k2"]
    token = "grep-admin-token-77"
    log_file = tmp_path / "agent.log"
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    caplog.set_level(logging.DEBUG)
    errors = []
    try:
        with KongAdminDouble(token=token) as kong:
            kong.add_consumer(username="alice")
            kong.add_key("alice", keys[0], ttl=3600)
            kong.add_consumer(username="bob")
            kong.add_key("bob", keys[2])
            sync = running(AdminApiSource(kong.url, environ={"KONG_ADMIN_TOKEN": token}))
            assert sync.wait_ready(10)
            kong.rotate_key("alice", keys[0], keys[1])
            wait_until(lambda: sync.lookup(keys[1]) is not None)
            kong.fail_next(2)
            kong.malform_next(2)
            wait_until(lambda: sum("read again" in m for m in records(caplog, logging.INFO)) == 1)
            kong.token = "other"
            wait_until(lambda: len(records(caplog, logging.WARNING)) == 2)
            kong.token = token
            wait_until(lambda: sum("read again" in m for m in records(caplog, logging.INFO)) == 2)
            for attempt in (lambda: AdminApiSource(kong.url, environ={}).load(),
                            lambda: AdminApiSource(kong.url, environ={"KONG_ADMIN_TOKEN": token + "x"}).load()):
                with pytest.raises(CredentialError) as caught:
                    attempt()
                errors.append(str(caught.value))
        deck = tmp_path / "kong.yaml"
        deck.write_text(DECK.format(key=keys[3]) + "  - key: " + keys[4] + ": [\n")
        with pytest.raises(CredentialError) as caught:
            CredentialSync(DeckFileSource(deck)).load_once()
        errors.append(str(caught.value))
    finally:
        root.removeHandler(handler)
        handler.close()
    written = log_file.read_text() + "\n".join(errors) + caplog.text
    assert "table changed" in written and "read again" in written and "HTTP 401" in written
    for secret in keys + [token]:
        assert secret not in written
