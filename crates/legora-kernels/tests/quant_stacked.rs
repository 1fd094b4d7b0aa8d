//! `stacked_lora_frozen`: the fused stacked-LoRA kernel over a frozen weight in each
//! storage format (tiles dequantized inside the products) against the reference path
//! (the weight dequantized by the Rust code, then the burn-ops `stacked_lora_linear`):
//! outputs and the gradients of `x`, `A_cat`, `B_cat` and dense gates, for one expert,
//! rows routed per expert (some to the base alone) and dense gates, at odd sizes and at
//! a row count past the column-tile threshold of the input-gradient product.
#![cfg(feature = "flex")]

use super::common;
use common::values;

use std::sync::Arc;

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::TensorData;
use legora_kernels::quant::{Format, FrozenWeight, QuantMatrix};
use legora_kernels::{reference, stacked_lora_frozen, Gating, StackedLora};

type Ad = Autodiff<Flex>;

fn tensor<const D: usize>(v: Vec<f32>, shape: [usize; D]) -> Tensor<Ad, D> {
    Tensor::from_data(TensorData::new(v, shape), &Default::default())
}

fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    legora_testing::assert_close(what, got, want, 2e-5, 1e-6);
}

/// The gating of case `k` over `n` rows and 2 experts.
fn gating(k: usize, n: usize) -> Gating<Ad> {
    match k {
        0 => Gating::Single(1),
        1 => {
            let rows: Arc<[Option<usize>]> =
                (0..n).map(|i| [Some(0), Some(1), None][i % 3]).collect();
            Gating::Rows(rows)
        }
        _ => Gating::Dense(tensor(values(n * 2, 5), [n, 2]).require_grad()),
    }
}

/// Output and gradients `[x, A, B, gates]` of one run (fused or reference).
fn run(
    fused: bool,
    format: Format,
    (n, dout, din): (usize, usize, usize),
    case: usize,
) -> Vec<Vec<f32>> {
    let ranks = vec![2, 3];
    let m = match format {
        Format::Ggml(ty) => common::ggml_matrix(ty, dout, din, 1),
        _ => QuantMatrix::quantize("w", &values(dout * din, 1), dout, din, format).unwrap(),
    };
    let wd = m.dequantize();
    let x = tensor(values(n * din, 2), [n, din]).require_grad();
    let a = tensor(values(5 * din, 3), [5, din]).require_grad();
    let b = tensor(values(dout * 5, 4), [dout, 5]).require_grad();
    let bias = tensor(values(dout, 6), [dout]);
    let g = gating(case, n);
    let lora = StackedLora {
        lora_a: a.clone(),
        lora_b: b.clone(),
        ranks,
        scales: vec![0.5, 2.0],
        dropout: 0.0,
        gating: g.clone(),
    };
    let y = if fused {
        let w = FrozenWeight::<Ad>::from_quant(m, &Default::default());
        assert!(w.has_fused_path());
        stacked_lora_frozen(x.clone(), &w, Some(bias), lora)
    } else {
        let w = tensor(wd, [dout, din]);
        reference::stacked_lora_linear(x.clone(), w, Some(bias), lora)
    };
    let weights = tensor(values(n * dout, 7), [n, dout]);
    let grads = (y.clone() * weights).sum().backward();
    let mut out = vec![to_vec(y)];
    for t in [x, a, b] {
        out.push(to_vec(t.grad(&grads).unwrap()));
    }
    if let Gating::Dense(gt) = g {
        out.push(to_vec(gt.grad(&grads).unwrap()));
    }
    out
}

/// LoRA over a GGUF file's blocks: Q8_0 and Q4_K (rows of 256), the same checks.
#[test]
fn fused_frozen_stacked_lora_over_ggml_blocks() {
    use legora_kernels::quant::ggml::GgmlType;
    for (format, dims) in [
        (Format::Ggml(GgmlType::Q8_0), (7, 45, 96)),
        (Format::Ggml(GgmlType::Q4_K), (300, 37, 256)),
    ] {
        for case in 0..3 {
            let f = run(true, format, dims, case);
            let r = run(false, format, dims, case);
            for (i, (a, b)) in f.iter().zip(&r).enumerate() {
                let what = ["y", "dx", "dA", "dB", "dgates"][i];
                assert_close(
                    &format!("{} {dims:?} case {case} {what}", format.name()),
                    a,
                    b,
                );
            }
        }
    }
}

#[test]
fn fused_frozen_stacked_lora_matches_reference_in_every_format() {
    // 300 rows: past the input gradient's column-tile threshold; 7 rows: row tiles.
    for dims in [(7, 45, 70), (300, 37, 96)] {
        for format in Format::ALL {
            for case in 0..3 {
                let f = run(true, format, dims, case);
                let r = run(false, format, dims, case);
                for (i, (a, b)) in f.iter().zip(&r).enumerate() {
                    let what = ["y", "dx", "dA", "dB", "dgates"][i];
                    let what = format!("{} {dims:?} case {case} {what}", format.name());
                    assert_close(&what, a, b);
                }
            }
        }
    }
}

/// A plain `Flex` forward gives the autodiff forward's values.
#[test]
fn plain_flex_forward_matches() {
    let (n, dout, din) = (5, 33, 64);
    for format in Format::ALL {
        let m = QuantMatrix::quantize("w", &values(dout * din, 1), dout, din, format).unwrap();
        let w = FrozenWeight::<Flex>::from_quant(m.clone(), &Default::default());
        let x: Tensor<Flex, 2> = Tensor::from_data(
            TensorData::new(values(n * din, 2), [n, din]),
            &Default::default(),
        );
        let a: Tensor<Flex, 2> = Tensor::from_data(
            TensorData::new(values(2 * din, 3), [2, din]),
            &Default::default(),
        );
        let b: Tensor<Flex, 2> = Tensor::from_data(
            TensorData::new(values(dout * 2, 4), [dout, 2]),
            &Default::default(),
        );
        let lora = |a: Tensor<Flex, 2>, b: Tensor<Flex, 2>| StackedLora {
            lora_a: a,
            lora_b: b,
            ranks: vec![2],
            scales: vec![1.5],
            dropout: 0.0,
            gating: Gating::Single(0),
        };
        let y = to_vec(stacked_lora_frozen(
            x.clone(),
            &w,
            None,
            lora(a.clone(), b.clone()),
        ));
        let wd: Tensor<Flex, 2> = Tensor::from_data(
            TensorData::new(m.dequantize(), [dout, din]),
            &Default::default(),
        );
        let want = to_vec(reference::stacked_lora_linear(x, wd, None, lora(a, b)));
        assert_close(format.name(), &y, &want);
    }
}
