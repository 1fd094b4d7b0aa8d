//! Process isolation: each way a plugin can fail (abort, segfault, a panic
//! under `panic = "abort"`, an infinite loop, garbage replies, a truncated
//! library, a broken worker program) is a typed error naming the plugin and
//! the call; the worker is killed and reaped, and the host and the plugins
//! loaded beside it go on. The test plugins are under `tests/bad-plugins/`;
//! the worker program is this crate's `legora-plugin-worker`.

use super::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{bare_host, lib_file, lib_path, worker_program};
use legora_plugin_api::{EvalRequest, ParseOptions};
use legora_plugin_host::{HostError, Isolation, PluginHost, Timeouts, WorkerExit};

/// Generous for the handshake (a cold start on a busy CI machine), short for
/// calls (the hanging plugin waits it out).
fn isolated_host(call: Duration) -> PluginHost {
    let mut host = bare_host(Isolation::Process);
    host.set_timeouts(Timeouts {
        handshake: Duration::from_secs(30),
        call,
    });
    host
}

/// The good plugins loaded beside the faulty ones still answer.
fn good_ones_work(host: &PluginHost) {
    let out = host
        .evaluate(
            "medical/label_accuracy",
            EvalRequest::new(["cardiology", "x"], ["cardiology", "y"]),
        )
        .expect("medical works");
    assert_eq!(out.metrics["accuracy"], 0.5);
    let out = host
        .parse_bytes(
            "minimal/tsv",
            "pairs.tsv",
            b"2+2\t4\n".to_vec(),
            &ParseOptions::strict(),
        )
        .expect("minimal works");
    assert_eq!(out.records.len(), 1);
}

