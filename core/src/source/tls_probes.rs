//! The TLS probes' loader (aya): loads the BPF object build.rs compiled, attaches its uprobes to one
//! process's TLS library at a time, and reads the ring buffer of plaintext records (fed to
//! `Pipeline::feed_tls`). This is the source edge, so it does I/O; what the records mean is `tls.rs`.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind, Register};
use object::{Object, ObjectSection, ObjectSymbol};

use super::nginx_reads::{nginx_reads, pt_regs_slot, NginxReads};
use super::trace_events::TraceEvents;
use aya::programs::{BtfTracePoint, UProbe};
use aya::{Btf, Ebpf, EbpfLoader};

static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tls.bpf.o"));

/// Entry probes, by program and symbol; every one also gets the shared return probe (`ssl_return`).
/// Used as they are only where `internal_workers` does not find the two functions all four call. Writes
/// first: see `attach_probes`.
const CALLS: [(&str, &str); 4] = [
    ("ssl_write_enter", "SSL_write"),
    ("ssl_write_ex_enter", "SSL_write_ex"),
    ("ssl_read_enter", "SSL_read"),
    ("ssl_read_ex_enter", "SSL_read_ex"),
];
/// The internal workers' programs, (s, buf, num, size_t *done) as the `_ex` forms': the read's entry with
/// the shared return probe; the write's entry alone (it sends the bytes there; see tls.bpf.c).
const READ_WORKER: &str = "ssl_read_ex_enter";
const WRITE_WORKER: &str = "ssl_write_worker";
/// nginx's read probe (see tls.bpf.c and nginx_reads.rs), on the call a successful SSL_read leads to.
const NGINX_DELIVERED: &str = "ngx_read_delivered";
const MARKERS: [(&str, &str); 3] =
    [("ssl_set_fd", "SSL_set_fd"), ("ssl_free", "SSL_free"), ("ssl_shutdown", "SSL_shutdown")];
const TRACEPOINTS: [(&str, &str); 6] = [
    ("sock_recv", "sock_recv_length"),
    ("sock_send", "sock_send_length"),
    ("sock_send_failed", "sock_send_length"),
    ("process_fork", "sched_process_fork"),
    ("process_exec", "sched_process_exec"),
    ("process_exit", "sched_process_exit"),
];
/// The sock tracepoints' programs that learn the socket of a library call with a return probe (an
/// nginx's read probe reads it from `c->fd`): attached with the first process probed that way, since they
/// run on every receive and send of the host (some 50 per request when each request is a new TLS
/// connection). The write worker, probed at its entry alone, needs only the failed sends
/// (`sock_send_failed`, attached always).
const LEARNING: [&str; 2] = ["sock_recv", "sock_send"];

/// The value of the `watched` map (struct nginx_layout in tls.bpf.c): where an nginx keeps what its read
/// probe reads; all zero for another process.
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct NginxLayout {
    ssl_field: u32,
    length: u8,
    buffer: u8,
    connection: u8,
    /// NO_REGISTER where no register holds c->ssl
    ssl_connection: u8,
}

const NO_REGISTER: u8 = 0xFF;

// SAFETY: a plain C struct of integers, with no padding (4 + 4 bytes), valid for any bit pattern.
unsafe impl aya::Pod for NginxLayout {}

impl NginxLayout {
    /// The layout of an nginx whose read probe's registers are all general ones (as they are).
    fn of(reads: &NginxReads) -> Option<NginxLayout> {
        let site = &reads.delivered;
        Some(NginxLayout {
            ssl_field: reads.ssl_field,
            length: pt_regs_slot(site.length)?,
            buffer: pt_regs_slot(site.buffer)?,
            connection: pt_regs_slot(site.connection)?,
            ssl_connection: site.ssl_connection.and_then(pt_regs_slot).unwrap_or(NO_REGISTER),
        })
    }
}

pub struct TlsProbes {
    /// the ring's consumer and producer positions, mapped read-only (how full it is, for the CPU watcher)
    positions: *const u8,
    page: usize,
    ring_bytes: u64,
    ebpf: Ebpf,
    ring: RingBuf<MapData>,
    /// the watched processes' children, as they fork (a ring of its own: see `forked`)
    forks: RingBuf<MapData>,
    watched: BpfHashMap<MapData, u32, NginxLayout>,
    attached: HashMap<u32, Process>,
    learning: bool,
    /// processes to be attached again, their events kept open until they are (see `forked`)
    superseded: HashMap<u32, Process>,
    /// the events of processes gone (exited, or exec'd into another program) that live processes
    /// inherited, by owner: closing an event ends every copy a child inherited from it
    retired: HashMap<u64, Process>,
    /// the owner number the next process attached itself gets
    next_owner: u64,
    /// processes that exec'd, forgotten, for the agent to forget too
    execed: Vec<u32>,
    /// children returned by `forked` to be attached, with the owner of the events they inherited
    pending: HashMap<u32, u64>,
    /// the uprobes' trace events (after `attached` in drop order: a process's events close first)
    trace: TraceEvents,
}

