"""decK state files: the shared fixture, JSON, plugins wherever decK puts them, and clear one-line errors."""

import json
from pathlib import Path

import pytest
import yaml

from agent.credentials.deck import load_deck_file, parse_deck
from agent.credentials.errors import CredentialError
from agent.credentials.key_auth import KeyAuthConfig

FIXTURE = Path(__file__).resolve().parents[1] / "captures" / "kong.yaml"


def test_fixture_file_maps_every_key_to_its_consumer():
    snapshot = load_deck_file(FIXTURE)
    table = snapshot.table
    assert table.lookup("alice-key-7f3a9c").subject("username") == "alice"
    assert table.lookup("bob-key-41d2e8").subject("custom_id") == "cust-bob"
    assert table.lookup("carol-key-old-5b7e") == table.lookup("carol-key-new-9c1f")
    machine = table.lookup("m42-key-e6a0b3")
    assert machine.subject("username") == "0a9b8c7d-6e5f-4a3b-9c2d-1e0f9a8b7c04"  # no username: its id
    assert machine.subject("custom_id") == "machine-42"
    assert table.lookup("not-a-key") is None
    assert table.lookup("alice-key").subject("username") == "alice"  # the quick start's, as Kong's tutorial
    assert len(table) == 6 and len(table.consumers()) == 4
    assert snapshot.key_auth == KeyAuthConfig(("apikey",), True, True, False)


def test_json_state_file(tmp_path):
    path = tmp_path / "kong.json"
    path.write_text(json.dumps({"_format_version": "3.0", "consumers": [
        {"username": "dave", "keyauth_credentials": [{"key": "dave-key"}]}]}))
    snapshot = load_deck_file(path)
    assert snapshot.table.lookup("dave-key").username == "dave"
    assert snapshot.key_auth is None


def test_consumer_without_id_gets_a_stable_derived_id():
    text = '_format_version: "3.0"\nconsumers:\n- username: erin\n  keyauth_credentials: [{key: erin-key}]\n'
    first = parse_deck(text, "a.yaml").table.lookup("erin-key")
    again = parse_deck(text, "a.yaml").table.lookup("erin-key")
    assert first.id == again.id and len(first.id) == 36
    assert first.subject("username") == "erin"


def test_key_auth_settings_from_service_and_route_plugins_are_merged():
    document = {
        "_format_version": "3.0",
        "services": [{"name": "s", "url": "http://x", "plugins": [
            {"name": "key-auth", "config": {"key_names": ["x-api-key"], "key_in_query": False}}],
            "routes": [{"name": "r", "paths": ["/"], "plugins": [
                {"name": "key-auth", "config": {"key_names": ["apikey"], "key_in_header": False}}]}]}],
        "plugins": [{"name": "key-auth", "enabled": False, "config": {"key_names": ["ignored"]}},
                    {"name": "rate-limiting", "config": {"minute": 5}}],
    }
    snapshot = parse_deck(yaml.safe_dump(document), "kong.yaml")
    assert snapshot.key_auth == KeyAuthConfig(("x-api-key", "apikey"), True, True, False)


def test_credential_without_key_is_skipped_and_counted():
    text = ('_format_version: "3.0"\nconsumers:\n- username: fay\n  keyauth_credentials:\n'
            '  - {key: fay-key}\n  - {tags: [generated]}\n')
    snapshot = parse_deck(text, "kong.yaml")
    assert len(snapshot.table) == 1 and snapshot.skipped == 1


@pytest.mark.parametrize("content, expected", [
    ("consumers: []\n", "kong.yaml: not a decK state file (no _format_version)"),
    ("- just\n- a list\n", "kong.yaml: not a decK state file (the top level is not a mapping)"),
    ('_format_version: "3.0"\nconsumers: {username: a}\n', "kong.yaml: consumers is not a list"),
    ('_format_version: "3.0"\nconsumers:\n- custom_id: c\n  keyauth_credentials: [{key: 12345}]\n',
     "kong.yaml: consumers[0].keyauth_credentials[0].key is not a non-empty string"),
    ('_format_version: "3.0"\nconsumers:\n- id: x\n  keyauth_credentials: [{key: k-1}]\n',
     "kong.yaml: consumers[0] has neither username nor custom_id"),
    ('_format_version: "3.0"\nconsumers:\n- username: a\n  keyauth_credentials: [{key: same-key-9}]\n'
     '- username: b\n  keyauth_credentials: [{key: same-key-9}]\n',
     "kong.yaml: one key is given to two consumers (a and b)"),
    ('_format_version: "3.0"\nconsumers:\n- username: alice\n  keyauth_credentials: [{key: key-1}]\n'
     '- username: alice\n  keyauth_credentials: [{key: key-2}]\n',
     "kong.yaml: one username (alice) is given to two consumers (consumers[0] and consumers[1])"),
    ('_format_version: "3.0"\nconsumers:\n- {username: a, custom_id: c-7}\n- {username: b}\n'
     '- {username: c, custom_id: c-7}\n',
     "kong.yaml: one custom_id (c-7) is given to two consumers (consumers[0] and consumers[2])"),
    ('_format_version: "3.0"\nconsumers:\n- {username: a, id: 8d8a7f1e-2f6b-4c0a-9a51-0f3c1d2e4a01}\n'
     '- {username: b, id: 8d8a7f1e-2f6b-4c0a-9a51-0f3c1d2e4a01}\n',
     "kong.yaml: one id (8d8a7f1e-2f6b-4c0a-9a51-0f3c1d2e4a01) is given to two consumers"
     " (consumers[0] and consumers[1])"),
])
def test_wrong_shape_gives_one_clear_line(content, expected):
    with pytest.raises(CredentialError) as caught:
        parse_deck(content, "kong.yaml")
    assert str(caught.value) == expected


