//! `FrozenWeight` and `frozen_linear`: the flex path (bytes read in place, tile kernel,
//! hand-written backward) against the reference path (burn-ops dequantization, matmul),
//! values and input/bias gradients, for every storage format; and the burn-ops
//! dequantization against the Rust one.
#![cfg(feature = "flex")]

use super::common;
use common::values;

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::TensorData;
use legora_kernels::quant::{frozen_linear_reference, Format, FrozenWeight, QuantMatrix};
use legora_kernels::{frozen_linear, has_fused_kernels};

type Ad = Autodiff<Flex>;

fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    legora_testing::assert_close(what, got, want, 1e-5, 1e-6);
}

/// A weight `[out, in]` in `format` on backend `B`, and its Rust dequantization: random
/// values quantized, or random GGML blocks (`in` rounded up to whole blocks).
fn weight<B: Backend>(format: Format, dout: usize, din: usize) -> (FrozenWeight<B>, Vec<f32>) {
    let m = match format {
        Format::Ggml(ty) => common::ggml_matrix(ty, dout, din, 21),
        _ => QuantMatrix::quantize("w", &values(dout * din, 21), dout, din, format).unwrap(),
    };
    let wd = m.dequantize();
    (FrozenWeight::from_quant(m, &Default::default()), wd)
}

/// Every storage format: [`Format::ALL`] and the GGML block types.
fn formats() -> Vec<Format> {
    let ggml = common::GGML_BLOCKS.iter().map(|(ty, _)| Format::Ggml(*ty));
    Format::ALL.into_iter().chain(ggml).collect()
}

/// `din` rounded up to whole blocks of `format`.
fn cols(format: Format, din: usize) -> usize {
    match format {
        Format::Ggml(ty) => din.next_multiple_of(ty.block_size()),
        _ => din,
    }
}

/// The burn-ops dequantization equals the Rust one exactly (same f32 operations), and
/// both keep the format and the memory of the storage.
#[test]
fn burn_dequantization_matches_rust() {
    for (dout, din) in [(37, 45), (9, 64), (3, 7)] {
        for format in formats() {
            let din = cols(format, din);
            let (w, want) = weight::<Flex>(format, dout, din);
            assert_eq!(w.format(), format);
            assert_eq!(w.dims(), [dout, din]);
            let what = format!("{} [{dout}, {din}]", format.name());
            assert_eq!(to_vec(w.dequantize_reference()), want, "{what} reference");
            assert_eq!(to_vec(w.dequantize()), want, "{what} fast");
        }
    }
    let (w, _) = weight::<Flex>(
        Format::Nf4 {
            double_quant: false,
        },
        64,
        128,
    );
    // 8192 codes in 1024 words; 128 f32 block scales.
    assert_eq!(w.bytes(), 4096 + 512);
    let (w, _) = weight::<Flex>(Format::Bf16, 64, 128);
    assert_eq!(w.bytes(), 2 * 8192);
}

/// Plain `Flex`: the fused path equals the reference path.
#[test]
fn flex_forward_matches_reference() {
    assert!(has_fused_kernels::<Flex>());
    let (n, dout) = (7, 150);
    let device = Default::default();
    for format in formats() {
        let din = cols(format, 70);
        let (w, _) = weight::<Flex>(format, dout, din);
        assert!(w.has_fused_path(), "{}", format.name());
        let x =
            Tensor::<Flex, 2>::from_data(TensorData::new(values(n * din, 3), [n, din]), &device);
        let b = Tensor::<Flex, 1>::from_data(TensorData::new(values(dout, 4), [dout]), &device);
        for bias in [None, Some(b)] {
            let what = format!("{} bias={}", format.name(), bias.is_some());
            let fused = to_vec(frozen_linear(x.clone(), &w, bias.clone()));
            let reference = to_vec(frozen_linear_reference(x.clone(), &w, bias));
            assert_close(&what, &fused, &reference);
        }
    }
}

/// `Autodiff<Flex>`: values and the gradients of `x` and `bias` (through a random
/// weighting of the output) equal the reference path's; the weight gets none.
#[test]
fn autodiff_gradients_match_reference() {
    let (n, dout) = (65, 140);
    let device = Default::default();
    let g = Tensor::<Ad, 2>::from_data(TensorData::new(values(n * dout, 9), [n, dout]), &device);
    for format in formats() {
        let din = cols(format, 67);
        let (w, _) = weight::<Ad>(format, dout, din);
        assert!(w.has_fused_path(), "{}", format.name());
        let run = |fused: bool| {
            let x =
                Tensor::<Ad, 2>::from_data(TensorData::new(values(n * din, 5), [n, din]), &device)
                    .require_grad();
            let b = Tensor::<Ad, 1>::from_data(TensorData::new(values(dout, 6), [dout]), &device)
                .require_grad();
            let y = if fused {
                frozen_linear(x.clone(), &w, Some(b.clone()))
            } else {
                frozen_linear_reference(x.clone(), &w, Some(b.clone()))
            };
            let grads = (y.clone() * g.clone()).sum().backward();
            let dx = x.grad(&grads).expect("x has a gradient");
            let db = b.grad(&grads).expect("bias has a gradient");
            if let FrozenWeight::Dense(p) = &w {
                assert!(
                    p.val().grad(&grads).is_none(),
                    "the frozen weight gets no gradient"
                );
            }
            (to_vec(y.inner()), to_vec(dx), to_vec(db))
        };
        let (y, dx, db) = run(true);
        let (yr, dxr, dbr) = run(false);
        let name = format.name();
        assert_close(&format!("{name} y"), &y, &yr);
        assert_close(&format!("{name} dx"), &dx, &dxr);
        assert_close(&format!("{name} dbias"), &db, &dbr);
    }
}

/// Without a bias and with one row (decode), the fused path still agrees; `x` of the
/// wrong width falls back to the reference path's own shape check (a panic there, as any
/// burn matmul), so it is not exercised here.
#[test]
fn one_row_without_bias() {
    let device = Default::default();
    let (w, wd) = weight::<Flex>(Format::Nf4 { double_quant: true }, 33, 129);
    let x = values(129, 8);
    let xt = Tensor::<Flex, 2>::from_data(TensorData::new(x.clone(), [1, 129]), &device);
    let y = to_vec(frozen_linear(xt, &w, None));
    let want: Vec<f32> = (0..33)
        .map(|r| {
            (0..129)
                .map(|c| f64::from(x[c]) * f64::from(wd[r * 129 + c]))
                .sum::<f64>() as f32
        })
        .collect();
    assert_close("decode row", &y, &want);
}

/// An embedding lookup over a quantized weight dequantizes just the rows asked for, equal
/// to dequantizing the whole weight and selecting them, in every format.
#[test]
fn rows_of_a_quantized_weight() {
    let device = Default::default();
    for format in formats() {
        let din = cols(format, 40);
        let (w, want) = weight::<Flex>(format, 23, din);
        let ids = [0i64, 22, 5, 5, 13];
        let t = Tensor::<Flex, 1, Int>::from_data(TensorData::new(ids.to_vec(), [5]), &device);
        let got = to_vec(w.rows(t));
        let want: Vec<f32> = ids
            .iter()
            .flat_map(|&i| want[i as usize * din..(i as usize + 1) * din].to_vec())
            .collect();
        assert_eq!(got, want, "{}", format.name());
    }
}
