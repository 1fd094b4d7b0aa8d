//! Fused next-token NLL: `logsumexp(row) − row[target]` forward, `softmax − one_hot`
//! backward, without the `[n, vocab]` log-softmax (and its copies) the composition keeps.

use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use rayon::prelude::*;

use crate::quant::{FrozenWeight, QuantView};

use super::frozen::FlexWeight;
use super::math;
use super::qgemm::{matmul_dyw, matmul_xwt};
use super::SendPtr;
use super::{
    ad_of, backward, contiguous, data, flex_of, from_ad, from_flex, mode, record, tensor, Mode,
};

/// State of the NLL backward: logits, each scored row's log-sum-exp and the targets.
#[derive(Clone, Debug)]
pub(crate) struct NllState {
    logits: FlexTensor,
    lse: Vec<f32>,
    targets: Vec<usize>,
}

/// Row `r = i·(s−1) + t` of the scores reads logits row `i·s + t`.
fn logits_row(r: usize, s: usize) -> usize {
    r / (s - 1) * s + r % (s - 1)
}

/// `(nll, lse)` per scored row.
fn forward(logits: &[f32], targets: &[usize], s: usize, v: usize) -> (Vec<f32>, Vec<f32>) {
    targets
        .par_iter()
        .enumerate()
        .with_min_len(8)
        .map(|(r, &tgt)| {
            let row = &logits[logits_row(r, s) * v..][..v];
            let max = row.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x));
            let mut buf: Vec<f32> = row.iter().map(|x| x - max).collect();
            math::exp_in_place(&mut buf);
            let sum = math::sum(&buf);
            let lse = max + sum.ln();
            (lse - row[tgt], lse)
        })
        .unzip()
}

/// `d logits[row] = dy[r] · (softmax(row) − one_hot(target))`; the last position of each
/// sequence scores nothing and gets zeros.
fn nll_backward(grad: &FlexTensor, st: &NllState, needs: [bool; 1]) -> [Option<FlexTensor>; 1] {
    [needs[0].then(|| {
        let shape = st.logits.layout().shape();
        let (s, v) = (shape[1], shape[2]);
        let (x, dy) = (data(&st.logits), data(grad));
        // Every row is written below (zeros for the last positions): no zeroing pass.
        let mut dl: Vec<f32> = Vec::with_capacity(x.len());
        let dl_p = SendPtr(dl.as_mut_ptr());
        (0..x.len() / v)
            .into_par_iter()
            .with_min_len(4)
            .for_each(|row| {
                // SAFETY: row `row` of `dl` belongs to this task alone.
                let out = unsafe { dl_p.get().add(row * v) };
                if row % s == s - 1 {
                    // SAFETY: `out` is this task's row of `v` elements inside `dl`'s capacity.
                    unsafe { std::ptr::write_bytes(out, 0, v) };
                    return;
                }
                let r = row / s * (s - 1) + row % s;
                let (g, lse) = (dy[r], st.lse[r]);
                let xr = &x[row * v..][..v];
                for (j, xv) in xr.iter().enumerate() {
                    // SAFETY: j < v: inside this task's row.
                    unsafe { out.add(j).write(g * math::exp(xv - lse)) };
                }
                // SAFETY: the forward indexed `row[target]` (bounds-checked), so
                // target < v; the element was written just above.
                unsafe { *out.add(st.targets[r]) -= g };
            });
        // SAFETY: all rows written above.
        unsafe { dl.set_len(x.len()) };
        tensor(dl, shape)
    })]
}

backward!(NllBackward, 1, NllState, nll_backward);

/// The targets of `batch` rows of `s` positions over a vocabulary of `v` as indices:
/// `batch · (s − 1)` of them, each in `0..v`; `None` otherwise (the kernels then leave
/// the case to the reference path).
fn scored_targets(targets: &[i64], batch: usize, s: usize, v: usize) -> Option<Vec<usize>> {
    let targets: Option<Vec<usize>> = targets
        .iter()
        .map(|&t| usize::try_from(t).ok().filter(|&t| t < v))
        .collect();
    targets.filter(|t| s >= 2 && t.len() == batch * (s - 1))
}

/// Fused [`crate::next_token_nll`].
pub(crate) fn next_token_nll<B: Backend>(
    logits: Tensor<B, 3>,
    targets: &[i64],
) -> Result<Tensor<B, 1>, Tensor<B, 3>> {
    let Some(mode) = mode::<B>() else {
        return Err(logits);
    };
    let [b, s, v] = logits.dims();
    let n = b * s.saturating_sub(1);
    let Some(targets) = scored_targets(targets, b, s, v) else {
        return Err(logits);
    };
    if !super::all_f32(&[logits.dtype()]) {
        return Err(logits);
    }
    Ok(match mode {
        Mode::Plain => {
            let x = contiguous(flex_of(logits));
            from_flex(tensor(forward(data(&x), &targets, s, v).0, &[n]))
        }
        Mode::Autodiff => {
            let mut xa = ad_of(logits);
            xa.primitive = contiguous(xa.primitive);
            from_ad(record(NllBackward, [&xa], |tracked| {
                let (nll, lse) = forward(data(&xa.primitive), &targets, s, v);
                let state = tracked.then(|| NllState {
                    logits: xa.primitive.clone(),
                    lse,
                    targets: targets.clone(),
                });
                (tensor(nll, &[n]), state)
            }))
        }
    })
}

