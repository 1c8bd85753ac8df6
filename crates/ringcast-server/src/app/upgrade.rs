//! Zero-downtime upgrade: the running process starts its successor with the listening sockets, hands it
//! the memory broker's streams, and drains.
//!
//! # The handover, step by step
//! 1. SIGUSR2 reaches the old process. It starts the binary at its own path (as it is on disk now, so
//!    a replaced binary is the one that starts) with its own arguments and environment, plus:
//!    the listening sockets as fds 3, 4, ... with `LISTEN_FDS`, `LISTEN_PID` (the child's pid) and
//!    `LISTEN_FDNAMES` (systemd's socket-activation convention: the same code path serves a systemd
//!    socket unit), and one end of a Unix socket pair as `RINGCAST_UPGRADE_FD`.
//! 2. The child takes the sockets (listenfd), builds everything, and writes `R` (ready) on the pair.
//!    The old process keeps accepting until then.
//! 3. The old process stops accepting, freezes its node (publications are refused from now on, answered
//!    with the temporary error 100, so nothing is published after the snapshot), and sends the memory
//!    broker's streams (`MemoryBroker::snapshot`) to the child, length-prefixed.
//! 4. The child restores them (same epochs and offsets), starts accepting, writes its pid file and
//!    answers `A`. In the gap between 3 and 4 nobody calls `accept`, but the listening socket is the
//!    same one in both processes: connections wait in its backlog (4096), none is refused.
//! 5. The old process drains: its clients are disconnected with 3001 (shutdown, reconnect) spread over
//!    `drain_window`; they reconnect to the child and recover from their offsets. Then it exits.
//!
//! If the child fails before `A` (exits, times out, cannot restore), the old process thaws its node,
//! accepts again, and stays in charge; the failure is logged.
//!
//! # Why `execve` from `pre_exec`
//! `LISTEN_PID` must be the child's own pid, which is known only after `fork`. Setting an environment
//! variable after `fork` in a multithreaded process is not async-signal-safe (it allocates), so the
//! environment block is built before the fork with a fixed-size slot for the pid; the child writes the
//! digits into it and calls `execve` itself. Only `getpid`, `dup2` and `execve` run between fork and exec.

use std::ffi::{CString, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::Duration;

/// The environment variable naming the child's end of the handover socket.
pub const UPGRADE_FD_ENV: &str = "RINGCAST_UPGRADE_FD";
/// How long the old process waits for its successor at each step before it gives up and stays.
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// The parent's side of a started successor.
#[derive(Debug)]
pub struct Successor {
    pub pid: u32,
    pub socket: UnixStream,
    child: std::process::Child,
}

impl Successor {
    /// Whether the successor has exited (reaped if so).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

/// The binary to start: our own path, without the " (deleted)" Linux appends once it was replaced.
fn own_binary() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let s = exe.as_os_str().as_bytes();
    let suffix = b" (deleted)";
    if s.ends_with(suffix) {
        return Ok(PathBuf::from(std::ffi::OsStr::from_bytes(&s[..s.len() - suffix.len()])));
    }
    Ok(exe)
}

fn cstring(b: &[u8]) -> std::io::Result<CString> {
    CString::new(b).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in argument"))
}

/// What the forked child needs, built before the fork (nothing is allocated after it).
struct ExecPlan {
    path: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    /// `LISTEN_PID=` followed by room for the digits and the NUL (heap memory: stable across the move).
    pid_slot: Box<[u8; 40]>,
    /// (source fd, target fd): duplicated onto the target in the child.
    fds: Vec<(RawFd, RawFd)>,
}

// SAFETY: the raw pointers point into the `CString`s and the slot owned by the same struct; they are
// only dereferenced by `execve` in the child.
unsafe impl Send for ExecPlan {}
unsafe impl Sync for ExecPlan {}

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";

impl ExecPlan {
    /// In the forked child: write the pid into its slot, move the fds into place, exec.
    fn exec(&mut self) -> std::io::Error {
        // SAFETY: getpid, dup2 and execve are async-signal-safe; the slot and the pointer arrays were
        // allocated before the fork and stay alive (owned by self).
        unsafe {
            let mut pid = libc::getpid() as u64;
            let mut digits = [0u8; 20];
            let mut n = 0;
            loop {
                digits[n] = b'0' + (pid % 10) as u8;
                n += 1;
                pid /= 10;
                if pid == 0 {
                    break;
                }
            }
            let slot = &mut *self.pid_slot;
            for i in 0..n {
                slot[LISTEN_PID_PREFIX.len() + i] = digits[n - 1 - i];
            }
            slot[LISTEN_PID_PREFIX.len() + n] = 0;
            for &(src, dst) in &self.fds {
                if libc::dup2(src, dst) < 0 {
                    return std::io::Error::last_os_error();
                }
            }
            libc::execve(self.path.as_ptr(), self.argv_ptrs.as_ptr(), self.envp_ptrs.as_ptr());
        }
        std::io::Error::last_os_error()
    }
}

/// Starts the successor with `listeners` (in the order `listen`, `internal_listen`, `tcp_listen`, as
/// configured; `names` for `LISTEN_FDNAMES`).
pub fn start(listeners: &[RawFd], names: &[&str]) -> std::io::Result<Successor> {
    let (ours, theirs) = UnixStream::pair()?;
    // Duplicates far above the targets, so that no `dup2` in the child overwrites a source it still
    // needs. Close-on-exec: only the targets survive the exec.
    let high = |fd: RawFd| -> std::io::Result<OwnedFd> {
        // SAFETY: fcntl on an fd we own; the result is a new fd we then own.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 1000) };
        if dup < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `dup` is a fresh, valid fd.
        Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) })
    };
    let mut keep = Vec::new();
    let mut fds = Vec::new();
    for (i, &fd) in listeners.iter().enumerate() {
        let h = high(fd)?;
        fds.push((h.as_raw_fd(), 3 + i as RawFd));
        keep.push(h);
    }
    let sock_target = 3 + listeners.len() as RawFd;
    let hs = high(theirs.as_raw_fd())?;
    fds.push((hs.as_raw_fd(), sock_target));
    keep.push(hs);

    let path = own_binary()?;
    let argv: Vec<CString> = std::iter::once(path.as_os_str().to_owned())
        .chain(std::env::args_os().skip(1))
        .map(|a: OsString| cstring(a.as_bytes()))
        .collect::<Result<_, _>>()?;
    let drop_vars = ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "LISTEN_FDS_FIRST_FD", UPGRADE_FD_ENV];
    let mut envp: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| !drop_vars.iter().any(|d| k.as_bytes() == d.as_bytes()))
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            cstring(&kv)
        })
        .collect::<Result<_, _>>()?;
    envp.push(cstring(format!("LISTEN_FDS={}", listeners.len()).as_bytes())?);
    envp.push(cstring(format!("LISTEN_FDNAMES={}", names.join(":")).as_bytes())?);
    envp.push(cstring(format!("{UPGRADE_FD_ENV}={sock_target}").as_bytes())?);
    let mut pid_slot = Box::new([0u8; 40]);
    pid_slot[..LISTEN_PID_PREFIX.len()].copy_from_slice(LISTEN_PID_PREFIX);
    let mut envp_ptrs: Vec<*const libc::c_char> = envp.iter().map(|c| c.as_ptr()).collect();
    envp_ptrs.push(pid_slot.as_ptr().cast());
    envp_ptrs.push(std::ptr::null());
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut plan = ExecPlan {
        path: cstring(path.as_os_str().as_bytes())?,
        _argv: argv,
        argv_ptrs,
        _envp: envp,
        envp_ptrs,
        pid_slot,
        fds,
    };
    let mut cmd = std::process::Command::new(&path);
    // SAFETY: the closure only calls async-signal-safe functions (see `ExecPlan::exec`).
    unsafe {
        cmd.pre_exec(move || Err(plan.exec()));
    }
    let child = cmd.spawn()?;
    drop(keep);
    drop(theirs);
    Ok(Successor { pid: child.id(), socket: ours, child })
}