/// True when no process with this id exists (reaped: not running, not a zombie).
fn gone(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        !Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

fn eval2() -> EvalRequest {
    EvalRequest::new(["a", "b"], ["a", "b"])
}

/// The exit, stderr and message of a `Crashed` error for `plugin` / `method`.
fn crashed(err: HostError, plugin: &str, method: &str) -> (WorkerExit, String, String) {
    let text = err.to_string();
    match err {
        HostError::Crashed {
            plugin: p,
            method: m,
            exit,
            stderr,
        } => {
            assert_eq!((p.as_str(), m.as_str()), (plugin, method), "{text}");
            (exit, stderr, text)
        }
        other => panic!("expected Crashed for {plugin} {method}, got {other:?}"),
    }
}

#[test]
fn crashes_and_hangs_are_typed_errors_and_the_host_goes_on() {
    let mut host = isolated_host(Duration::from_secs(1));
    for name in ["medical", "minimal"] {
        host.load_name(name).expect("good plugin");
    }
    for lib in [
        "legora_test_plugin_abort",
        "legora_test_plugin_segfault",
        "legora_test_plugin_panic_abort",
        "legora_test_plugin_hang",
    ] {
        let plugin = host
            .load_path(lib_path(lib))
            .expect("loads: faults at call time");
        assert!(plugin.worker_pid().is_some());
    }
    good_ones_work(&host);

    // Each fault: the error, the worker reaped, a fresh worker for the next
    // call (the preset works), and the other plugins untouched.
    let cases: [(&str, &str, &str); 4] = [
        ("abort", "SIGABRT", "calling abort() in `evaluate`"),
        ("segfault", "SIGSEGV", "writing through an invalid pointer"),
        (
            "panic-abort",
            "SIGABRT",
            "the evaluator exploded on 2 examples",
        ),
        ("hang", "", ""),
    ];
    for (name, signal, said) in cases {
        let pid = host
            .plugin(name)
            .expect("loaded")
            .worker_pid()
            .expect("running");
        let err = host
            .evaluate(&format!("{name}/boom"), eval2())
            .expect_err("faults");
        if name == "hang" {
            let text = err.to_string();
            match err {
                HostError::Timeout {
                    plugin,
                    method,
                    timeout,
                } => {
                    assert_eq!((plugin.as_str(), method.as_str()), ("hang", "evaluate"));
                    assert_eq!(timeout, Duration::from_secs(1));
                    assert!(text.contains("within 1.0 s"), "{text}");
                }
                other => panic!("expected Timeout, got {other:?}"),
            }
        } else {
            let (exit, stderr, text) = crashed(err, name, "evaluate");
            assert_eq!(exit.signal_name(), Some(signal), "{text}");
            assert!(stderr.contains(said), "{name}: stderr {stderr:?}");
            assert!(text.contains(&format!("({signal})")), "{text}");
            assert!(text.contains(said), "the message quotes stderr: {text}");
        }
        assert!(gone(pid), "{name}: worker {pid} was not reaped");
        assert_eq!(
            host.plugin(name).expect("still registered").worker_pid(),
            None
        );
        let preset = host
            .preset(&format!("{name}/ok"))
            .expect("a fresh worker answers");
        assert_eq!(preset.lora.r, 2);
        let again = host.plugin(name).expect("registered").worker_pid();
        assert!(again.is_some_and(|p| p != pid), "{name}: restarted");
        good_ones_work(&host);
    }

    // parse faults too, with the panic message of the abort-on-panic plugin
    let err = host
        .parse_bytes(
            "panic-abort/lines",
            "x.txt",
            b"x".to_vec(),
            &ParseOptions::strict(),
        )
        .expect_err("aborts");
    let (_, stderr, _) = crashed(err, "panic-abort", "parse");
    assert!(stderr.contains("index out of bounds"), "{stderr}");
    let err = host
        .parse_bytes(
            "segfault/lines",
            "x.txt",
            b"x".to_vec(),
            &ParseOptions::strict(),
        )
        .expect_err("crashes");
    crashed(err, "segfault", "parse");
    assert_eq!(
        host.plugins().iter().map(|p| p.name()).collect::<Vec<_>>(),
        [
            "medical",
            "minimal",
            "abort",
            "segfault",
            "panic-abort",
            "hang"
        ]
    );
    good_ones_work(&host);
}

#[test]
fn garbage_replies_are_typed_errors_in_both_modes() {
    for isolation in [Isolation::Process, Isolation::InProcess] {
        let mut host = bare_host(isolation);
        host.load_name("medical").expect("medical");
        let garbage = host
            .load_path(lib_path("legora_test_plugin_garbage"))
            .expect("its manifest is fine");
        let pid = garbage.worker_pid();
        assert_eq!(pid.is_some(), isolation == Isolation::Process);
        let malformed = |evaluator: &str| match host.evaluate(
            &format!("garbage/{evaluator}"),
            EvalRequest::new(["a"], ["a"]),
        ) {
            Err(HostError::MalformedResponse {
                plugin,
                method,
                reason,
            }) => {
                assert_eq!((plugin.as_str(), method.as_str()), ("garbage", "evaluate"));
                reason
            }
            other => panic!("{isolation:?} {evaluator}: expected MalformedResponse, got {other:?}"),
        };
        let reason = malformed("binary");
        assert!(reason.contains("response starts with"), "{reason}");
        // 1 << 40 bytes claimed in a 16-byte buffer: refused before reading
        assert_eq!(
            malformed("overlong"),
            "the plugin reported a 1099511627776-byte reply in a buffer of 16 bytes"
        );
        // prints on stdout do not get into the protocol
        assert_eq!(host.preset("garbage/chatty").expect("chatty").lora.r, 2);
        let big = host
            .evaluate("garbage/big", EvalRequest::new(["a"], ["a"]))
            .expect("8 KiB is within the default limit");
        assert_eq!(big.metrics["x"], 1.0);
        // a worker that relayed a bad reply is alive and the same
        assert_eq!(host.plugin("garbage").expect("loaded").worker_pid(), pid);
        good_ones_work_medical(&host);

        // the same reply over a small limit
        let mut small = bare_host(isolation);
        small.set_max_frame_len(4096);
        small
            .load_path(lib_path("legora_test_plugin_garbage"))
            .expect("the manifest fits");
        match small.evaluate("garbage/big", EvalRequest::new(["a"], ["a"])) {
            Err(HostError::MalformedResponse { reason, .. }) => assert!(
                reason.starts_with("the plugin's reply is 8")
                    && reason.ends_with("bytes, over the limit of 4096 bytes"),
                "{reason}"
            ),
            other => panic!("{isolation:?}: expected MalformedResponse, got {other:?}"),
        }
        if isolation == Isolation::Process {
            // a request over the limit is refused before it is sent
            let long = vec!["y".repeat(100); 50];
            match small.evaluate("garbage/big", EvalRequest::new(long.clone(), long)) {
                Err(HostError::FrameTooLarge {
                    plugin,
                    direction,
                    limit,
                    ..
                }) => assert_eq!(
                    (plugin.as_str(), direction, limit),
                    ("garbage", "request", 4096)
                ),
                other => panic!("expected FrameTooLarge, got {other:?}"),
            }
        }
    }
}

fn good_ones_work_medical(host: &PluginHost) {
    let out = host
        .evaluate("medical/label_accuracy", EvalRequest::new(["a"], ["a"]))
        .expect("medical works");
    assert_eq!(out.metrics["accuracy"], 1.0);
}

/// A folder like a user's plugin folder: the good plugins, each faulty one
/// under a name plugin folders are searched for, and a truncated library.
fn mixed_plugin_dir(tag: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("mixed-plugins-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("tmp dir");
    for lib in ["legora_plugin_medical", "legora_plugin_minimal"] {
        std::fs::copy(lib_path(lib), dir.join(lib_file(lib))).expect("copy");
    }
    for name in ["abort", "segfault", "panic_abort", "hang", "garbage"] {
        std::fs::copy(
            lib_path(&format!("legora_test_plugin_{name}")),
            dir.join(lib_file(&format!("legora_plugin_{name}"))),
        )
        .expect("copy");
    }
    let bytes = std::fs::read(lib_path("legora_plugin_medical")).expect("read");
    std::fs::write(
        dir.join(lib_file("legora_plugin_truncated")),
        &bytes[..bytes.len() / 2],
    )
    .expect("write");
    dir
}

#[test]
fn faults_while_loading_drop_only_that_plugin() {
    let dir = mixed_plugin_dir("load");
    for isolation in [Isolation::Process, Isolation::InProcess] {
        let mut host = PluginHost::new();
        host.use_env_path(false).use_exe_dir(false);
        host.add_search_dir(&dir);
        host.set_isolation(isolation);
        host.set_timeouts(Timeouts {
            handshake: Duration::from_secs(2),
            call: Duration::from_secs(2),
        });
        // The faulty plugins fault while loading: in a constructor (segfault,
        // on Linux) or in `manifest` (the others).
        host.set_worker_command(
            "/usr/bin/env",
            [
                "LEGORA_TEST_FAULT_AT=load",
                worker_program(),
                "plugin-worker",
            ],
        );
        let mut errors = Vec::new();
        for path in host.discover() {
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let faulty = !name.contains("medical") && !name.contains("minimal");
            if isolation == Isolation::InProcess && faulty && !name.contains("truncated") {
                // In process these would take the test down: that is the point.
                continue;
            }
            match host.load_path(&path) {
                Ok(_) => assert!(!faulty, "{name} loaded"),
                Err(e) => errors.push((name, path, e)),
            }
        }
        let names: Vec<&str> = host.plugins().iter().map(|p| p.name()).collect();
        assert_eq!(names, ["medical", "minimal"], "{isolation:?}");
        good_ones_work(&host);
        for (name, path, err) in errors {
            let text = err.to_string();
            let plugin = path.display().to_string();
            match (name.as_str(), err) {
                (n, HostError::NotLoadable { path: p, message }) if n.contains("truncated") => {
                    assert_eq!(p, path);
                    assert!(message.starts_with("truncated: "), "{message}");
                }
                (
                    n,
                    HostError::Crashed {
                        plugin: p,
                        method,
                        exit,
                        ..
                    },
                ) if n.contains("segfault") => {
                    assert_eq!(p, plugin);
                    let at = if cfg!(target_os = "linux") {
                        "load"
                    } else {
                        "manifest"
                    };
                    assert_eq!(method, at, "{text}");
                    assert_eq!(exit.signal_name(), Some("SIGSEGV"), "{text}");
                }
                (
                    n,
                    HostError::Crashed {
                        plugin: p,
                        method,
                        exit,
                        ..
                    },
                ) if n.contains("abort") => {
                    assert_eq!((p, method.as_str()), (plugin, "manifest"));
                    assert_eq!(exit.signal_name(), Some("SIGABRT"), "{text}");
                }
                (
                    n,
                    HostError::Timeout {
                        plugin: p, method, ..
                    },
                ) if n.contains("hang") => {
                    assert_eq!((p, method.as_str()), (plugin, "manifest"));
                }
                (
                    n,
                    HostError::MalformedResponse {
                        plugin: p, method, ..
                    },
                ) if n.contains("garbage") => {
                    assert_eq!((p, method.as_str()), (plugin, "manifest"));
                }
                (n, other) => panic!("{isolation:?} {n}: unexpected {other:?}"),
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A worker program made of a shell script: `$1` is the library path.
fn scripted_host(script: &str) -> PluginHost {
    let mut host = bare_host(Isolation::Process);
    host.set_worker_command("/bin/sh", ["-c", script, "sh"]);
    host.set_timeouts(Timeouts {
        handshake: Duration::from_secs(1),
        call: Duration::from_secs(1),
    });
    host
}

/// A frame as the worker writes it.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

#[test]
fn broken_worker_programs_are_typed_errors() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("scripted-workers");
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("write");
        path.display().to_string()
    };
    let ready = br#"{"worker_protocol":1,"abi_version":1,"load":{"status":"ready"}}"#;
    let hello = write("hello.bin", &frame(ready));
    let future = write(
        "future.bin",
        &frame(br#"{"worker_protocol":99,"abi_version":1,"load":{"status":"ready"}}"#),
    );
    let not_json = write("not-json.bin", &frame(b"hello, I am not a worker"));
    let huge = write("huge.bin", &u64::MAX.to_le_bytes());
    let lib = lib_path("legora_plugin_minimal");
    let load = |script: String| scripted_host(&script).load_path(&lib).expect_err("fails");
    let who = lib.display().to_string();

    // exits at once: no hello
    for code in [0, 7] {
        match load(format!("exit {code}")) {
            HostError::Crashed {
                plugin,
                method,
                exit,
                ..
            } => {
                assert_eq!((plugin.as_str(), method.as_str()), (who.as_str(), "load"));
                assert_eq!(exit, WorkerExit::Code(code));
            }
            other => panic!("expected Crashed, got {other:?}"),
        }
    }
    // a length prefix of 8 ASCII bytes: far over the hello's limit
    match load("printf 'garbage!'; exec sleep 10".into()) {
        HostError::FrameTooLarge {
            method, direction, ..
        } => assert_eq!((method.as_str(), direction), ("load", "reply")),
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    // a cut length prefix
    match load("printf 'abc'".into()) {
        HostError::BadFrame { method, reason, .. } => {
            assert_eq!(method, "load");
            assert!(
                reason.starts_with("the stream ended 3 bytes into a 8-byte frame"),
                "{reason}"
            );
        }
        other => panic!("expected BadFrame, got {other:?}"),
    }
    // a frame that is not a hello
    match load(format!("cat '{not_json}'; exec sleep 10")) {
        HostError::BadFrame { reason, .. } => {
            assert!(
                reason.contains("the worker's hello is not valid"),
                "{reason}"
            )
        }
        other => panic!("expected BadFrame, got {other:?}"),
    }
    // another protocol version
    match load(format!("cat '{future}'; exec sleep 10")) {
        HostError::Worker { path, message } => {
            assert_eq!(path, lib);
            assert!(message.contains("speaks worker protocol 99"), "{message}");
        }
        other => panic!("expected Worker, got {other:?}"),
    }
    // silent: the handshake times out
    match load("exec sleep 10".into()) {
        HostError::Timeout {
            method, timeout, ..
        } => assert_eq!((method.as_str(), timeout), ("load", Duration::from_secs(1))),
        other => panic!("expected Timeout, got {other:?}"),
    }
    // a good hello, then a reply frame announcing 2^64 - 1 bytes
    match load(format!("cat '{hello}' '{huge}'; exec sleep 10")) {
        HostError::FrameTooLarge {
            plugin,
            method,
            direction,
            len,
            limit,
        } => {
            assert_eq!(
                (plugin.as_str(), method.as_str()),
                (who.as_str(), "manifest")
            );
            assert_eq!((direction, len), ("reply", u64::MAX));
            assert_eq!(limit, legora_plugin_host::DEFAULT_MAX_FRAME_LEN);
        }
        other => panic!("expected FrameTooLarge, got {other:?}"),
    }
    // a good hello, then silence: the manifest call times out
    match load(format!("cat '{hello}'; exec sleep 10")) {
        HostError::Timeout { method, .. } => assert_eq!(method, "manifest"),
        other => panic!("expected Timeout, got {other:?}"),
    }
    // no such program
    let mut host = bare_host(Isolation::Process);
    host.set_worker_command("/nonexistent/legora-plugin-worker", ["plugin-worker"]);
    match host.load_path(&lib) {
        Err(HostError::Worker { message, .. }) => {
            assert!(message.contains("could not be started"), "{message}")
        }
        other => panic!("expected Worker, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_worker_program_refuses_a_bad_command_line() {
    let out = std::process::Command::new(worker_program())
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("usage: legora-plugin-worker"),
        "{stderr}"
    );
}
