//! The worker side of process isolation: the code a plugin worker process runs.
//!
//! A worker serves one plugin library for one host. The `legora` binary runs it
//! as `legora plugin-worker <library>`; this crate also ships it as the
//! `legora-plugin-worker` program, and any binary can become a worker by
//! calling [`run`] (or [`main`]) when asked to:
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     legora_plugin_host::worker::main()
//! }
//! ```
//!
//! What it does, in order:
//! 1. takes the protocol pipes off stdin and stdout, then points stdout at
//!    stderr and stdin at the null device, so that whatever the plugin prints
//!    or reads can never corrupt a frame;
//! 2. turns core dumps off, and exits should the host go away;
//! 3. opens the library and checks its entry table exactly as the in-process
//!    loader does, and sends the outcome as its first frame;
//! 4. answers requests (two frames: request JSON, payload) with one reply frame
//!    each until stdin closes. The plugin's reply buffer is checked (non-null,
//!    length within capacity and within the frame limit) before it is read.
//!
//! Exit codes: 0 when the host closed the pipe, 2 when the library could not
//! be loaded (the host already has the reason), 3 when the host's frames were
//! unreadable, 64 for a bad command line.

use std::ffi::OsString;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::process::ExitCode;

use legora_plugin_api::abi::PluginVTable;
use legora_plugin_api::ABI_VERSION;

use crate::dylib::{call_table, open_library};
use crate::frame::{
    read_frame, write_frame, FrameError, Hello, LoadStatus, DEFAULT_MAX_FRAME_LEN, REPLY_FAILED,
    REPLY_OK, WORKER_PROTOCOL,
};
use crate::process::MAX_FRAME_ENV;

/// The subcommand (first argument) a worker program is started with, before
/// the library path: `legora plugin-worker <library>`. [`main`] accepts it too.
pub const WORKER_SUBCOMMAND: &str = "plugin-worker";

/// Exit code: the host closed the pipe (normal end).
const EXIT_DONE: u8 = 0;
/// Exit code: the library could not be loaded.
const EXIT_NOT_LOADED: u8 = 2;
/// Exit code: the host's frames could not be read, or replies not written.
const EXIT_PROTOCOL: u8 = 3;
/// Exit code: bad command line.
const EXIT_USAGE: u8 = 64;

/// The entry point of a standalone worker program: reads
/// `[plugin-worker] <library>` from the command line and calls [`run`].
pub fn main() -> ExitCode {
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.first().is_some_and(|a| a == WORKER_SUBCOMMAND) {
        args.remove(0);
    }
    match <[OsString; 1]>::try_from(args) {
        Ok([path]) => run(Path::new(&path)),
        Err(_) => {
            eprintln!(
                "usage: legora-plugin-worker [{WORKER_SUBCOMMAND}] <plugin library>\n\
                 (started by a legora plugin host, which speaks to it through stdin and stdout)"
            );
            ExitCode::from(EXIT_USAGE)
        }
    }
}

/// Serves the plugin library at `path` over stdin / stdout until stdin closes
/// (see the module docs). Call it before anything else touches stdin or
/// stdout.
pub fn run(path: &Path) -> ExitCode {
    let (input, output) = match take_protocol_pipes() {
        Ok(pipes) => pipes,
        Err(e) => {
            eprintln!("legora plugin worker: cannot set up its pipes: {e}");
            return ExitCode::from(EXIT_PROTOCOL);
        }
    };
    let mut input = BufReader::with_capacity(64 << 10, input);
    let mut output = BufWriter::with_capacity(64 << 10, output);
    disable_core_dumps();
    exit_when_orphaned();
    let limit = frame_limit();
    let (table, load) = match open_library(path) {
        Ok(table) => (Some(table), LoadStatus::Ready),
        Err(status) => (None, status),
    };
    let hello = Hello {
        worker_protocol: WORKER_PROTOCOL,
        abi_version: ABI_VERSION,
        load,
    };
    let hello = serde_json::to_vec(&hello).unwrap_or_default();
    if write_frame(&mut output, &[&hello])
        .and_then(|()| output.flush())
        .is_err()
    {
        return ExitCode::from(EXIT_PROTOCOL);
    }
    match table {
        Some(table) => serve(table, &mut input, &mut output, limit),
        None => ExitCode::from(EXIT_NOT_LOADED),
    }
}

