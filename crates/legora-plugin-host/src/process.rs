//! The host side of process isolation: one worker process per dynamic plugin,
//! started as `<worker program> [args] <library path>`, spoken to through
//! length-prefixed frames on its stdin and stdout (see [`crate::frame`]), with
//! a time limit on every exchange. A worker that crashes, hangs or garbles its
//! output is killed and reaped, and the call fails with a typed error naming
//! the plugin; the next call starts a fresh worker.

use std::ffi::OsString;
use std::fmt;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use legora_plugin_api::protocol::{Call, Reply, Request};
use legora_plugin_api::{Manifest, ABI_VERSION};

use crate::error::HostError;
use crate::frame::{
    read_frame, write_frame, FrameError, Hello, LoadStatus, MAX_HELLO_LEN, REPLY_FAILED, REPLY_OK,
    WORKER_PROTOCOL,
};

/// Environment variable the host sets on a worker: its frame limit in bytes.
pub(crate) const MAX_FRAME_ENV: &str = "LEGORA_PLUGIN_WORKER_MAX_FRAME";

/// How long a worker whose pipes closed gets to exit before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);

/// How many bytes of a worker's stderr are kept for error messages.
const STDERR_TAIL: usize = 16 << 10;

/// Where dynamic plugins run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    /// Each dynamic plugin runs in a worker process of its own (the default): a
    /// crash, abort or hang in the plugin is an error, not the end of the host.
    #[default]
    Process,
    /// Dynamic plugins are loaded into the host process (faster calls, no
    /// protection: a crashing plugin takes the host down).
    InProcess,
}

/// Time limits of the calls to an isolated plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Starting the worker, opening the library and fetching the manifest
    /// (default 10 s).
    pub handshake: Duration,
    /// Every other call: parse, evaluate, preset (default 60 s).
    pub call: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            call: Duration::from_secs(60),
        }
    }
}

/// The program that runs an isolated plugin, and the arguments put before the
/// library path: `legora plugin-worker <path>` by default in the `legora`
/// binary, `legora-plugin-worker <path>` for the worker this crate ships.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerCommand {
    program: PathBuf,
    args: Vec<OsString>,
}

impl WorkerCommand {
    /// A program with no arguments before the library path.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
        }
    }

    /// Adds an argument (before the library path).
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// The program.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// The arguments before the library path.
    pub fn args(&self) -> &[OsString] {
        &self.args
    }
}

impl fmt::Display for WorkerCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.program.display())?;
        for a in &self.args {
            write!(f, " {}", a.to_string_lossy())?;
        }
        Ok(())
    }
}

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal (`SIGSEGV`, `SIGABRT`, `SIGBUS`, ...).
    Signal(i32),
    /// It closed its pipes but did not exit; the host killed it.
    Unresponsive,
}

impl WorkerExit {
    fn from_status(status: ExitStatus) -> Self {
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            if let Some(signal) = status.signal() {
                return WorkerExit::Signal(signal);
            }
        }
        WorkerExit::Code(status.code().unwrap_or(-1))
    }

    /// The conventional name of the signal, for the common ones.
    pub fn signal_name(&self) -> Option<&'static str> {
        let WorkerExit::Signal(signal) = *self else {
            return None;
        };
        #[cfg(unix)]
        {
            let names: [(i32, &str); 12] = [
                (libc::SIGHUP, "SIGHUP"),
                (libc::SIGINT, "SIGINT"),
                (libc::SIGQUIT, "SIGQUIT"),
                (libc::SIGILL, "SIGILL"),
                (libc::SIGTRAP, "SIGTRAP"),
                (libc::SIGABRT, "SIGABRT"),
                (libc::SIGBUS, "SIGBUS"),
                (libc::SIGFPE, "SIGFPE"),
                (libc::SIGKILL, "SIGKILL"),
                (libc::SIGSEGV, "SIGSEGV"),
                (libc::SIGPIPE, "SIGPIPE"),
                (libc::SIGTERM, "SIGTERM"),
            ];
            names.iter().find(|(n, _)| *n == signal).map(|(_, s)| *s)
        }
        #[cfg(not(unix))]
        {
            let _ = signal;
            None
        }
    }
}

impl fmt::Display for WorkerExit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkerExit::Code(code) => write!(f, "exited with code {code}"),
            WorkerExit::Signal(signal) => match self.signal_name() {
                Some(name) => write!(f, "was killed by signal {signal} ({name})"),
                None => write!(f, "was killed by signal {signal}"),
            },
            WorkerExit::Unresponsive => {
                f.write_str("closed its pipes without exiting and was killed")
            }
        }
    }
}

