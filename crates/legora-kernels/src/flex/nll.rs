//! Fused next-token NLL: `logsumexp(row) − row[target]` forward, `softmax − one_hot`
//! backward, without the `[n, vocab]` log-softmax (and its copies) the composition keeps.

use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use rayon::prelude::*;

use super::math;
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
    let targets: Option<Vec<usize>> = targets
        .iter()
        .map(|&t| usize::try_from(t).ok().filter(|&t| t < v))
        .collect();
    let Some(targets) = targets.filter(|t| s >= 2 && t.len() == n) else {
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
