"""`--tls-port`: HTTPS metered from the gateway's own TLS library, by eBPF uprobes (see core/bpf/tls.bpf.c).

The processes listening on each TLS port (nginx's master and its workers, Kong's among them) are found
from the kernel's socket tables; each one's TLS library is the `libssl.so*` it maps (`/proc/PID/maps`, reached through
`/proc/PID/root` so that a container's or Kong's own copy is the one probed), or its executable when
OpenSSL is linked in statically. A watched process's children (a reload's new workers) inherit its
probes from the kernel as they fork, so they are probed from their first instruction; the probes report
forks and exits, and a rescan every few seconds catches any other newcomer.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections import Counter
from pathlib import Path

import psutil

from agent import _core
from agent.pipeline import Pipeline

log = logging.getLogger("agent.tls")

RESCAN_SECONDS = 5.0         # how often the listeners are looked for again
EXEC_RESCAN_SECONDS = 0.5    # how soon after a gateway process exec'd (an nginx binary upgrade)
RECORDS_PER_CALL = 8192      # records the core reads per call, between looks at the forks and the clock


class TlsUnavailable(RuntimeError):
    """The TLS probes cannot run here; the message is the one line the start says."""


def listening_processes(ports: set[int]) -> set[int]:
    """Processes holding a listening socket on one of `ports`, with the process tree around them (the
    workers a master has started meanwhile, say)."""
    found = _holders(_listening_inodes(ports))
    tree: set[int] = set()
    for pid in found:
        try:
            process = psutil.Process(pid)
            top = process
            for parent in process.parents():
                if not _same_executable(parent, process):
                    break
                top = parent
            tree |= {top.pid} | {child.pid for child in top.children(recursive=True)}
        except psutil.Error:
            continue
    return tree


def _listening_inodes(ports: set[int]) -> set[str]:
    """The inodes of the listening TCP sockets on `ports`, from the kernel's tables (this network namespace's)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text(encoding="ascii", errors="replace").splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) in ports:
                inodes.add(fields[9])
    return inodes


def _holders(inodes: set[str]) -> set[int]:
    """Every process with a descriptor on one of those sockets. psutil names one process per socket, and
    nginx's master, its workers and whatever they started (a plugin's shell inherits the listeners) share
    them: named alone, a helper hid the gateway."""
    holders: set[int] = set()
    if not inodes:
        return holders
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            links = (os.readlink(fd.path) for fd in os.scandir(f"/proc/{entry.name}/fd"))
            if any(link.startswith("socket:[") and link[8:-1] in inodes for link in links):
                holders.add(int(entry.name))
        except OSError:  # gone, or a descriptor closed meanwhile
            continue
    return holders


def _same_executable(parent: psutil.Process, process: psutil.Process) -> bool:
    """An ancestor whose executable cannot be read (another namespace's, or an init the kernel hides even
    from root) is not the gateway's."""
    try:
        return parent.exe() == process.exe()
    except psutil.Error:
        return False


