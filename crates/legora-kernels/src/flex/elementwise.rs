//! Row-wise fused ops: RMSNorm, rotary embedding, SwiGLU. Each is one parallel pass
//! forward and one backward, where the burn composition records 3–10 nodes.

use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use rayon::prelude::*;

use super::math::sigmoid;
use super::{
    ad_of, all_f32, backward, contiguous, data, flex_of, from_ad, from_flex, mode, record, tensor,
    value_of, Mode,
};

/// Elements per parallel task: below this, splitting costs more than it saves.
const GRAIN: usize = 1 << 14;

/// Run `f(row_index, rows_of_out)` over `out` split into groups of whole rows, in
/// parallel. `f` gets the index of the group's first row.
pub(crate) fn par_rows(out: &mut [f32], row_len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if row_len == 0 {
        return;
    }
    let rows_per_task = GRAIN.div_ceil(row_len).max(1);
    out.par_chunks_mut(rows_per_task * row_len)
        .enumerate()
        .for_each(|(i, chunk)| f(i * rows_per_task, chunk));
}

/// Two outputs of the same shape, filled row group by row group in parallel.
fn par_rows2(
    a: &mut [f32],
    b: &mut [f32],
    row_len: usize,
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync,
) {
    if row_len == 0 {
        return;
    }
    let rows_per_task = GRAIN.div_ceil(row_len).max(1);
    a.par_chunks_mut(rows_per_task * row_len)
        .zip(b.par_chunks_mut(rows_per_task * row_len))
        .enumerate()
        .for_each(|(i, (ca, cb))| f(i * rows_per_task, ca, cb));
}

// ---------------------------------------------------------------------------------------
// RMSNorm

/// State of the RMSNorm backward: input, weight and each row's `1/rms`.
#[derive(Clone, Debug)]
pub(crate) struct RmsState {
    x: FlexTensor,
    weight: FlexTensor,
    rstd: FlexTensor,
}

/// `y = w · x · r`, `r = 1/sqrt(mean(x²) + ε)`; returns `y` and `r` per row.
fn rms_forward(x: &[f32], w: &[f32], eps: f64) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let rows = x.len() / d;
    let mut y = vec![0.0f32; x.len()];
    let mut rstd = vec![0.0f32; rows];
    let rows_per_task = GRAIN.div_ceil(d).max(1);
    y.par_chunks_mut(rows_per_task * d)
        .zip(rstd.par_chunks_mut(rows_per_task))
        .enumerate()
        .for_each(|(i, (yc, rc))| {
            let first = i * rows_per_task;
            for (j, (yr, r)) in yc.chunks_mut(d).zip(rc.iter_mut()).enumerate() {
                let xr = &x[(first + j) * d..(first + j + 1) * d];
                let ss: f32 = xr.iter().map(|v| v * v).sum();
                *r = 1.0 / ((ss / d as f32) as f64 + eps).sqrt() as f32;
                for ((o, xv), wv) in yr.iter_mut().zip(xr).zip(w) {
                    *o = wv * (xv * *r);
                }
            }
        });
    (y, rstd)
}