TTL_DECK = '_format_version: "3.0"\nconsumers:\n- username: ines\n  keyauth_credentials: [{{key: k-9, ttl: {ttl}}}]\n'


@pytest.mark.parametrize("ttl", ['"abc"', "-5", "true", "1.5"])
def test_a_ttl_that_is_not_whole_seconds_is_refused_as_deck_refuses_it(ttl):
    with pytest.raises(CredentialError) as caught:
        parse_deck(TTL_DECK.format(ttl=ttl), "kong.yaml")
    assert str(caught.value) == "kong.yaml: consumers[0].keyauth_credentials[0].ttl is not a non-negative integer"


@pytest.mark.parametrize("ttl", ["0", "3600", "null"])
def test_a_ttl_of_whole_seconds_is_accepted(ttl):
    assert parse_deck(TTL_DECK.format(ttl=ttl), "kong.yaml").table.lookup("k-9").username == "ines"


def test_syntax_error_message_does_not_quote_the_line(tmp_path):
    path = tmp_path / "kong.yaml"
    text = '_format_version: "3.0"\nconsumers:\n- username: g\n  keyauth_credentials:\n  - key: secret-key: x\n'
    path.write_text(text)
    with pytest.raises(yaml.YAMLError) as raw:  # PyYAML's own message shows the offending line
        yaml.safe_load(text)
    assert "secret-key" in str(raw.value)
    with pytest.raises(CredentialError) as caught:
        load_deck_file(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not valid YAML (mapping values are not allowed")
    assert message.endswith("at line 5, column 20)") and "secret-key" not in message
    assert "secret-key" not in message and "\n" not in message


@pytest.mark.parametrize("name, text, refusal", [
    # PyYAML alone keeps the last `username`, so mallory would be billed for alice's key
    ("kong.yaml", '_format_version: "3.0"\nconsumers:\n- username: alice\n  keyauth_credentials:\n'
                  '  - key: alice-secret-key\n  username: mallory\n',
     "a key is repeated in one mapping at line 6, column 3 (first at line 3); decK refuses such a file"),
    ("kong.json", '{"_format_version": "3.0", "consumers": [{"username": "alice", "username": "mallory", '
                  '"keyauth_credentials": [{"key": "alice-secret-key"}]}]}',
     "a key is repeated in one object; decK refuses such a file"),
])
def test_a_key_repeated_in_one_mapping_is_refused_as_deck_refuses_it(tmp_path, name, text, refusal):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(CredentialError) as caught:
        load_deck_file(path)
    assert str(caught.value) == f"{path}: {refusal}"


def test_keys_given_beside_a_yaml_merge_override_the_merged_ones():
    text = ('_format_version: "3.0"\nbase: &base {username: shared, custom_id: c-1}\nconsumers:\n'
            '- <<: *base\n  username: hana\n  keyauth_credentials: [{key: hana-key}]\n')
    assert parse_deck(text, "kong.yaml").table.lookup("hana-key").username == "hana"


def test_a_base_merged_into_a_mapping_before_its_own_turn_is_no_repeated_key():
    """`b` is flattened in place when `a` merges it first; its own `x` then overrides `c`'s, as YAML says."""
    text = ('_format_version: "3.0"\nc0: &c {x: 0}\nnested: {deeper: {base: &b {<<: *c, x: 1}}}\n'
            'a: {<<: *b, x: 2}\nconsumers:\n- username: hana\n  keyauth_credentials: [{key: hana-key}]\n')
    assert parse_deck(text, "kong.yaml").table.lookup("hana-key").username == "hana"


def test_json_syntax_error(tmp_path):
    path = tmp_path / "kong.json"
    path.write_text('{"_format_version": "3.0", "consumers": [{"keyauth_credentials": [{"key": "json-secret"')
    with pytest.raises(CredentialError) as caught:
        load_deck_file(path)
    assert str(caught.value).startswith(f"{path}: not valid JSON (")
    assert "json-secret" not in str(caught.value)


def test_missing_unreadable_and_binary_files(tmp_path):
    with pytest.raises(CredentialError, match="nope.yaml: no such file$"):
        load_deck_file(tmp_path / "nope.yaml")
    with pytest.raises(CredentialError, match="is a directory"):
        load_deck_file(tmp_path)
    binary = tmp_path / "kong.yaml"
    binary.write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(CredentialError, match="not UTF-8 text"):
        load_deck_file(binary)


@pytest.mark.parametrize("text", [
    '_format_version: "3.0"\nx: ' + "[" * 50_000 + "]" * 50_000,     # libyaml would overflow its stack
    '{"_format_version": "3.0", "x": ' + "[" * 5_000 + "]" * 5_000 + "}",
])
def test_a_file_nested_deeper_than_any_deck_file_is_one_clear_error(text):
    with pytest.raises(CredentialError, match="nested deeper than 1000 levels"):
        parse_deck(text, "deep", is_json=text.startswith("{"))


@pytest.mark.parametrize("value", ["!!int alice-key-7f3a9c", "!!float alice-key-7f3a9c", "!!timestamp alice-key-7f3a9c",
                                   "9" * 100_000])
def test_a_value_its_tag_cannot_build_is_one_line_without_the_value(value):
    text = f'_format_version: "3.0"\nconsumers:\n- username: alice\n  keyauth_credentials:\n  - key: {value}\n'
    with pytest.raises(CredentialError) as raised:
        parse_deck(text, "tags.yaml")
    assert "alice-key-7f3a9c" not in str(raised.value) and "999" not in str(raised.value)
