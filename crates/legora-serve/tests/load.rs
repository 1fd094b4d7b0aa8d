//! Load on loopback, bounded: 64 clients × 8 requests on mixed models, some streaming.
//! With the queue as long as the number of clients, no request is refused, none fails
//! and every answer is the completion the model gives alone. With a short queue, the
//! requests beyond it get 429 with OpenAI's error object (counted in `/metrics`), none
//! gets another error, and the server serves on.

use super::common;

use std::collections::BTreeMap;
use std::sync::Barrier;

use common::*;
use serde_json::{json, Value};

const CLIENTS: usize = 64;
const MAX_NEW: usize = 4;
const MODELS: [&str; 5] = ["base", "a", "b", "mix", "mix/e0"];
const PROMPTS: [&str; 2] = ["The cat sat on the", "Once upon a time"];

/// Client `i`'s request `j`: (model, prompt).
fn request(i: usize, j: usize) -> (&'static str, &'static str) {
    (MODELS[(i + j) % MODELS.len()], PROMPTS[(i / 2 + j) % 2])
}

fn body(model: &str, prompt: &str, stream: bool) -> String {
    json!({"model": model, "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0,
           "stream": stream})
    .to_string()
}

/// The status and the completion text (streamed chunks concatenated) of one request.
fn ask(server: &legora_serve::Server, model: &str, prompt: &str, stream: bool) -> (u16, Value) {
    if !stream {
        let (code, v) = post(server, "/v1/completions", &body(model, prompt, false), None);
        return match code {
            200 => (code, v["choices"][0]["text"].clone()),
            _ => (code, v),
        };
    }
    let chunks = post_stream(server, "/v1/completions", &body(model, prompt, true));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    (200, json!(text))
}

/// Every client's answers, all clients started together.
fn storm(
    server: &legora_serve::Server,
    requests: usize,
    stream: impl Fn(usize, usize) -> bool + Sync,
) -> Vec<Vec<(u16, Value)>> {
    let start = Barrier::new(CLIENTS);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..CLIENTS)
            .map(|i| {
                let (start, stream) = (&start, &stream);
                s.spawn(move || {
                    start.wait();
                    (0..requests)
                        .map(|j| {
                            let (model, prompt) = request(i, j);
                            ask(server, model, prompt, stream(i, j))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn load_within_the_queue_is_served_and_beyond_it_refused_with_429() {
    let dir = scratch("load");
    let fx = fixtures(&dir);
    let mut want = BTreeMap::new();
    for m in MODELS {
        for p in PROMPTS {
            want.insert((m, p), reference(&fx, m, p, false, MAX_NEW));
        }
    }

    // The queue holds every client: 512 requests, all served, each as the model alone.
    let roomy = server(&fx, |o| {
        o.limits.max_queue = CLIENTS;
        o.engine.max_seqs = 16;
    });
    let answers = storm(&roomy, 8, |i, j| (i + j) % 3 == 0);
    for (i, client) in answers.iter().enumerate() {
        for (j, (code, text)) in client.iter().enumerate() {
            let (m, p) = request(i, j);
            assert_eq!(*code, 200, "client {i} request {j} ({m}): {text}");
            assert_eq!(text.as_str(), Some(want[&(m, p)].as_str()), "{m} {p:?}");
        }
    }
    assert_eq!(
        metric(
            &roomy,
            "legora_requests_total{route=\"/v1/completions\",status=\"200\"}"
        ),
        (CLIENTS * 8) as f64
    );
    assert_eq!(metric(&roomy, "legora_queue_depth"), 0.0);
    roomy.shutdown();

    // A queue of 2 behind 2 running sequences: what does not fit is refused with 429.
    let server = server(&fx, |o| {
        o.limits.max_queue = 2;
        o.engine.max_seqs = 2;
    });
    let answers = storm(&server, 2, |_, _| false);
    let (mut served, mut refused) = (0, 0);
    for (i, client) in answers.iter().enumerate() {
        for (j, (code, v)) in client.iter().enumerate() {
            let (m, p) = request(i, j);
            match code {
                200 => {
                    served += 1;
                    assert_eq!(v.as_str(), Some(want[&(m, p)].as_str()), "{m} {p:?}");
                }
                429 => {
                    refused += 1;
                    assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
                    assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
                }
                c => panic!("client {i} request {j}: status {c}: {v}"),
            }
        }
    }
    assert!(
        served >= 1 && refused >= 1,
        "{served} served, {refused} refused"
    );
    assert_eq!(
        metric(
            &server,
            "legora_requests_total{route=\"/v1/completions\",status=\"429\"}"
        ),
        refused as f64
    );
    // The storm is over: the server serves again.
    let (code, text) = ask(&server, "a", PROMPTS[0], false);
    assert_eq!(code, 200);
    assert_eq!(text.as_str(), Some(want[&("a", PROMPTS[0])].as_str()));
    server.shutdown();
    let _ = std::fs::remove_dir_all(dir);
}
