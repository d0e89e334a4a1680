//! Uprobes as the kernel's trace events (tracefs `uprobe_events`), opened per gateway process as perf
//! events that its children inherit. This is how a reload's new workers are probed from their first
//! instruction: the kernel copies a process's inheritable perf events into every child it forks, before
//! the child runs, so nothing has to be attached after the fork and nothing is served unseen meanwhile.
//!
//! The other way to make a uprobe (the uprobe PMU, perf_event_open with a path, which aya uses) cannot be
//! inherited safely: the kernel would copy the path again from the memory of the process that forks, the
//! gateway's, where the agent's pointer means nothing, and a refusal there fails the gateway's fork.
//!
//! A trace event is made once per probe site (file, offset, entry or return) and holds its program: the
//! program is attached to a perf event on the agent's own process (the `carrier`), and then runs for every
//! hit in any process that has a perf event open on that trace event, its own or inherited. A process's
//! perf events only choose which processes the site traps in; a process opened twice (attached again,
//! or attached and also inheriting) still runs the program once per hit. Closing a process's events is
//! never the trace event's last close (the carrier holds it), so it does not wait for the kernel's RCU
//! grace periods under the trace-event lock, which would hold up the next attach.
//!
//! Every process also gets an `anchor`: a perf event of its own that its children do not inherit. The
//! kernel takes a child whose perf events were all inherited for a clone of its parent's, and then swaps
//! the two processes' sets at a context switch between clones (a saving for counters, which add up the
//! same either way). A uprobe's filter goes by each event's own process, so after a swap an exiting worker
//! took a live sibling's events with it, and the kernel removed the sibling's probes: without anchors,
//! one of the two new workers of most reloads lost all its probes as the old workers exited. One event
//! not inherited makes the children not clones.
//!
//! This is the source edge: it writes tracefs and makes perf events.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where tracefs is mounted when nothing mounted it (systemd mounts it there on every boot).
const TRACEFS_HOME: &str = "/sys/kernel/tracing";
/// The prefix of this agent's trace-event groups, `agent_tls_<pid>`; a dead agent's are removed at start.
const GROUP_PREFIX: &str = "agent_tls_";

/// One probe site: the file (device and inode), the offset in it, and whether it is a return probe.
type Site = (u64, u64, u64, bool);

struct TraceEvent {
    name: String,
    id: u64,
    /// the program's descriptor number, which stays the same while the agent runs
    program: i32,
    /// the agent's own perf event on it, which holds the program (dropped before the event is removed)
    _carrier: OwnedFd,
}

pub struct TraceEvents {
    root: PathBuf,
    group: String,
    events: HashMap<Site, TraceEvent>,
    /// the number in the next event's name (not reused: a half-made event that could not be removed keeps
    /// its name)
    made: u32,
    /// tracefs was not mounted, and the agent mounted it at `TRACEFS_HOME`
    pub mounted: bool,
}

impl TraceEvents {
    /// Finds tracefs (mounting it where systemd would, if nothing has) and removes the trace events a
    /// previous agent left behind when it was killed.
    pub fn open() -> Result<TraceEvents, String> {
        let (root, mounted) = tracefs()?;
        if !root.join("uprobe_events").exists() {
            return Err(format!("this kernel has no uprobe events ({} has no uprobe_events)", root.display()));
        }
        let group = format!("{GROUP_PREFIX}{}", std::process::id());
        let events = TraceEvents { root, group, events: HashMap::new(), made: 0, mounted };
        events.remove_stale();
        Ok(events)
    }

