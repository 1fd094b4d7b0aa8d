//! `MoeLinear` forward+backward: stacked-rank fast path vs the per-expert loop.
//!
//! ```text
//! cargo bench -p legora-nn --bench moe_linear                 # E=8, r=16, d=1024, 2048 tokens
//! cargo bench -p legora-nn --bench moe_linear -- --tokens 256 --d 256 --iters 3
//! ```
//!
//! Prints a table and one JSON line per path (`{"path":..,"tokens_per_s":..}`), medians
//! over the timed iterations after one warm-up.

use std::time::Instant;

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Distribution, Tensor};
use legora_nn::{
    reference, AdapterSpec, Experts, InitLoraWeights, MoeLinear, Router, RouterConfig,
};

type B = Autodiff<Flex>;

struct Args {
    experts: usize,
    rank: usize,
    d: usize,
    tokens: usize,
    top_k: usize,
    iters: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        experts: 8,
        rank: 16,
        d: 1024,
        tokens: 2048,
        top_k: 2,
        iters: 5,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = || argv.get(i + 1).and_then(|v| v.parse::<usize>().ok());
        let slot = match argv[i].as_str() {
            "--experts" => Some(&mut a.experts),
            "--rank" => Some(&mut a.rank),
            "--d" => Some(&mut a.d),
            "--tokens" => Some(&mut a.tokens),
            "--top-k" => Some(&mut a.top_k),
            "--iters" => Some(&mut a.iters),
            _ => None, // cargo passes --bench; ignore unknown flags
        };
        match (slot, val()) {
            (Some(s), Some(v)) => {
                *s = v;
                i += 2;
            }
            (Some(_), None) => {
                eprintln!("{} needs a positive integer", argv[i]);
                std::process::exit(2);
            }
            (None, _) => i += 1,
        }
    }
    a
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let a = parse_args();
    let device = Default::default();
    let w = Tensor::<B, 2>::random([a.d, a.d], Distribution::Normal(0.0, 0.02), &device);
    let mut layer = MoeLinear::new(w, None).expect("valid base");
    for e in 0..a.experts {
        let spec = AdapterSpec::new(a.rank, 2.0 * a.rank as f64).with_init(InitLoraWeights::Random);
        layer
            .add_expert(&format!("e{e}"), &spec)
            .expect("valid expert");
    }
    let cfg = RouterConfig::new(a.experts).with_top_k(a.top_k.min(a.experts));
    let router = Router::init(&cfg, a.d, &device).expect("valid router");
    let layer = layer.with_router(router).expect("router matches");
    let x = Tensor::<B, 2>::random([a.tokens, a.d], Distribution::Default, &device);

    println!(
        "MoeLinear fwd+bwd on flex: E={} r={} d={} tokens={} top_k={} iters={}",
        a.experts, a.rank, a.d, a.tokens, a.top_k, a.iters
    );
    println!("{:<6} {:>12} {:>14}", "path", "median ms", "tokens/s");
    let mut results = Vec::new();
    for path in ["fast", "loop"] {
        let mut times = Vec::new();
        for it in 0..=a.iters {
            let t0 = Instant::now();
            let xg = x.clone().require_grad();
            let out = layer
                .router
                .as_ref()
                .expect("router")
                .forward(xg.clone(), None);
            let y = match path {
                "fast" => layer
                    .forward(xg, &Experts::Gates(out.gates))
                    .map(|(y, _)| y),
                _ => reference::moe_loop(&layer, xg, out.gates),
            }
            .expect("shapes match");
            let grads = (y.sum() + out.aux_loss).backward();
            // force completion of the gradient computation
            let g = layer.experts[0].lora_A.val().grad(&grads).expect("grad");
            let _ = g.into_data();
            if it > 0 {
                times.push(t0.elapsed().as_secs_f64());
            }
        }
        let med = median(times.clone());
        let tps = a.tokens as f64 / med;
        println!("{path:<6} {:>12.2} {:>14.0}", med * 1e3, tps);
        results.push((path, med, tps, times));
    }
    let speedup = results[1].1 / results[0].1;
    println!("fast path speed-up over loop: {speedup:.2}x");
    for (path, med, tps, times) in &results {
        let json = serde_json::json!({
            "bench": "moe_linear", "path": path, "experts": a.experts, "rank": a.rank,
            "d": a.d, "tokens": a.tokens, "top_k": a.top_k,
            "median_s": med, "tokens_per_s": tps, "times_s": times,
        });
        println!("{json}");
    }
}
