//! The server end to end on an ephemeral loopback port: 12 concurrent clients on the
//! base, two adapters, a routed mixture and one of its experts, some streaming, each get
//! exactly the completion `legora generate` gives alone (greedy); `usage` is right; the
//! streamed chunks concatenate to the same text.

use super::common;

use common::*;
use serde_json::{json, Value};

const MAX_NEW: usize = 12;

/// One client's request.
struct Case {
    model: &'static str,
    prompt: &'static str,
    chat: bool,
    stream: bool,
}

fn body(c: &Case) -> String {
    let mut v = json!({"model": c.model, "max_tokens": MAX_NEW, "temperature": 0,
                       "stream": c.stream});
    if c.chat {
        v["messages"] = json!([{"role": "user", "content": c.prompt}]);
    } else {
        v["prompt"] = json!(c.prompt);
    }
    if c.stream {
        v["stream_options"] = json!({"include_usage": true});
    }
    v.to_string()
}

/// The text and usage of one answer (streamed chunks concatenated).
fn ask(server: &legora_serve::Server, c: &Case) -> (String, Value, String) {
    let path = if c.chat {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    if !c.stream {
        let (code, v) = post(server, path, &body(c), None);
        assert_eq!(code, 200, "{v}");
        let choice = &v["choices"][0];
        let text = if c.chat {
            assert_eq!(choice["message"]["role"], "assistant");
            choice["message"]["content"].as_str().unwrap().to_string()
        } else {
            choice["text"].as_str().unwrap().to_string()
        };
        let reason = choice["finish_reason"].as_str().unwrap().to_string();
        return (text, v["usage"].clone(), reason);
    }
    let chunks = post_stream(server, path, &body(c));
    let (mut text, mut usage, mut reason) = (String::new(), Value::Null, String::new());
    for ch in &chunks {
        if let Some(u) = ch.get("usage") {
            usage = u.clone();
            continue;
        }
        let choice = &ch["choices"][0];
        let delta = if c.chat {
            &choice["delta"]["content"]
        } else {
            &choice["text"]
        };
        if let Some(d) = delta.as_str() {
            text.push_str(d);
        }
        if let Some(r) = choice["finish_reason"].as_str() {
            reason = r.to_string();
        }
    }
    if c.chat {
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    }
    (text, usage, reason)
}

#[test]
fn concurrent_clients_get_what_generate_gives_alone() {
    let dir = scratch("concurrent");
    let fx = fixtures(&dir);
    // Room for a few clients at once: rows join and leave the running batch.
    let server = server(&fx, |o| {
        o.engine.max_seqs = 8;
        o.engine.prefill_chunk = 5;
        o.engine.step_tokens = 24;
    });
    let (code, models) = get_text(&server, "/v1/models", None);
    assert_eq!(code, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["base", "a", "b", "mix", "mix/e0", "mix/e1"]);

    let prompts = [
        "The cat sat on the",
        "Once upon a time there was a little",
        "the",
    ];
    let models = ["base", "a", "b", "mix", "mix/e1", "a"];
    let cases: Vec<Case> = (0..12)
        .map(|i| Case {
            model: models[i % models.len()],
            prompt: prompts[i % prompts.len()],
            chat: i % 4 == 3,
            stream: i % 3 == 1,
        })
        .collect();
    let answers: Vec<(String, Value, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = cases.iter().map(|c| s.spawn(|| ask(&server, c))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut distinct = std::collections::BTreeSet::new();
    for (c, (text, usage, reason)) in cases.iter().zip(&answers) {
        let want = reference(&fx, c.model, c.prompt, c.chat, MAX_NEW);
        distinct.insert(want.clone());
        assert_eq!(
            text, &want,
            "{} {:?} (chat {}, stream {})",
            c.model, c.prompt, c.chat, c.stream
        );
        // usage: the prompt's tokens as the tokenizer gives them; the tokens generated
        let prompt_tokens = usage["prompt_tokens"].as_u64().unwrap();
        let completion = usage["completion_tokens"].as_u64().unwrap();
        assert!(prompt_tokens > 0);
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            prompt_tokens + completion
        );
        match reason.as_str() {
            "length" => assert_eq!(completion, MAX_NEW as u64),
            "stop" => assert!(completion <= MAX_NEW as u64),
            r => panic!("finish_reason {r}"),
        }
    }
    // The adapters and the mixture do change the completions (the test can fail).
    assert!(distinct.len() >= 4, "{distinct:?}");
    let (_, metrics) = get_text(&server, "/metrics", None);
    let seqs = metrics
        .lines()
        .find(|l| l.starts_with("legora_batch_sequences_sum"))
        .unwrap();
    let steps = metrics
        .lines()
        .find(|l| l.starts_with("legora_steps_total"))
        .unwrap();
    let sum: f64 = seqs.split(' ').nth(1).unwrap().parse().unwrap();
    let n: f64 = steps.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(
        sum / n > 1.5,
        "steps batch several sequences: {seqs} / {steps}"
    );
    server.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}
