"""`agent doctor [the flags of a start]`: checks what that start would need, one line per check, and exits 0
only if every check passes. It changes nothing: no directory is created, no event is sent (the ingest
endpoint gets an empty batch, which tells a refused token from an accepted one), no spool is opened.

The checks: the permission to capture (a packet socket) and to take priority back (`--no-yield-cpu`
skips it), the interface, who listens on the gateway port(s), the credential source and the metering
flags, the ingest endpoint's reachability and token, that the state directories (spool, store) and
`--output` can be written, and that `--metrics-listen` is free.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil

from agent import config, logs
from agent._core import CaptureError, CaptureFile
from agent.credentials import options as credential_options
from agent.credentials.errors import CredentialError
from agent.flags import FlagParser
from agent.gateway import options as gateway_options
from agent.live.cpu_share import can_take_priority_back
from agent.live.privileges import user_entry
from agent.live.startup_checks import (check_ring_memory, describe_listener, interface_link, listening_pids,
                                       socket_error)
from agent.metering.subject import SubjectError
from agent.options import pipeline_from_args
from agent.replay_end import WHOLE_FRAMES
from agent.sink.ingest import BATCH_CONTENT_TYPE, api_token_source
from agent.sink.options import state_dirs, tls_verification
from agent.sink.spool import LOCK_FILE
from agent.tokens import TokenError, shown_url

INGEST_TIMEOUT = 10.0


class Failed(Exception):
    """A check did not pass; the message says why, in one line."""


class Warned(Exception):
    """A check passed with a caveat a start would meet (its line says `warn`, the exit status stays 0)."""


Check = tuple[str, Callable[[], str]]  # (what is checked, the check: returns what it found or raises Failed)


def doctor(parser: FlagParser, argv: list[str]) -> int:
    """The checks a start with `argv` needs, one line each; 0 if all pass, 1 otherwise (2: a bad flag)."""
    parser.prog = "agent doctor"
    args = config.parse_args(parser, argv, os.environ)
    logs.configure("error", args.log_format)  # the checks' lines say it all; a check's own log stays quiet
    passed = True
    for name, check in checks(args):
        warned = False
        try:
            found, ok = check(), True
        except Warned as warning:
            found, ok, warned = str(warning), True, True
        except Failed as failure:
            found, ok = str(failure), False
        except (CaptureError, CredentialError, SubjectError, TokenError, OSError, psutil.Error) as error:
            found, ok = " ".join(str(error).split()) or type(error).__name__, False
        passed &= ok
        print(f"{'warn' if warned else 'ok' if ok else 'FAIL':4}  {name}: {found}", flush=True)
    return 0 if passed else 1


def checks(args: argparse.Namespace) -> Iterator[Check]:
    if args.read:
        yield "capture file", lambda: _capture_file(args.read)
    else:
        yield "capture permission", lambda: _packet_socket(args.iface)
        if args.yield_cpu:
            yield "capture priority", _priority
        yield "ring memory", lambda: _ring_memory(args)
        yield f"interface {args.iface}", lambda: _interface(args.iface)
        for port in sorted(set(args.port or [8000])):
            yield f"port {port}", lambda port=port: _listener(port)
    if args.user:
        yield f"user {args.user}", lambda: f"uid {user_entry(args.user).pw_uid}"
    yield "credentials", lambda: _credentials(args)
    if args.ingest_endpoint:
        yield "ingest endpoint", lambda: _ingest(args)
    for directory in state_dirs(args):
        yield f"state directory {directory}", lambda directory=directory: _writable_dir(directory)
    if args.output and args.output != "-":
        yield f"output {args.output}", lambda: _writable_dir(Path(args.output).parent, what="its directory")
    if args.metrics_listen:
        yield "metrics address", lambda: _free_address(args.metrics_listen)


def _capture_file(path: str) -> str:
    capture = CaptureFile(path)
    snap_length = capture.snap_length
    capture.close()
    if snap_length is not None and snap_length < WHOLE_FRAMES:
        raise Warned(f"readable, but its snap length is {snap_length} bytes: packets longer than that were cut"
                     " short when captured and their bytes are lost (a replay counts them in cut_short_packets"
                     " and exits 3); capture whole frames (tcpdump -s 0)")
    return "readable"


def _packet_socket(interface: str) -> str:
    try:
        socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close()
    except OSError as error:
        raise Failed(str(socket_error(interface, error))) from None
    return "packet sockets can be opened"


def _priority() -> str:
    if not can_take_priority_back():
        raise Failed("cannot take priority back from idle (needs CAP_SYS_NICE, or an RLIMIT_NICE of 30): a start"
                     " would capture at normal priority; --no-yield-cpu says that is meant")
    return "can yield to the gateway and take priority back"


def _ring_memory(args: argparse.Namespace) -> str:
    check_ring_memory(args.ring_mb << 20, args.workers)
    return f"{args.workers} x {args.ring_mb} MiB fits"


def _interface(name: str) -> str:
    link = interface_link(name)
    up = psutil.net_if_stats()[name].isup
    if not up:
        raise Failed("the interface is down")
    return f"up, {'loopback' if link.loopback else 'raw IP' if link.header_length == 0 else 'Ethernet'}"


def _listener(port: int) -> str:
    pids = listening_pids({port})[port]
    if not pids:
        raise Failed("nothing listens on it (is the gateway up, is --port its proxy port?)")
    return f"{describe_listener(pids)} listens"


def _credentials(args: argparse.Namespace) -> str:
    if args.iface:
        credential_options.refuse_missing_deck_file(args)
    credentials = credential_options.credentials_from_args(args)
    if credentials is not None:
        credentials.load_once()
    gateway_options.adopt_plugin_delivery(args, credentials)  # the endpoint and token the start would use
    pipeline_from_args(args, credentials)  # the metering flags, with the gateway's key-auth settings
    if credentials is None:
        return f"none needed for --subject {args.subject}"
    table = credentials.table
    assert table is not None
    consumers = len({consumer.id for consumer in table.consumers()})
    return f"{consumers} consumers with {len(table)} keys from {credentials.source.description}"


def _ingest(args: argparse.Namespace) -> str:
    """An empty batch: refused for its token (401/403), else refused as empty (400) or accepted, but never
    an event ingested."""
    tokens = api_token_source(args.api_token_file, getattr(args, "plugin_api_token", None))
    token = tokens.read()
    headers = {"Content-Type": BATCH_CONTENT_TYPE, **({"Authorization": f"Bearer {token}"} if token else {})}
    shown = shown_url(args.ingest_endpoint)
    try:
        with httpx.Client(timeout=INGEST_TIMEOUT, verify=tls_verification(args)) as client:
            response = client.post(args.ingest_endpoint, content=b"[]", headers=headers)
    except (httpx.HTTPError, ValueError) as error:
        raise Failed(f"{shown} unreachable ({type(error).__name__}: {error})".replace(token or "\0", "[token]")) from None
    status = response.status_code
    if status in (401, 403):
        raise Failed(f"{shown} refuses the token ({status}; from {tokens.describe()})")
    if status == 400 or 200 <= status < 300:
        return f"{shown} reachable, token accepted" if token else f"{shown} reachable, no token sent"
    raise Failed(f"{shown} answered {status} {response.reason_phrase} (the events' URL?)")


def _writable_dir(directory: Path, what: str = "") -> str:
    """Writable as it is, or creatable in the nearest directory that exists; a spool another agent holds
    is in use."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise Failed(f"{existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise Failed(f"{existing} is not writable by uid {os.geteuid()}")
    if existing != directory:
        return f"{what or 'it'} will be created in {existing}"
    lock = directory / LOCK_FILE
    if lock.exists():
        descriptor = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(descriptor, fcntl.LOCK_UN)
        except OSError as error:
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise Failed("a running agent holds this spool") from None
            raise
        finally:
            os.close(descriptor)
    return "writable"


def _free_address(address: tuple[str, int]) -> str:
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise Failed(f"cannot listen on {host}:{port} ({error.strerror or error})") from None
    return f"{host}:{port} is free"