/// `dx = r·(g − x̂·mean(g·x̂))` with `g = dy·w`, `x̂ = x·r`; `dw = Σ_rows dy·x̂`.
fn rms_backward(grad: &FlexTensor, st: &RmsState, needs: [bool; 2]) -> [Option<FlexTensor>; 2] {
    let (dy, x, w, rstd) = (data(grad), data(&st.x), data(&st.weight), data(&st.rstd));
    let d = w.len();
    let dx = needs[0].then(|| {
        let mut dx = vec![0.0f32; x.len()];
        par_rows(&mut dx, d, |first, chunk| {
            for (j, out) in chunk.chunks_mut(d).enumerate() {
                let row = first + j;
                let (xr, gr, r) = (&x[row * d..][..d], &dy[row * d..][..d], rstd[row]);
                let dot: f32 = xr
                    .iter()
                    .zip(gr)
                    .zip(w)
                    .map(|((xv, g), wv)| g * wv * xv)
                    .sum();
                let c = dot * r * r / d as f32;
                for (((o, xv), g), wv) in out.iter_mut().zip(xr).zip(gr).zip(w) {
                    *o = r * (g * wv - xv * c);
                }
            }
        });
        tensor(dx, st.x.layout().shape())
    });
    let dw = needs[1].then(|| {
        let rows = x.len() / d;
        let rows_per_task = GRAIN.div_ceil(d).max(1);
        let dw = (0..rows.div_ceil(rows_per_task))
            .into_par_iter()
            .map(|t| {
                let mut acc = vec![0.0f32; d];
                for row in t * rows_per_task..((t + 1) * rows_per_task).min(rows) {
                    let (xr, gr, r) = (&x[row * d..][..d], &dy[row * d..][..d], rstd[row]);
                    for ((a, xv), g) in acc.iter_mut().zip(xr).zip(gr) {
                        *a += g * xv * r;
                    }
                }
                acc
            })
            .reduce(
                || vec![0.0f32; d],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        tensor(dw, &[d])
    });
    [dx, dw]
}

backward!(RmsBackward, 2, RmsState, rms_backward);

/// Fused [`crate::rms_norm`].
pub(crate) fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, 1>)> {
    let Some(mode) = mode::<B>() else {
        return Err((x, weight));
    };
    if !all_f32(&[x.dtype(), weight.dtype()]) || x.dims()[D - 1] != weight.dims()[0] {
        return Err((x, weight));
    }
    let shape = x.dims();
    let run = |x: &FlexTensor, w: &FlexTensor| {
        let (y, rstd) = rms_forward(data(x), data(w), eps);
        let rows = rstd.len();
        (tensor(y, &shape), tensor(rstd, &[rows]))
    };
    Ok(match mode {
        Mode::Plain => {
            let (x, w) = (contiguous(flex_of(x)), contiguous(flex_of(weight)));
            from_flex(run(&x, &w).0)
        }
        Mode::Autodiff => {
            let (mut xa, mut wa) = (ad_of(x), ad_of(weight));
            xa.primitive = contiguous(xa.primitive);
            wa.primitive = contiguous(wa.primitive);
            from_ad(record(RmsBackward, [&xa, &wa], |tracked| {
                let (y, rstd) = run(&xa.primitive, &wa.primitive);
                let state = tracked.then(|| RmsState {
                    x: xa.primitive.clone(),
                    weight: wa.primitive.clone(),
                    rstd,
                });
                (y, state)
            }))
        }
    })
}

// ---------------------------------------------------------------------------------------
// Rotary embedding

/// State of the rotary backward: the tables (the rotation's transpose is its inverse).
#[derive(Clone, Debug)]
pub(crate) struct RopeState {
    cos: FlexTensor,
    sin: FlexTensor,
    heads: usize,
}

/// `y = x·cos + rotate_half(x)·sin` for each head of each position (`cos`, `sin`: one
/// row of `hd` per position); with `inverse`, its transpose
/// `dx = dy·cos + rotate_halfᵀ(dy·sin)`, which is the backward.
fn rope_apply(
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    heads: usize,
    hd: usize,
    inverse: bool,
) -> Vec<f32> {
    let half = hd / 2;
    let mut y = vec![0.0f32; x.len()];
    par_rows(&mut y, heads * hd, |first, chunk| {
        for (j, out) in chunk.chunks_mut(heads * hd).enumerate() {
            let pos = first + j;
            let (c, sn) = (&cos[pos * hd..][..hd], &sin[pos * hd..][..hd]);
            for (hh, o) in out.chunks_mut(hd).enumerate() {
                let xr = &x[(pos * heads + hh) * hd..][..hd];
                for i in 0..half {
                    let (a, b) = (xr[i], xr[i + half]);
                    if inverse {
                        // dx_i = dy_i·cos_i + dy_{i+h}·sin_{i+h}; dx_{i+h} = dy_{i+h}·cos_{i+h} − dy_i·sin_i
                        o[i] = a * c[i] + b * sn[i + half];
                        o[i + half] = b * c[i + half] - a * sn[i];
                    } else {
                        // y_i = x_i·cos_i − x_{i+h}·sin_i; y_{i+h} = x_{i+h}·cos_{i+h} + x_i·sin_{i+h}
                        o[i] = a * c[i] - b * sn[i];
                        o[i + half] = b * c[i + half] + a * sn[i + half];
                    }
                }
            }
        }
    });
    y
}

fn rope_backward(grad: &FlexTensor, st: &RopeState, needs: [bool; 1]) -> [Option<FlexTensor>; 1] {
    let hd = st.cos.layout().shape()[3];
    [needs[0].then(|| {
        let dx = rope_apply(data(grad), data(&st.cos), data(&st.sin), st.heads, hd, true);
        tensor(dx, grad.layout().shape())
    })]
}

backward!(RopeBackward, 1, RopeState, rope_backward);

