"""The event subject, as Kong's plugin chooses it with `subject.look_up_value_in` and `subject.field`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from agent.credentials.key_auth import KeyAuthConfig
from agent.credentials.table import CredentialTable
from agent.http.message import Message
from agent.metering.key_lookup import find_key, query_value

log = logging.getLogger(__name__)

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
            if names_a_key(name, key_names):
                raise SubjectError(f"--subject {kind}:{name} would put API keys into events; choose another field")
            return cls(kind, name.lower() if kind == "header" else name)
        raise SubjectError(f"--subject {text!r}: expected consumer, header:NAME or query:NAME")


class SubjectResolver:
    def __init__(self, rule: SubjectRule, key_auth: Callable[[], KeyAuthConfig],
                 table: Callable[[], CredentialTable | None]) -> None:
        self.rule = rule
        self._key_auth = key_auth
        self._table = table
        self._checked: KeyAuthConfig | None = None  # the key-auth settings the rule was last checked against
        self._names_a_key = False

    def ready(self) -> bool:
        """False while a consumer subject cannot be decided (the credential table has not loaded yet)."""
        return self.rule.look_up_value_in != "consumer" or self._table() is not None

    def resolve(self, request: Message) -> tuple[str | None | object, str | None]:
        """The subject (None when it cannot be resolved, NOT_READY while the credential table is missing)
        and the API key it came from (None for a header or query subject), so that the event can be kept
        clear of that key."""
        rule = self.rule
        if rule.look_up_value_in != "consumer" and self._fieldnames_a_key():
            return None, None
        if rule.look_up_value_in == "header":
            return request.header(rule.field) or None, None
        if rule.look_up_value_in == "query":
            return query_value(request.target, rule.field) or None, None
        table = self._table()
        if table is None:
            return NOT_READY, None
        key = find_key(request, self._key_auth())
        if key is None:
            return None, None
        consumer = table.lookup(key)
        return (consumer.subject(rule.field) if consumer is not None else None), key

    def _fieldnames_a_key(self) -> bool:
        """`SubjectRule.parse` refused the key names known at the start; the gateway's own key-auth settings
        arrive later (and may change), so the rule is checked again against each new set: a subject must
        never be an API key. Such requests are left unresolved (counted), with one error per change."""
        config = self._key_auth()
        if config is not self._checked and config != self._checked:
            self._checked = config
            self._names_a_key = names_a_key(self.rule.field, config.key_names)
            if self._names_a_key:
                log.error("--subject %s:%s names one of key-auth's key names: its value is an API key, never "
                          "a subject; requests stay unresolved", self.rule.look_up_value_in, self.rule.field)
        return self._names_a_key


def names_a_key(field: str, key_names: tuple[str, ...]) -> bool:
    """Whether a header or query field is one of key-auth's key names: its value would be an API key."""
    return field.lower() in {name.lower() for name in key_names}
