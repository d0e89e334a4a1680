//! The TLS probes' loader (aya): loads the BPF object build.rs compiled, attaches its uprobes to one
//! process's TLS library at a time, and reads the ring buffer of plaintext records (fed to
//! `Pipeline::feed_tls`). This is the source edge, so it does I/O; what the records mean is `tls.rs`.

use std::collections::HashSet;
use std::num::NonZeroU32;

use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::uprobe::UProbeScope;
use aya::programs::{BtfTracePoint, UProbe};
use aya::{Btf, Ebpf, EbpfLoader};

static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tls.bpf.o"));

/// Entry probes, by program and symbol; every one also gets the shared return probe (`ssl_return`).
const CALLS: [(&str, &str); 4] = [
    ("ssl_read_enter", "SSL_read"),
    ("ssl_read_ex_enter", "SSL_read_ex"),
    ("ssl_write_enter", "SSL_write"),
    ("ssl_write_ex_enter", "SSL_write_ex"),
];
const MARKERS: [(&str, &str); 2] = [("ssl_set_fd", "SSL_set_fd"), ("ssl_free", "SSL_free")];
const TRACEPOINTS: [(&str, &str); 4] = [
    ("sock_recv", "sock_recv_length"),
    ("sock_send", "sock_send_length"),
    ("process_fork", "sched_process_fork"),
    ("process_exit", "sched_process_exit"),
];

pub struct TlsProbes {
    ebpf: Ebpf,
    ring: RingBuf<MapData>,
    watched: BpfHashMap<MapData, u32, u8>,
    attached: HashSet<u32>,
}

/// One line saying what the kernel refused, and to what.
fn refused(what: &str, error: impl std::fmt::Display) -> String {
    format!("{what}: {error}")
}

impl TlsProbes {
    /// Loads the programs and attaches the tracepoints (not yet any uprobe): what fails here is what the
    /// agent cannot do on this host (no BPF permission, no BTF, no uprobes), said in one line.
    pub fn load(ring_bytes: u32) -> Result<TlsProbes, String> {
        let missing = env!("TLS_BPF_MISSING");
        if OBJECT.is_empty() {
            return Err(format!("the TLS probes were not built when the agent was installed ({missing})"));
        }
        if !std::path::Path::new("/sys/bus/event_source/devices/uprobe").exists() {
            return Err("this kernel has no uprobe events (/sys/bus/event_source/devices/uprobe)".to_string());
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("chunks", ring_bytes)
            .load(OBJECT)
            .map_err(|error| refused("the kernel refused the TLS probes' maps", verbose(&error)))?;
        let btf = Btf::from_sys_fs().map_err(|error| refused("no kernel BTF", error))?;
        for (program, _) in CALLS.iter().chain(MARKERS.iter()).chain([("ssl_return", "")].iter()) {
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
            trace.attach().map_err(|error| refused(&format!("cannot attach to tracepoint {tracepoint}"), verbose(&error)))?;
        }
        let ring = RingBuf::try_from(ebpf.take_map("chunks").ok_or("no ring buffer map")?)
            .map_err(|error| error.to_string())?;
        let watched = BpfHashMap::try_from(ebpf.take_map("watched").ok_or("no watched map")?)
            .map_err(|error| error.to_string())?;
        Ok(TlsProbes { ebpf, ring, watched, attached: HashSet::new() })
    }

    /// Attaches every probe to process `pid`'s copy of `library` (a path as the agent sees it, e.g.
    /// under /proc/PID/root). Idempotent per pid.
    pub fn attach(&mut self, pid: u32, library: &str) -> Result<(), String> {
        if self.attached.contains(&pid) {
            return Ok(());
        }
        let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).ok_or("pid 0")?);
        self.watched.insert(pid, 1, 0).map_err(|error| refused("cannot watch the process", error))?;
        for (program, symbol) in CALLS.iter().chain(MARKERS.iter()) {
            let probe: &mut UProbe = self.ebpf.program_mut(program).and_then(|p| p.try_into().ok()).ok_or("no probe")?;
            probe.attach(*symbol, library, scope).map_err(|error| {
                refused(&format!("cannot attach a uprobe to {symbol} in {library} (pid {pid})"), verbose(&error))
            })?;
        }
        let ret: &mut UProbe = self.ebpf.program_mut("ssl_return").and_then(|p| p.try_into().ok()).ok_or("no probe")?;
        for (_, symbol) in CALLS {
            ret.attach(symbol, library, scope).map_err(|error| {
                refused(&format!("cannot attach a uretprobe to {symbol} in {library} (pid {pid})"), verbose(&error))
            })?;
        }
        self.attached.insert(pid);
        Ok(())
    }

    /// A process that exited: its probes went with it; forget it (its pid may come back as another).
    pub fn forget(&mut self, pid: u32) {
        self.attached.remove(&pid);
        let _ = self.watched.remove(&pid);
    }

    pub fn is_attached(&self, pid: u32) -> bool {
        self.attached.contains(&pid)
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

    /// The ring's file descriptor, to wait on.
    pub fn fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.ring.as_raw_fd()
    }

    /// (records the ring had no room for, plaintext bytes not copied), summed over CPUs.
    pub fn losses(&self) -> (u64, u64) {
        let Some(map) = self.ebpf.map("losses") else { return (0, 0) };
        let Ok(losses) = PerCpuArray::<&MapData, u64>::try_from(map) else { return (0, 0) };
        let sum = |index: u32| losses.get(&index, 0).map_or(0, |values| values.iter().sum());
        (sum(0), sum(1))
    }
}

/// aya's errors with their causes (the verifier's log among them), on one line.
fn verbose(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text.replace('\n', " ")
}