/// A process the probes are attached to, itself or by inheritance.
struct Process {
    attached: Attached,
    /// its anchor and its uprobes' perf events, which its children inherit (only the anchor for a child
    /// that inherited its parent's); closing them ends its probes (an attach refused part-way drops
    /// those it made)
    _perf_events: Vec<OwnedFd>,
    /// the monotonic clock (bpf_ktime_get_ns's) when its probes were all in (for a child that inherited
    /// them, its anchor): a child forked after that inherited them and is not a clone
    complete_ns: u64,
    /// its uprobes' events are inherited ones, not its own
    inherited: bool,
    /// whose uprobes' events these are: a number of its own when attached itself, else its parent's
    owner: u64,
}

/// What the forks ring says (struct fork in tls.bpf.c).
#[derive(Clone, Copy, Debug, PartialEq)]
enum ForkKind {
    Fork,
    /// the process `child` exec'd: its probes and layout are the old program's
    Exec,
}

/// A record of the forks ring (struct fork in tls.bpf.c).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Fork {
    child: u32,
    parent: u32,
    time_ns: u64,
    kind: ForkKind,
    /// the parent's thread that forked
    thread: u32,
}

impl Fork {
    fn parse(record: &[u8]) -> Option<Fork> {
        let word = |at: usize| record.get(at..at + 4).and_then(|bytes| bytes.try_into().ok()).map(u32::from_ne_bytes);
        let time = record.get(8..16).and_then(|bytes| bytes.try_into().ok()).map(u64::from_ne_bytes)?;
        let kind = if word(16)? == 1 { ForkKind::Exec } else { ForkKind::Fork };
        Some(Fork { child: word(0)?, parent: word(4)?, time_ns: time, kind, thread: word(20)? })
    }
}

/// How long before a fork its parent's probes must have been all in for the child to be taken as having
/// inherited them: a fork copies the parent's perf events early in the syscall and is reported at its end,
/// and one that overlapped the parent's attach may lack the last ones (that child is attached itself;
/// a site opened twice for a process still runs its program once).
const INHERITED_AFTER_NS: u64 = 1_000_000_000;

/// What a fork asks of the agent (see `TlsProbes::forked`).
#[derive(Debug, PartialEq)]
enum AfterFork {
    Inherited,
    AttachChild,
    AttachBoth,
}

/// `parent`: (when its probes were all in, whether they are inherited), if the agent has it.
fn after_fork(parent: Option<(u64, bool)>, fork_ns: u64) -> AfterFork {
    match parent {
        Some((complete_ns, _)) if complete_ns.saturating_add(INHERITED_AFTER_NS) < fork_ns => AfterFork::Inherited,
        Some((_, true)) => AfterFork::AttachBoth,
        _ => AfterFork::AttachChild,
    }
}

/// The monotonic clock, as bpf_ktime_get_ns reads it.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given, which lives through the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

/// How a process's reads are probed, which is what each costs it: a probe hit is a trap into the kernel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ReadProbes {
    /// nginx's own read function: one hit per read that got bytes
    Nginx,
    /// the library's read worker: an entry and a return per SSL_read call (nginx makes two a request)
    LibraryWorker,
    /// SSL_read and SSL_read_ex themselves, entry and return
    LibraryCalls,
}

impl ReadProbes {
    pub fn name(self) -> &'static str {
        match self {
            ReadProbes::Nginx => "nginx",
            ReadProbes::LibraryWorker => "library worker",
            ReadProbes::LibraryCalls => "library calls",
        }
    }
}

/// What attaching to a process did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Attached {
    pub reads: ReadProbes,
    /// its executable is an nginx (it has `ngx_ssl_recv`), whether or not its read function was understood
    pub nginx: bool,
}

/// Where the two probes a keep-alive request hits in an nginx sit, as file offsets: nginx's read site in
/// its executable and the write worker in its TLS library (None where the code has another shape). For
/// the benchmark's floor: a bare kernel trap at each costs what no probe program can save.
pub fn nginx_request_sites(executable: &[u8], library: &[u8]) -> (Option<u64>, Option<u64>) {
    (nginx_reads(executable).map(|reads| reads.delivered.at), internal_workers(library).map(|[_, write]| write))
}

