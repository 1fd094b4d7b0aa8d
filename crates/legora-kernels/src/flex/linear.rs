//! Fused LoRA linear: `y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ` as one op.
//!
//! The frozen product goes to one multi-threaded gemm writing over the broadcast bias; the
//! rank-`r` path runs per block of rows in parallel (the skinny `[N, in]·[in, r]` products
//! are below burn-flex's threading threshold and would run on one core), accumulating
//! straight into `y`. The dropout mask is counter-based, so the backward draws it again
//! from its seed instead of keeping an `[N, in]` copy of it.

use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use rayon::prelude::*;

use super::attention::gemm;
use super::dropout::{draw_seed, mask_range};
use super::{
    ad_of, all_f32, backward, contiguous, data, flex_of, from_ad, from_flex, mode, record, tensor,
    Mode, SendPtr,
};

/// Rows per parallel block of the rank-`r` path.
const BLOCK: usize = 64;

/// Sizes and settings of one fused LoRA linear.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    n: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
    scale: f32,
    /// Keep probability and mask seed, when dropout is on.
    dropout: Option<(f64, u64)>,
}

impl Dims {
    /// Rows `start..start + rows` of `x`, with this op's dropout applied (into `buf`).
    fn dropped<'a>(
        &self,
        x: &'a [f32],
        start: usize,
        rows: usize,
        buf: &'a mut Vec<f32>,
    ) -> &'a [f32] {
        let xb = &x[start * self.d_in..(start + rows) * self.d_in];
        match self.dropout {
            None => xb,
            Some((keep, seed)) => {
                buf.resize(xb.len(), 0.0);
                mask_range(seed, keep, start * self.d_in, buf);
                buf.iter_mut().zip(xb).for_each(|(m, v)| *m *= v);
                buf
            }
        }
    }
}

/// `(y, h)` with `h = s·drop(x)·Aᵀ` `[n, r]` (kept for the backward).
fn forward(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    a: &[f32],
    b: &[f32],
    d: Dims,
) -> (Vec<f32>, Vec<f32>) {
    let (n, din, dout, r) = (d.n, d.d_in, d.d_out, d.r);
    let mut y = match bias {
        Some(bias) => bias.repeat(n),
        None => vec![0.0f32; n * dout],
    };
    // SAFETY: x [n, din], w [dout, din] read as Wᵀ, y [n, dout].
    unsafe {
        gemm_par(
            (n, dout, din),
            y.as_mut_ptr(),
            dout,
            bias.is_some(),
            (x.as_ptr(), din, 1),
            (w.as_ptr(), 1, din),
            1.0,
        );
    }
    let mut h = vec![0.0f32; n * r];
    y.par_chunks_mut(BLOCK * dout)
        .zip(h.par_chunks_mut(BLOCK * r))
        .enumerate()
        .for_each(|(i, (yb, hb))| {
            let rows = yb.len() / dout;
            let mut buf = Vec::new();
            let xd = d.dropped(x, i * BLOCK, rows, &mut buf);
            // SAFETY: block-local slices of the sizes given.
            unsafe {
                gemm(
                    (rows, r, din),
                    hb.as_mut_ptr(),
                    r,
                    false,
                    (xd.as_ptr(), din, 1),
                    (a.as_ptr(), 1, din),
                    d.scale,
                );
                gemm(
                    (rows, dout, r),
                    yb.as_mut_ptr(),
                    dout,
                    true,
                    (hb.as_ptr(), r, 1),
                    (b.as_ptr(), 1, r),
                    1.0,
                );
            }
        });
    (y, h)
}

/// A gemm that may use every core (for the full-size frozen products).
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_par(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    beta: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        lhs.0,
        lhs.2 as isize,
        lhs.1 as isize,
        rhs.0,
        rhs.2 as isize,
        rhs.1 as isize,
        if accumulate { 1.0 } else { 0.0 },
        beta,
        false,
        false,
        false,
        gemm::Parallelism::Rayon(0),
    )
}

/// State of the backward: inputs, `h` and the sizes (with the mask seed).
#[derive(Clone, Debug)]
pub(crate) struct LinearState {
    x: FlexTensor,
    w: FlexTensor,
    a: FlexTensor,
    b: FlexTensor,
    h: FlexTensor,
    dims: Dims,
}