/// Everything a worker needs besides the library path.
#[derive(Debug, Clone)]
pub(crate) struct WorkerConfig {
    pub command: WorkerCommand,
    pub timeouts: Timeouts,
    pub max_frame_len: u64,
}

/// What the reader and writer threads report.
enum Event {
    Frame(Result<Vec<u8>, FrameError>),
    WriteFailed,
}

/// Why an exchange failed; the process is then discarded.
enum Fault {
    Timeout(Duration),
    TooLarge {
        len: u64,
        limit: u64,
    },
    BadFrame(String),
    /// The stream closed at a frame boundary or a request could not be written.
    Died,
}

/// The last bytes a worker wrote to stderr, and whether it closed it.
#[derive(Default)]
struct StderrTail {
    bytes: Vec<u8>,
}

impl StderrTail {
    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > STDERR_TAIL {
            let cut = self.bytes.len() - STDERR_TAIL;
            self.bytes.drain(..cut);
        }
    }
}

/// A running worker.
struct Process {
    child: Child,
    stdin: Option<ChildStdin>,
    events: Receiver<Event>,
    sender: Sender<Event>,
    stderr: Arc<Mutex<StderrTail>>,
    stderr_closed: Receiver<()>,
}

/// A reply frame with its status byte checked.
pub(crate) struct WorkerReply(Vec<u8>);

impl WorkerReply {
    /// The plugin's response bytes.
    pub(crate) fn body(&self) -> &[u8] {
        &self.0[1..]
    }
}

