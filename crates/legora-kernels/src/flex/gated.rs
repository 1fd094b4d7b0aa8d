//! Fused router-gated mixture of LoRA experts on one linear layer:
//! `y = x·Wᵀ + b + ((drop(x)·A_catᵀ) ⊙ G)·B_catᵀ`, `G[i, e·r + j] = gates[i, e]·s_e` —
//! the stacked-rank form (two skinny products for any number of experts), with the
//! gates differentiable (router training).

use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;

use super::gemm;
use super::linear::{
    ad_inputs, add_input_grad, base_dw, base_dx, base_forward, bias_grad, fit, stacked_grad,
    sum_partials, Dims, BLOCK,
};
use super::{
    ad_of, backward, contiguous, data, flex_of, from_ad, from_flex, mode, record, tensor, Mode,
    SendPtr,
};

/// `G` rows `start..start + rows`: each expert's gate times its scale over its `r` columns.
fn expanded_gates(gates: &[f32], d: &Dims, start: usize, rows: usize) -> Vec<f32> {
    let (e, r) = (d.scales.len(), d.r);
    let mut g = Vec::with_capacity(rows * e * r);
    for i in start..start + rows {
        for (k, s) in d.scales.iter().enumerate() {
            let v = gates[i * e + k] * s;
            g.extend(std::iter::repeat_n(v, r));
        }
    }
    g
}

/// `(y, u)` with `u = drop(x)·A_catᵀ` `[n, E·r]` (kept for the backward).
fn forward(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    a: &[f32],
    b: &[f32],
    gates: &[f32],
    d: &Dims,
) -> (Vec<f32>, Vec<f32>) {
    let (n, din, dout, er) = (d.n, d.d_in, d.d_out, d.er());
    let mut y = base_forward(x, w, bias, n, din, dout);
    let mut u = vec![0.0f32; n * er];
    y.par_chunks_mut(BLOCK * dout)
        .zip(u.par_chunks_mut(BLOCK * er))
        .enumerate()
        .for_each(|(i, (yb, ub))| {
            let (start, rows) = (i * BLOCK, yb.len() / dout);
            let mut buf = Vec::new();
            let mask = d.mask(start, rows);
            let xd = d.dropped(x, start, rows, mask.as_deref(), &mut buf);
            let mut h = expanded_gates(gates, d, start, rows);
            // SAFETY: block-local slices of the sizes given.
            unsafe {
                gemm(
                    (rows, er, din),
                    ub.as_mut_ptr(),
                    er,
                    false,
                    (xd.as_ptr(), din, 1),
                    (a.as_ptr(), 1, din),
                    1.0,
                );
            }
            h.iter_mut().zip(ub.iter()).for_each(|(g, uv)| *g *= uv);
            unsafe {
                gemm(
                    (rows, dout, er),
                    yb.as_mut_ptr(),
                    dout,
                    true,
                    (h.as_ptr(), er, 1),
                    (b.as_ptr(), 1, er),
                    1.0,
                );
            }
        });
    (y, u)
}

/// State of the backward.
#[derive(Clone, Debug)]
pub(crate) struct GatedState {
    x: FlexTensor,
    w: FlexTensor,
    a: FlexTensor,
    b: FlexTensor,
    gates: FlexTensor,
    u: FlexTensor,
    dims: Dims,
}

