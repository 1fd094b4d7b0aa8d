//! `legora bench` on the tiny shape: it runs, emits one valid JSON object per case and
//! refuses unknown cases. No timing thresholds (timings depend on the machine).

use serde_json::Value;

fn legora(args: &[&str]) -> std::process::Output {
    super::common::legora_cmd().args(args).output().unwrap()
}

/// The JSON lines of a successful run.
fn records(args: &[&str]) -> Vec<Value> {
    let out = legora(args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn num(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` is not a number: {v}"))
}

/// Fields every record has, with sane values.
/// `steps` per run, `runs` runs (the experts of S-concurrent-seq, else 1).
fn check(v: &Value, case: &str, steps: u64, runs: u64, tokens_per_step: u64) {
    assert_eq!(v["impl"], "legora");
    assert_eq!(v["case"], case);
    assert_eq!(v["backend"], "flex");
    assert_eq!(v["steps"].as_u64(), Some(steps), "{v}");
    assert_eq!(v["timed_steps"].as_u64(), Some(steps * runs), "{v}");
    assert_eq!(v["tokens_per_step"].as_u64(), Some(tokens_per_step), "{v}");
    assert!(v["threads"].as_u64().is_some_and(|t| t >= 1), "{v}");
    for key in [
        "step_s_median",
        "step_s_min",
        "step_s_max",
        "tokens_per_s",
        "total_s",
        "forward_s_median",
        "backward_s_median",
        "optim_s_median",
        "last_loss",
    ] {
        let x = num(v, key);
        assert!(x.is_finite() && x > 0.0, "`{key}` = {x}: {v}");
    }
    let (lo, med, hi) = (
        num(v, "step_s_min"),
        num(v, "step_s_median"),
        num(v, "step_s_max"),
    );
    assert!(lo <= med && med <= hi, "{v}");
    let tps = num(v, "tokens_per_s");
    assert!(
        (tps - tokens_per_step as f64 / med).abs() <= 1e-6 * tps,
        "{v}"
    );
    assert!(
        num(v, "total_s") >= lo * (steps * runs) as f64 * 0.999,
        "{v}"
    );
    // null only where the OS offers no peak-memory counter
    if cfg!(target_os = "linux") {
        assert!(num(v, "peak_rss_mb") > 0.0, "{v}");
    }
    assert!(v["trainable_params"].as_u64().is_some_and(|n| n > 0), "{v}");
}

#[test]
fn tiny_case_emits_json() {
    let rows = records(&[
        "bench", "--case", "tiny", "--steps", "2", "--warmup", "1", "--json",
    ]);
    assert_eq!(rows.len(), 1);
    let v = &rows[0];
    // batch 2 × seq 16
    check(v, "tiny", 2, 1, 32);
    // LoRA r=8 on q_proj [128 ← 32] (q: 4 heads × 8) and v_proj [16 ← 32] (2 kv heads
    // × 8) in 2 layers: 2 · (8·(32+32) + 8·(32+16)) = 1,792
    assert_eq!(v["trainable_params"], 1792);
}

#[test]
fn every_case_runs_on_the_tiny_shape() {
    let rows = records(&[
        "bench",
        "--case",
        "S-all,S-moe,S-concurrent,S-concurrent-seq",
        "--tiny",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--json",
    ]);
    assert_eq!(rows.len(), 4);
    check(&rows[0], "S-all@tiny", 1, 1, 32);
    check(&rows[1], "S-moe@tiny", 1, 1, 32);
    check(&rows[2], "S-concurrent@tiny", 1, 1, 3 * 32);
    check(&rows[3], "S-concurrent-seq@tiny", 1, 3, 32);
    let all = rows[0]["trainable_params"].as_u64().unwrap();
    // 4 experts of the S-all adapter + a router [4, 32] per layer
    assert_eq!(
        rows[1]["trainable_params"].as_u64(),
        Some(4 * all + 2 * 4 * 32)
    );
    // 3 experts, concurrently or one after another
    assert_eq!(rows[2]["trainable_params"].as_u64(), Some(3 * all));
    assert_eq!(rows[3]["trainable_params"].as_u64(), Some(3 * all));
}

#[test]
fn markdown_table_without_json() {
    let out = legora(&["bench", "--case", "tiny", "--steps", "1", "--warmup", "0"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[0].starts_with("| case |"), "{stdout}");
    assert!(
        lines[2].starts_with("| tiny | float32 | flex |"),
        "{stdout}"
    );
}

#[test]
fn unknown_case_is_a_usage_error_listing_the_cases() {
    let out = legora(&["bench", "--case", "S-qv,nope", "--steps", "1"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("nope"), "{stderr}");
    for case in [
        "S-qv",
        "S-all",
        "S-moe",
        "S-concurrent",
        "S-concurrent-seq",
        "tiny",
        "all",
    ] {
        assert!(stderr.contains(case), "{stderr}");
    }
    let out = legora(&["bench", "--case", "tiny", "--steps", "0"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn gpu_cases_run_on_the_tiny_shape_with_bf16_projections() {
    let args = |dtype: Option<&'static str>| {
        let mut a = vec![
            "bench",
            "--case",
            "G-qv,G-all,G-concurrent",
            "--tiny",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--json",
        ];
        if let Some(d) = dtype {
            a.extend(["--dtype", d]);
        }
        records(&a)
    };
    let bf16 = args(None);
    assert_eq!(bf16.len(), 3);
    check(&bf16[0], "G-qv@tiny", 1, 1, 32);
    check(&bf16[1], "G-all@tiny", 1, 1, 32);
    check(&bf16[2], "G-concurrent@tiny", 1, 1, 3 * 32);
    assert!(bf16.iter().all(|r| r["dtype"] == "bf16"), "{bf16:?}");
    // the same random weights and batches with f32 projections: the first step's loss
    // moves only by bf16's rounding of the weights
    let f32 = args(Some("f32"));
    assert!(f32.iter().all(|r| r["dtype"] == "f32"), "{f32:?}");
    for (a, b) in bf16.iter().zip(&f32) {
        let (x, y) = (num(a, "last_loss"), num(b, "last_loss"));
        assert!(x != y && (x - y).abs() < 1e-2 * y.abs(), "{x} vs {y}");
    }
}

/// `--quantize` stores the random model's projections in a bitsandbytes format (and the
/// embeddings in bf16) straight from generation; the first step's loss moves only by the
/// quantization of the weights. Several cases run in fresh processes with the same flags.
#[test]
fn quantized_storage_from_generation() {
    let run = |extra: &[&'static str]| {
        let mut a = vec![
            "bench", "--case", "tiny", "--steps", "1", "--warmup", "0", "--json",
        ];
        a.extend(extra);
        records(&a).remove(0)
    };
    let f32 = run(&[]);
    assert_eq!(f32["storage"], "float32");
    for (extra, storage) in [
        (
            &["--quantize", "nf4", "--double-quant"][..],
            "nf4-dq projections, embeddings and lm_head bf16",
        ),
        (
            &["--quantize", "fp4"],
            "fp4 projections, embeddings and lm_head bf16",
        ),
        (
            &["--quantize", "int8"],
            "int8 projections, embeddings and lm_head bf16",
        ),
        (&["--dtype", "bf16"], "bfloat16"),
    ] {
        let v = run(extra);
        check(&v, "tiny", 1, 1, 32);
        assert_eq!(v["storage"], storage, "{v}");
        let (x, y) = (num(&v, "last_loss"), num(&f32, "last_loss"));
        assert!(x != y && (x - y).abs() < 2e-2 * y, "{extra:?}: {x} vs {y}");
    }
    let rows = records(&[
        "bench",
        "--case",
        "tiny,S-qv",
        "--tiny",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--quantize",
        "int8",
        "--seed",
        "3",
        "--json",
    ]);
    assert_eq!(rows.len(), 2);
    check(&rows[1], "S-qv@tiny", 1, 1, 32);
    // the same case, seed and storage in two processes: the same model, batches and loss
    assert_eq!(rows[0]["last_loss"], rows[1]["last_loss"]);
    assert!(rows
        .iter()
        .all(|r| r["storage"].as_str().unwrap().starts_with("int8")));
}

/// `--shape` swaps the model of a case and keeps its batch; the label names the shape.
#[test]
fn shape_flag_sets_the_model() {
    let rows = records(&[
        "bench", "--case", "tiny", "--shape", "S", "--seq", "8", "--steps", "1", "--warmup", "0",
        "--json",
    ]);
    check(&rows[0], "tiny@S", 1, 1, 16);
    assert_eq!(rows[0]["hidden"], 512);
    assert_eq!(rows[0]["shape"], "S");
}

/// A case that cannot fit is refused before anything is allocated, with the computed
/// need, what it is made of and the memory available; no panic, no abort.
#[test]
fn cases_too_large_for_memory_are_refused_before_allocating() {
    let refused = |args: &[&str], needles: &[&str]| {
        let started = std::time::Instant::now();
        let out = legora(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        for n in needles {
            assert!(stderr.contains(n), "`{n}` missing: {stderr}");
        }
        assert!(started.elapsed().as_secs() < 30, "{stderr}");
    };
    refused(
        &["bench", "--case", "tiny", "--batch", "1000000000"],
        &[
            "case tiny",
            "needs at least",
            "16000000000 tokens",
            "MiB available",
        ],
    );
    // Qwen2-7B in f32: 7.6 G parameters
    refused(
        &[
            "bench",
            "--case",
            "S-qv",
            "--shape",
            "L",
            "--memory-limit",
            "6000",
        ],
        &[
            "frozen weights 29050 MiB (float32)",
            "6000 MiB available (--memory-limit)",
        ],
    );
    refused(
        &[
            "bench",
            "--case",
            "S-qv",
            "--shape",
            "L",
            "--quantize",
            "nf4",
            "--double-quant",
            "--memory-limit",
            "4000",
        ],
        &["frozen weights 5290 MiB (nf4-dq projections, embeddings and lm_head bf16)"],
    );
}

/// `--model` trains over a real model's weights and shape (an HF folder or a GGUF file,
/// its blocks kept or in the storage asked for); a folder without weights, or no folder,
/// is refused naming the path.
#[test]
fn model_flag_benches_a_real_model() {
    let root = legora_testing::workspace_root();
    let hf = root.join("tests/fixtures/models/qwen3");
    let gguf = root.join("tests/fixtures/gguf/qwen3-q8_0.gguf");
    // the GGUF file's Q8_0 blocks as they are, then requantized to NF4
    for (path, extra, hidden) in [(&hf, None, 64), (&gguf, None, 32), (&gguf, Some("nf4"), 32)] {
        let p = path.to_str().unwrap();
        let mut args = vec![
            "bench", "--case", "tiny", "--model", p, "--steps", "1", "--warmup", "0", "--json",
        ];
        if let Some(q) = extra {
            args.extend(["--quantize", q]);
        }
        let v = records(&args).remove(0);
        check(&v, v["case"].as_str().unwrap(), 1, 1, 32);
        assert!(v["case"].as_str().unwrap().starts_with("tiny@"), "{v}");
        assert_eq!(v["hidden"], hidden, "{v}");
        if extra.is_none() && path == &gguf {
            // ffn_down (rows of 88) is F16 in the file, read as f32 values
            let storage = "Q8_0 / f32 projections, embeddings Q8_0 (GGUF blocks)";
            assert_eq!(v["storage"], storage, "{v}");
        }
        assert!(num(&v, "last_loss").is_finite(), "{v}");
    }
    let tmp = std::env::temp_dir().join(format!("legora-bench-noweights-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(hf.join("config.json"), tmp.join("config.json")).unwrap();
    for (dir, needle) in [
        (tmp.clone(), "safetensors"),
        (tmp.join("absent"), "config.json"),
    ] {
        let out = legora(&["bench", "--case", "tiny", "--model", dir.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.contains(dir.to_str().unwrap()), "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
