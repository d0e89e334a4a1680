"""Reading Kong's Admin API (through the contract-following double): pages, workspaces, RBAC token, ttl,
and every failure turned into one line that names no key and no token."""

import logging
import socket
import threading
import time

import pytest

from agent.credentials.admin_api import AdminApiSource, split_admin_url
from agent.credentials.errors import CredentialError
from agent.credentials.key_auth import KeyAuthConfig
from tests.doubles.kong_admin import FakeClock, KongAdminDouble

TOKEN = "rbac-token-d41d8cd98f"


@pytest.fixture
def kong():
    with KongAdminDouble() as double:
        yield double


def test_thousands_of_consumers_over_several_pages(kong):
    for n in range(3500):
        kong.add_consumer(username=f"user-{n}", custom_id=f"cust-{n}")
        kong.add_key(f"user-{n}", f"key-{n}")
    snapshot = AdminApiSource(kong.url).load()
    assert len(snapshot.table) == 3500
    assert all(snapshot.table.lookup(f"key-{n}").username == f"user-{n}" for n in (0, 999, 1000, 2001, 3499))
    key_auth_pages = [r for r in kong.requests if r.path == "/key-auths"]
    assert len(key_auth_pages) == 4 and all(r.query["size"] == "1000" for r in key_auth_pages)
    assert "offset" not in key_auth_pages[0].query and all("offset" in r.query for r in key_auth_pages[1:])


def test_workspace_prefix_reads_only_that_workspace(kong):
    kong.add_consumer(username="default-user")
    kong.add_key("default-user", "default-key")
    kong.add_consumer(username="team-user", workspace="team-a")
    kong.add_key("team-user", "team-key", workspace="team-a")
    snapshot = AdminApiSource(kong.url + "/team-a/").load()
    assert snapshot.table.lookup("team-key").username == "team-user"
    assert snapshot.table.lookup("default-key") is None
    assert {r.path for r in kong.requests} == {"/team-a/consumers", "/team-a/key-auths", "/team-a/plugins",
                                               "/team-a/services", "/team-a/routes"}


def test_key_auth_settings_are_read_from_plugins(kong):
    kong.add_plugin("key-auth", {"key_names": ["x-api-key"], "key_in_header": True, "key_in_query": False,
                                 "key_in_body": False, "hide_credentials": True, "anonymous": None})
    kong.add_plugin("key-auth", {"key_names": ["apikey"], "key_in_header": True, "key_in_query": True,
                                 "key_in_body": False}, enabled=False)
    kong.add_plugin("cors", {"origins": ["*"]})
    assert AdminApiSource(kong.url).load().key_auth == KeyAuthConfig(("x-api-key",), True, False, False)


def test_malformed_key_auth_settings_fail_the_read(kong):
    kong.add_plugin("key-auth", {"key_names": "apikey"})
    with pytest.raises(CredentialError, match=r"malformed page from GET /plugins page 1: data\[0\]: "
                                              r"config.key_names is not a list of names$"):
        AdminApiSource(kong.url).load()


def test_no_key_auth_plugin_means_no_settings(kong):
    assert AdminApiSource(kong.url).load().key_auth is None


def test_token_from_environment_is_sent_and_required(kong):
    kong.token = TOKEN
    kong.add_consumer(username="alice")
    kong.add_key("alice", "alice-key")
    snapshot = AdminApiSource(kong.url, environ={"KONG_ADMIN_TOKEN": TOKEN}).load()
    assert snapshot.table.lookup("alice-key").username == "alice"
    assert all(r.headers.get("kong-admin-token") == TOKEN for r in kong.requests)
    with pytest.raises(CredentialError) as missing:
        AdminApiSource(kong.url, environ={}).load()
    assert str(missing.value).endswith(
        "GET /consumers page 1 answered HTTP 401 (RBAC needs a token: set KONG_ADMIN_TOKEN or --admin-token-file)")
    with pytest.raises(CredentialError, match=r"answered HTTP 401 \(the admin token was refused\)$"):
        AdminApiSource(kong.url, environ={"KONG_ADMIN_TOKEN": "wrong-token"}).load()


def test_token_file_wins_over_environment_and_is_reread(kong, tmp_path):
    kong.token = TOKEN
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")
    source = AdminApiSource(kong.url, token_file=token_file, environ={"KONG_ADMIN_TOKEN": "stale"})
    source.load()
    assert kong.requests[-1].headers["kong-admin-token"] == TOKEN
    kong.token = "rotated-token"
    token_file.write_text("rotated-token")
    source.load()
    assert kong.requests[-1].headers["kong-admin-token"] == "rotated-token"
    token_file.unlink()
    with pytest.raises(CredentialError, match=r"admin token file .*admin-token: cannot read \(No such file"):
        source.load()


def test_token_is_never_logged_nor_in_errors(kong, caplog):
    caplog.set_level(logging.DEBUG)
    kong.token = TOKEN
    kong.add_consumer(username="alice")
    kong.add_key("alice", "alice-key")
    source = AdminApiSource(kong.url, environ={"KONG_ADMIN_TOKEN": TOKEN})
    source.load()
    kong.fail_next(1)
    with pytest.raises(CredentialError) as failed:
        source.load()
    kong.token = "another"
    with pytest.raises(CredentialError) as refused:
        source.load()
    assert kong.requests[-1].headers["kong-admin-token"] == TOKEN  # it was sent...
    written = caplog.text + str(failed.value) + str(refused.value)
    assert caplog.records and TOKEN not in written and "alice-key" not in written  # ...and never written