impl Process {
    /// Starts the worker and reads its hello (within `timeouts.handshake`);
    /// `label` names the plugin in errors (its path until it is registered).
    fn spawn(path: &Path, config: &WorkerConfig, label: &str) -> Result<Process, HostError> {
        let mut child = Command::new(config.command.program())
            .args(config.command.args())
            .arg(path)
            .env(MAX_FRAME_ENV, config.max_frame_len.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| HostError::Worker {
                path: path.to_path_buf(),
                message: format!("`{}` could not be started: {e}", config.command),
            })?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HostError::Worker {
                path: path.to_path_buf(),
                message: "the worker's pipes were not created".into(),
            });
        };
        let (sender, events) = mpsc::channel();
        spawn_reader(stdout, sender.clone(), config.max_frame_len);
        let tail = Arc::new(Mutex::new(StderrTail::default()));
        let stderr_closed = spawn_stderr_forwarder(stderr, tail.clone());
        let mut process = Process {
            child,
            stdin: Some(stdin),
            events,
            sender,
            stderr: tail,
            stderr_closed,
        };
        let hello = match process.events.recv_timeout(config.timeouts.handshake) {
            Ok(Event::Frame(Ok(bytes))) => bytes,
            Ok(event) => {
                let fault = fault_of_event(event);
                return Err(process.fail(fault, label, "load"));
            }
            Err(_) => {
                let fault = Fault::Timeout(config.timeouts.handshake);
                return Err(process.fail(fault, label, "load"));
            }
        };
        let hello: Hello = match serde_json::from_slice(&hello) {
            Ok(h) => h,
            Err(e) => {
                let fault = Fault::BadFrame(format!(
                    "the worker's hello is not valid: {e} (it starts with {:?}; is `{}` a legora plugin worker?)",
                    String::from_utf8_lossy(&hello[..hello.len().min(60)]),
                    config.command
                ));
                return Err(process.fail(fault, label, "load"));
            }
        };
        if hello.worker_protocol != WORKER_PROTOCOL || hello.abi_version != ABI_VERSION {
            process.kill_and_reap();
            return Err(HostError::Worker {
                path: path.to_path_buf(),
                message: format!(
                    "`{}` speaks worker protocol {} and plugin ABI {}, this host speaks {WORKER_PROTOCOL} and {ABI_VERSION}: use the worker of the same legora build",
                    config.command, hello.worker_protocol, hello.abi_version
                ),
            });
        }
        match hello.load {
            LoadStatus::Ready => Ok(process),
            status => {
                process.reap(EXIT_GRACE);
                Err(crate::dylib::load_error(path, status))
            }
        }
    }

    /// Sends one request and waits for its reply.
    fn exchange(
        &mut self,
        request: &[u8],
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Result<WorkerReply, String>, Fault> {
        let Process {
            child,
            stdin,
            events,
            sender,
            ..
        } = self;
        let Some(stdin) = stdin.as_mut() else {
            return Err(Fault::Died);
        };
        std::thread::scope(|scope| {
            let sender = sender.clone();
            // A separate writer: a worker that stops reading must not block the
            // host past the time limit (killing the worker unblocks the write).
            scope.spawn(move || {
                let mut w = BufWriter::with_capacity(64 << 10, stdin);
                let sent = write_frame(&mut w, &[request])
                    .and_then(|()| write_frame(&mut w, &[payload]))
                    .and_then(|()| w.flush());
                if sent.is_err() {
                    let _ = sender.send(Event::WriteFailed);
                }
            });
            let event = match events.recv_timeout(timeout) {
                // The write failing means the worker is gone or not reading;
                // its stdout closing tells which.
                Ok(Event::WriteFailed) => events.recv_timeout(EXIT_GRACE).ok(),
                Ok(event) => Some(event),
                Err(RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    return Err(Fault::Timeout(timeout));
                }
                Err(RecvTimeoutError::Disconnected) => None,
            };
            let result = match event {
                Some(Event::Frame(Ok(frame))) => match frame.first() {
                    Some(&REPLY_OK) => Ok(Ok(WorkerReply(frame))),
                    Some(&REPLY_FAILED) => Ok(Err(String::from_utf8_lossy(&frame[1..]).into())),
                    Some(other) => Err(Fault::BadFrame(format!(
                        "unknown reply status byte {other:#04x}"
                    ))),
                    None => Err(Fault::BadFrame("an empty reply frame".into())),
                },
                Some(event) => Err(fault_of_event(event)),
                None => Err(Fault::Died),
            };
            if result.is_err() {
                // Unblocks the writer should it still be writing.
                let _ = child.kill();
            }
            result
        })
    }

    /// Turns a fault into the error for `plugin` / `method`; kills and reaps.
    fn fail(mut self, fault: Fault, plugin: &str, method: &str) -> HostError {
        let (plugin, method) = (plugin.to_string(), method.to_string());
        match fault {
            Fault::Timeout(timeout) => {
                self.kill_and_reap();
                HostError::Timeout {
                    plugin,
                    method,
                    timeout,
                }
            }
            Fault::TooLarge { len, limit } => {
                self.kill_and_reap();
                HostError::FrameTooLarge {
                    plugin,
                    method,
                    direction: "reply",
                    len,
                    limit,
                }
            }
            Fault::BadFrame(reason) => {
                let exit = self.reap(Duration::ZERO);
                HostError::BadFrame {
                    plugin,
                    method,
                    reason: format!("{reason} (its worker process {exit})"),
                }
            }
            Fault::Died => {
                let exit = self.reap(EXIT_GRACE);
                let stderr = self.stderr_tail();
                HostError::Crashed {
                    plugin,
                    method,
                    exit,
                    stderr,
                }
            }
        }
    }

    /// Waits up to `grace` for the worker to exit, then kills it; always reaps.
    fn reap(&mut self, grace: Duration) -> WorkerExit {
        self.stdin = None;
        let deadline = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return WorkerExit::from_status(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    self.kill_and_reap();
                    return WorkerExit::Unresponsive;
                }
            }
        }
    }

    fn kill_and_reap(&mut self) {
        self.stdin = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The worker's last stderr output, once the forwarder saw its end (or
    /// after a short wait, should a grandchild still hold the pipe).
    fn stderr_tail(&self) -> String {
        let _ = self.stderr_closed.recv_timeout(Duration::from_millis(500));
        let tail = self.stderr.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&tail.bytes).into_owned()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Closing stdin asks the worker to exit; a worker that does not is
        // killed. Either way it is reaped (no zombie).
        self.reap(Duration::from_millis(200));
    }
}

fn fault_of_event(event: Event) -> Fault {
    match event {
        Event::Frame(Ok(_)) => Fault::BadFrame("an unexpected frame".into()),
        Event::Frame(Err(FrameError::Closed)) | Event::WriteFailed => Fault::Died,
        Event::Frame(Err(FrameError::TooLarge { len, limit })) => Fault::TooLarge { len, limit },
        Event::Frame(Err(e)) => Fault::BadFrame(e.to_string()),
    }
}