    /// A perf event that makes process `pid` (and every child it forks from now on) trap at `offset` in
    /// `path` and run `program` there (one program per site).
    pub fn open_for(&mut self, program: BorrowedFd<'_>, path: &str, offset: u64, retprobe: bool, pid: u32)
                    -> Result<OwnedFd, String> {
        let metadata = std::fs::metadata(path).map_err(|error| format!("cannot read {path}: {error}"))?;
        let site = (metadata.dev(), metadata.ino(), offset, retprobe);
        let id = match self.events.get(&site) {
            Some(event) if event.program != program.as_raw_fd() => {
                return Err(format!("two programs for the uprobe at {offset:#x} in {path}"));
            }
            Some(event) => event.id,
            None => {
                let event = self.make(program, path, offset, retprobe)?;
                let id = event.id;
                self.events.insert(site, event);
                id
            }
        };
        let event = perf_event(id, pid, true)
            .map_err(|error| format!("cannot open the uprobe at {offset:#x} in {path} for pid {pid}: {error}"))?;
        enable(&event).map_err(|error| format!("cannot enable the uprobe at {offset:#x} in {path}: {error}"))?;
        Ok(event)
    }

    /// The anchor of process `pid` (see the module's comment): opened before its uprobes' events, and for a
    /// child that inherited them as soon as it is known.
    pub fn anchor(pid: u32) -> Result<OwnedFd, String> {
        let attr = PerfEventAttr {
            kind: PERF_TYPE_SOFTWARE,
            size: std::mem::size_of::<PerfEventAttr>() as u32,
            config: PERF_COUNT_SW_DUMMY,
            ..PerfEventAttr::default()
        };
        open(&attr, pid).map_err(|error| format!("cannot open a perf event for pid {pid}: {error}"))
    }

    /// A new trace event for the site, its program attached through the carrier.
    fn make(&mut self, program: BorrowedFd<'_>, path: &str, offset: u64, retprobe: bool) -> Result<TraceEvent, String> {
        if path.contains(|c: char| c.is_whitespace() || c == ':') {
            return Err(format!("cannot probe {path:?}: tracefs takes no spaces or colons in a path"));
        }
        let name = format!("p{}", self.made);
        self.made += 1;
        let kind = if retprobe { 'r' } else { 'p' };
        self.command(&format!("{kind}:{}/{name} {path}:{offset:#x}", self.group))
            .map_err(|error| format!("cannot make a uprobe at {offset:#x} in {path}: {error}"))?;
        let made = (|| {
            let id_path = self.root.join("events").join(&self.group).join(&name).join("id");
            let id = std::fs::read_to_string(&id_path)
                .map_err(|error| format!("cannot read {}: {error}", id_path.display()))?;
            let id = id.trim().parse().map_err(|_| format!("{} is not a number: {id:?}", id_path.display()))?;
            let carrier = perf_event(id, std::process::id(), false)
                .map_err(|error| format!("cannot open the uprobe at {offset:#x} in {path}: {error}"))?;
            attach_program(&carrier, program)
                .map_err(|error| format!("cannot attach a program to the uprobe at {offset:#x} in {path}: {error}"))?;
            Ok(TraceEvent { name: name.clone(), id, program: program.as_raw_fd(), _carrier: carrier })
        })();
        if made.is_err() {
            let _ = self.command(&format!("-:{}/{name}", self.group));
        }
        made
    }

    /// One line written to `uprobe_events` (appended: tracefs takes no seek).
    fn command(&self, line: &str) -> std::io::Result<()> {
        let mut file = OpenOptions::new().append(true).open(self.root.join("uprobe_events"))?;
        file.write_all(format!("{line}\n").as_bytes())
    }

    /// The trace events of agents that are no longer running (or of an earlier agent with this pid):
    /// removed, as the agent would have on a clean stop. A killed agent's were seen busy for a moment
    /// after it was gone (while its CPU-share watcher still held copies of its descriptors), so a busy one
    /// is tried again for up to 2 s; one still in use then stays.
    fn remove_stale(&self) {
        let Ok(listing) = std::fs::read_to_string(self.root.join("uprobe_events")) else { return };
        let mut stale = stale_events(&listing, std::process::id(), |pid| Path::new(&format!("/proc/{pid}")).exists());
        for _ in 0..40 {
            let busy = |error: std::io::Error| error.raw_os_error() == Some(libc::EBUSY);
            stale.retain(|name| self.command(&format!("-:{name}")).is_err_and(busy));
            if stale.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
}

impl Drop for TraceEvents {
    /// Every process's perf events are closed by now (TlsProbes drops them first): the carriers go, then
    /// the trace events.
    fn drop(&mut self) {
        let names: Vec<String> = self.events.drain().map(|(_, event)| event.name).collect();
        for name in names {
            let _ = self.command(&format!("-:{}/{name}", self.group));
        }
    }
}

/// The `group/name` of each of an agent's events in a `uprobe_events` listing whose agent is `own_pid` or
/// not `running`.
fn stale_events(listing: &str, own_pid: u32, running: impl Fn(u32) -> bool) -> Vec<String> {
    listing.lines().filter_map(|line| {
        let name = line.get(2..)?.split_whitespace().next()?;
        let pid: u32 = name.split('/').next()?.strip_prefix(GROUP_PREFIX)?.parse().ok()?;
        (pid == own_pid || !running(pid)).then(|| name.to_string())
    }).collect()
}

/// tracefs's mount point, and whether the agent mounted it. Where nothing has (a minimal VM or image
/// without systemd), it is mounted where systemd would.
fn tracefs() -> Result<(PathBuf, bool), String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if let Some(found) = mount_point(&mounts, "tracefs") {
        return Ok((found, false));
    }
    if let Some(debugfs) = mount_point(&mounts, "debugfs") {
        let under = debugfs.join("tracing");
        if under.join("uprobe_events").exists() {
            return Ok((under, false));
        }
    }
    let target = std::ffi::CString::new(TRACEFS_HOME).expect("no NUL");
    let kind = std::ffi::CString::new("tracefs").expect("no NUL");
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call and no data.
    let status = unsafe { libc::mount(kind.as_ptr(), target.as_ptr(), kind.as_ptr(), 0, std::ptr::null()) };
    if status != 0 {
        return Err(format!("tracefs is not mounted and mounting it at {TRACEFS_HOME} failed: {}",
                           std::io::Error::last_os_error()));
    }
    Ok((PathBuf::from(TRACEFS_HOME), true))
}

/// The mount point of the first filesystem of type `kind` in a /proc/self/mounts listing (whose spaces
/// in paths are written `\040`).
fn mount_point(mounts: &str, kind: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        (fields.len() > 2 && fields[2] == kind).then(|| PathBuf::from(fields[1].replace("\\040", " ")))
    })
}