/// Gradients of `[x, weight, bias, A_cat, B_cat, gates]`, per row block:
/// `dh = dY·B_cat`, `d gates[i, e] = s_e·Σ_{j ∈ e} u[i, j]·dh[i, j]`, `du = dh ⊙ G`,
/// `dx = dY·W + (du·A_cat) ⊙ mask`, `dA_cat = duᵀ·drop(x)`, `dB_cat = dYᵀ·(u ⊙ G)`.
fn gated_backward(grad: &FlexTensor, st: &GatedState, needs: [bool; 6]) -> [Option<FlexTensor>; 6] {
    let d = &st.dims;
    let (n, din, dout, r, er, e) = (d.n, d.d_in, d.d_out, d.r, d.er(), d.scales.len());
    let (dy, x, w, a, b) = (
        data(grad),
        data(&st.x),
        data(&st.w),
        data(&st.a),
        data(&st.b),
    );
    let (gates, u) = (data(&st.gates), data(&st.u));
    let mut dx = if needs[0] {
        base_dx(dy, w, n, din, dout)
    } else {
        Vec::new()
    };
    let mut dg = vec![0.0f32; if needs[5] { n * e } else { 0 }];
    let (dx_p, dg_p) = (SendPtr(dx.as_mut_ptr()), SendPtr(dg.as_mut_ptr()));
    let partials = (0..n.div_ceil(BLOCK)).into_par_iter().map(|i| {
        let (start, rows) = (i * BLOCK, BLOCK.min(n - i * BLOCK));
        let (dyb, ub) = (&dy[start * dout..], &u[start * er..(start + rows) * er]);
        let g = expanded_gates(gates, d, start, rows);
        let mask = d.mask(start, rows);
        let mut dh = vec![0.0f32; rows * er];
        // SAFETY: block-local views; the block owns its rows of dx and d gates.
        unsafe {
            gemm(
                (rows, er, dout),
                dh.as_mut_ptr(),
                er,
                false,
                (dyb.as_ptr(), dout, 1),
                (b.as_ptr(), er, 1),
                1.0,
            );
        }
        if needs[5] {
            for row in 0..rows {
                for k in 0..e {
                    let cols = row * er + k * r..row * er + (k + 1) * r;
                    let v: f32 = ub[cols.clone()]
                        .iter()
                        .zip(&dh[cols])
                        .map(|(p, q)| p * q)
                        .sum();
                    unsafe { *dg_p.get().add((start + row) * e + k) = v * d.scales[k] };
                }
            }
        }
        // du = dh ⊙ G, in place
        dh.iter_mut().zip(&g).for_each(|(v, gv)| *v *= gv);
        let du = dh;
        let mut da = vec![0.0f32; if needs[3] { er * din } else { 0 }];
        let mut db = vec![0.0f32; if needs[4] { dout * er } else { 0 }];
        unsafe {
            if needs[0] {
                let dxb = std::slice::from_raw_parts_mut(dx_p.get().add(start * din), rows * din);
                add_input_grad(dxb, &du, er, a.as_ptr(), din, 1.0, mask.as_deref());
            }
            if needs[3] {
                let mut buf = Vec::new();
                let xd = d.dropped(x, start, rows, mask.as_deref(), &mut buf);
                gemm(
                    (er, din, rows),
                    da.as_mut_ptr(),
                    din,
                    false,
                    (du.as_ptr(), 1, er),
                    (xd.as_ptr(), din, 1),
                    1.0,
                );
            }
            if needs[4] {
                let h: Vec<f32> = ub.iter().zip(&g).map(|(p, q)| p * q).collect();
                gemm(
                    (dout, er, rows),
                    db.as_mut_ptr(),
                    er,
                    false,
                    (dyb.as_ptr(), 1, dout),
                    (h.as_ptr(), er, 1),
                    1.0,
                );
            }
        }
        (da, db)
    });
    let (da, db) = sum_partials(partials);
    [
        needs[0].then(|| tensor(dx, &[n, din])),
        needs[1].then(|| base_dw(dy, x, n, din, dout)),
        needs[2].then(|| bias_grad(dy, dout)),
        needs[3].then(|| stacked_grad(da, [er, din])),
        needs[4].then(|| stacked_grad(db, [dout, er])),
        needs[5].then(|| tensor(dg, &[n, e])),
    ]
}

backward!(GatedBackward, 6, GatedState, gated_backward);

type Args<B> = (
    Tensor<B, 2>,
    Tensor<B, 2>,
    Option<Tensor<B, 1>>,
    crate::GatedLora<B>,
);

/// Fused [`crate::gated_lora_linear`].
pub(crate) fn gated_lora_linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    lora: crate::GatedLora<B>,
) -> Result<Tensor<B, 2>, Args<B>> {
    let Some(mode) = mode::<B>() else {
        return Err((x, weight, bias, lora));
    };
    let n = x.dims()[0];
    let gates_fit = lora.gates.dtype() == DType::F32 && lora.gates.dims() == [n, lora.scales.len()];
    let lora_ab = (&lora.lora_a, &lora.lora_b);
    let (rank, scales) = (lora.rank, &lora.scales);
    let fitted = fit(
        mode,
        &x,
        &weight,
        bias.as_ref(),
        lora_ab,
        rank,
        scales,
        lora.dropout,
        gates_fit,
    );
    let Some(dims) = fitted else {
        return Err((x, weight, bias, lora));
    };
    let dout = dims.d_out;
    let er = dims.er();
    Ok(match mode {
        Mode::Plain => {
            let [x, w, a, b, g] =
                [x, weight, lora.lora_a, lora.lora_b, lora.gates].map(|t| contiguous(flex_of(t)));
            let bias = bias.map(|t| contiguous(flex_of(t)));
            let bias = bias.as_ref().map(data);
            let (y, _) = forward(
                data(&x),
                data(&w),
                bias,
                data(&a),
                data(&b),
                data(&g),
                &dims,
            );
            from_flex(tensor(y, &[n, dout]))
        }
        Mode::Autodiff => {
            let ([xa, wa, ba, aa, bb], has_bias) =
                ad_inputs(x, weight, bias, lora.lora_a, lora.lora_b);
            let mut ga = ad_of(lora.gates);
            ga.primitive = contiguous(ga.primitive);
            let ga = &ga;
            from_ad(record(
                GatedBackward,
                [&xa, &wa, &ba, &aa, &bb, ga],
                |tracked| {
                    let bias = has_bias.then(|| data(&ba.primitive));
                    let (x, w, a, b, g) = (
                        &xa.primitive,
                        &wa.primitive,
                        &aa.primitive,
                        &bb.primitive,
                        &ga.primitive,
                    );
                    let (y, u) = forward(data(x), data(w), bias, data(a), data(b), data(g), &dims);
                    let state = tracked.then(|| GatedState {
                        x: x.clone(),
                        w: w.clone(),
                        a: a.clone(),
                        b: b.clone(),
                        gates: g.clone(),
                        u: tensor(u, &[n, er]),
                        dims: dims.clone(),
                    });
                    (tensor(y, &[n, dout]), state)
                },
            ))
        }
    })
}