/// Whether process `pid` is alive: not gone, and not a zombie (an exited worker its master has not reaped
/// yet still has a /proc entry, but no executable or mappings to attach to).
fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().is_some_and(|stat| {
        // the state follows the command name, which is in parentheses and may hold any byte
        stat.rfind(')').and_then(|end| stat[end + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// Why an attach failed, in one line each.
#[derive(Debug)]
pub enum AttachError {
    /// the process exited (or is a zombie) before its probes were all in: nothing of it is left to meter
    Exited(String),
    /// the kernel or the process's files refused
    Refused(String),
}

/// One line saying what the kernel refused, and to what.
fn refused(what: &str, error: impl std::fmt::Display) -> String {
    format!("{what}: {error}")
}

impl TlsProbes {
    /// Loads the programs and attaches the tracepoints (not yet any uprobe): what fails here is what the
    /// agent cannot do on this host (no BPF permission, no BTF, no uprobes), said in one line.
    pub fn load(ring_bytes: u32, ports: &[u16]) -> Result<TlsProbes, String> {
        let missing = env!("TLS_BPF_MISSING");
        if OBJECT.is_empty() {
            return Err(format!("the TLS probes were not built when the agent was installed ({missing})"));
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("chunks", ring_bytes)
            .allow_unsupported_maps() // the per-thread call state (task storage), used by the programs alone
            .load(OBJECT)
            .map_err(|error| refused("the kernel refused the TLS probes' maps", verbose(&error)))?;
        let btf = Btf::from_sys_fs().map_err(|error| refused("no kernel BTF", error))?;
        let others = [("ssl_return", ""), (WRITE_WORKER, ""), (NGINX_DELIVERED, "")];
        for (program, _) in CALLS.iter().chain(MARKERS.iter()).chain(others.iter()) {
            let probe: &mut UProbe = ebpf
                .program_mut(program)
                .and_then(|program| program.try_into().ok())
                .ok_or_else(|| format!("the TLS probes' object has no uprobe {program}"))?;
            probe.load().map_err(|error| refused(&format!("the kernel refused the uprobe program {program}"),
                                                 verbose(&error)))?;
        }
        for (program, tracepoint) in TRACEPOINTS {
            let trace: &mut BtfTracePoint = ebpf
                .program_mut(program)
                .and_then(|program| program.try_into().ok())
                .ok_or_else(|| format!("the TLS probes' object has no tracepoint program {program}"))?;
            trace.load(tracepoint, &btf).map_err(|error| {
                refused(&format!("the kernel refused the tracepoint program {program}"), verbose(&error))
            })?;
            if !LEARNING.contains(&program) {
                trace.attach().map_err(|error| {
                    refused(&format!("cannot attach to tracepoint {tracepoint}"), verbose(&error))
                })?;
            }
        }
        let ring = RingBuf::try_from(ebpf.take_map("chunks").ok_or("no ring buffer map")?)
            .map_err(|error| error.to_string())?;
        let forks = RingBuf::try_from(ebpf.take_map("forks").ok_or("no forks ring buffer map")?)
            .map_err(|error| error.to_string())?;
        let watched = BpfHashMap::try_from(ebpf.take_map("watched").ok_or("no watched map")?)
            .map_err(|error| error.to_string())?;
        let mut metered: BpfHashMap<MapData, u16, u8> =
            BpfHashMap::try_from(ebpf.take_map("tls_ports").ok_or("no tls_ports map")?)
                .map_err(|error| error.to_string())?;
        for port in ports {
            metered.insert(port, 1, 0).map_err(|error| refused("cannot set the TLS ports", error))?;
        }
        // before the mapping below, which nothing would unmap if this failed
        let trace = TraceEvents::open()?;
        use std::os::fd::AsRawFd;
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        // SAFETY: a new read-only shared mapping of the ring's first two pages (consumer and producer
        // positions), which the kernel allows; it is unmapped in Drop.
        let positions = unsafe {
            libc::mmap(std::ptr::null_mut(), 2 * page, libc::PROT_READ, libc::MAP_SHARED, ring.as_raw_fd(), 0)
        };
        if positions == libc::MAP_FAILED {
            return Err(format!("cannot map the ring buffer's positions: {}", std::io::Error::last_os_error()));
        }
        Ok(TlsProbes { positions: positions as *const u8, page, ring_bytes: u64::from(ring_bytes), ebpf, ring,
                       forks, watched, attached: HashMap::new(), learning: false, superseded: HashMap::new(),
                       retired: HashMap::new(), next_owner: 1, execed: Vec::new(), pending: HashMap::new(), trace })
    }

    /// Whether the agent had to mount tracefs (nothing had), to say so.
    pub fn mounted_tracefs(&self) -> bool {
        self.trace.mounted
    }

    /// Attaches every probe to process `pid`'s copy of `library` (a path as the agent sees it, e.g.
    /// under /proc/PID/root), and its reads to nginx's own read function where its executable is an
    /// nginx; the children it forks from then on inherit them. Idempotent per pid.
    pub fn attach(&mut self, pid: u32, library: &str) -> Result<Attached, AttachError> {
        if let Some(process) = self.attached.get(&pid) {
            return Ok(process.attached);
        }
        let executable = format!("/proc/{pid}/exe");
        let executable_code = std::fs::read(&executable).ok();
        let is_nginx = executable_code.as_deref().is_some_and(|code| {
            object::File::parse(code).ok().is_some_and(|file| find_symbol(&file, "ngx_ssl_recv").is_some())
        });
        let nginx = executable_code.as_deref().and_then(nginx_reads)
            .and_then(|reads| Some((NginxLayout::of(&reads)?, reads.delivered.at)));
        let layout = nginx.map_or(NginxLayout::default(), |(layout, _)| layout);
        self.watched.insert(pid, layout, 0)
            .map_err(|error| AttachError::Refused(refused("cannot watch the process", error)))?;
        // all or nothing: a process refused part-way has the events made so far dropped, which ends them
        let mut links = Vec::new();
        let made = TraceEvents::anchor(pid).and_then(|anchor| {
            links.push(anchor);
            self.attach_probes(pid, library, &executable, nginx.map(|(_, at)| at), &mut links)
        });
        let superseded = self.superseded.remove(&pid);
        self.pending.remove(&pid);
        match made {
            Ok(reads) => {
                let attached = Attached { reads, nginx: is_nginx };
                let owner = self.next_owner;
                self.next_owner += 1;
                let process = Process { attached, _perf_events: links, complete_ns: monotonic_ns(), inherited: false,
                                        owner };
                self.attached.insert(pid, process);
                if let Some(old) = superseded {
                    self.release(old);
                }
                Ok(attached)
            }
            Err(error) => {
                drop(links);
                let running = is_running(pid);
                match superseded {
                    // attached again and refused: it keeps the probes it had
                    Some(old) if running => {
                        self.attached.insert(pid, old);
                    }
                    _ => {
                        let _ = self.watched.remove(&pid);
                    }
                }
                Err(if running { AttachError::Refused(error) } else { AttachError::Exited(error) })
            }
        }
    }

    /// A process's events once it no longer needs them: closed, unless a live process inherited them
    /// (then retired until none does).
    fn release(&mut self, process: Process) {
        let owners = self.live_owners();
        if !process.inherited && owners.contains(&process.owner) {
            self.retired.insert(process.owner, process);
        }
        self.retired.retain(|owner, _| owners.contains(owner));
    }

    /// The owners whose events some live process still inherits: the attached, those being attached again,
    /// and the children to attach, which hold inherited copies until they are.
    fn live_owners(&self) -> std::collections::HashSet<u64> {
        self.attached.values().chain(self.superseded.values()).map(|process| process.owner)
            .chain(self.pending.values().copied()).collect()
    }

    /// The processes the agent takes as attached whose probes the programs no longer watch (they exited or
    /// exec'd, and the record saying so was lost: the ring was full): forgotten, for the agent to forget.
    pub fn unwatched(&mut self) -> Vec<u32> {
        let gone: Vec<u32> = self.attached.keys().copied().filter(|pid| self.watched.get(pid, 0).is_err()).collect();
        for pid in &gone {
            self.forget(*pid);
        }
        gone
    }

    /// Every probe of process `pid`, each link pushed onto `links`; how its reads are probed. `nginx_read`:
    /// where in its executable nginx's read site is, if it is an nginx whose code was recognised.
    ///
    /// Writes are probed before reads. A process busy while it is attached (a reload's new worker under
    /// load, a gateway at its peak when the agent starts) has requests in flight on many connections: one
    /// whose request is read after the read probe is in, but whose response is written before the write
    /// probe is, would have the next response paired with it, and every later one on that connection
    /// shifted by one (statuses and sizes billed to the wrong requests). The other way round, a response
    /// whose request went unseen is only a response without a request (counted, not billed).
    fn attach_probes(&mut self, pid: u32, library: &str, executable: &str, nginx_read: Option<u64>,
                     links: &mut Vec<OwnedFd>) -> Result<ReadProbes, String> {
        let code = std::fs::read(library).map_err(|error| format!("cannot read {library}: {error}"))?;
        let file = object::File::parse(&*code).ok();
        let symbol_at = |symbol: &str| {
            file.as_ref().and_then(|file| file_offset(file, find_symbol(file, symbol)?.address()))
                .ok_or_else(|| format!("{library} has no {symbol}"))
        };
        let mut reads = ReadProbes::Nginx;
        let workers = internal_workers(&code);
        match workers {
            Some([read, write]) => {
                links.push(self.attach_one(WRITE_WORKER, write, library, pid)?);
                if nginx_read.is_none() {
                    reads = ReadProbes::LibraryWorker;
                    links.push(self.attach_one(READ_WORKER, read, library, pid)?);
                    links.push(self.attach_one("ssl_return", read, library, pid)?);
                }
            }
            None => {
                if nginx_read.is_none() {
                    reads = ReadProbes::LibraryCalls;
                }
                let reads_elsewhere = |program: &str| nginx_read.is_some() && program.starts_with("ssl_read");
                for (program, symbol) in CALLS.into_iter().filter(|(program, _)| !reads_elsewhere(program)) {
                    let at = symbol_at(symbol)?;
                    links.push(self.attach_one(program, at, library, pid)?);
                    links.push(self.attach_one("ssl_return", at, library, pid)?);
                }
            }
        }
        if let Some(at) = nginx_read {
            links.push(self.attach_one(NGINX_DELIVERED, at, executable, pid)?);
        }
        for (program, symbol) in MARKERS {
            let at = match file.as_ref().and_then(|file| past_null_check(file, symbol)) {
                Some(at) => at,
                None => symbol_at(symbol)?,
            };
            links.push(self.attach_one(program, at, library, pid)?);
        }
        // kernel TLS's sendfile (OpenSSL 3.0 and later) sends on the socket outside any write: its
        // entry ends the last write's window as SSL_shutdown's does
        if let Ok(at) = symbol_at("SSL_sendfile") {
            links.push(self.attach_one("ssl_shutdown", at, library, pid)?);
        }
        // last, once the process's own probes are in: a process refused above does not leave it running.
        // A call with a return probe (every one but an nginx's read and the write worker's) learns its
        // socket from its sends and receives.
        if (nginx_read.is_none() || workers.is_none()) && !self.learning {
            for program in LEARNING {
                let trace: &mut BtfTracePoint = self.ebpf.program_mut(program).and_then(|p| p.try_into().ok())
                    .ok_or("no tracepoint program")?;
                // (one attached twice after a refusal of the other runs twice: learning is done once per call)
                trace.attach().map_err(|error| refused(&format!("cannot attach the tracepoint program {program}"),
                                                       verbose(&error)))?;
            }
            self.learning = true;
        }
        Ok(reads)
    }

    /// Program `program` at `offset` in `file` (a path the agent reaches), in process `pid` and its
    /// future children.
    fn attach_one(&mut self, program: &str, offset: u64, file: &str, pid: u32) -> Result<OwnedFd, String> {
        let probe = self.ebpf.program(program).ok_or_else(|| format!("no program {program}"))?;
        let fd = probe.fd().map_err(|error| format!("program {program} is not loaded: {error}"))?;
        self.trace.open_for(fd.as_fd(), file, offset, program == "ssl_return", pid)
    }

    /// A process that exited: forget it (its pid may come back as another) and close its probes' events.
    /// Its entry in the programs' `watched` map went when it exited (the exit tracepoint), and a child
    /// that took its pid since is watched again: that entry stays.
    pub fn forget(&mut self, pid: u32) {
        if let Some(process) = self.attached.remove(&pid) {
            self.release(process);
        }
        if let Some(process) = self.superseded.remove(&pid) {
            self.release(process);
        }
        self.pending.remove(&pid);
    }

    /// The processes that exec'd another program since the last call (forgotten: see `forked`).
    pub fn execed(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.execed)
    }

    pub fn is_attached(&self, pid: u32) -> bool {
        self.attached.contains_key(&pid)
    }

    /// Up to `max_records` records, each handed to `each`; returns how many there were.
    pub fn drain(&mut self, max_records: usize, mut each: impl FnMut(&[u8])) -> usize {
        let mut records = 0;
        while records < max_records {
            let Some(item) = self.ring.next() else { break };
            each(&item);
            records += 1;
        }
        records
    }

    /// The children watched processes forked since the last call, and the parents to attach again, each to
    /// be passed to `attach`. A child forked well after its parent's probes were all in inherited them (the
    /// kernel copies them into the child before it runs) and is taken as attached here, given its anchor
    /// (`attach` then only says how); a child forked while its parent was being attached, or by a parent
    /// the agent did not attach, is attached by `attach`. So is the parent again, if its own probes are
    /// inherited and it forked before its anchor was in: the child is then a clone, whose exit could take
    /// the parent's probes with it (see trace_events.rs); the parent's events stay until it is attached.
    pub fn forked(&mut self) -> Vec<u32> {
        let mut records = Vec::new();
        while let Some(item) = self.forks.next() {
            records.extend(Fork::parse(&item));
        }
        let mut pids = Vec::new();
        for fork in records {
            if fork.kind == ForkKind::Exec {
                // its probes and layout are the old program's (the programs no longer watch it): it is
                // attached again if it is still a gateway process, when the agent next looks (a helper a
                // fork of this batch started is not attached as the program it became)
                pids.retain(|pid| *pid != fork.child);
                self.pending.remove(&fork.child);
                let old = self.attached.remove(&fork.child).into_iter().chain(self.superseded.remove(&fork.child));
                for process in old.collect::<Vec<_>>() {
                    self.release(process);
                }
                self.execed.push(fork.child);
                continue;
            }
            let parent = self.attached.get(&fork.parent);
            // a fork by another thread than the parent's first: that thread's perf events are those the
            // threads started before the attach lack (an event opened on a process is its first thread's,
            // inherited by the threads started after), so the child may have none
            let from_leader = fork.thread == fork.parent;
            let decided = after_fork(parent.map(|parent| (parent.complete_ns, parent.inherited)), fork.time_ns);
            match decided {
                AfterFork::Inherited if from_leader && !self.attached.contains_key(&fork.child) => {
                    let (attached, owner) = parent.map(|parent| (parent.attached, parent.owner)).expect("a parent");
                    let anchor = match TraceEvents::anchor(fork.child) {
                        Ok(anchor) => vec![anchor],
                        // gone already (its exit may have been read before its fork): nothing to keep
                        Err(_) if !is_running(fork.child) => continue,
                        // (out of descriptors, most likely): its probes work; its own forks may be clones
                        Err(_) => Vec::new(),
                    };
                    let child = Process { attached, _perf_events: anchor, complete_ns: monotonic_ns(),
                                          inherited: true, owner };
                    self.attached.insert(fork.child, child);
                    pids.push(fork.child);
                }
                AfterFork::Inherited if self.attached.contains_key(&fork.child) => pids.push(fork.child),
                AfterFork::AttachBoth => {
                    if let Some(parent) = self.attached.remove(&fork.parent) {
                        self.pending.insert(fork.child, parent.owner);
                        self.superseded.insert(fork.parent, parent);
                    }
                    pids.extend([fork.parent, fork.child]);
                }
                _ => {
                    if let Some(parent) = parent {
                        self.pending.insert(fork.child, parent.owner);
                    }
                    pids.push(fork.child);
                }
            }
        }
        pids
    }

    /// How full the ring is, 0 to 1.
    pub fn ready_fraction(&self) -> f64 {
        // SAFETY: both positions are u64s at the start of the two mapped pages, written by the kernel and
        // the consumer; volatile reads, since they change under us.
        let (consumer, producer) = unsafe {
            (std::ptr::read_volatile(self.positions as *const u64),
             std::ptr::read_volatile(self.positions.add(self.page) as *const u64))
        };
        producer.saturating_sub(consumer) as f64 / self.ring_bytes as f64
    }

    /// The ring's file descriptor, to wait on.
    pub fn fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.ring.as_raw_fd()
    }

    /// (records the ring had no room for, plaintext bytes not copied, calls seen but not followed),
    /// summed over CPUs.
    pub fn losses(&self) -> (u64, u64, u64) {
        let Some(map) = self.ebpf.map("losses") else { return (0, 0, 0) };
        let Ok(losses) = PerCpuArray::<&MapData, u64>::try_from(map) else { return (0, 0, 0) };
        let sum = |index: u32| losses.get(&index, 0).map_or(0, |values| values.iter().sum());
        (sum(0), sum(1), sum(2))
    }
}

impl Drop for TlsProbes {
    fn drop(&mut self) {
        // the processes' perf events, before the trace events they are open on
        self.attached.clear();
        self.superseded.clear();
        self.retired.clear();
        // SAFETY: the mapping made in `load`, of that size, used by nothing after this.
        unsafe { libc::munmap(self.positions as *mut libc::c_void, 2 * self.page) };
    }
}

/// aya's errors with their causes (the verifier's log among them), on one line.
fn verbose(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(&format!(": {cause_text}"));
        }
        source = cause.source();
    }
    text.replace('\n', " ")
}

/// The file offsets of OpenSSL's internal read and write workers, `ssl_read_internal` and
/// `ssl_write_internal(s, buf, num, ...)` (1.1.1 and 3.x): the functions `SSL_read`,
/// `SSL_read_ex` (and `SSL_read_early_data`) and `SSL_write`, `SSL_write_ex` all call. Probes there see
/// every read and write, whichever public form the gateway uses. They are also cheaper on x86-64: a
/// worker begins with `push` (saving registers), an instruction the kernel emulates, where the public
/// functions begin with `sub $N, %rsp`, which costs a single-step on top of the trap. Found as the first
/// direct call in each public function, and trusted only in that shape: `SSL_read` and `SSL_read_ex` call
/// the same function, the first making the `size_t *` it passes and the second passing its own;
/// `SSL_write` and `SSL_write_ex` (`SSL_write_ex2` from 3.2) call the same other function; each begins
/// with `push` (after `endbr64` on CET builds). None otherwise (another library, a build that inlined
/// them, not x86-64): the public functions are probed then.
pub fn internal_workers(elf: &[u8]) -> Option<[u64; 2]> {
    if !cfg!(target_arch = "x86_64") {
        return None;
    }
    let file = object::File::parse(elf).ok()?;
    // SSL_read(s, buf, int num) makes its `size_t *readbytes` (the fourth argument, rcx) before the
    // call; SSL_read_ex passes its own through untouched
    let (read, sets_done) = first_call(&file, "SSL_read")?;
    let (read_ex, sets_done_ex) = first_call(&file, "SSL_read_ex")?;
    (read == read_ex && sets_done && !sets_done_ex).then_some(())?;
    // 3.2 added SSL_write_ex2, which SSL_write_ex jumps to and which calls the worker
    let (write, _) = first_call(&file, "SSL_write")?;
    let (write_ex, _) = first_call(&file, "SSL_write_ex2").or_else(|| first_call(&file, "SSL_write_ex"))?;
    (write == write_ex && write != read).then_some(())?;
    Some([entry_offset(&file, read)?, entry_offset(&file, write)?])
}

/// The file offset of the worker at `address`, at its first `push` (after an `endbr64` on CET builds):
/// an instruction the kernel emulates, with the arguments still as the caller passed them.
fn entry_offset(file: &object::File<'_>, address: u64) -> Option<u64> {
    match instructions_at(file, address, 1)?.as_slice() {
        [(push, at)] if push.mnemonic() == Mnemonic::Push => Some(*at),
        _ => None,
    }
}

/// The first `count` instructions at `address` (an `endbr64`, on CET builds, skipped), each with the file
/// offset it begins at.
fn instructions_at(file: &object::File<'_>, address: u64, count: usize) -> Option<Vec<(Instruction, u64)>> {
    let (code, section) = code_at(file, address, 32)?;
    let (file_start, start) = (section.file_range()?.0, section.address());
    let mut instructions: Vec<Instruction> =
        Decoder::with_ip(64, code, address, DecoderOptions::NONE).iter().take(count + 1).collect();
    if instructions.first().is_some_and(|first| first.mnemonic() == Mnemonic::Endbr64) {
        instructions.remove(0);
    }
    instructions.truncate(count);
    (instructions.len() == count).then_some(())?;
    Some(instructions.into_iter().map(|instruction| (instruction, file_start + instruction.ip() - start)).collect())
}

/// The file offset of `symbol`'s first `push` when all before it is a null check of its first argument
/// (`test %rdi,%rdi` and `je`, as `SSL_free` begins): the kernel single-steps a `test` (a second trap,
/// about ten times the cost of an emulated `push`), and at the `push` the argument is still in rdi. A null
/// argument jumps past the probe, which the program would ignore anyway. None in any other shape: the
/// symbol itself is probed then.
fn past_null_check(file: &object::File<'_>, symbol: &str) -> Option<u64> {
    if !cfg!(target_arch = "x86_64") {
        return None;
    }
    let instructions = instructions_at(file, find_symbol(file, symbol)?.address(), 3)?;
    let [(test, _), (branch, _), (push, at)] = instructions.as_slice() else { return None };
    let checks_rdi = test.mnemonic() == Mnemonic::Test
        && test.op_count() == 2
        && (0..2).all(|at| test.op_kind(at) == OpKind::Register && test.op_register(at) == Register::RDI);
    // `je`: a null argument jumps away, so the push is the path every real SSL* takes
    (checks_rdi && branch.mnemonic() == Mnemonic::Je && push.mnemonic() == Mnemonic::Push).then_some(*at)
}

pub(super) fn find_symbol<'data, 'file>(file: &'file object::File<'data>, symbol: &str) -> Option<object::Symbol<'data, 'file>> {
    file.dynamic_symbols().chain(file.symbols()).find(|candidate| {
        candidate.name().is_ok_and(|name| name == symbol || name.split('@').next() == Some(symbol))
            && candidate.address() != 0
    })
}

/// The target of `symbol`'s first call, if that is a direct call into the same section (not a PLT stub)
/// and comes before any return or jump out; and whether an instruction before it writes rcx (the fourth
/// argument).
fn first_call(file: &object::File<'_>, symbol: &str) -> Option<(u64, bool)> {
    let found = find_symbol(file, symbol)?;
    let start = found.address();
    let length = if found.size() > 0 { found.size() } else { 256 };
    let (code, section) = code_at(file, start, length)?;
    let text = section.address()..section.address() + section.size();
    let mut writes_rcx = false;
    for instruction in Decoder::with_ip(64, code, start, DecoderOptions::NONE).iter().take(64) {
        match instruction.flow_control() {
            FlowControl::Call => {
                let target = instruction.near_branch_target();
                return (instruction.is_call_near() && text.contains(&target)).then_some((target, writes_rcx));
            }
            FlowControl::Return | FlowControl::UnconditionalBranch | FlowControl::IndirectBranch => return None,
            _ => {}
        }
        writes_rcx |= instruction.op_count() > 0
            && instruction.op0_kind() == OpKind::Register
            && instruction.op0_register().full_register() == Register::RCX
            && !matches!(instruction.mnemonic(), Mnemonic::Cmp | Mnemonic::Test | Mnemonic::Push);
    }
    None
}

/// The file offset of virtual address `address` (what a uprobe is attached at).
pub(super) fn file_offset(file: &object::File<'_>, address: u64) -> Option<u64> {
    let (_, section) = code_at(file, address, 1)?;
    Some(section.file_range()?.0 + address - section.address())
}

/// Up to `length` bytes of code from virtual address `address`, and the section holding them.
pub(super) fn code_at<'data, 'file>(file: &'file object::File<'data>, address: u64, length: u64)
                         -> Option<(&'data [u8], object::Section<'data, 'file>)> {
    let section = file.sections().find(|section| {
        section.address() <= address && address < section.address() + section.size()
    })?;
    let data = section.data().ok()?;
    let from = usize::try_from(address - section.address()).ok()?;
    let to = from.checked_add(usize::try_from(length).ok()?)?.min(data.len());
    Some((data.get(from..to)?, section))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_forked_well_after_its_parents_probes_were_in_inherited_them() {
        let second = 1_000_000_000;
        assert_eq!(after_fork(Some((5 * second, false)), 7 * second), AfterFork::Inherited);
        assert_eq!(after_fork(Some((5 * second, true)), 7 * second), AfterFork::Inherited);
        // forked while the parent was being attached, or just after: it may lack the last probes
        assert_eq!(after_fork(Some((5 * second, false)), 5 * second + 1), AfterFork::AttachChild);
        assert_eq!(after_fork(Some((5 * second, false)), 4 * second), AfterFork::AttachChild);
        // a parent that inherited its probes and forked before its anchor was in: the child is a clone
        assert_eq!(after_fork(Some((5 * second, true)), 5 * second + 1), AfterFork::AttachBoth);
        assert_eq!(after_fork(None, 7 * second), AfterFork::AttachChild, "a parent the agent did not attach");
        let record = |kind: u8| [1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, kind, 0, 0, 0, 4, 0, 0, 0];
        let fork = Fork { child: 1, parent: 2, time_ns: 3, kind: ForkKind::Fork, thread: 4 };
        assert_eq!(Fork::parse(&record(0)), Some(fork));
        assert_eq!(Fork::parse(&record(1)), Some(Fork { kind: ForkKind::Exec, ..fork }));
        assert_eq!(Fork::parse(&[1, 0, 0, 0]), None);
    }

    #[test]
    fn a_zombie_or_a_gone_process_is_not_running() {
        assert!(is_running(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while is_running(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!is_running(pid), "exited, not reaped yet: a zombie");
        assert!(std::fs::metadata(format!("/proc/{pid}")).is_ok());
        child.wait().unwrap();
        assert!(!is_running(pid));
    }

    #[test]
    fn debian_openssl_3_has_the_internal_workers() {
        let Ok(library) = std::fs::read("/usr/lib/x86_64-linux-gnu/libssl.so.3") else {
            panic!("this test reads Debian's libssl.so.3 (libssl3), which the gateway stand-in links");
        };
        let file = object::File::parse(&*library).unwrap();
        let [read, write] = internal_workers(&library).expect("ssl_read_internal and ssl_write_internal");
        assert_ne!(read, write);
        let public = |symbol: &str| file.dynamic_symbols().find(|s| s.name().is_ok_and(|n| n == symbol)).unwrap();
        for (worker, symbol) in [(read, "SSL_read"), (write, "SSL_write")] {
            let (code, section) = code_at(&file, public(symbol).address(), 64).unwrap();
            assert!(code.len() == 64 && worker > 0);
            let (virtual_address, _) = first_call(&file, symbol).unwrap();
            assert_eq!(worker, section.file_range().unwrap().0 + virtual_address - section.address());
        }
        assert!(first_call(&file, "SSL_read").unwrap().1, "SSL_read makes its readbytes pointer (rcx)");
        assert!(!first_call(&file, "SSL_read_ex").unwrap().1, "SSL_read_ex passes its caller's");
        assert_eq!(first_call(&file, "SSL_free"), None, "SSL_free returns (for a null SSL*) before any call");
        assert_eq!(internal_workers(b"not an elf"), None);
        // SSL_free begins `test %rdi,%rdi; je; push`: probed at the push, past the single-stepped test
        let free = public("SSL_free").address();
        let (code, section) = code_at(&file, free, 16).unwrap();
        let at = past_null_check(&file, "SSL_free").expect("SSL_free's null check");
        let virtual_address = at - section.file_range().unwrap().0 + section.address();
        assert!(virtual_address > free && virtual_address < free + 16);
        assert_eq!(code[usize::try_from(virtual_address - free).unwrap()] & 0xF0, 0x40, "a REX-prefixed push");
        assert_eq!(past_null_check(&file, "SSL_set_fd"), None, "SSL_set_fd begins with its push");
        assert_eq!(past_null_check(&file, "no_such_symbol"), None);
    }
}
