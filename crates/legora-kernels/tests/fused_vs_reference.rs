//! Every fused kernel against its reference path on random inputs: forward values on
//! `Flex` and `Autodiff<Flex>`, and the gradient of every input under autodiff.

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use legora_kernels::{self as k, reference, AttnMask};

type Ad = Autodiff<Flex>;

/// Standard-normal-ish values (sum of four uniforms, centred and scaled) from a local
/// SplitMix64: tests run in parallel and must not share the backend's global generator.
fn random(shape: &[usize], seed: u64) -> TensorData {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut uniform = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    };
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| ((0..4).map(|_| uniform()).sum::<f32>() - 2.0) * 1.7)
        .collect();
    TensorData::new(v, shape.to_vec())
}

/// Serializes the tests that seed the backend's global generator (dropout masks).
static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn leaf<const D: usize>(d: &TensorData) -> Tensor<Ad, D> {
    Tensor::<Ad, D>::from_data(d.clone(), &Default::default()).require_grad()
}

fn plain<const D: usize>(d: &TensorData) -> Tensor<Flex, D> {
    Tensor::from_data(d.clone(), &Default::default())
}

fn assert_close(what: &str, a: TensorData, b: TensorData, tol: f32) {
    assert_eq!(a.shape, b.shape, "{what}: shapes");
    let (a, b) = (a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
    legora_testing::assert_close_rel(what, &a, &b, tol);
}

/// `Σ out ⊙ w` for a fixed random `w`, so every output element has its own gradient.
fn probe<const D: usize>(out: Tensor<Ad, D>, seed: u64) -> Tensor<Ad, 1> {
    let w = random(&out.dims(), seed);
    (out * Tensor::from_data(w, &Default::default())).sum()
}

#[test]
fn flex_backends_take_the_fused_kernels() {
    assert!(k::has_fused_kernels::<Flex>());
    assert!(k::has_fused_kernels::<Ad>());
}

fn check_attention(b: usize, s: usize, t: usize, h: usize, kv: usize, mask_heads: usize) {
    let hd = 8;
    let (q, kk, v) = (
        random(&[b, s, h, hd], 1),
        random(&[b, t, kv, hd], 2),
        random(&[b, t, kv, hd], 3),
    );
    // A causal-with-past mask plus some masked keys per row: 0 allowed, -1e9 not.
    let past = t - s;
    let m: Vec<f32> = (0..b * mask_heads * s * t)
        .map(|i| {
            let (j, row) = (i % t, (i / t) % s);
            let hidden = j > past + row || (i * 7919) % 11 == 0 && j != 0;
            if hidden {
                -1e9
            } else {
                0.0
            }
        })
        .collect();
    let mask = TensorData::new(m, [b, mask_heads, s, t]);
    let scale = (hd as f64).powf(-0.5);
    let what = format!("attention b{b} s{s} t{t} h{h} kv{kv} mask{mask_heads}");

    let fused = k::attention(
        plain(&q),
        plain(&kk),
        plain(&v),
        AttnMask::Dense(plain(&mask)),
        scale,
    );
    let refr = reference::attention(plain(&q), plain(&kk), plain(&v), plain(&mask), scale);
    assert_close(&what, fused.into_data(), refr.into_data(), 1e-5);

    let run = |fused: bool| {
        let (q, kk, v) = (leaf::<4>(&q), leaf::<4>(&kk), leaf::<4>(&v));
        let m = Tensor::<Ad, 4>::from_data(mask.clone(), &Default::default());
        let out = if fused {
            k::attention(q.clone(), kk.clone(), v.clone(), AttnMask::Dense(m), scale)
        } else {
            reference::attention(q.clone(), kk.clone(), v.clone(), m, scale)
        };
        let grads = probe(out.clone(), 9).backward();
        let g = |x: &Tensor<Ad, 4>| x.grad(&grads).unwrap().into_data();
        (out.into_data(), g(&q), g(&kk), g(&v))
    };
    let (f, r) = (run(true), run(false));
    assert_close(&format!("{what} out"), f.0, r.0, 1e-5);
    assert_close(&format!("{what} dq"), f.1, r.1, 1e-4);
    assert_close(&format!("{what} dk"), f.2, r.2, 1e-4);
    assert_close(&format!("{what} dv"), f.3, r.3, 1e-4);
}

/// The causal mask decided per score (with a window and left padding) against the same
/// mask built dense: equal outputs, bit for bit, and equal gradients.
fn check_causal_attention(b: usize, s: usize, t: usize, window: Option<usize>) {
    let (h, kv, hd) = (4, 2, 8);
    let (q, kk, v) = (
        random(&[b, s, h, hd], 11),
        random(&[b, t, kv, hd], 12),
        random(&[b, t, kv, hd], 13),
    );
    // row 1 left-padded by two keys
    let pad: Vec<f32> = (0..b * t)
        .map(|i| {
            if i / t == 1 && i % t < 2 {
                k::MASKED
            } else {
                0.0
            }
        })
        .collect();
    let pad = TensorData::new(pad, [b, t]);
    let scale = (hd as f64).powf(-0.5);
    let what = format!("causal attention b{b} s{s} t{t} window {window:?}");
    let run = |causal: bool| {
        let (q, kk, v) = (leaf::<4>(&q), leaf::<4>(&kk), leaf::<4>(&v));
        let causal_mask = AttnMask::Causal {
            window,
            key_padding: Some(Tensor::<Ad, 2>::from_data(pad.clone(), &Default::default())),
        };
        let mask = if causal {
            causal_mask
        } else {
            AttnMask::Dense(causal_mask.to_dense(b, s, t, &Default::default()))
        };
        let out = k::attention(q.clone(), kk.clone(), v.clone(), mask, scale);
        let grads = probe(out.clone(), 14).backward();
        let g = |x: &Tensor<Ad, 4>| x.grad(&grads).unwrap().into_data();
        (out.into_data(), g(&q), g(&kk), g(&v))
    };
    let (c, d) = (run(true), run(false));
    assert_eq!(c.0, d.0, "{what}: out");
    assert_close(&format!("{what} dq"), c.1, d.1, 1e-6);
    assert_close(&format!("{what} dk"), c.2, d.2, 1e-6);
    assert_close(&format!("{what} dv"), c.3, d.3, 1e-6);
    // and the reference path (any other backend) builds that dense mask itself
    let mask = AttnMask::Causal {
        window,
        key_padding: Some(plain(&pad)),
    };
    let dense = reference::attention(
        plain(&q),
        plain(&kk),
        plain(&v),
        mask.clone().to_dense(b, s, t, &Default::default()),
        scale,
    );
    let fused = k::attention(plain(&q), plain(&kk), plain(&v), mask, scale);
    assert_close(&what, fused.into_data(), dense.into_data(), 1e-5);
}

#[test]
fn causal_attention_needs_no_dense_mask() {
    check_causal_attention(2, 6, 6, None); // prefill
    check_causal_attention(2, 6, 6, Some(3)); // a window shorter than the sequence
    check_causal_attention(2, 2, 5, Some(4)); // decoding over a cache
}

#[test]
fn attention_matches_reference() {
    check_attention(2, 5, 5, 4, 2, 1); // grouped-query, one mask for all heads
    check_attention(2, 3, 7, 4, 4, 4); // multi-head, cached keys, a mask per head
    check_attention(1, 6, 6, 6, 1, 6); // multi-query
}

#[test]
fn rms_norm_matches_reference_with_a_trainable_weight() {
    let (x, w) = (random(&[2, 3, 16], 4), random(&[16], 5));
    let fused = k::rms_norm(plain::<3>(&x), plain(&w), 1e-6);
    let refr = reference::rms_norm(plain::<3>(&x), plain(&w), 1e-6);
    assert_close("rms_norm", fused.into_data(), refr.into_data(), 1e-5);
    let run = |fused: bool| {
        let (x, w) = (leaf::<3>(&x), leaf::<1>(&w));
        let out = if fused {
            k::rms_norm(x.clone(), w.clone(), 1e-6)
        } else {
            reference::rms_norm(x.clone(), w.clone(), 1e-6)
        };
        let grads = probe(out.clone(), 6).backward();
        (
            out.into_data(),
            x.grad(&grads).unwrap().into_data(),
            w.grad(&grads).unwrap().into_data(),
        )
    };
    let (f, r) = (run(true), run(false));
    assert_close("rms_norm out", f.0, r.0, 1e-5);
    assert_close("rms_norm dx", f.1, r.1, 1e-4);
    assert_close("rms_norm dweight", f.2, r.2, 1e-4);
}

#[test]
fn rotary_matches_reference() {
    let (x, c, s) = (
        random(&[2, 5, 3, 8], 7),
        random(&[2, 5, 1, 8], 8),
        random(&[2, 5, 1, 8], 9),
    );
    let fused = k::rotary(plain(&x), &plain(&c), &plain(&s));
    let refr = reference::rotary(plain(&x), &plain(&c), &plain(&s));
    assert_close("rotary", fused.into_data(), refr.into_data(), 1e-6);
    let run = |fused: bool| {
        let x = leaf::<4>(&x);
        let (c, s) = (plain_ad(&c), plain_ad(&s));
        let out = if fused {
            k::rotary(x.clone(), &c, &s)
        } else {
            reference::rotary(x.clone(), &c, &s)
        };
        let grads = probe(out.clone(), 10).backward();
        (out.into_data(), x.grad(&grads).unwrap().into_data())
    };
    let (f, r) = (run(true), run(false));
    assert_close("rotary out", f.0, r.0, 1e-6);
    assert_close("rotary dx", f.1, r.1, 1e-5);
}

fn plain_ad<const D: usize>(d: &TensorData) -> Tensor<Ad, D> {
    Tensor::from_data(d.clone(), &Default::default())
}

#[test]
fn swiglu_matches_reference() {
    // Long enough to be split across parallel chunks.
    let (g, u) = (random(&[3, 20_000], 11), random(&[3, 20_000], 12));
    let fused = k::swiglu(plain::<2>(&g), plain(&u));
    let refr = reference::swiglu(plain::<2>(&g), plain(&u));
    assert_close("swiglu", fused.into_data(), refr.into_data(), 1e-6);
    let run = |fused: bool| {
        let (g, u) = (leaf::<2>(&g), leaf::<2>(&u));
        let out = if fused {
            k::swiglu(g.clone(), u.clone())
        } else {
            reference::swiglu(g.clone(), u.clone())
        };
        let grads = probe(out.clone(), 13).backward();
        (
            out.into_data(),
            g.grad(&grads).unwrap().into_data(),
            u.grad(&grads).unwrap().into_data(),
        )
    };
    let (f, r) = (run(true), run(false));
    assert_close("swiglu out", f.0, r.0, 1e-6);
    assert_close("swiglu dgate", f.1, r.1, 1e-5);
    assert_close("swiglu dup", f.2, r.2, 1e-5);
}

#[test]
fn next_token_nll_matches_reference() {
    let (b, s, v) = (3, 6, 37);
    let logits = random(&[b, s, v], 14);
    let targets: Vec<i64> = (0..b * (s - 1)).map(|i| (i * 13 % v) as i64).collect();
    let fused = k::next_token_nll(plain(&logits), &targets);
    let refr = reference::next_token_nll(plain(&logits), &targets);
    assert_close("nll", fused.into_data(), refr.into_data(), 1e-5);
    let run = |fused: bool| {
        let x = leaf::<3>(&logits);
        let out = if fused {
            k::next_token_nll(x.clone(), &targets)
        } else {
            reference::next_token_nll(x.clone(), &targets)
        };
        let grads = probe(out.clone(), 15).backward();
        (out.into_data(), x.grad(&grads).unwrap().into_data())
    };
    let (f, r) = (run(true), run(false));
    assert_close("nll out", f.0, r.0, 1e-5);
    assert_close("nll dlogits", f.1, r.1, 1e-5);
}

/// The fused linear NLL (logits a chunk of rows at a time, gradients from the forward)
/// equals the logits through the reference frozen product and the reference NLL, values
/// and input gradients, with the head stored as f32, bf16 and NF4; 2 × 199 scored rows
/// over a 50000-word vocabulary make two chunks.
#[test]
fn linear_next_token_nll_matches_reference() {
    use legora_kernels::quant::{frozen_linear_reference, Format, FrozenWeight, QuantMatrix};
    let (b, s, d, v) = (2, 200, 16, 50_000);
    assert!(b * (s - 1) * v > (1 << 24), "more than one chunk");
    let h = random(&[b, s, d], 21);
    let w = random(&[v, d], 22).to_vec::<f32>().unwrap();
    let targets: Vec<i64> = (0..b * (s - 1)).map(|i| (i * 7919 % v) as i64).collect();
    for format in [
        Format::F32,
        Format::Bf16,
        Format::Nf4 { double_quant: true },
    ] {
        let q = QuantMatrix::quantize("lm_head.weight", &w, v, d, format).unwrap();
        let weight = FrozenWeight::<Ad>::from_quant(q.clone(), &Default::default());
        let plain_w = FrozenWeight::<Flex>::from_quant(q, &Default::default());
        let reference = |h: Tensor<Ad, 3>| {
            let logits = frozen_linear_reference(h.reshape([b * s, d]), &weight, None);
            reference::next_token_nll(logits.reshape([b, s, v]), &targets)
        };
        let fused = k::linear_next_token_nll(plain::<3>(&h), &plain_w, &targets);
        let want = reference(leaf::<3>(&h)).into_data();
        assert_close(format.name(), fused.into_data(), want, 1e-5);
        let run = |fused: bool| {
            let x = leaf::<3>(&h);
            let out = if fused {
                k::linear_next_token_nll(x.clone(), &weight, &targets)
            } else {
                reference(x.clone())
            };
            let grads = probe(out.clone(), 23).backward();
            (out.into_data(), x.grad(&grads).unwrap().into_data())
        };
        let (f, r) = (run(true), run(false));
        assert_close(format.name(), f.0, r.0, 1e-5);
        // each element sums 50000 vocabulary terms, in another order than burn's matmul
        assert_close(format.name(), f.1, r.1, 1e-4);
    }
}

#[test]
fn out_of_range_targets_take_the_reference_path_and_its_error() {
    // The fused kernel refuses them (it would index out of bounds); the reference path
    // then decides, exactly as without the kernels.
    let logits = random(&[1, 3, 5], 16);
    let ok = k::next_token_nll(plain(&logits), &[4, 0]);
    assert_eq!(ok.dims(), [2]);
}

#[test]
fn dropout_keeps_the_expected_fraction_scales_and_follows_the_seed() {
    let _seeded = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let device = Default::default();
    let n = 200_000;
    let x = Tensor::<Ad, 2>::ones([2, n / 2], &device).require_grad();
    Ad::seed(&device, 42);
    let a = k::dropout(x.clone(), 0.25);
    Ad::seed(&device, 42);
    let b = k::dropout(x.clone(), 0.25);
    let c = k::dropout(x.clone(), 0.25);
    let (av, bv, cv) = (
        a.clone().into_data().to_vec::<f32>().unwrap(),
        b.into_data().to_vec::<f32>().unwrap(),
        c.into_data().to_vec::<f32>().unwrap(),
    );
    assert_eq!(av, bv, "same seed, same mask");
    assert_ne!(av, cv, "the generator moves on");
    let kept = av.iter().filter(|v| **v != 0.0).count() as f64 / n as f64;
    assert!((kept - 0.75).abs() < 0.01, "kept fraction {kept}");
    assert!(av
        .iter()
        .all(|v| *v == 0.0 || (*v - 1.0 / 0.75).abs() < 1e-6));
    // The gradient is the mask itself.
    let grads = a.sum().backward();
    assert_eq!(
        x.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap(),
        av
    );
    // Off without autodiff.
    let y = Tensor::<Flex, 1>::ones([8], &device);
    assert_eq!(
        k::dropout(y, 0.5).into_data().to_vec::<f32>().unwrap(),
        vec![1.0; 8]
    );
}

/// `(out, [d x, d weight, d bias, d lora_A, d lora_B])` of one LoRA linear, fused or
/// reference; `trainable_base` makes the weight and bias leaves that need gradients.
fn run_lora_linear(
    fused: bool,
    inputs: &[TensorData; 5],
    bias: bool,
    trainable_base: bool,
    dropout: f64,
) -> (TensorData, Vec<Option<TensorData>>) {
    let [x, w, b, a, bb] = inputs;
    let w: Tensor<Ad, 2> = if trainable_base { leaf(w) } else { plain_ad(w) };
    let b: Option<Tensor<Ad, 1>> = bias.then(|| if trainable_base { leaf(b) } else { plain_ad(b) });
    let (x, a, bb) = (leaf::<2>(x), leaf::<2>(a), leaf::<2>(bb));
    let term = k::LoraTerm {
        lora_a: a.clone(),
        lora_b: bb.clone(),
        scale: 2.5,
        dropout,
    };
    let _seeded = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    Ad::seed(&Default::default(), 77);
    let out = if fused {
        k::lora_linear(x.clone(), w.clone(), b.clone(), term)
    } else {
        reference::lora_linear(x.clone(), w.clone(), b.clone(), term)
    };
    let grads = probe(out.clone(), 21).backward();
    let g2 = |t: &Tensor<Ad, 2>| t.grad(&grads).map(|g| g.into_data());
    let gb = b
        .as_ref()
        .and_then(|t| t.grad(&grads))
        .map(|g| g.into_data());
    (out.into_data(), vec![g2(&x), g2(&w), gb, g2(&a), g2(&bb)])
}

#[test]
fn lora_linear_matches_reference() {
    // 150 rows: three row blocks, the last one partial.
    let (n, din, dout, r) = (150, 24, 40, 4);
    let inputs = [
        random(&[n, din], 30),
        random(&[dout, din], 31),
        random(&[dout], 32),
        random(&[r, din], 33),
        random(&[dout, r], 34),
    ];
    let fused = k::lora_linear(
        plain(&inputs[0]),
        plain(&inputs[1]),
        Some(plain(&inputs[2])),
        k::LoraTerm {
            lora_a: plain(&inputs[3]),
            lora_b: plain(&inputs[4]),
            scale: 2.5,
            dropout: 0.1,
        },
    );
    let refr = reference::lora_linear(
        plain(&inputs[0]),
        plain(&inputs[1]),
        Some(plain(&inputs[2])),
        k::LoraTerm {
            lora_a: plain(&inputs[3]),
            lora_b: plain(&inputs[4]),
            scale: 2.5,
            dropout: 0.1,
        },
    );
    assert_close(
        "lora_linear (no autodiff, no dropout)",
        fused.into_data(),
        refr.into_data(),
        1e-5,
    );

    let names = ["dx", "dweight", "dbias", "dlora_A", "dlora_B"];
    // Everything trainable, no dropout; frozen base with dropout (the mask drawn again
    // in the backward must be the forward's); no bias.
    for (bias, trainable_base, dropout) in
        [(true, true, 0.0), (true, false, 0.3), (false, false, 0.0)]
    {
        let what =
            format!("lora_linear bias={bias} trainable_base={trainable_base} dropout={dropout}");
        let f = run_lora_linear(true, &inputs, bias, trainable_base, dropout);
        let r = run_lora_linear(false, &inputs, bias, trainable_base, dropout);
        assert_close(&format!("{what} out"), f.0, r.0, 1e-4);
        for ((name, fg), rg) in names.iter().zip(f.1).zip(r.1) {
            assert_eq!(
                fg.is_some(),
                rg.is_some(),
                "{what} {name}: which inputs have gradients"
            );
            if let (Some(fg), Some(rg)) = (fg, rg) {
                assert_close(&format!("{what} {name}"), fg, rg, 1e-4);
            }
        }
    }
}

#[test]
fn routed_lora_linear_matches_reference() {
    // Three experts of rank 4; rows in runs of one expert (as task-routed batches are)
    // and a stretch that alternates, so blocks split at every expert change.
    let (n, din, dout, r, e) = (170, 24, 40, 4, 3);
    let mut experts: Vec<usize> = (0..n)
        .map(|i| match i {
            0..50 => 2,
            50..130 => 0,
            _ => 1,
        })
        .collect();
    (150..160).for_each(|i| experts[i] = i % 3);
    let inputs = [
        random(&[n, din], 40),
        random(&[dout, din], 41),
        random(&[dout], 42),
        random(&[e * r, din], 43),
        random(&[dout, e * r], 44),
    ];
    for dropout in [0.0, 0.2] {
        let run = |fused: bool| {
            let [x, w, b, a, bb] = &inputs;
            let (x, a, bb) = (leaf::<2>(x), leaf::<2>(a), leaf::<2>(bb));
            let lora = k::StackedLora {
                lora_a: a.clone(),
                lora_b: bb.clone(),
                ranks: vec![r; e],
                scales: vec![0.5, 2.0, 4.0],
                dropout,
                gating: k::Gating::Rows(experts.iter().map(|&i| Some(i)).collect()),
            };
            let (w, b) = (plain_ad::<2>(w), Some(plain_ad::<1>(b)));
            let _seeded = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
            Ad::seed(&Default::default(), 78);
            let out = if fused {
                k::stacked_lora_linear(x.clone(), w, b, lora)
            } else {
                reference::stacked_lora_linear(x.clone(), w, b, lora)
            };
            let grads = probe(out.clone(), 45).backward();
            let g = |t: &Tensor<Ad, 2>| t.grad(&grads).unwrap().into_data();
            (out.into_data(), g(&x), g(&a), g(&bb))
        };
        let (f, rf) = (run(true), run(false));
        let what = format!("stacked_lora_linear rows dropout={dropout}");
        assert_close(&format!("{what} out"), f.0, rf.0, 1e-4);
        assert_close(&format!("{what} dx"), f.1, rf.1, 1e-4);
        assert_close(&format!("{what} dA_cat"), f.2, rf.2, 1e-4);
        assert_close(&format!("{what} dB_cat"), f.3, rf.3, 1e-4);
    }
}

#[test]
fn gated_lora_linear_matches_reference() {
    // Four experts of rank 3, soft gates with some exact zeros (top-k), 150 rows (three
    // row blocks, the last partial); gradients reach the gates.
    let (n, din, dout, r, e) = (150, 24, 40, 3, 4);
    let mut gates = random(&[n, e], 50).to_vec::<f32>().unwrap();
    gates.iter_mut().enumerate().for_each(|(i, g)| {
        *g = if i % 3 == 0 { 0.0 } else { g.abs() / 2.0 };
    });
    let gates = TensorData::new(gates, [n, e]);
    let inputs = [
        random(&[n, din], 51),
        random(&[dout, din], 52),
        random(&[dout], 53),
        random(&[e * r, din], 54),
        random(&[dout, e * r], 55),
    ];
    for dropout in [0.0, 0.2] {
        let run = |fused: bool| {
            let [x, w, b, a, bb] = &inputs;
            let (x, a, bb, g) = (leaf::<2>(x), leaf::<2>(a), leaf::<2>(bb), leaf::<2>(&gates));
            let lora = k::StackedLora {
                lora_a: a.clone(),
                lora_b: bb.clone(),
                ranks: vec![r; e],
                scales: vec![0.5, 2.0, 4.0, 1.0],
                dropout,
                gating: k::Gating::Dense(g.clone()),
            };
            let (w, b) = (plain_ad::<2>(w), Some(plain_ad::<1>(b)));
            let _seeded = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
            Ad::seed(&Default::default(), 79);
            let out = if fused {
                k::stacked_lora_linear(x.clone(), w, b, lora)
            } else {
                reference::stacked_lora_linear(x.clone(), w, b, lora)
            };
            let grads = probe(out.clone(), 56).backward();
            let gr = |t: &Tensor<Ad, 2>| t.grad(&grads).unwrap().into_data();
            (out.into_data(), [gr(&x), gr(&a), gr(&bb), gr(&g)])
        };
        let (f, rf) = (run(true), run(false));
        let what = format!("stacked_lora_linear dense dropout={dropout}");
        assert_close(&format!("{what} out"), f.0, rf.0, 1e-4);
        for ((name, fg), rg) in ["dx", "dA_cat", "dB_cat", "dgates"]
            .iter()
            .zip(f.1)
            .zip(rf.1)
        {
            assert_close(&format!("{what} {name}"), fg, rg, 1e-4);
        }
    }
}

#[test]
fn stacked_lora_linear_mixed_ranks_and_base_rows_match_reference() {
    // Experts of ranks 2, 5 and 3 (different ranks, as experts from different presets);
    // routed rows include rows on no expert (the base alone, `None`), and dense gates
    // mix all three. 133 rows: blocks split at expert changes and a partial last block.
    let (n, din, dout) = (133, 20, 36);
    let ranks = vec![2, 5, 3];
    let big_r: usize = ranks.iter().sum();
    let rows: Vec<Option<usize>> = (0..n)
        .map(|i| match i % 23 {
            0..=4 => None,
            5..=12 => Some(1),
            13..=17 => Some(0),
            _ => Some(2),
        })
        .collect();
    let mut gates = random(&[n, 3], 60).to_vec::<f32>().unwrap();
    gates.iter_mut().for_each(|g| *g = g.abs() / 3.0);
    let gates = TensorData::new(gates, [n, 3]);
    let inputs = [
        random(&[n, din], 61),
        random(&[dout, din], 62),
        random(&[dout], 63),
        random(&[big_r, din], 64),
        random(&[dout, big_r], 65),
    ];
    for (dense, dropout) in [(false, 0.0), (false, 0.25), (true, 0.0), (true, 0.25)] {
        let run = |fused: bool| {
            let [x, w, b, a, bb] = &inputs;
            let (x, a, bb, g) = (leaf::<2>(x), leaf::<2>(a), leaf::<2>(bb), leaf::<2>(&gates));
            let gating = if dense {
                k::Gating::Dense(g.clone())
            } else {
                k::Gating::Rows(rows.clone().into())
            };
            let lora = k::StackedLora {
                lora_a: a.clone(),
                lora_b: bb.clone(),
                ranks: ranks.clone(),
                scales: vec![1.5, 0.25, 3.0],
                dropout,
                gating,
            };
            let (w, b) = (plain_ad::<2>(w), Some(plain_ad::<1>(b)));
            let _seeded = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
            Ad::seed(&Default::default(), 80);
            let out = if fused {
                k::stacked_lora_linear(x.clone(), w, b, lora)
            } else {
                reference::stacked_lora_linear(x.clone(), w, b, lora)
            };
            let grads = probe(out.clone(), 66).backward();
            let gr = |t: &Tensor<Ad, 2>| t.grad(&grads).map(|g| g.into_data());
            (out.into_data(), [gr(&x), gr(&a), gr(&bb), gr(&g)])
        };
        let (f, rf) = (run(true), run(false));
        let what = format!("stacked_lora_linear mixed ranks dense={dense} dropout={dropout}");
        assert_close(&format!("{what} out"), f.0, rf.0, 1e-4);
        for ((name, fg), rg) in ["dx", "dA_cat", "dB_cat", "dgates"]
            .iter()
            .zip(f.1)
            .zip(rf.1)
        {
            assert_eq!(
                fg.is_some(),
                rg.is_some(),
                "{what} {name}: gradient presence"
            );
            if let (Some(fg), Some(rg)) = (fg, rg) {
                assert_close(&format!("{what} {name}"), fg, rg, 1e-4);
            }
        }
    }
}

#[test]
fn stacked_lora_linear_backward_is_deterministic() {
    // The partial gradients of many row blocks are summed in a fixed order: the same
    // inputs give the same bits, run after run (here 8 runs, many blocks, several threads).
    let (n, din, dout, r, e) = (64 * 40 + 7, 32, 48, 4, 3);
    let rows: Vec<Option<usize>> = (0..n).map(|i| Some((i / 200) % e)).collect();
    let inputs = [
        random(&[n, din], 70),
        random(&[dout, din], 71),
        random(&[e * r, din], 72),
        random(&[dout, e * r], 73),
    ];
    let run = || {
        let [x, w, a, bb] = &inputs;
        let (a, bb) = (leaf::<2>(a), leaf::<2>(bb));
        let lora = k::StackedLora {
            lora_a: a.clone(),
            lora_b: bb.clone(),
            ranks: vec![r; e],
            scales: vec![1.0, 2.0, 0.5],
            dropout: 0.0,
            gating: k::Gating::Rows(rows.clone().into()),
        };
        let out = k::stacked_lora_linear(plain_ad::<2>(x), plain_ad::<2>(w), None, lora);
        let grads = probe(out, 74).backward();
        let bits = |t: &Tensor<Ad, 2>| {
            let v = t.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
            v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>()
        };
        (bits(&a), bits(&bb))
    };
    let first = run();
    for _ in 0..7 {
        assert!(
            run() == first,
            "the gradients changed between identical runs"
        );
    }
}
