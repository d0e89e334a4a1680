"""The event subject, as Kong's plugin chooses it with `subject.look_up_value_in` and `subject.field`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agent.credentials.table import CredentialTable
from agent.http.message import Message
from agent.metering.keyauth import KeyAuthConfig, find_key, query_value

NOT_READY = object()  # the credential table has not loaded yet: the subject cannot be decided now


class SubjectError(ValueError):
    """A subject rule that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class SubjectRule:
    look_up_value_in: str = "consumer"   # consumer | header | query
    field: str = "username"              # consumer: username | id | custom_id; header/query: the name

    @classmethod
    def parse(cls, text: str, consumer_field: str, key_names: tuple[str, ...]) -> "SubjectRule":
        kind, _, name = text.partition(":")
        if kind == "consumer" and not name:
            return cls("consumer", consumer_field)
        if kind in ("header", "query") and name:
            if name.lower() in {key.lower() for key in key_names}:
                raise SubjectError(f"--subject {kind}:{name} would put API keys into events; choose another field")
            return cls(kind, name.lower() if kind == "header" else name)
        raise SubjectError(f"--subject {text!r}: expected consumer, header:NAME or query:NAME")


class SubjectResolver:
    def __init__(self, rule: SubjectRule, key_auth: Callable[[], KeyAuthConfig],
                 table: Callable[[], CredentialTable | None]) -> None:
        self.rule = rule
        self._key_auth = key_auth
        self._table = table

    def ready(self) -> bool:
        """False while a consumer subject cannot be decided (the credential table has not loaded yet)."""
        return self.rule.look_up_value_in != "consumer" or self._table() is not None

    def resolve(self, request: Message) -> str | None | object:
        """The subject, None when it cannot be resolved, or NOT_READY while the credential table is missing."""
        rule = self.rule
        if rule.look_up_value_in == "header":
            return request.header(rule.field) or None
        if rule.look_up_value_in == "query":
            return query_value(request.target, rule.field) or None
        table = self._table()
        if table is None:
            return NOT_READY
        key = find_key(request, self._key_auth())
        if key is None:
            return None
        consumer = table.lookup(key)
        return consumer.subject(rule.field) if consumer is not None else None