/// Answers requests until the host closes the pipe.
fn serve(
    table: &PluginVTable,
    input: &mut impl Read,
    output: &mut impl Write,
    limit: u64,
) -> ExitCode {
    loop {
        let request = match read_frame(input, limit) {
            Ok(frame) => frame,
            Err(FrameError::Closed) => return ExitCode::from(EXIT_DONE),
            Err(e) => return protocol_error(&e),
        };
        let payload = match read_frame(input, limit) {
            Ok(frame) => frame,
            Err(e) => return protocol_error(&e),
        };
        let written = match call_table(table, &request, &payload, limit) {
            Ok(reply) => write_frame(output, &[&[REPLY_OK], &reply]),
            Err(reason) => write_frame(output, &[&[REPLY_FAILED], reason.as_bytes()]),
        };
        if written.and_then(|()| output.flush()).is_err() {
            // The host is gone.
            return ExitCode::from(EXIT_PROTOCOL);
        }
    }
}

fn protocol_error(e: &FrameError) -> ExitCode {
    eprintln!("legora plugin worker: unreadable request from the host: {e}");
    ExitCode::from(EXIT_PROTOCOL)
}

/// The frame limit the host passed, or the default.
fn frame_limit() -> u64 {
    std::env::var(MAX_FRAME_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_MAX_FRAME_LEN)
}

type Pipes = (Box<dyn Read>, Box<dyn Write>);

/// Moves the protocol off fds 0 and 1: the pipes get new (close-on-exec) fds,
/// stdout then writes to stderr and stdin reads the null device.
#[cfg(unix)]
fn take_protocol_pipes() -> io::Result<Pipes> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let dup = |fd: i32| -> io::Result<OwnedFd> {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) only creates a new descriptor.
        let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
        if new < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `new` is a fresh descriptor owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(new) })
    };
    let input = dup(0)?;
    let output = dup(1)?;
    let null = std::fs::File::open("/dev/null")?;
    // SAFETY: dup2 onto the standard descriptors; nothing in this process
    // holds a Rust handle that assumes what fds 0 and 1 refer to, and std's
    // stdout buffer is empty (nothing was printed yet).
    let (a, b) = unsafe {
        (
            libc::dup2(2, 1),
            libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 0),
        )
    };
    if a < 0 || b < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((
        Box::new(std::fs::File::from(input)),
        Box::new(std::fs::File::from(output)),
    ))
}

/// Without fd juggling: the plugin must not use stdin or stdout.
#[cfg(not(unix))]
fn take_protocol_pipes() -> io::Result<Pipes> {
    Ok((Box::new(io::stdin()), Box::new(io::stdout())))
}

/// A crashing plugin should not leave a core file per crash behind.
fn disable_core_dumps() {
    #[cfg(unix)]
    {
        let zero = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: setrlimit reads the struct it is given; lowering a limit
        // needs no privilege.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
    }
}

/// Exits when the host dies (its stdin would close too, but a plugin stuck in
/// a loop never reads it again).
fn exit_when_orphaned() {
    #[cfg(unix)]
    {
        // SAFETY: getppid has no preconditions.
        let parent = unsafe { libc::getppid() };
        std::thread::spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_millis(500));
            // SAFETY: getppid has no preconditions.
            if unsafe { libc::getppid() } != parent {
                // SAFETY: _exit ends the process at once, running no
                // destructors or atexit handlers of the (possibly stuck) plugin.
                unsafe { libc::_exit(i32::from(EXIT_PROTOCOL)) };
            }
        });
    }
}
