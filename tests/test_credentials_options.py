"""The credential flags and the factory the CLI calls."""

import argparse

import pytest

from agent.credentials.admin_api import AdminApiSource
from agent.credentials.deck import DeckFileSource
from agent.credentials.errors import CredentialError
from agent import options
from agent.credentials.options import add_arguments, credentials_from_args
from agent.gateway import options as gateway_options


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options.add_arguments(parser)  # the overrides of the gateway's configuration
    gateway_options.add_arguments(parser)
    return parser.parse_args(argv)


def test_defaults():
    args = parse()
    assert (args.credentials, args.credentials_refresh, args.admin_token_file, args.subject_field) == \
        (None, 30.0, None, "username")
    assert credentials_from_args(args) is None


def test_admin_api_url_with_workspace_and_token_file(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("t")
    sync = credentials_from_args(parse("--credentials", "https://kong:8444/team-a", "--credentials-refresh",
                                       "5", "--admin-token-file", str(token_file), "--subject-field", "custom_id"))
    assert isinstance(sync.source.inner, AdminApiSource) and sync.refresh_seconds == 5.0
    assert sync.source.description == "Admin API https://kong:8444/team-a"
    assert not sync.ready


def test_deck_file(tmp_path):
    sync = credentials_from_args(parse("--credentials", str(tmp_path / "kong.yaml")))
    assert isinstance(sync.source.inner, DeckFileSource)


def test_token_file_with_a_deck_file_is_a_mistake(tmp_path):
    with pytest.raises(CredentialError, match="--admin-token-file goes with an Admin API URL"):
        credentials_from_args(parse("--credentials", "kong.yaml", "--admin-token-file", "t"))


def test_bad_url_is_a_one_line_error():
    with pytest.raises(CredentialError, match="not an http:// or https:// Admin API URL"):
        credentials_from_args(parse("--credentials", "kong://admin:8001"))


@pytest.mark.parametrize("argv", [["--credentials-refresh", "0"], ["--credentials-refresh", "soon"],
                                  ["--subject-field", "email"]])
def test_bad_values_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert "error:" in capsys.readouterr().err


def test_the_admin_token_cannot_be_given_on_the_command_line(capsys: pytest.CaptureFixture) -> None:
    """Nor taken as an abbreviation of --admin-token-file, whose error about the file would print it."""
    with pytest.raises(SystemExit) as exit_:
        parse("--admin-token", "tok-5d0e")
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "KONG_ADMIN_TOKEN" in error and "tok-5d0e" not in error