def test_token_that_cannot_be_a_header_is_refused_without_quoting_it(kong):
    with pytest.raises(CredentialError) as caught:
        AdminApiSource(kong.url, environ={"KONG_ADMIN_TOKEN": "tok\x00en-secret"}).load()
    assert "secret" not in str(caught.value)


def test_ttl_key_stops_mapping_when_it_expires():
    clock = FakeClock()
    with KongAdminDouble(clock=clock) as kong:
        kong.add_consumer(username="temp")
        kong.add_key("temp", "temp-key", ttl=30)
        kong.add_key("temp", "lasting-key")
        snapshot = AdminApiSource(kong.url, clock=clock).load()
    assert snapshot.table.lookup("temp-key").username == "temp"
    clock.advance(29.5)
    assert snapshot.table.lookup("temp-key").username == "temp"
    clock.advance(0.5)
    assert snapshot.table.lookup("temp-key") is None
    assert snapshot.table.lookup("lasting-key").username == "temp"


@pytest.mark.parametrize("ttl", ["abc", -5, True, 1.5])
def test_a_ttl_that_is_not_whole_seconds_fails_the_read(kong, ttl):
    """Kong lists `ttl` as the whole seconds left; anything else must not become a key that never expires."""
    kong.add_consumer(username="temp")
    kong.add_key("temp", "temp-key")["ttl"] = ttl  # as a server off the contract would list it
    with pytest.raises(CredentialError, match=r"malformed page from GET /key-auths page 1: "
                                              r"data\[0\]\.ttl is not a non-negative integer$"):
        AdminApiSource(kong.url).load()


def test_key_of_a_consumer_made_between_the_two_lists_waits_for_the_next_read(kong):
    kong.add_consumer(username="alice")
    kong.add_key("alice", "alice-key")

    def consumer_made_after_consumers_were_listed(request):
        if request.path == "/key-auths" and kong.before_answer is not None:
            kong.before_answer = None
            kong.add_consumer(username="late")
            kong.add_key("late", "late-key")

    kong.before_answer = consumer_made_after_consumers_were_listed
    source = AdminApiSource(kong.url)
    snapshot = source.load()
    assert snapshot.table.lookup("late-key") is None and snapshot.skipped == 1
    assert snapshot.table.lookup("alice-key").username == "alice"
    again = source.load()
    assert again.table.lookup("late-key").username == "late" and again.skipped == 0


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_errors(kong, status):
    kong.fail_next(1, status)
    with pytest.raises(CredentialError, match=f"GET /consumers page 1 answered HTTP {status}$"):
        AdminApiSource(kong.url).load()


def test_malformed_page_on_a_later_page(kong):
    for n in range(1500):
        kong.add_consumer(username=f"u{n}")
    kong.before_answer = lambda request: kong.malform_next(1) if "offset" in request.query else None
    with pytest.raises(CredentialError, match="malformed page from GET /consumers page 2: not JSON$"):
        AdminApiSource(kong.url).load()


def test_refused_connection_and_timeout(kong):
    url = kong.url
    kong.stall_next(1, 5.0)
    with pytest.raises(CredentialError, match="GET /consumers page 1 timed out$"):
        AdminApiSource(url, timeout=0.2).load()
    kong.stop()
    with pytest.raises(CredentialError, match=r"GET /consumers page 1 failed \(.*refused"):
        AdminApiSource(url).load()


def test_unknown_workspace(kong):
    with pytest.raises(CredentialError, match=r"answered HTTP 404 \(is team-b a workspace\?\)$"):
        AdminApiSource(kong.url + "/team-b").load()


def test_plugins_forbidden_only_loses_key_auth_settings(kong, caplog):
    kong.add_consumer(username="alice")
    kong.add_key("alice", "alice-key")
    kong.before_answer = lambda request: kong.fail_next(1, 403) if request.path == "/plugins" else None
    source = AdminApiSource(kong.url)
    for _ in range(2):
        snapshot = source.load()
        assert snapshot.table.lookup("alice-key").username == "alice" and snapshot.key_auth is None
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


@pytest.mark.parametrize("url, message", [
    ("ftp://kong:8001", "is not an http:// or https:// Admin API URL"),
    ("ftp://admin:hunter2@kong:8001", "'ftp://\\*\\*\\*@kong:8001' is not an http:// or https:// Admin API URL"),
    ("http://admin:pw@kong:8001", "credentials in the Admin API URL are not accepted"),
    ("http://kong:8001/?x=1", "takes no query or fragment"),
    ("http://[::1", "is not a valid Admin API URL"),
    ("http://kong:abc", "is not a valid Admin API URL"),
])
def test_bad_admin_urls(url, message):
    with pytest.raises(CredentialError, match=message.replace("?", r"\?")) as raised:
        split_admin_url(url)
    assert "hunter2" not in str(raised.value)


def test_a_server_that_sends_slowly_or_without_end_cannot_hold_a_load_past_its_deadline():
    listener = socket.create_server(("127.0.0.1", 0))

    def drip() -> None:  # an endless chunked body, a byte at a time
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n")
            try:
                while True:
                    connection.sendall(b"1\r\n \r\n")
                    time.sleep(0.05)
            except OSError:
                return

    threading.Thread(target=drip, daemon=True).start()
    source = AdminApiSource(f"http://127.0.0.1:{listener.getsockname()[1]}", environ={}, max_load_seconds=1.0)
    started = time.monotonic()
    with pytest.raises(CredentialError, match="took too long"):
        source.load()
    assert time.monotonic() - started < 5
    listener.close()


def test_admin_url_split():
    assert split_admin_url("https://kong.internal:8444/team-a/") == ("https://kong.internal:8444", "/team-a")
    assert split_admin_url("http://127.0.0.1:8001") == ("http://127.0.0.1:8001", "")