/// Gradients of `[x, weight, bias, lora_A, lora_B]`:
/// `dh = dY·B`, `dx = dY·W + s·(dh·A) ⊙ mask`, `dA = s·dhᵀ·drop(x)`, `dB = dYᵀ·h`,
/// `dW = dYᵀ·x`, `dbias = Σ_rows dY`.
fn linear_backward(
    grad: &FlexTensor,
    st: &LinearState,
    needs: [bool; 5],
) -> [Option<FlexTensor>; 5] {
    let d = st.dims;
    let (n, din, dout, r) = (d.n, d.d_in, d.d_out, d.r);
    let (dy, x, w, a, b, h) = (
        data(grad),
        data(&st.x),
        data(&st.w),
        data(&st.a),
        data(&st.b),
        data(&st.h),
    );
    let mut dx = vec![0.0f32; if needs[0] { n * din } else { 0 }];
    if needs[0] {
        // SAFETY: dy [n, dout], w [dout, din], dx [n, din].
        unsafe {
            gemm_par(
                (n, din, dout),
                dx.as_mut_ptr(),
                din,
                false,
                (dy.as_ptr(), dout, 1),
                (w.as_ptr(), din, 1),
                1.0,
            );
        }
    }
    let dx_p = SendPtr(dx.as_mut_ptr());
    let (da, db) = (0..n.div_ceil(BLOCK))
        .into_par_iter()
        .map(|i| {
            let (start, rows) = (i * BLOCK, BLOCK.min(n - i * BLOCK));
            let dyb = &dy[start * dout..];
            let mut dh = vec![0.0f32; rows * r];
            let mut da = vec![0.0f32; if needs[3] { r * din } else { 0 }];
            let mut db = vec![0.0f32; if needs[4] { dout * r } else { 0 }];
            // SAFETY: block-local views; block i owns rows start..start+rows of dx.
            unsafe {
                gemm(
                    (rows, r, dout),
                    dh.as_mut_ptr(),
                    r,
                    false,
                    (dyb.as_ptr(), dout, 1),
                    (b.as_ptr(), r, 1),
                    1.0,
                );
                if needs[0] {
                    let dxb =
                        std::slice::from_raw_parts_mut(dx_p.get().add(start * din), rows * din);
                    match d.dropout {
                        None => gemm(
                            (rows, din, r),
                            dxb.as_mut_ptr(),
                            din,
                            true,
                            (dh.as_ptr(), r, 1),
                            (a.as_ptr(), din, 1),
                            d.scale,
                        ),
                        Some((keep, seed)) => {
                            let mut t = vec![0.0f32; rows * din];
                            gemm(
                                (rows, din, r),
                                t.as_mut_ptr(),
                                din,
                                false,
                                (dh.as_ptr(), r, 1),
                                (a.as_ptr(), din, 1),
                                d.scale,
                            );
                            let mut m = vec![0.0f32; rows * din];
                            mask_range(seed, keep, start * din, &mut m);
                            dxb.iter_mut()
                                .zip(t.iter().zip(&m))
                                .for_each(|(o, (tv, mv))| *o += tv * mv);
                        }
                    }
                }
                if needs[3] {
                    let mut buf = Vec::new();
                    let xd = d.dropped(x, start, rows, &mut buf);
                    gemm(
                        (r, din, rows),
                        da.as_mut_ptr(),
                        din,
                        false,
                        (dh.as_ptr(), 1, r),
                        (xd.as_ptr(), din, 1),
                        d.scale,
                    );
                }
                if needs[4] {
                    let hb = &h[start * r..];
                    gemm(
                        (dout, r, rows),
                        db.as_mut_ptr(),
                        r,
                        false,
                        (dyb.as_ptr(), 1, dout),
                        (hb.as_ptr(), r, 1),
                        1.0,
                    );
                }
            }
            (da, db)
        })
        .reduce(
            || (Vec::new(), Vec::new()),
            |(mut a1, mut b1), (a2, b2)| {
                add_into(&mut a1, a2);
                add_into(&mut b1, b2);
                (a1, b1)
            },
        );
    let dw = needs[1].then(|| {
        let mut dw = vec![0.0f32; dout * din];
        // SAFETY: dy [n, dout] read as dYᵀ, x [n, din], dw [dout, din].
        unsafe {
            gemm_par(
                (dout, din, n),
                dw.as_mut_ptr(),
                din,
                false,
                (dy.as_ptr(), 1, dout),
                (x.as_ptr(), din, 1),
                1.0,
            );
        }
        tensor(dw, &[dout, din])
    });
    let dbias = needs[2].then(|| {
        let mut s = vec![0.0f32; dout];
        dy.chunks(dout)
            .for_each(|row| s.iter_mut().zip(row).for_each(|(a, v)| *a += v));
        tensor(s, &[dout])
    });
    [
        needs[0].then(|| tensor(dx, &[n, din])),
        dw,
        dbias,
        needs[3].then(|| tensor(da, &[r, din])),
        needs[4].then(|| tensor(db, &[dout, r])),
    ]
}

