"""The table itself: digests only, expiry, refusing a key shared by two consumers, change summaries."""

import pytest

from agent.credentials.errors import CredentialError
from agent.credentials.key_auth import KeyAuthConfig, from_plugin_config, merge
from agent.credentials.sync import describe_change
from agent.credentials.table import Consumer, CredentialTable, TableBuilder, key_digest
from tests.doubles.kong_admin import FakeClock

ALICE = Consumer("id-alice", "alice", "cust-alice")
BOB = Consumer("id-bob", "bob")
MACHINE = Consumer("id-m42", None, "machine-42")


def test_subject_fields_and_fallback_to_id():
    assert ALICE.subject("username") == "alice"
    assert ALICE.subject("id") == "id-alice"
    assert ALICE.subject("custom_id") == "cust-alice"
    assert MACHINE.subject("username") == "id-m42"
    assert BOB.subject("custom_id") is None


def test_table_holds_digests_not_keys():
    table = CredentialTable.from_keys([("alice-secret-key", ALICE)])
    assert table.lookup("alice-secret-key") == ALICE
    assert table.lookup("alice-secret-kez") is None
    assert table.digests() == {key_digest("alice-secret-key")}
    assert "alice-secret-key" not in repr(vars(table))


def test_key_with_expiry_stops_mapping_when_it_runs_out():
    clock = FakeClock()
    builder = TableBuilder(clock)
    builder.add("short-lived", ALICE, expires_at=clock() + 60)
    builder.add("forever", BOB)
    table = builder.build()
    clock.advance(59.9)
    assert table.lookup("short-lived") == ALICE
    clock.advance(0.1)
    assert table.lookup("short-lived") is None
    assert table.lookup("forever") == BOB


def test_entries_give_digest_subject_consumer_and_expiry_of_every_key():
    clock = FakeClock()
    builder = TableBuilder(clock)
    builder.add("alice-key", ALICE, expires_at=clock() + 60)
    builder.add("bob-key", BOB)
    builder.add("machine-key", MACHINE)
    table = builder.build()
    # bob has no custom_id: no subject under it, but still known by id (for plugins scoped to him)
    assert sorted(table.entries("custom_id"), key=str) == sorted([
        (key_digest("alice-key"), "cust-alice", ALICE.id, clock() + 60),
        (key_digest("bob-key"), None, BOB.id, None),
        (key_digest("machine-key"), "machine-42", MACHINE.id, None)], key=str)
    assert sorted(table.entries("username"), key=str) == sorted([
        (key_digest("alice-key"), "alice", ALICE.id, clock() + 60),
        (key_digest("bob-key"), "bob", BOB.id, None),
        (key_digest("machine-key"), "id-m42", MACHINE.id, None)], key=str)
    assert all(len(digest) == 32 for digest, *_ in table.entries("id"))


def test_a_key_given_to_two_consumers_is_refused_without_naming_it():
    builder = TableBuilder()
    builder.add("shared-key-123", ALICE)
    builder.add("shared-key-123", ALICE)  # listed twice for the same consumer: harmless
    with pytest.raises(CredentialError) as caught:
        builder.add("shared-key-123", BOB)
    assert "alice" in str(caught.value) and "bob" in str(caught.value)
    assert "shared-key-123" not in str(caught.value)


def test_change_summary_counts_without_keys():
    old = CredentialTable.from_keys([("k-alice", ALICE), ("k-bob", BOB)])
    new = CredentialTable.from_keys([("k-alice-2", ALICE), ("k-bob", Consumer("id-bob", "robert"))])
    summary = describe_change(old, new)
    assert summary == ("table changed: 2 consumers (+0 -0), 2 keys (+1 -1, "
                       "1 now mapping to another or renamed consumer)")
    assert describe_change(new, CredentialTable.from_keys([("k-alice-2", ALICE),
                                                           ("k-bob", Consumer("id-bob", "robert"))])) is None
    assert describe_change(None, old) == "loaded 2 consumers with 2 keys"


def test_key_auth_config_defaults_checks_and_union():
    assert from_plugin_config({}, "p") == KeyAuthConfig()
    assert from_plugin_config({"key_names": ["x-api-key"], "key_in_query": False, "key_in_body": None},
                              "p") == KeyAuthConfig(("x-api-key",), True, False, False)
    with pytest.raises(CredentialError, match="plugins\\[2\\]: config.key_names"):
        from_plugin_config({"key_names": "apikey"}, "plugins[2]")
    with pytest.raises(CredentialError, match="config.key_in_header is not true or false"):
        from_plugin_config({"key_in_header": "yes"}, "p")
    merged = merge([KeyAuthConfig(("apikey",), True, False), KeyAuthConfig(("x-key", "apikey"), False, True)])
    assert merged == KeyAuthConfig(("apikey", "x-key"), True, True, False)
    assert merge([]) is None