/// The start of `struct perf_event_attr`, up to `config1` (PERF_ATTR_SIZE_VER0, which every kernel takes).
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    /// the bit fields: disabled is bit 0, inherit bit 1
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const PERF_TYPE_SOFTWARE: u32 = 1;
const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_COUNT_SW_DUMMY: u64 = 9;
const DISABLED: u64 = 1;
const INHERIT: u64 = 1 << 1;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
const PERF_EVENT_IOC_ENABLE: libc::c_ulong = 0x2400;
/// _IOW('$', 8, __u32)
const PERF_EVENT_IOC_SET_BPF: libc::c_ulong = 0x4004_2408;

/// A counting perf event on trace event `id` for process `pid` (its main thread: a uprobe's filter is the
/// process's memory, so every thread of it), disabled, inherited by its children if `inherit`.
fn perf_event(id: u64, pid: u32, inherit: bool) -> std::io::Result<OwnedFd> {
    let attr = PerfEventAttr {
        kind: PERF_TYPE_TRACEPOINT,
        size: std::mem::size_of::<PerfEventAttr>() as u32,
        config: id,
        flags: DISABLED | if inherit { INHERIT } else { 0 },
        ..PerfEventAttr::default()
    };
    open(&attr, pid)
}

/// perf_event_open(attr, pid, any CPU, no group).
fn open(attr: &PerfEventAttr, pid: u32) -> std::io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: perf_event_open reads `attr`, a valid struct whose `size` says how much of it there is, and
    // returns a new descriptor or -1; the other arguments are plain integers.
    let fd = unsafe {
        libc::syscall(libc::SYS_perf_event_open, attr as *const PerfEventAttr, pid, -1 as libc::c_int,
                      -1 as libc::c_int, PERF_FLAG_FD_CLOEXEC)
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just made for us, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

fn enable(event: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: a perf event descriptor we own; ENABLE takes no argument.
    if unsafe { libc::ioctl(event.as_raw_fd(), PERF_EVENT_IOC_ENABLE as _, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn attach_program(event: &OwnedFd, program: BorrowedFd<'_>) -> std::io::Result<()> {
    // SAFETY: a perf event descriptor we own, and a BPF program's descriptor as SET_BPF's integer argument.
    if unsafe { libc::ioctl(event.as_raw_fd(), PERF_EVENT_IOC_SET_BPF as _, program.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    enable(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_events_of_an_agent_no_longer_running_or_of_this_pid_are_stale() {
        let listing = "p:agent_tls_10/p0 /usr/sbin/nginx:0x0000000000012345\n\
                       r:agent_tls_10/p1 /lib/libssl.so.3:0x0000000000000100\n\
                       p:agent_tls_20/p0 /usr/sbin/nginx:0x0000000000012345\n\
                       p:agent_tls_30/p0 /usr/sbin/nginx:0x0000000000012345\n\
                       p:other/agent_tls_40 /bin/true:0x10\n\
                       p:agent_tls_x/p0 /bin/true:0x10\n";
        let running = |pid| pid == 20 || pid == 30;
        assert_eq!(stale_events(listing, 30, running), ["agent_tls_10/p0", "agent_tls_10/p1", "agent_tls_30/p0"]);
        assert!(stale_events("", 1, running).is_empty());
    }

    #[test]
    fn tracefs_is_found_in_the_mounts_listing() {
        let mounts = "proc /proc proc rw 0 0\n\
                      debugfs /sys/kernel/debug debugfs rw 0 0\n\
                      tracefs /mnt/my\\040trace tracefs rw 0 0\n";
        assert_eq!(mount_point(mounts, "tracefs"), Some(PathBuf::from("/mnt/my trace")));
        assert_eq!(mount_point(mounts, "debugfs"), Some(PathBuf::from("/sys/kernel/debug")));
        assert_eq!(mount_point(mounts, "cgroup2"), None);
    }

    #[test]
    fn perf_event_attr_is_the_kernels_first_version() {
        assert_eq!(std::mem::size_of::<PerfEventAttr>(), 64, "PERF_ATTR_SIZE_VER0");
    }
}
