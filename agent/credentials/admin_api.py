"""Read consumers, key-auth credentials and key-auth's settings from Kong's Admin API, and with them the
gateway's services, routes and plugins (`agent/gateway/admin_api.py`).

`--credentials http://HOST:8001[/WORKSPACE]`: a path after the host is put before every request path,
which is how an Enterprise workspace (`/team-a/consumers`) is addressed. Lists are read a page at a time
(`size=1000`), following `offset` until the page's `next` is null. The RBAC token is read from
`--admin-token-file` or `KONG_ADMIN_TOKEN` at each load (so a rotated token is picked up) and sent as the
`Kong-Admin-Token` header; it never appears in a message.

Kong's key-auth `ttl` is the number of seconds the credential has left when it is read, so each key gets
an expiry on the table's clock, counted from just before the page that listed it was requested.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import httpx

from agent.credentials.errors import CredentialError
from agent.credentials.key_auth import is_ttl, merge
from agent.credentials.source import Snapshot
from agent.credentials.table import Clock, Consumer, TableBuilder
from agent.gateway import admin_api as gateway
from agent.tokens import TokenError, TokenSource, shown_url

log = logging.getLogger(__name__)

TOKEN_ENV = "KONG_ADMIN_TOKEN"
TOKEN_HEADER = "Kong-Admin-Token"
PAGE_SIZE = 1000
MAX_PAGE_BYTES = 64 << 20  # a page of 1000 credentials is well under a megabyte
MAX_PAGES = 100_000
T = TypeVar("T")


def split_admin_url(url: str) -> tuple[str, str]:
    """(`scheme://host:port`, `/workspace` or ""); refuses what would leak a secret or be ignored."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a port that is not a number raises here
    except ValueError:
        raise CredentialError(f"{shown_url(url)!r} is not a valid Admin API URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CredentialError(f"{shown_url(url)!r} is not an http:// or https:// Admin API URL")
    if parts.username is not None or parts.password is not None:
        raise CredentialError(
            f"credentials in the Admin API URL are not accepted; use {TOKEN_ENV} or --admin-token-file"
        )
    if parts.query or parts.fragment:
        raise CredentialError("the Admin API URL takes no query or fragment; only an optional /workspace path")
    prefix = parts.path.rstrip("/")
    return f"{parts.scheme}://{parts.netloc}", prefix


class AdminApiSource:
    def __init__(
        self,
        url: str,
        token_file: Path | None = None,
        environ: Mapping[str, str] = os.environ,
        timeout: float = 10.0,
        max_load_seconds: float = 300.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._base, self._prefix = split_admin_url(url)
        self._tokens = TokenSource(token_file, TOKEN_ENV, "admin token", environ)
        self._timeout = timeout
        self._max_load_seconds = max_load_seconds
        self._clock = clock
        self._warned: set[str] = set()  # the lists RBAC keeps from this token, said once each

    @property
    def description(self) -> str:
        return f"Admin API {self._base}{self._prefix}"

    def fingerprint(self) -> Hashable | None:
        return None

    def load(self) -> Snapshot:
        headers = {"Accept": "application/json"}
        token = self._token()
        if token:
            headers[TOKEN_HEADER] = token
        deadline = time.monotonic() + self._max_load_seconds
        with httpx.Client(base_url=self._base, headers=headers, timeout=self._timeout) as client:
            pages = Pager(client, self._prefix, self.description, bool(token), deadline, self._clock)
            consumers = {c.id: c for c in _consumers(pages)}
            builder = TableBuilder(self._clock)
            skipped = _key_auths(pages, consumers, builder)
            plugins = self._readable(pages, "/plugins", lambda: list(pages.items("/plugins")))
            key_auth, metering = gateway.read_plugins(pages, plugins or [])
            services = self._readable(pages, "/services", lambda: gateway.read_services(pages))
            routes = (self._readable(pages, "/routes", lambda: gateway.read_routes(pages))
                      if services is not None else None)
        config = gateway.gateway_config(*(services or ([], set())), routes or [], (key_auth, metering), consumers)
        return Snapshot(builder.build(), merge(i.config for i in key_auth) if plugins is not None else None,
                        skipped, config)

    def _token(self) -> str | None:
        try:
            return self._tokens.read()
        except TokenError as error:
            raise CredentialError(str(error)) from None

    def _readable(self, pages: "Pager", path: str, read: Callable[[], T]) -> T | None:
        """`read()`, or None when RBAC lets the token read credentials but not this list: without /plugins
        key-auth's settings come from flags or defaults and nothing is scoped; without /services or
        /routes there are no routes. Said once per source."""
        try:
            return read()
        except _Forbidden:
            if path not in self._warned:
                consequence = ("key-auth settings come from flags or defaults, and no metering-and-billing"
                               " entry is read" if path == "/plugins" else "routes and services are not known")
                log.warning("credentials: %s does not let this token read %s; %s", self.description, path,
                            consequence)
                self._warned.add(path)
            return None


class _Forbidden(CredentialError):
    """RBAC lets the token read some lists but not this one."""


class Pager:
    """Reads one list endpoint page by page, checking each page's shape, within one load's deadline."""

    def __init__(self, client: httpx.Client, prefix: str, description: str, has_token: bool,
                 deadline: float, clock: Clock) -> None:
        self._client = client
        self._prefix = prefix
        self.description = description
        self._has_token = has_token
        self._deadline = deadline
        self._clock = clock
        self.requested_at = 0.0  # on the table's clock, just before the current page was asked for

    def items(self, path: str) -> Iterator[tuple[int, dict, str]]:
        """(index in page, entity, where) for every entity of every page."""
        offset: str | None = None
        seen: set[str] = set()
        for page_number in range(1, MAX_PAGES + 1):
            where = f"GET {self._prefix}{path} page {page_number}"
            page = self._page(path, offset, where)
            for index, item in enumerate(page["data"]):
                if not isinstance(item, dict):
                    raise self.malformed(where, f"data[{index}] is not an object")
                yield index, item, where
            if page.get("next") is None:
                return
            offset = page.get("offset")
            if not isinstance(offset, str) or not offset:
                raise self.malformed(where, "next is set but offset is missing")
            if offset in seen:
                raise self.malformed(where, "offset repeats an earlier page")
            seen.add(offset)
        raise CredentialError(f"{self.description}: {path} has more than {MAX_PAGES} pages")

    def _page(self, path: str, offset: str | None, where: str) -> dict:
        if time.monotonic() > self._deadline:
            raise CredentialError(f"{self.description}: reading the lists took too long ({where})")
        params = {"size": PAGE_SIZE}
        if offset is not None:
            params["offset"] = offset
        self.requested_at = self._clock()
        try:
            with self._client.stream("GET", self._prefix + path, params=params) as response:
                if response.status_code != 200:
                    raise self._refused(response.status_code, path, where)
                body = self._read_body(response, where)
        except httpx.TimeoutException:
            raise CredentialError(f"{self.description}: {where} timed out") from None
        except httpx.HTTPError as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CredentialError(f"{self.description}: {where} failed ({reason})") from None
        try:
            page = json.loads(body)
        except (ValueError, RecursionError):
            raise self.malformed(where, "not JSON") from None
        if not isinstance(page, dict) or not isinstance(page.get("data"), list):
            raise self.malformed(where, "no data list")
        if page.get("next") is not None and not isinstance(page.get("next"), str):
            raise self.malformed(where, "next is neither a string nor null")
        return page

    def _read_body(self, response: httpx.Response, where: str) -> bytes:
        """The page, read a chunk at a time so that neither a server that sends slowly nor one that sends
        without end can hold the load past its deadline or fill the memory."""
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > MAX_PAGE_BYTES:
                raise self.malformed(where, f"larger than {MAX_PAGE_BYTES >> 20} MiB")
            if time.monotonic() > self._deadline:
                raise CredentialError(f"{self.description}: reading the lists took too long ({where})")
        return bytes(body)

    def _refused(self, status: int, path: str, where: str) -> CredentialError:
        message = f"{self.description}: {where} answered HTTP {status}"
        if status == 401:
            hint = ("the admin token was refused" if self._has_token
                    else f"RBAC needs a token: set {TOKEN_ENV} or --admin-token-file")
            return CredentialError(f"{message} ({hint})")
        if status in (403, 404) and path in ("/plugins", "/services", "/routes"):
            return _Forbidden(message)
        if status == 404 and self._prefix:
            return CredentialError(f"{message} (is {self._prefix.lstrip('/')} a workspace?)")
        return CredentialError(message)

    def malformed(self, where: str, what: str) -> CredentialError:
        return CredentialError(f"{self.description}: malformed page from {where}: {what}")


def _consumers(pages: Pager) -> Iterator[Consumer]:
    for index, item, where in pages.items("/consumers"):
        consumer_id = item.get("id")
        if not isinstance(consumer_id, str) or not consumer_id:
            raise pages.malformed(where, f"data[{index}].id is not a string")
        names = {}
        for field in ("username", "custom_id"):
            value = item.get(field)
            if value is not None and not isinstance(value, str):
                raise pages.malformed(where, f"data[{index}].{field} is not a string")
            names[field] = value or None
        yield Consumer(id=consumer_id, **names)


def _key_auths(pages: Pager, consumers: dict[str, Consumer], builder: TableBuilder) -> int:
    """Adds every mappable key; returns how many were listed but could not be mapped."""
    skipped = 0
    for index, item, where in pages.items("/key-auths"):
        key, ttl, owner = item.get("key"), item.get("ttl"), item.get("consumer")
        owner_id = owner.get("id") if isinstance(owner, dict) else None
        if key is not None and not isinstance(key, str):
            raise pages.malformed(where, f"data[{index}].key is not a string")
        if ttl is not None and not is_ttl(ttl):
            raise pages.malformed(where, f"data[{index}].ttl is not a non-negative integer")
        consumer = consumers.get(owner_id) if isinstance(owner_id, str) else None
        if not key or consumer is None or ttl == 0:
            # No key, a consumer made or deleted while the lists were read, or under a second left (Kong
            # shows whole seconds): the next load settles it.
            skipped += 1
            continue
        try:
            builder.add(key, consumer, None if ttl is None else pages.requested_at + ttl)
        except CredentialError as exc:
            raise CredentialError(f"{pages.description}: {exc}") from None
    return skipped
