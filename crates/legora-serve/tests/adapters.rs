//! Adapters at run time: loaded and unloaded while another request runs (which still
//! gets exactly its completion), refused outside `--adapter-dir` (symlinks resolved);
//! a streaming client that goes away frees its sequence (the metrics show it).

use super::common;

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// Polls `ok` until it holds; fails after 120 s (a loaded 2-core CI machine once took
/// over 20 s to start a streaming sequence here).
fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < Duration::from_secs(120), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn hot_load_unload_refuse_escapes_and_free_cancelled_streams() {
    let dir = scratch("adapters");
    let fx = fixtures(&dir);
    let outside = dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    // A copy of adapter a outside the adapter folder, and a symlink to it inside.
    let escaped = outside.join("a");
    std::fs::create_dir_all(&escaped).unwrap();
    for f in std::fs::read_dir(&fx.adapter_a).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, escaped.join(f.file_name().unwrap())).unwrap();
    }
    #[cfg(unix)]
    std::os::unix::fs::symlink(&escaped, dir.join("adapters/link")).unwrap();
    let server = server(&fx, |o| {
        o.adapters.clear();
        o.limits.adapter_dirs = vec![dir.join("adapters")];
    });
    const LONG: usize = 48;
    let base_body =
        json!({"model": "base", "prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0})
            .to_string();
    std::thread::scope(|s| {
        // A request on the base runs while adapters come and go.
        let running = s.spawn(|| post(&server, "/v1/completions", &base_body, None));
        let (code, v) = post(
            &server,
            "/v1/adapters",
            &json!({"name": "hot", "path": "a"}).to_string(),
            None,
        );
        assert_eq!(code, 200, "{v}");
        let body = json!({"model": "hot", "prompt": "The cat sat on the", "max_tokens": 8,
                          "temperature": 0})
        .to_string();
        let (code, v) = post(&server, "/v1/completions", &body, None);
        assert_eq!(code, 200, "{v}");
        assert_eq!(
            v["choices"][0]["text"],
            reference(&fx, "a", "The cat sat on the", false, 8)
        );
        let (code, v) = delete(&server, "/v1/adapters/hot");
        assert_eq!(code, 200, "{v}");
        let (code, v) = post(&server, "/v1/completions", &body, None);
        assert_eq!(code, 404, "{v}");
        let (code, v) = running.join().unwrap();
        assert_eq!(code, 200, "{v}");
        assert_eq!(
            v["choices"][0]["text"],
            reference(&fx, "base", "Once upon a time", false, LONG)
        );
    });
    // Outside the adapter folder: refused, by a relative path or through a symlink.
    for path in [
        "../outside/a".to_string(),
        escaped.display().to_string(),
        "link".to_string(),
    ] {
        let (code, v) = post(
            &server,
            "/v1/adapters",
            &json!({"name": "x", "path": path}).to_string(),
            None,
        );
        assert_eq!(code, 403, "{path}: {v}");
        assert_eq!(v["error"]["type"], "permission_error");
    }
    // Inside, but a file in it links outside: what is opened is checked, not the path.
    #[cfg(unix)]
    {
        let linked = dir.join("adapters/linked");
        std::fs::create_dir_all(&linked).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::os::unix::fs::symlink(escaped.join(f), linked.join(f)).unwrap();
        }
        let (code, v) = post(
            &server,
            "/v1/adapters",
            &json!({"name": "x", "path": "linked"}).to_string(),
            None,
        );
        assert_eq!(code, 403, "{v}");
        assert_eq!(v["error"]["type"], "permission_error");
    }
    // A damaged adapter: 400, naming the folder asked for.
    let broken = dir.join("adapters/broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::copy(
        fx.adapter_a.join("adapter_model.safetensors"),
        broken.join("adapter_model.safetensors"),
    )
    .unwrap();
    std::fs::write(broken.join("adapter_config.json"), b"{\"r\": \"eight\"}").unwrap();
    let (code, v) = post(
        &server,
        "/v1/adapters",
        &json!({"name": "x", "path": "broken"}).to_string(),
        None,
    );
    assert_eq!(code, 400, "{v}");
    let msg = v["error"]["message"].as_str().unwrap();
    let named = broken.canonicalize().unwrap().join("adapter_config.json");
    assert!(msg.contains(&named.display().to_string()), "{msg}");
    let (code, v) = delete(&server, "/v1/adapters/mix");
    assert_eq!(code, 400, "start-up models stay: {v}");
    let (code, v) = delete(&server, "/v1/adapters/never");
    assert_eq!(code, 404, "{v}");

    // A streaming client reads one chunk and goes away: its sequence is freed.
    let closed_before = metric(&server, "legora_sequences_freed_total{reason=\"closed\"}");
    {
        let body =
            json!({"model": "mix", "prompt": "the", "max_tokens": 400, "stream": true}).to_string();
        let resp = agent()
            .post(&format!("http://{}/v1/completions", server.addr()))
            .send_string(&body)
            .unwrap();
        let mut lines = BufReader::new(resp.into_reader()).lines();
        let first = lines.next().unwrap().unwrap();
        assert!(first.starts_with("data: "), "{first}");
        wait_for("the sequence to run", || {
            metric(&server, "legora_active_sequences") == 1.0
        });
    }
    wait_for("the cancelled sequence to be freed", || {
        metric(&server, "legora_sequences_freed_total{reason=\"closed\"}") > closed_before
            && metric(&server, "legora_active_sequences") == 0.0
    });
    server.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_stop_string_finishes_the_sequence_rather_than_closing_it() {
    let dir = scratch("stop-metric");
    let fx = fixtures(&dir);
    let server = server(&fx, |_| {});
    let prompt = "Once upon a time";
    let full = reference(&fx, "base", prompt, false, 40);
    // a stop string a few characters into the greedy completion
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 8, "{full:?}");
    let stop: String = chars[4..7].iter().collect();
    let finished = "legora_sequences_freed_total{reason=\"finished\"}";
    let closed = "legora_sequences_freed_total{reason=\"closed\"}";
    let (finished_before, closed_before) = (metric(&server, finished), metric(&server, closed));
    let body = |stream: bool| {
        json!({"model": "base", "prompt": prompt, "max_tokens": 40, "temperature": 0,
               "stop": [stop], "stream": stream})
        .to_string()
    };
    let (code, v) = post(&server, "/v1/completions", &body(false), None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let chunks = post_stream(&server, "/v1/completions", &body(true));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop", "{last}");
    wait_for("both sequences to be freed", || {
        metric(&server, finished) >= finished_before + 2.0
            && metric(&server, "legora_active_sequences") == 0.0
    });
    assert_eq!(
        metric(&server, closed),
        closed_before,
        "a stop string is not a client that went away"
    );
    server.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}
