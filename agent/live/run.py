"""Live mode: meter a running gateway from the kernel's packet ring until SIGINT or SIGTERM.

At a stop signal the rings stop filling, what they already hold is read, the connections still open are
closed out (an answered request is emitted; one still waiting is emitted as replay emits it), every event
reaches the sink and the summary line is printed, well within 10 seconds.

With `--workers N` the kernel spreads flows over N child processes (fanout by flow hash), each with its
own ring and pipeline; the parent owns the sink, receives their events through pipes and sums their
counters into one summary. Unless `--no-yield-cpu`, the capture runs at idle priority while its ring has
room (see `cpu_share.py`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import logging
import os
import signal

from agent import logs
from agent.credentials.sync import CredentialSync
from agent.live.capture import StopFlag, capture, nothing, yield_cpu
from agent.live.capture_record import CaptureRecord
from agent.live.cpu_share import (CATCH_UP_NICE, allow_return_after_privilege_drop, can_take_priority_back,
                                  catch_up_priority)
from agent.live.fanout import run_workers
from agent.live.privileges import drop_privileges, user_entry
from agent.live.ring_store import RingStore
from agent.live.service_manager import ServiceManager, inherited_fds
from agent.live.tls import TlsCapture, TlsUnavailable
from agent.live.startup_checks import Link, LiveCaptureError, interface_link, report_listeners
from agent.observe.server import Monitor
from agent.options import pipeline_from_args
from agent.pipeline import Pipeline
from agent.sink import Sink
from agent.sink.datadir import default_data_dir, hand_over
from agent.sink.options import state_dirs
from agent.source.kernel_filter import MAX_PORTS, capture_filter
from agent.source.packet_ring import PacketRing

log = logging.getLogger("agent.live")


def run_live(args: argparse.Namespace, credentials: CredentialSync | None, open_sink: Callable[[], Sink]) -> int:
    """Capture until stopped; 0 when every worker finished cleanly, 1 otherwise."""
    ports = set(args.port or [8000])
    if len(ports) > MAX_PORTS:
        raise LiveCaptureError(f"at most {MAX_PORTS} --port values can be captured")
    link = interface_link(args.iface)
    pipeline = pipeline_from_args(args, credentials)  # bad metering flags fail before anything is opened
    if args.user:
        user_entry(args.user)
    manager = ServiceManager.from_environment()
    store = RingStore(manager, inherited_fds(), args.data_dir or default_data_dir())
    # the rings first: without permission to capture, that is the one line a start says
    program = capture_filter(ports, link.header_length, drop_outgoing=link.loopback)
    rings = store.open(link, program, args.ring_mb << 20, args.workers)
    monitor = None
    try:
        tls = open_tls(args)
        if credentials is not None:
            credentials.load_at_start()  # a refused plugin configuration stops the start (exit 2)
        sink = open_sink()  # once the gateway's configuration, which may name the endpoint, was tried
        stop = StopFlag()
        # listening before privileges drop: a port below 1024 works with --user
        monitor = (Monitor(args.metrics_listen, args.workers, sink, lambda: stop.signal is not None)
                   if args.metrics_listen else None)
        report_listeners(ports)
        if args.user:
            _switch_user(args)
        if args.yield_cpu and not can_take_priority_back():
            log.warning("capturing at normal priority, as with --no-yield-cpu: at idle priority the capture could "
                        "not take priority back once its ring fills (that needs CAP_SYS_NICE, or an RLIMIT_NICE "
                        "of %d, which --user keeps only with CAP_SYS_RESOURCE)", 20 - CATCH_UP_NICE)
            args.yield_cpu = False
    except BaseException:
        for ring in rings:
            ring.close()
        if monitor is not None:
            monitor.close()
        raise
    try:
        directories = state_dirs(args)
        record = CaptureRecord(directories[0] if directories else None)
        return _capture_until_stopped(args, link, ports, rings, pipeline, credentials, sink, stop, monitor, tls,
                                      manager, record)
    finally:
        if monitor is not None:
            monitor.close()


def _capture_until_stopped(args: argparse.Namespace, link: Link, ports: set[int], rings: list[PacketRing],
                           pipeline: Pipeline, credentials: CredentialSync | None, sink: Sink, stop: StopFlag,
                           monitor: Monitor | None, tls: TlsCapture | None, manager: ServiceManager | None,
                           record: CaptureRecord) -> int:
    if args.yield_cpu:
        stop.on_first = catch_up_priority  # the thread that takes the signal: the capture, or the workers' reader
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    where = (f"capturing on {link.interface} (ports {', '.join(map(str, sorted(ports)))}; "
             f"{len(rings)} x {rings[0].ring_bytes >> 20} MiB ring)")

    def capturing() -> None:
        log.info("%s", where)
        record.started(took_over_the_ring=any(ring.taken_over for ring in rings), metering_tls=tls is not None)
        if manager is not None:
            manager.ready()  # Type=notify: a start (or restart) is done once capture has begun

    status = monitor.status if monitor is not None else None
    if len(rings) == 1:
        if tls is not None:  # before the CPU-share watcher starts: it looks at the fuller of the two rings
            rings[0].also_wake_on(tls.fileno(), tls.probes.ready_fraction)
        on_stop = yield_cpu([(os.getpid(), rings[0])]) if args.yield_cpu else nothing
        capturing()
        counters = capture(rings[0], pipeline, credentials, stop, sink.write, on_stop,
                           report=(lambda report: status.update(1, report)) if status is not None else None,
                           tls=tls)
        rings[0].close()
        clean = True
    else:
        counters, clean = run_workers(rings, args, credentials, stop, sink, capturing, status)
    sink.close()  # in live capture a spool is not waited for: what it holds is sent at the next start
    record.stopped()
    delivery = sink.counters()
    logs.summary({**counters, **delivery})
    return 0 if clean else 1


def open_tls(args: argparse.Namespace) -> TlsCapture | None:
    """`--tls-port`: the probes, attached to the port's listeners. Where this host cannot run them, one
    line says why and the plain capture goes on."""
    if not args.tls_port:
        return None
    try:
        return TlsCapture(set(args.tls_port), args.tls_ring_mb << 20)
    except TlsUnavailable as error:
        log.error("%s; plain capture goes on", error)
        return None


def _switch_user(args: argparse.Namespace) -> None:
    """`--user`: the sink's directories become that user's (it goes on writing there), then the switch."""
    if args.yield_cpu:
        allow_return_after_privilege_drop()
    user = user_entry(args.user)
    for directory in state_dirs(args):
        try:
            hand_over(directory, user.pw_uid, user.pw_gid)
        except OSError as error:
            raise LiveCaptureError(f"--user {args.user}: cannot hand {directory} over to that user "
                                   f"({error.strerror or error})") from None
    drop_privileges(args.user)

