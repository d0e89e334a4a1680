"""Where key-auth looks for the key, and how `hide_credentials` strips it from the URI.

Kong's key-auth tries each name in `key_names` in turn: the request headers first (name
case-insensitive), then the query string (name case-sensitive, URL-decoded). Keys in the body
(`key_in_body`) are out of reach: bodies are counted, never kept.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote_plus

from agent.credentials.key_auth import KeyAuthConfig
from agent.http.message import Message


def query_parameters(target: str) -> list[tuple[str, str]]:
    """(name, value) pairs of the query string, URL-decoded, in order."""
    return parse_qsl(target.partition("?")[2].partition("#")[0], keep_blank_values=True)


def query_value(target: str, name: str) -> str | None:
    if "?" not in target:
        return None
    for parameter, value in query_parameters(target):
        if parameter == name:
            return value
    return None


def find_key(request: Message, config: KeyAuthConfig) -> str | None:
    for name in config.key_names:
        if config.key_in_header:
            value = request.header(name.lower())
            if not value and "_" in name:  # as OpenResty's header table does; nginx drops `_` headers anyway
                value = request.header(name.lower().replace("_", "-"))
            if value:
                return value
        if config.key_in_query:
            value = query_value(request.target, name)
            if value:
                return value
    return None


def hide_credentials(target: str, key_names: tuple[str, ...], key: str | None = None) -> str:
    """The target without any key parameter, as key-auth's `hide_credentials` strips it, and without any
    other parameter that carries the key the gateway used (`?APIKEY=<key>`, `?x=1;apikey=<key>`): a key
    never reaches an event, whatever else the client sent."""
    path, question, query = target.partition("?")
    if not question:
        return target
    kept = [part for part in query.split("&") if unquote_plus(part.partition("=")[0]) not in key_names
            and not (key and (key in part or key in unquote_plus(part)))]
    return f"{path}?{'&'.join(kept)}" if kept else path
