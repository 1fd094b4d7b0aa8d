//! Data-parallel `legora train`: two ranks as separate processes on 127.0.0.1, each
//! taking 4 rows of every batch of 8, end with the adapters one process trains on the
//! whole batches; a rank killed mid-run stops the other with a typed error (no hang),
//! and `--resume` on every rank finishes the run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::common;
use common::workspace_root;

/// Longest a run of these tests may take before it is killed and the test fails.
const DEADLINE: Duration = Duration::from_secs(300);

fn temp_dir(tag: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-dp-{tag}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A two-task run over the demo base: experts for `expert_steps`, then the router
/// (`router_steps`, 0 = no router stage); no dropout, jitter or aux loss, so a shard's
/// loss is exactly its part of the whole batch's. The ranks' gradients differ from the
/// one process's by rounding only (losses and gradient norms agree to ~1e-7), but AdamW
/// divides by `√v`, which magnifies that rounding in an element whose gradient is
/// near zero in proportion to the learning rate: at 5e-3 one element of 512 ended
/// 2e-5 apart after 5 steps; at 1e-3 (used here) everything is within 1e-6.
fn run_file(
    dir: &Path,
    name: &str,
    batch: usize,
    expert_steps: usize,
    router_steps: usize,
) -> PathBuf {
    let root = workspace_root();
    let data = |rel: &str| path(&root.join("plugins").join(rel));
    let router = if router_steps == 0 {
        "[stages.router]\nenabled = false\n".to_string()
    } else {
        format!(
            "[stages.router]\nmax_steps = {router_steps}\nbatch_size = {batch}\n\
             routing_loss_coef = 0.1\nlearning_rate = 1e-2\n"
        )
    };
    let text = format!(
        "seed = 5\noutput_dir = \"out-{name}\"\n\n[model]\npath = {:?}\ntemplate = \"chatml\"\n\
         max_seq_len = 128\n\n[data]\nval_fraction = 0.2\npad_per_task = true\n\n\
         [lora]\nr = 4\nlora_alpha = 8\ntarget_modules = [\"q_proj\", \"v_proj\"]\nlora_dropout = 0.0\n\n\
         [moe]\nrouter_aux_loss_coef = 0.0\njitter_noise = 0.0\n\n\
         [[tasks]]\nname = \"medical\"\nformat = \"medical/alpaca\"\ntrain = {:?}\nmax_samples = 24\n\n\
         [[tasks]]\nname = \"finance\"\nformat = \"finance/alpaca\"\ntrain = {:?}\nmax_samples = 24\n\n\
         [stages.experts]\nmax_steps = {expert_steps}\nbatch_size = {batch}\nlearning_rate = 1e-3\n\
         save_steps = 1\n\n{router}\n[stages.eval]\nenabled = false\n",
        path(&root.join("demo/base")),
        data("medical/data/alpaca/train.json"),
        data("finance/data/alpaca/train.json"),
    );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn legora(dir: &Path, args: &[String]) -> Command {
    let mut c = common::legora_cmd();
    c.args(args)
        .current_dir(dir)
        .env_remove("LEGORA_PLUGIN_PATH")
        .env("LEGORA_PROGRESS_SECS", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn train_args(run: &Path, extra: &[&str]) -> Vec<String> {
    let plugins = common::bundled_plugins();
    let mut a: Vec<String> = [
        "train",
        "--config",
        &path(run),
        "--plugin-dir",
        &path(plugins),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// Wait for a child, killing it (and failing) past the deadline.
fn wait(mut child: Child, what: &str) -> Output {
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > DEADLINE {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("{what} hung: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn ok(out: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what}: exit {:?}\nstdout:\n{stdout}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Start ranks 0..world of `run` (rank 1 first: it retries until rank 0 listens).
fn spawn_ranks(dir: &Path, run: &Path, world: usize, extra: &[&str]) -> Vec<Child> {
    let port = free_port().to_string();
    let world_s = world.to_string();
    let mut children: Vec<(usize, Child)> = (0..world)
        .rev()
        .map(|rank| {
            let rank_s = rank.to_string();
            let mut flags = vec![
                "--world-size",
                world_s.as_str(),
                "--rank",
                rank_s.as_str(),
                "--coordinator",
            ];
            let coordinator = format!("127.0.0.1:{port}");
            flags.push(&coordinator);
            flags.extend_from_slice(extra);
            let child = legora(dir, &train_args(run, &flags)).spawn().unwrap();
            (rank, child)
        })
        .collect();
    children.sort_by_key(|(r, _)| *r);
    children.into_iter().map(|(_, c)| c).collect()
}

/// Every trained tensor under `out` (experts, mixture, single adapters), by file and name.
fn trained(out: &Path) -> Vec<(String, String, Vec<f32>)> {
    let mut files = Vec::new();
    let mut stack = vec![out.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_str().unwrap().to_string();
            if p.is_dir() && name != "stages" {
                stack.push(p);
            } else if name.ends_with(".safetensors") {
                files.push(p);
            }
        }
    }
    files.sort();
    let mut out_t = Vec::new();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
        names.sort();
        for n in names {
            let v = st.tensor(&n).unwrap();
            assert_eq!(v.dtype(), safetensors::Dtype::F32, "{n} in {}", f.display());
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let rel = f.strip_prefix(out).unwrap().display().to_string();
            out_t.push((rel, n, vals));
        }
    }
    out_t
}

fn assert_same_adapters(want: &Path, got: &Path, tol: f32) {
    let (w, g) = (trained(want), trained(got));
    assert!(!w.is_empty(), "no adapters under {}", want.display());
    let names = |v: &[(String, String, Vec<f32>)]| {
        v.iter()
            .map(|(f, n, _)| format!("{f}:{n}"))
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&w), names(&g));
    let mut worst = 0f32;
    for ((f, n, a), (_, _, b)) in w.iter().zip(&g) {
        assert_eq!(a.len(), b.len(), "{f}:{n}");
        for (x, y) in a.iter().zip(b) {
            let d = (x - y).abs();
            worst = worst.max(d);
            assert!(d <= tol, "{f}:{n}: {x} vs {y}");
        }
    }
    eprintln!("largest difference {worst:e} over {} tensors", w.len());
}

/// `(step, loss)` of the train lines of a run's `metrics.jsonl`.
fn losses(out: &Path) -> Vec<(String, u64, f64)> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss").is_some() && v.get("val_loss").is_none())
        .map(|v| {
            let stage = v["stage"].as_str().unwrap().to_string();
            (
                stage,
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn two_ranks_with_batch_4_train_the_adapters_one_process_trains_with_batch_8() {
    let dir = temp_dir("equal");
    let whole = run_file(&dir, "whole", 8, 5, 5);
    let sharded = run_file(&dir, "sharded", 4, 5, 5);
    ok(
        &wait(
            legora(&dir, &train_args(&whole, &[])).spawn().unwrap(),
            "one process",
        ),
        "one process",
    );
    let ranks = spawn_ranks(&dir, &sharded, 2, &[]);
    let outs: Vec<Output> = ranks.into_iter().map(|c| wait(c, "a rank")).collect();
    let rank1 = ok(&outs[1], "rank 1");
    assert!(
        rank1.contains("rank 1 of 2: training done; rank 0 writes the outputs"),
        "{rank1}"
    );
    let rank0 = ok(&outs[0], "rank 0");
    assert!(rank0.contains("# legora report"), "{rank0}");

    assert_same_adapters(&dir.join("out-whole"), &dir.join("out-sharded"), 1e-5);
    // rank 0 logs the whole batch's loss: the one process's, step by step
    let (a, b) = (
        losses(&dir.join("out-whole")),
        losses(&dir.join("out-sharded")),
    );
    assert_eq!(a.len(), 10, "{a:?}");
    assert_eq!(a.len(), b.len());
    for ((s, n, x), (t, m, y)) in a.iter().zip(&b) {
        assert_eq!((s, n), (t, m));
        assert!(
            (x - y).abs() <= 1e-5 * x.abs().max(1.0),
            "{s} step {n}: {x} vs {y}"
        );
    }
    // only rank 0 wrote: one metrics file, one set of checkpoints
    let ckpts = dir.join("out-sharded/stages/experts/checkpoints");
    assert!(ckpts.join("latest").exists());
}

#[test]
fn a_killed_rank_stops_the_other_with_an_error_and_resume_restarts_both() {
    let dir = temp_dir("kill");
    let steps = 40;
    let whole = run_file(&dir, "whole", 8, steps, 0);
    let sharded = run_file(&dir, "sharded", 4, steps, 0);
    ok(
        &wait(
            legora(&dir, &train_args(&whole, &[])).spawn().unwrap(),
            "one process",
        ),
        "one process",
    );

    let mut ranks = spawn_ranks(&dir, &sharded, 2, &["--peer-timeout", "60"]);
    // kill rank 1 once rank 0 has logged a step (and well before the 40th)
    let metrics = dir.join("out-sharded/metrics.jsonl");
    let t = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(true, |m| m.lines().count() < 2) {
        assert!(t.elapsed() < DEADLINE, "rank 0 logged no step");
        assert!(ranks[0].try_wait().unwrap().is_none(), "rank 0 ended early");
        std::thread::sleep(Duration::from_millis(5));
    }
    ranks[1].kill().unwrap();
    let _ = ranks[1].wait();
    let rank0 = ranks.remove(0);
    let t = Instant::now();
    let out = wait(rank0, "rank 0 after its peer died");
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "rank 0 took {:?} to stop",
        t.elapsed()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("data-parallel rank 0: rank 1 closed the connection"),
        "{err}"
    );
    assert!(err.contains("restart all of them with --resume"), "{err}");

    // both ranks resume from rank 0's latest checkpoint and finish the run
    let ranks = spawn_ranks(&dir, &sharded, 2, &["--resume"]);
    let outs: Vec<Output> = ranks
        .into_iter()
        .map(|c| wait(c, "a resumed rank"))
        .collect();
    ok(&outs[1], "resumed rank 1");
    ok(&outs[0], "resumed rank 0");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("out-sharded/report.json")).unwrap(),
    )
    .unwrap();
    let stage = &report["stages"][0];
    assert_eq!(stage["steps"], steps);
    let this_run = stage["steps_this_run"].as_u64().unwrap();
    assert!(this_run < steps as u64, "the resume started over: {stage}");
    assert_same_adapters(&dir.join("out-whole"), &dir.join("out-sharded"), 1e-5);
}

#[test]
fn mismatched_ranks_are_refused_before_training() {
    let dir = temp_dir("mismatch");
    let a = run_file(&dir, "a", 4, 2, 0);
    let b = run_file(&dir, "b", 4, 3, 0);
    let port = free_port().to_string();
    let coordinator = format!("127.0.0.1:{port}");
    let flags = |rank: &'static str| -> Vec<String> {
        [
            "--world-size",
            "2",
            "--rank",
            rank,
            "--coordinator",
            &coordinator,
            "--peer-timeout",
            "30",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let f0 = flags("0");
    let f1 = flags("1");
    let r0 = legora(
        &dir,
        &train_args(&a, &f0.iter().map(String::as_str).collect::<Vec<_>>()),
    )
    .spawn()
    .unwrap();
    let r1 = legora(
        &dir,
        &train_args(&b, &f1.iter().map(String::as_str).collect::<Vec<_>>()),
    )
    .spawn()
    .unwrap();
    let (o0, o1) = (wait(r0, "rank 0"), wait(r1, "rank 1"));
    let e0 = String::from_utf8_lossy(&o0.stderr);
    assert_eq!(o0.status.code(), Some(1), "{e0}");
    assert!(e0.contains("rank 1 differs in run file"), "{e0}");
    assert_eq!(o1.status.code(), Some(1));
    assert!(!dir.join("out-a/stages").exists(), "nothing trained");

    // a rank outside the world size is a usage error before anything connects
    let bad = legora(
        &dir,
        &train_args(
            &a,
            &[
                "--world-size",
                "2",
                "--rank",
                "2",
                "--coordinator",
                &coordinator,
            ],
        ),
    )
    .output()
    .unwrap();
    let e = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{e}");
    assert!(
        e.contains("`rank`") && e.contains("below the world size 2"),
        "{e}"
    );
}

/// The `epoch` of a run's last train line.
fn last_epoch(out: &Path) -> f64 {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last = text
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.get("epoch").is_some())
        .expect("a train line");
    last["epoch"].as_f64().unwrap()
}

#[test]
fn one_epoch_is_one_pass_over_the_rows_whatever_the_ranks() {
    let dir = temp_dir("epoch");
    let epoch_file = |name: &str, batch: usize| {
        let p = run_file(&dir, name, batch, 1, 0);
        let text = std::fs::read_to_string(&p).unwrap();
        let text = text.replace("max_steps = 1\n", "num_train_epochs = 1\n");
        std::fs::write(&p, text).unwrap();
        p
    };
    let whole = epoch_file("whole", 4);
    let sharded = epoch_file("sharded", 2);
    ok(
        &wait(
            legora(&dir, &train_args(&whole, &[])).spawn().unwrap(),
            "one process",
        ),
        "one process",
    );
    let outs: Vec<Output> = spawn_ranks(&dir, &sharded, 2, &[])
        .into_iter()
        .map(|c| wait(c, "a rank"))
        .collect();
    ok(&outs[1], "rank 1");
    ok(&outs[0], "rank 0");
    // the last step ends the first pass over the training rows (a batch of 4 rows more
    // than the rows at most): one process with 4 rows, and two ranks with 2 each
    for out in ["out-whole", "out-sharded"] {
        let e = last_epoch(&dir.join(out));
        assert!(
            (1.0..1.25).contains(&e),
            "{out}: the run ended at epoch {e}"
        );
    }
}