/// `acc += part` (an empty `acc` takes `part` as is).
fn add_into(acc: &mut Vec<f32>, part: Vec<f32>) {
    if acc.is_empty() {
        *acc = part;
    } else {
        acc.iter_mut().zip(&part).for_each(|(a, p)| *a += p);
    }
}

backward!(LinearBackward, 5, LinearState, linear_backward);

type Args<B> = (
    Tensor<B, 2>,
    Tensor<B, 2>,
    Option<Tensor<B, 1>>,
    crate::LoraTerm<B>,
);

/// Fused [`crate::lora_linear`].
pub(crate) fn lora_linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    lora: crate::LoraTerm<B>,
) -> Result<Tensor<B, 2>, Args<B>> {
    let Some(mode) = mode::<B>() else {
        return Err((x, weight, bias, lora));
    };
    let ([n, din], [dout, win], [r, ain], [bout, br]) = (
        x.dims(),
        weight.dims(),
        lora.lora_a.dims(),
        lora.lora_b.dims(),
    );
    let mut dtypes = vec![
        x.dtype(),
        weight.dtype(),
        lora.lora_a.dtype(),
        lora.lora_b.dtype(),
    ];
    dtypes.extend(bias.as_ref().map(|b| b.dtype()));
    let fits = all_f32(&dtypes)
        && win == din
        && ain == din
        && bout == dout
        && br == r
        && bias.as_ref().is_none_or(|b| b.dims() == [dout]);
    if !fits {
        return Err((x, weight, bias, lora));
    }
    let device = x.device();
    let dropout = (mode == Mode::Autodiff && lora.dropout > 0.0)
        .then(|| (1.0 - lora.dropout, draw_seed::<B>(&device)));
    let dims = Dims {
        n,
        d_in: din,
        d_out: dout,
        r,
        scale: lora.scale as f32,
        dropout,
    };
    Ok(match mode {
        Mode::Plain => {
            let [x, w, a, b] =
                [x, weight, lora.lora_a, lora.lora_b].map(|t| contiguous(flex_of(t)));
            let bias = bias.map(|t| contiguous(flex_of(t)));
            let (y, _) = forward(
                data(&x),
                data(&w),
                bias.as_ref().map(data),
                data(&a),
                data(&b),
                dims,
            );
            from_flex(tensor(y, &[n, dout]))
        }
        Mode::Autodiff => {
            let has_bias = bias.is_some();
            let bias = bias.unwrap_or_else(|| Tensor::zeros([dout], &device));
            let mut xa = ad_of(x);
            let mut wa = ad_of(weight);
            let mut ba = ad_of(bias);
            let mut aa = ad_of(lora.lora_a);
            let mut bb = ad_of(lora.lora_b);
            for t in [&mut xa, &mut wa, &mut ba, &mut aa, &mut bb] {
                t.primitive = contiguous(t.primitive.clone());
            }
            from_ad(record(
                LinearBackward,
                [&xa, &wa, &ba, &aa, &bb],
                |tracked| {
                    let bias = has_bias.then(|| data(&ba.primitive));
                    let (x, w, a, b) = (&xa.primitive, &wa.primitive, &aa.primitive, &bb.primitive);
                    let (y, h) = forward(data(x), data(w), bias, data(a), data(b), dims);
                    let state = tracked.then(|| LinearState {
                        x: x.clone(),
                        w: w.clone(),
                        a: a.clone(),
                        b: b.clone(),
                        h: tensor(h, &[n, r]),
                        dims,
                    });
                    (tensor(y, &[n, dout]), state)
                },
            ))
        }
    })
}
