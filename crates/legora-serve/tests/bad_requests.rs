//! Bad requests get the right status and OpenAI's error object, and the server keeps
//! serving: a missing or wrong API key, malformed JSON, wrong types, `max_tokens` of
//! 10^9, a prompt longer than the context, an unknown model, a body over the cap, a full
//! queue.

use super::common;

use common::*;
use serde_json::{json, Value};

const KEY: &str = "test-key";

/// Route, body, API key, expected status, error type, words of the message.
type Case<'a> = (&'a str, String, Option<&'a str>, u16, &'a str, &'a str);

/// The answer is OpenAI's error object with a message naming `needle`.
fn is_error(v: &Value, kind: &str, needle: &str) {
    let e = &v["error"];
    assert_eq!(e["type"], kind, "{v}");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
}

fn good(server: &legora_serve::Server) {
    let body = json!({"model": "base", "prompt": "the", "max_tokens": 2}).to_string();
    let (code, v) = post(server, "/v1/completions", &body, Some(KEY));
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 2);
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let dir = scratch("bad");
    let fx = fixtures(&dir);
    let server = server(&fx, |o| {
        o.limits.api_key = Some(KEY.into());
        o.limits.max_body_bytes = 8 << 10;
        o.limits.max_tokens = 1000;
    });
    let long_prompt = "the cat ".repeat(400);
    let cases: Vec<Case> = vec![
        (
            "/v1/completions",
            json!({"model": "base", "prompt": "the"}).to_string(),
            None,
            401,
            "invalid_request_error",
            "API key",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "base", "messages": []}).to_string(),
            Some("wrong"),
            401,
            "invalid_request_error",
            "API key",
        ),
        (
            "/v1/completions",
            "{\"model\": \"base\", \"prompt\": ".into(),
            Some(KEY),
            400,
            "invalid_request_error",
            "EOF",
        ),
        (
            "/v1/completions",
            json!({"model": "base", "prompt": "the", "max_tokens": "ten"}).to_string(),
            Some(KEY),
            400,
            "invalid_request_error",
            "invalid type",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "base", "messages": [{"role": "user", "content": 3}]}).to_string(),
            Some(KEY),
            400,
            "invalid_request_error",
            "invalid type",
        ),
        (
            "/v1/completions",
            json!({"model": "base", "prompt": "the", "max_tokens": 1_000_000_000u64}).to_string(),
            Some(KEY),
            400,
            "invalid_request_error",
            "max_tokens",
        ),
        (
            "/v1/completions",
            json!({"model": "base", "prompt": long_prompt}).to_string(),
            Some(KEY),
            400,
            "invalid_request_error",
            "context is 512 tokens",
        ),
        (
            "/v1/completions",
            json!({"model": "base", "prompt": [1, 2, 100000]}).to_string(),
            Some(KEY),
            400,
            "invalid_request_error",
            "vocabulary",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).to_string(),
            Some(KEY),
            404,
            "not_found_error",
            "`nope` does not exist",
        ),
        (
            "/v1/completions",
            json!({"model": "mix/e7", "prompt": "the"}).to_string(),
            Some(KEY),
            404,
            "not_found_error",
            "does not exist",
        ),
        (
            "/v1/completions",
            json!({"model": "base", "prompt": "x".repeat(10_000)}).to_string(),
            Some(KEY),
            413,
            "invalid_request_error",
            "over 8192 bytes",
        ),
        (
            "/v1/completions",
            json!({"model": "base", "prompt": "the", "top_p": 3.0}).to_string(),
            Some(KEY),
            400,
            "invalid_request_error",
            "top_p",
        ),
    ];
    for (path, body, key, status, kind, needle) in &cases {
        let (code, v) = post(&server, path, body, *key);
        assert_eq!(code, *status, "{body:.80}: {v}");
        is_error(&v, kind, needle);
        good(&server);
    }
    let (code, _) = get_text(&server, "/v1/models", None);
    assert_eq!(code, 401);
    let (code, text) = get_text(&server, "/health", None);
    assert_eq!((code, text.as_str()), (200, "ok"));
    let (code, text) = get_text(&server, "/metrics", Some(KEY));
    assert_eq!(code, 200);
    assert!(text.contains("legora_requests_total{route=\"/v1/completions\",status=\"400\"}"));
    server.shutdown();

    // No room in the queue: 429, and the server still answers what it can.
    let server = common::server(&fx, |o| o.limits.max_queue = 0);
    let body = json!({"model": "base", "prompt": "the", "max_tokens": 2}).to_string();
    let (code, v) = post(&server, "/v1/completions", &body, None);
    assert_eq!(code, 429);
    is_error(&v, "rate_limit_error", "capacity");
    let (code, _) = get_text(&server, "/v1/models", None);
    assert_eq!(code, 200);
    server.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}
