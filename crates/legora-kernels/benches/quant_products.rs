//! Frozen-weight products by storage format: `y = x·Wᵀ` (`matmul_xwt`) and `dx = dy·W`
//! (`matmul_dyw`) with `W` dequantized a tile at a time, against the same products on
//! the f32 weight (one multi-threaded gemm).
//!
//! ```text
//! cargo bench -p legora-kernels --bench quant_products                 # n=512, in=896, out=4864
//! cargo bench -p legora-kernels --bench quant_products -- --n 1 --iters 20
//! ```
//!
//! Prints one line per format: median milliseconds of each product over the timed
//! iterations (formats interleaved, after one warm-up) and the ratio to f32, then one
//! JSON line per format.

use std::time::Instant;

use legora_kernels::quant::ggml::GgmlType;
use legora_kernels::quant::{matmul_dyw, matmul_xwt, Format, QuantMatrix};

#[path = "../tests/common/mod.rs"]
mod common;
use common::values;

struct Args {
    n: usize,
    din: usize,
    dout: usize,
    iters: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        n: 512,
        din: 896,
        dout: 4864,
        iters: 7,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        let val = argv.get(i + 1).and_then(|v| v.parse::<usize>().ok());
        let slot = match argv[i].as_str() {
            "--n" => Some(&mut a.n),
            "--in" => Some(&mut a.din),
            "--out" => Some(&mut a.dout),
            "--iters" => Some(&mut a.iters),
            _ => None, // cargo passes --bench; ignore unknown flags
        };
        match (slot, val) {
            (Some(s), Some(v)) if v > 0 => {
                *s = v;
                i += 2;
            }
            (Some(_), _) => {
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
    let formats = [
        Format::F32,
        Format::Bf16,
        Format::F16,
        Format::Int8,
        Format::Nf4 {
            double_quant: false,
        },
        Format::Nf4 { double_quant: true },
        Format::Fp4 {
            double_quant: false,
        },
        Format::Ggml(GgmlType::Q8_0),
        Format::Ggml(GgmlType::Q4_0),
        Format::Ggml(GgmlType::Q4_K),
    ];
    let w = values(a.dout * a.din, 1);
    // GGML blocks need whole blocks per row: K-quants are benched only when `in` allows
    let formats: Vec<Format> = formats
        .into_iter()
        .filter(|f| !matches!(f, Format::Ggml(t) if a.din % t.block_size() != 0))
        .collect();
    let mats: Vec<QuantMatrix> = formats
        .iter()
        .map(|&f| match f {
            // random blocks (the gguf package is the quantizer of GGUF files, not legora)
            Format::Ggml(ty) => common::ggml_matrix(ty, a.dout, a.din, 1),
            _ => QuantMatrix::quantize("w", &w, a.dout, a.din, f).expect("finite weight"),
        })
        .collect();
    let x = values(a.n * a.din, 2);
    let dy = values(a.n * a.dout, 3);
    let mut y = vec![0.0f32; a.n * a.dout];
    let mut dx = vec![0.0f32; a.n * a.din];
    let mut times = vec![(Vec::new(), Vec::new()); formats.len()];
    for iter in 0..=a.iters {
        for (m, t) in mats.iter().zip(times.iter_mut()) {
            let view = m.view();
            let start = Instant::now();
            matmul_xwt(a.n, &x, &view, &mut y, false).expect("sizes");
            let fwd = start.elapsed().as_secs_f64() * 1e3;
            let start = Instant::now();
            matmul_dyw(a.n, &dy, &view, &mut dx, false).expect("sizes");
            let bwd = start.elapsed().as_secs_f64() * 1e3;
            if iter > 0 {
                t.0.push(fwd);
                t.1.push(bwd);
            }
        }
    }
    let medians: Vec<(f64, f64)> = times
        .into_iter()
        .map(|(f, b)| (median(f), median(b)))
        .collect();
    let (f0, b0) = medians[0];
    println!(
        "n={} in={} out={} threads={} iters={}",
        a.n,
        a.din,
        a.dout,
        rayon::current_num_threads(),
        a.iters
    );
    println!(
        "{:8} {:>10} {:>7} {:>10} {:>7} {:>10}",
        "format", "x·Wᵀ ms", "×f32", "dy·W ms", "×f32", "MiB"
    );
    for ((f, m), (fwd, bwd)) in formats.iter().zip(&mats).zip(&medians) {
        let mib = m.bytes() as f64 / (1 << 20) as f64;
        println!(
            "{:8} {fwd:10.2} {:7.2} {bwd:10.2} {:7.2} {mib:10.2}",
            f.name(),
            fwd / f0,
            bwd / b0
        );
    }
    for (f, (fwd, bwd)) in formats.iter().zip(&medians) {
        println!(
            "{{\"format\":\"{}\",\"xwt_ms\":{fwd:.3},\"dyw_ms\":{bwd:.3},\"xwt_vs_f32\":{:.3},\"dyw_vs_f32\":{:.3}}}",
            f.name(),
            fwd / f0,
            bwd / b0
        );
    }
}