def tls_library(pid: int) -> str | None:
    """The path, as this agent reaches it, of the TLS library process `pid` maps; its executable when no
    libssl is mapped (a static OpenSSL); None when the process is gone."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and os.path.basename(fields[5]).startswith("libssl.so"):
            return f"/proc/{pid}/root{fields[5]}"
    return f"/proc/{pid}/exe"


def raise_descriptor_limit() -> None:
    """The soft limit on open files up to the hard one: each gateway process attached itself holds 8 or 9
    perf events (an anchor and its probes), so a gateway of 200 workers found at start needs some 1,800
    descriptors, over the usual soft limit of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class TlsCapture:
    """The probes, attached to the gateway's processes, read into the capture loop's pipeline."""

    def __init__(self, ports: set[int], ring_bytes: int) -> None:
        self.ports = ports
        self.ring_bytes = ring_bytes
        raise_descriptor_limit()
        try:
            self.probes = _core.TlsProbes(ring_bytes, sorted(ports))
        except OSError as error:
            hint = (" (the agent needs root: CAP_BPF, CAP_PERFMON, write access to tracefs and, to mount it, "
                    "CAP_SYS_ADMIN)" if "not permitted" in str(error) else "")
            raise TlsUnavailable(f"--tls-port: cannot meter HTTPS here: {error}{hint}") from None
        if self.probes.mounted_tracefs():
            log.info("--tls-port: tracefs was not mounted; mounted it at /sys/kernel/tracing (the uprobes are "
                     "made there)")
        self.attached: dict[int, str] = {}  # pid -> how its reads are probed (see attach)
        self.slow_reads_warned = False
        self.refused: set[int] = set()
        self.execed: set[int] = set()  # exec'd and still listening (see rescan)
        self.next_scan = 0.0
        self.http2_warned = 0
        self.drops_warned = 0
        self.unread_bytes = 0  # left in the ring at a stop's deadline
        self.rescan()
        if not self.attached:
            log.warning("--tls-port %s: no process listens there yet; looking again every %.0f s",
                        ",".join(map(str, sorted(ports))), RESCAN_SECONDS)
        else:
            log.info("metering HTTPS on port %s in %d processes (reads: %s)", ",".join(map(str, sorted(ports))),
                     len(self.attached), self.read_probes())

    def fileno(self) -> int:
        return self.probes.fileno()

    def rescan(self) -> None:
        """Attach to listeners not attached yet."""
        self.next_scan = time.monotonic() + RESCAN_SECONDS
        for pid in self.probes.unwatched():  # an exit or exec whose record the probes had no room for
            self.attached.pop(pid, None)
        listening = listening_processes(self.ports)
        self.execed &= listening
        for pid in sorted(listening - self.attached.keys() - self.refused):
            if pid in self.execed and tls_library(pid) == f"/proc/{pid}/exe":
                # a program without TLS that a gateway process became (a shell a plugin started), holding the
                # listening socket nginx lets its children inherit: nothing to meter, and no error; looked at
                # again each time, in case it maps the library later
                log.debug("--tls-port: pid %d exec'd a program that maps no TLS library: not attached", pid)
                continue
            self.attach(pid)

    def attach(self, pid: int) -> None:
        """Probes `pid`. An nginx's reads take one probe hit each where the core understood its read function,
        else the library's (two hits per call): that costs the gateway more, so it is said once."""
        library = tls_library(pid)
        if library is None:
            return
        try:
            reads, is_nginx = self.probes.attach(pid, library)
        except ProcessLookupError as error:  # it exited while being attached (a reload's old worker)
            log.debug("--tls-port: pid %d exited while being attached: %s", pid, error)
            return
        except OSError as error:
            self.refused.add(pid)
            log.error("--tls-port: %s", error)
            return
        self.attached[pid] = reads
        log.debug("TLS probes attached to pid %d (%s), reads by %s probes", pid, library, reads)
        if is_nginx and reads != "nginx" and not self.slow_reads_warned:
            self.slow_reads_warned = True
            log.warning("--tls-port: pid %d is an nginx whose read function (ngx_ssl_recv) the agent does not "
                        "recognise: its reads are probed in the TLS library instead (%s), 5 or 6 probe hits per "
                        "request instead of 2", pid, reads)

    def read_probes(self) -> str:
        """How many attached processes read by which probes, e.g. "nginx 3"."""
        return ", ".join(f"{path} {count}" for path, count in sorted(Counter(self.attached.values()).items()))

    def feed(self, pipeline: Pipeline) -> tuple[bytes, int]:
        """What the probes have for `pipeline`: its events' lines and how many records there were. New
        children are taken first (most inherited their parent's probes; one forked while its parent was
        being attached, and such a parent if its own probes are inherited, are attached now). A process that
        exec'd is forgotten, and the listeners looked at again soon: an nginx binary upgrade's new master
        is attached anew there."""
        for pid in self.probes.forked():
            self.attach(pid)
        for pid in self.probes.execed():
            log.debug("--tls-port: pid %d exec'd another program: looked for again among the listeners", pid)
            self.attached.pop(pid, None)
            self.refused.discard(pid)
            self.execed.add(pid)
            self.next_scan = min(self.next_scan, time.monotonic() + EXEC_RESCAN_SECONDS)
        lines, records, exited = pipeline.feed_tls(self.probes, RECORDS_PER_CALL)
        for pid in exited:
            self.probes.forget(pid)
            self.attached.pop(pid, None)
            self.refused.discard(pid)
        if time.monotonic() >= self.next_scan:
            self.rescan()
        return lines, records

    def warn(self, counters: dict[str, int]) -> None:
        """Once a second: say when new HTTP/2 connections were seen (their requests are not metered), and when
        the ring had no room for records (their requests are counted lost, not billed)."""
        seen = counters.get("http2_connections", 0)
        if seen > self.http2_warned:
            log.warning("%d HTTP/2 connections (ALPN h2) on the TLS port so far: counted as http2_connections, "
                        "their requests not metered (HTTP/2 is not decoded yet)", seen)
            self.http2_warned = seen
        drops = self.probes.losses()[0]
        if drops > self.drops_warned:
            log.warning("the TLS probes' ring had no room for %d records (%d in all): the agent was behind; what "
                        "they held is counted lost (tls_ring_drops, tls_truncated_bytes, lost_exchanges); a "
                        "larger --tls-ring-mb holds more", drops - self.drops_warned, drops)
            self.drops_warned = drops

    def counters(self) -> dict[str, int]:
        """The probes' own losses, for the summary line."""
        ring_drops, _uncopied, unfollowed = self.probes.losses()  # uncopied: the core's tls_truncated_bytes
        library_reads = sum(reads != "nginx" for reads in self.attached.values())
        return {"tls_ring_drops": ring_drops, "tls_unfollowed_calls": unfollowed,
                "tls_unread_bytes": self.unread_bytes, "tls_processes": len(self.attached),
                "tls_library_read_processes": library_reads}

    def backlog_bytes(self) -> int:
        """Bytes of records the ring holds now."""
        return int(self.probes.ready_fraction() * self.ring_bytes)