/// Reads frames from the worker's stdout until the first error (the end of
/// the stream included), which it reports last. The first frame is the
/// hello, held to a small limit.
fn spawn_reader(mut stdout: impl Read + Send + 'static, events: Sender<Event>, limit: u64) {
    std::thread::spawn(move || {
        let mut frame_limit = MAX_HELLO_LEN.min(limit);
        loop {
            let frame = read_frame(&mut stdout, frame_limit);
            let end = frame.is_err();
            if events.send(Event::Frame(frame)).is_err() || end {
                return;
            }
            frame_limit = limit;
        }
    });
}

/// Copies the worker's stderr to the host's as it arrives, keeping the tail
/// for error messages; the receiver hears once it ends.
fn spawn_stderr_forwarder(
    mut stderr: impl Read + Send + 'static,
    tail: Arc<Mutex<StderrTail>>,
) -> Receiver<()> {
    let (closed, on_close) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match stderr.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let _ = io::stderr().write_all(&buf[..n]);
                    tail.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = closed.send(());
    });
    on_close
}

/// A dynamic plugin in a worker process. The worker is started at load time
/// and again, with the same handshake, on the first call after one died.
pub(crate) struct Isolated {
    path: PathBuf,
    config: WorkerConfig,
    process: Mutex<Option<Process>>,
    manifest: OnceLock<Manifest>,
}

impl Isolated {
    /// Starts the worker (the plugin is named by its path in errors).
    pub(crate) fn start(path: &Path, config: WorkerConfig) -> Result<Self, HostError> {
        let process = Process::spawn(path, &config, &path.display().to_string())?;
        Ok(Self {
            path: path.to_path_buf(),
            config,
            process: Mutex::new(Some(process)),
            manifest: OnceLock::new(),
        })
    }

    /// Remembers the registered manifest: a restarted worker must report it again.
    pub(crate) fn set_manifest(&self, manifest: Manifest) {
        let _ = self.manifest.set(manifest);
    }

    /// The process id of the live worker, if one is running.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.process
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|p| p.child.id())
    }

    /// One call: the plugin's response bytes, `Ok(Err(reason))` when the
    /// worker got no valid buffer from the plugin, or the transport error.
    pub(crate) fn call(
        &self,
        plugin: &str,
        method: &str,
        request: &[u8],
        payload: &[u8],
    ) -> Result<Result<WorkerReply, String>, HostError> {
        let limit = self.config.max_frame_len;
        for (part, len) in [("request", request.len()), ("payload", payload.len())] {
            if len as u64 > limit {
                return Err(HostError::FrameTooLarge {
                    plugin: plugin.to_string(),
                    method: method.to_string(),
                    direction: if part == "request" {
                        "request"
                    } else {
                        "request payload"
                    },
                    len: len as u64,
                    limit,
                });
            }
        }
        let mut slot = self.process.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(self.restart(plugin)?);
        }
        let Some(process) = slot.as_mut() else {
            unreachable!("the worker slot was just filled")
        };
        let timeout = if method == "manifest" {
            self.config.timeouts.handshake
        } else {
            self.config.timeouts.call
        };
        match process.exchange(request, payload, timeout) {
            Ok(reply) => Ok(reply),
            Err(fault) => {
                let process = slot.take().expect("the worker slot is filled");
                Err(process.fail(fault, plugin, method))
            }
        }
    }

    /// A fresh worker for a plugin whose worker died, checked to report the
    /// manifest registered at load time.
    fn restart(&self, plugin: &str) -> Result<Process, HostError> {
        let mut process = Process::spawn(&self.path, &self.config, plugin)?;
        let Some(expected) = self.manifest.get() else {
            return Ok(process);
        };
        let request = serde_json::to_vec(&Request::new(Call::Manifest)).map_err(|e| {
            HostError::InvalidRequest {
                message: format!("cannot encode the request: {e}"),
            }
        })?;
        let reply = match process.exchange(&request, &[], self.config.timeouts.handshake) {
            Ok(reply) => reply,
            Err(fault) => return Err(process.fail(fault, plugin, "manifest")),
        };
        let malformed = |reason: String| HostError::MalformedResponse {
            plugin: plugin.to_string(),
            method: "manifest".into(),
            reason,
        };
        let reply = reply.map_err(malformed)?;
        match crate::decode_reply(plugin, "manifest", reply.body())? {
            Reply::Manifest(m) if m == *expected => Ok(process),
            Reply::Manifest(_) => Err(malformed(
                "the restarted worker reports another manifest than at load time".into(),
            )),
            other => Err(malformed(format!(
                "expected a `manifest` reply, got `{}`",
                other.kind()
            ))),
        }
    }
}