/// Logits computed at once by [`linear_next_token_nll`]: rows per chunk are this many
/// elements over the vocabulary (64 MiB of f32).
pub(crate) const LOGITS_CHUNK: usize = 1 << 24;

/// State of the fused linear-NLL backward: `d nll[r] / d h[row(r)]` of every scored row
/// (`[n, hidden]`, computed in the forward), and `[batch, seq, hidden]`.
#[derive(Clone, Debug)]
pub(crate) struct LinearNllState {
    grads: Vec<f32>,
    shape: [usize; 3],
}

/// `dh[row(r)] = dy[r] · grads[r]`; the last position of each sequence gets zeros.
fn linear_nll_backward(
    grad: &FlexTensor,
    st: &LinearNllState,
    needs: [bool; 1],
) -> [Option<FlexTensor>; 1] {
    [needs[0].then(|| {
        let [b, s, d] = st.shape;
        let dy = data(grad);
        let mut dh = vec![0.0f32; b * s * d];
        dh.par_chunks_mut(d)
            .enumerate()
            .filter(|(row, _)| row % s != s - 1)
            .for_each(|(row, out)| {
                let r = row / s * (s - 1) + row % s;
                let g = &st.grads[r * d..][..d];
                for (o, x) in out.iter_mut().zip(g) {
                    *o = dy[r] * x;
                }
            });
        tensor(dh, &[b, s, d])
    })]
}

backward!(LinearNllBackward, 1, LinearNllState, linear_nll_backward);

/// `(nll, grads)` of the scored rows of `h` `[b·s, d]` under `W` `[v, d]`, a chunk of
/// rows at a time: logits `x·Wᵀ`, their log-sum-exp, and with `with_grads` the rows
/// `(softmax − one_hot(target))·W` (what the backward scales by the output gradient).
fn linear_forward(
    h: &[f32],
    w: &QuantView<'_>,
    targets: &[usize],
    s: usize,
    with_grads: bool,
) -> crate::Result<(Vec<f32>, Option<Vec<f32>>)> {
    let (v, d, n) = (w.rows(), w.cols(), targets.len());
    let chunk = (LOGITS_CHUNK / v.max(1)).clamp(1, n.max(1));
    let mut nll = vec![0.0f32; n];
    let mut grads = with_grads.then(|| vec![0.0f32; n * d]);
    let mut x = Vec::with_capacity(chunk * d);
    let mut logits = vec![0.0f32; chunk * v];
    for r0 in (0..n).step_by(chunk) {
        let c = chunk.min(n - r0);
        x.clear();
        for r in r0..r0 + c {
            x.extend_from_slice(&h[logits_row(r, s) * d..][..d]);
        }
        let lg = &mut logits[..c * v];
        matmul_xwt(c, &x, w, lg, false)?;
        lg.par_chunks_mut(v)
            .zip(&mut nll[r0..r0 + c])
            .zip(&targets[r0..r0 + c])
            .for_each(|((row, out), &tgt)| *out = softmax_nll(row, tgt, with_grads));
        if let Some(g) = grads.as_mut() {
            matmul_dyw(c, lg, w, &mut g[r0 * d..(r0 + c) * d], false)?;
        }
    }
    Ok((nll, grads))
}

/// `logsumexp(row) − row[tgt]`; with `to_grad`, `row` becomes `softmax(row) −
/// one_hot(tgt)`.
fn softmax_nll(row: &mut [f32], tgt: usize, to_grad: bool) -> f32 {
    let target = row[tgt];
    let max = row.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x));
    row.iter_mut().for_each(|x| *x -= max);
    math::exp_in_place(row);
    let sum = math::sum(row);
    if to_grad {
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|p| *p *= inv);
        row[tgt] -= 1.0;
    }
    max + sum.ln() - target
}

/// Fused [`crate::linear_next_token_nll`]; `Err(h)` where `B` is not a fused backend,
/// `h` is not f32, the weight is not stored as expected or a size disagrees.
pub(crate) fn linear_next_token_nll<B: Backend>(
    h: Tensor<B, 3>,
    weight: &FrozenWeight<B>,
    targets: &[i64],
) -> Result<Tensor<B, 1>, Tensor<B, 3>> {
    let Some(mode) = mode::<B>() else {
        return Err(h);
    };
    let Some(fw) = FlexWeight::of(weight, mode) else {
        return Err(h);
    };
    let [b, s, d] = h.dims();
    let [v, wd] = weight.dims();
    let n = b * s.saturating_sub(1);
    let Some(targets) = scored_targets(targets, b, s, v).filter(|_| wd == d) else {
        return Err(h);
    };
    if !super::all_f32(&[h.dtype()]) {
        return Err(h);
    }
    Ok(match mode {
        Mode::Plain => {
            let x = contiguous(flex_of(h));
            let view = fw.view().expect("checked by FlexWeight::of");
            let (nll, _) =
                linear_forward(data(&x), &view, &targets, s, false).expect("sizes checked above");
            from_flex(tensor(nll, &[n]))
        }
        Mode::Autodiff => {
            let mut ha = ad_of(h);
            ha.primitive = contiguous(ha.primitive);
            from_ad(record(LinearNllBackward, [&ha], |tracked| {
                let view = fw.view().expect("checked by FlexWeight::of");
                let (nll, grads) = linear_forward(data(&ha.primitive), &view, &targets, s, tracked)
                    .expect("sizes checked above");
                let state = grads.map(|grads| LinearNllState {
                    grads,
                    shape: [b, s, d],
                });
                (tensor(nll, &[n]), state)
            }))
        }
    })
}