/// Fused [`crate::rotary`].
pub(crate) fn rotary<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let Some(mode) = mode::<B>() else {
        return Err(x);
    };
    let [b, s, heads, hd] = x.dims();
    let table = [b, s, 1, hd];
    if !all_f32(&[x.dtype(), cos.dtype(), sin.dtype()])
        || hd % 2 != 0
        || cos.dims() != table
        || sin.dims() != table
    {
        return Err(x);
    }
    let cos = contiguous(value_of(cos.clone(), mode));
    let sin = contiguous(value_of(sin.clone(), mode));
    let shape = [b, s, heads, hd];
    Ok(match mode {
        Mode::Plain => {
            let x = contiguous(flex_of(x));
            let y = rope_apply(data(&x), data(&cos), data(&sin), heads, hd, false);
            from_flex(tensor(y, &shape))
        }
        Mode::Autodiff => {
            let mut xa = ad_of(x);
            xa.primitive = contiguous(xa.primitive);
            from_ad(record(RopeBackward, [&xa], |tracked| {
                let y = rope_apply(
                    data(&xa.primitive),
                    data(&cos),
                    data(&sin),
                    heads,
                    hd,
                    false,
                );
                let state = tracked.then(|| RopeState {
                    cos: cos.clone(),
                    sin: sin.clone(),
                    heads,
                });
                (tensor(y, &shape), state)
            }))
        }
    })
}

// ---------------------------------------------------------------------------------------
// SwiGLU

/// State of the SwiGLU backward: both inputs.
#[derive(Clone, Debug)]
pub(crate) struct SwigluState {
    gate: FlexTensor,
    up: FlexTensor,
}

/// `silu(g)·u`.
fn swiglu_forward(g: &[f32], u: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0f32; g.len()];
    par_rows(&mut y, 1, |first, out| {
        let n = out.len();
        let (g, u) = (&g[first..first + n], &u[first..first + n]);
        for i in 0..n {
            out[i] = g[i] * sigmoid(g[i]) * u[i];
        }
    });
    y
}

/// `d gate = dy·u·σ(g)·(1 + g·(1 − σ(g)))`, `d up = dy·silu(g)`.
fn swiglu_backward(
    grad: &FlexTensor,
    st: &SwigluState,
    needs: [bool; 2],
) -> [Option<FlexTensor>; 2] {
    let (dy, g, u) = (data(grad), data(&st.gate), data(&st.up));
    let n = g.len();
    // Both gradients are computed (one pass, equal-length slices so the loop vectorizes);
    // an unneeded one is dropped.
    let mut dg = vec![0.0f32; n];
    let mut du = vec![0.0f32; n];
    par_rows2(&mut dg, &mut du, 1, |first, a, b| {
        let m = a.len();
        let (g, u, dy, b) = (
            &g[first..first + m],
            &u[first..first + m],
            &dy[first..first + m],
            &mut b[..m],
        );
        for i in 0..m {
            let sg = sigmoid(g[i]);
            a[i] = dy[i] * u[i] * sg * (1.0 + g[i] * (1.0 - sg));
            b[i] = dy[i] * g[i] * sg;
        }
    });
    let shape = grad.layout().shape();
    [
        needs[0].then(|| tensor(dg, shape)),
        needs[1].then(|| tensor(du, shape)),
    ]
}

backward!(SwigluBackward, 2, SwigluState, swiglu_backward);

/// Fused [`crate::swiglu`].
pub(crate) fn swiglu<B: Backend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    let Some(mode) = mode::<B>() else {
        return Err((gate, up));
    };
    if !all_f32(&[gate.dtype(), up.dtype()]) || gate.dims() != up.dims() {
        return Err((gate, up));
    }
    let shape = gate.dims();
    Ok(match mode {
        Mode::Plain => {
            let (g, u) = (contiguous(flex_of(gate)), contiguous(flex_of(up)));
            from_flex(tensor(swiglu_forward(data(&g), data(&u)), &shape))
        }
        Mode::Autodiff => {
            let (mut ga, mut ua) = (ad_of(gate), ad_of(up));
            ga.primitive = contiguous(ga.primitive);
            ua.primitive = contiguous(ua.primitive);
            from_ad(record(SwigluBackward, [&ga, &ua], |tracked| {
                let y = swiglu_forward(data(&ga.primitive), data(&ua.primitive));
                let state = tracked.then(|| SwigluState {
                    gate: ga.primitive.clone(),
                    up: ua.primitive.clone(),
                });
                (tensor(y, &shape), state)
            }))
        }
    })
}
