"""The event subject, as Kong's plugin chooses it with `subject.look_up_value_in` and `subject.field`."""

from __future__ import annotations

from dataclasses import dataclass

from agent import _core


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
            if _core.names_a_key(kind, name, list(key_names)):
                raise SubjectError(f"--subject {kind}:{name} would put API keys into events; choose another field")
            return cls(kind, name.lower() if kind == "header" else name)
        raise SubjectError(f"--subject {text!r}: expected consumer, header:NAME or query:NAME")