/// The child's side: the handover socket from the parent, when this process was started by an upgrade.
/// Read once, at start (before any thread but main exists).
pub fn inherited_socket() -> Option<UnixStream> {
    let fd: RawFd = std::env::var(UPGRADE_FD_ENV).ok()?.parse().ok()?;
    std::env::remove_var(UPGRADE_FD_ENV);
    // SAFETY: the parent put one end of a socket pair at this fd for us; nothing else owns it.
    let sock = unsafe { <UnixStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // Not inherited further (a later upgrade passes its own).
    // SAFETY: fcntl on the fd we now own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Some(sock)
}

/// Child: tell the parent we hold the sockets and can take over, then receive the broker snapshot.
pub fn child_receive(sock: &mut UnixStream) -> std::io::Result<Vec<u8>> {
    sock.set_read_timeout(Some(HANDOVER_TIMEOUT))?;
    sock.write_all(b"R")?;
    let mut len = [0u8; 8];
    sock.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > 1 << 34 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "snapshot length"));
    }
    let mut snapshot = vec![0u8; len as usize];
    sock.read_exact(&mut snapshot)?;
    Ok(snapshot)
}

/// Child: accepting now; the parent may drain.
pub fn child_accepting(sock: &mut UnixStream) -> std::io::Result<()> {
    sock.write_all(b"A")
}

/// Parent: waits for the successor's `R` (blocking; run it off the runtime's workers).
pub fn parent_wait_ready(sock: &mut UnixStream) -> std::io::Result<()> {
    expect(sock, b'R')
}

/// Parent: sends the snapshot and waits for the successor's `A`.
pub fn parent_hand_over(sock: &mut UnixStream, snapshot: &[u8]) -> std::io::Result<()> {
    sock.set_write_timeout(Some(HANDOVER_TIMEOUT))?;
    sock.write_all(&(snapshot.len() as u64).to_le_bytes())?;
    sock.write_all(snapshot)?;
    expect(sock, b'A')
}

fn expect(sock: &mut UnixStream, byte: u8) -> std::io::Result<()> {
    sock.set_read_timeout(Some(HANDOVER_TIMEOUT))?;
    let mut b = [0u8; 1];
    sock.read_exact(&mut b)?;
    if b[0] != byte {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "unexpected handover byte"));
    }
    Ok(())
}

/// Writes `pid` to `path` (through a temporary file and a rename, so a reader never sees half of it).
pub fn write_pid_file(path: &std::path::Path, pid: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{pid}\n"))?;
    std::fs::rename(&tmp, path)
}
