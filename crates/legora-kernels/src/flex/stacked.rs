//! The fused stacked-LoRA linear: `y = x·Wᵀ + b + ((drop(x)·A_catᵀ) ⊙ G)·B_catᵀ` as one
//! op, for one adapter, for task-routed experts (each row through its own expert only,
//! mLoRA's BatchLoRA: no zero-gated work for the other experts) and for router-gated
//! mixtures (dense gates, differentiable).
//!
//! The frozen product goes to one multi-threaded gemm writing over the broadcast bias; the
//! rank path runs per block of rows in parallel (the skinny `[N, in]·[in, R]` products are
//! below burn-flex's threading threshold and would run on one core), accumulating straight
//! into `y`. The dropout mask is counter-based, so the backward draws it again from its
//! seed instead of keeping an `[N, in]` copy of it.
//!
//! Determinism: the per-block partial gradients of `A_cat` and `B_cat` are summed in a
//! fixed order (groups of [`GROUP`] blocks, then the groups in order), so a run gives the
//! same bits whatever the thread scheduling.

use std::sync::Arc;

use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use rayon::prelude::*;

use super::dropout::{draw_seed, mask_range};
use super::frozen::FlexWeight;
use super::qgemm;
use super::{
    ad_of, all_f32, backward, contiguous, data, flex_of, from_ad, from_flex, mode, record, tensor,
    Mode, SendPtr,
};
use super::{gemm, gemm_with, AdTensor};
use crate::quant::{FrozenWeight, QuantView, ViewData};
use crate::{Gating, StackedLora};

/// Rows per parallel block of the rank path.
pub(crate) const BLOCK: usize = 64;
/// Row blocks whose partial gradients one parallel task sums, in order.
const GROUP: usize = 4;
/// A row of [`Route::Rows`] that runs the frozen base alone.
const NONE: u32 = u32::MAX;

/// How rows use the experts, in the kernel's terms.
#[derive(Clone, Debug)]
enum Route {
    /// Every row on this expert.
    Single(u32),
    /// The expert of each row ([`NONE`]: none).
    Rows(Arc<[u32]>),
    /// Dense gates `[n, E]`, passed beside the state.
    Dense,
}

/// Sizes and settings of one fused stacked-LoRA linear.
#[derive(Clone, Debug)]
pub(crate) struct Dims {
    n: usize,
    d_in: usize,
    d_out: usize,
    /// Rank of each expert.
    ranks: Arc<[usize]>,
    /// First stacked column of each expert.
    offsets: Arc<[usize]>,
    /// Scale of each expert.
    scales: Arc<[f32]>,
    route: Route,
    /// Keep probability and mask seed, when dropout is on.
    dropout: Option<(f64, u64)>,
}

/// A run of rows `start..start + rows` on one expert (`None`: the base alone).
type Block = (usize, usize, Option<usize>);

impl Dims {
    /// `R = Σ_e r_e`, the stacked columns.
    fn total_rank(&self) -> usize {
        self.ranks.iter().sum()
    }

    /// The largest rank (row stride of the per-row intermediate of routed rows).
    fn max_rank(&self) -> usize {
        self.ranks.iter().copied().max().unwrap_or(0)
    }

    fn expert_of(&self, row: usize) -> Option<usize> {
        match &self.route {
            Route::Single(e) => Some(*e as usize),
            Route::Rows(v) => (v[row] != NONE).then_some(v[row] as usize),
            Route::Dense => None,
        }
    }

    /// Blocks of at most [`BLOCK`] rows, each on one expert (routed) or plain (dense).
    fn blocks(&self) -> Vec<Block> {
        let mut out = Vec::with_capacity(self.n / BLOCK + 1);
        let mut start = 0;
        while start < self.n {
            let e = self.expert_of(start);
            let mut end = start + 1;
            while end < self.n && end - start < BLOCK && self.expert_of(end) == e {
                end += 1;
            }
            out.push((start, end - start, e));
            start = end;
        }
        out
    }

    /// The dropout mask of rows `start..start + rows` (`None` without dropout).
    fn mask(&self, start: usize, rows: usize) -> Option<Vec<f32>> {
        self.dropout.map(|(keep, seed)| {
            let mut m = vec![0.0f32; rows * self.d_in];
            mask_range(seed, keep, start * self.d_in, &mut m);
            m
        })
    }

    /// Rows `start..start + rows` of `x`, times `mask` when there is one (into `buf`).
    fn dropped<'a>(
        &self,
        x: &'a [f32],
        start: usize,
        rows: usize,
        mask: Option<&[f32]>,
        buf: &'a mut Vec<f32>,
    ) -> &'a [f32] {
        let xb = &x[start * self.d_in..(start + rows) * self.d_in];
        match mask {
            None => xb,
            Some(m) => {
                buf.clear();
                buf.extend(xb.iter().zip(m).map(|(v, mv)| v * mv));
                buf
            }
        }
    }

    /// `G` rows `start..start + rows` for dense gates: each expert's gate times its scale
    /// over its columns, `[rows, R]`.
    fn expanded_gates(&self, gates: &[f32], start: usize, rows: usize) -> Vec<f32> {
        let e = self.ranks.len();
        let mut g = Vec::with_capacity(rows * self.total_rank());
        for i in start..start + rows {
            for (k, (s, r)) in self.scales.iter().zip(self.ranks.iter()).enumerate() {
                g.extend(std::iter::repeat_n(gates[i * e + k] * s, *r));
            }
        }
        g
    }
}

/// Forward of routed rows: `(y, h)` with `h = s_e·drop(x)·A_eᵀ` per row (row stride
/// `max_rank`, kept for the backward).
fn routed_forward(
    x: &[f32],
    w: &QuantView<'_>,
    bias: Option<&[f32]>,
    (a, b): (&[f32], &[f32]),
    d: &Dims,
) -> (Vec<f32>, Vec<f32>) {
    let (n, din, dout, big_r, rm) = (d.n, d.d_in, d.d_out, d.total_rank(), d.max_rank());
    let mut y = qgemm::base_forward(x, w, bias, n);
    let mut h = vec![0.0f32; n * rm];
    let (y_p, h_p) = (SendPtr(y.as_mut_ptr()), SendPtr(h.as_mut_ptr()));
    d.blocks().into_par_iter().for_each(|(start, rows, e)| {
        let Some(e) = e else { return };
        let (r, off) = (d.ranks[e], d.offsets[e]);
        let mut buf = Vec::new();
        let mask = d.mask(start, rows);
        let xd = d.dropped(x, start, rows, mask.as_deref(), &mut buf);
        // SAFETY: block (start, rows) owns those rows of y and h; A_e is rows off..off+r
        // of A_cat (`[R, din]`), B_e columns off..off+r of B_cat (`[dout, R]`).
        unsafe {
            let (yb, hb) = (y_p.get().add(start * dout), h_p.get().add(start * rm));
            let (ae, be) = (a.as_ptr().add(off * din), b.as_ptr().add(off));
            gemm(
                (rows, r, din),
                hb,
                rm,
                false,
                (xd.as_ptr(), din, 1),
                (ae, 1, din),
                d.scales[e],
            );
            gemm(
                (rows, dout, r),
                yb,
                dout,
                true,
                (hb, rm, 1),
                (be, 1, big_r),
                1.0,
            );
        }
    });
    (y, h)
}

/// Forward of dense gates: `(y, u)` with `u = drop(x)·A_catᵀ` `[n, R]` (kept for the
/// backward).
fn dense_forward(
    x: &[f32],
    w: &QuantView<'_>,
    bias: Option<&[f32]>,
    (a, b): (&[f32], &[f32]),
    gates: &[f32],
    d: &Dims,
) -> (Vec<f32>, Vec<f32>) {
    let (n, din, dout, big_r) = (d.n, d.d_in, d.d_out, d.total_rank());
    let mut y = qgemm::base_forward(x, w, bias, n);
    let mut u = vec![0.0f32; n * big_r];
    y.par_chunks_mut(BLOCK * dout)
        .zip(u.par_chunks_mut(BLOCK * big_r))
        .enumerate()
        .for_each(|(i, (yb, ub))| {
            let (start, rows) = (i * BLOCK, yb.len() / dout);
            let mut buf = Vec::new();
            let mask = d.mask(start, rows);
            let xd = d.dropped(x, start, rows, mask.as_deref(), &mut buf);
            let mut g = d.expanded_gates(gates, start, rows);
            // SAFETY: block-local slices of the sizes given; A_cat `[R, din]` read as
            // its transpose.
            unsafe {
                gemm(
                    (rows, big_r, din),
                    ub.as_mut_ptr(),
                    big_r,
                    false,
                    (xd.as_ptr(), din, 1),
                    (a.as_ptr(), 1, din),
                    1.0,
                );
            }
            g.iter_mut().zip(ub.iter()).for_each(|(gv, uv)| *gv *= uv);
            // SAFETY: as above; B_cat `[dout, R]` read as its transpose.
            unsafe {
                gemm(
                    (rows, dout, big_r),
                    yb.as_mut_ptr(),
                    dout,
                    true,
                    (g.as_ptr(), big_r, 1),
                    (b.as_ptr(), 1, big_r),
                    1.0,
                );
            }
        });
    (y, u)
}

/// State of the backward: inputs, the kept intermediate and the sizes (with the seed).
#[derive(Clone, Debug)]
pub(crate) struct StackedState {
    x: FlexTensor,
    /// The base weight's primitives (shared with the module, never a dense copy).
    w: FlexWeight,
    a: FlexTensor,
    b: FlexTensor,
    /// Dense gates `[n, E]` (an empty tensor when routed).
    gates: FlexTensor,
    /// `h` (routed) or `u` (dense).
    kept: FlexTensor,
    dims: Dims,
}

/// One block's partial `(dA_cat, dB_cat)` (empty when not needed) added into `acc`.
struct Partials {
    da: Vec<f32>,
    db: Vec<f32>,
}

impl Partials {
    fn new(d: &Dims, needs: [bool; 6]) -> Self {
        let (big_r, din, dout) = (d.total_rank(), d.d_in, d.d_out);
        Self {
            da: vec![0.0; if needs[3] { big_r * din } else { 0 }],
            db: vec![0.0; if needs[4] { dout * big_r } else { 0 }],
        }
    }

    /// `self += other`.
    fn add(mut self, other: Partials) -> Self {
        self.da.iter_mut().zip(&other.da).for_each(|(a, p)| *a += p);
        self.db.iter_mut().zip(&other.db).for_each(|(a, p)| *a += p);
        self
    }
}

/// What every block of the backward reads.
struct Ctx<'a> {
    d: &'a Dims,
    dy: &'a [f32],
    x: &'a [f32],
    a: &'a [f32],
    b: &'a [f32],
    gates: &'a [f32],
    kept: &'a [f32],
    needs: [bool; 6],
    dx: SendPtr,
    dg: SendPtr,
}

// SAFETY: the raw pointers are written only at rows owned by one block.
unsafe impl Sync for Ctx<'_> {}

/// Routed block on expert `e`: `dh = dY·B_e`, `dx += s_e·(dh·A_e) ⊙ mask`,
/// `dA_e += s_e·dhᵀ·drop(x)`, `dB_e += dYᵀ·h`.
fn routed_block(c: &Ctx<'_>, (start, rows, e): Block, acc: &mut Partials) {
    let Some(e) = e else { return };
    let d = c.d;
    let (din, dout, big_r, rm) = (d.d_in, d.d_out, d.total_rank(), d.max_rank());
    let (r, off, s) = (d.ranks[e], d.offsets[e], d.scales[e]);
    let dyb = &c.dy[start * dout..(start + rows) * dout];
    let mask = d.mask(start, rows);
    let mut dh = vec![0.0f32; rows * r];
    // SAFETY: A_e, B_e as in `routed_forward`; this block owns rows start..start+rows of
    // dx; `acc` is this task's own.
    unsafe {
        let (ae, be) = (c.a.as_ptr().add(off * din), c.b.as_ptr().add(off));
        gemm(
            (rows, r, dout),
            dh.as_mut_ptr(),
            r,
            false,
            (dyb.as_ptr(), dout, 1),
            (be, big_r, 1),
            1.0,
        );
        if c.needs[0] {
            let dxb = std::slice::from_raw_parts_mut(c.dx.get().add(start * din), rows * din);
            add_input_grad(dxb, &dh, r, ae, din, s, mask.as_deref());
        }
        if c.needs[3] {
            let mut buf = Vec::new();
            let xd = d.dropped(c.x, start, rows, mask.as_deref(), &mut buf);
            let dst = acc.da.as_mut_ptr().add(off * din);
            gemm(
                (r, din, rows),
                dst,
                din,
                true,
                (dh.as_ptr(), 1, r),
                (xd.as_ptr(), din, 1),
                s,
            );
        }
        if c.needs[4] {
            let hb = c.kept.as_ptr().add(start * rm);
            let dst = acc.db.as_mut_ptr().add(off);
            gemm(
                (dout, r, rows),
                dst,
                big_r,
                true,
                (dyb.as_ptr(), 1, dout),
                (hb, rm, 1),
                1.0,
            );
        }
    }
}

/// Dense block: `dh = dY·B_cat`, `d gates[i, e] = s_e·Σ_{j ∈ e} u[i, j]·dh[i, j]`,
/// `du = dh ⊙ G`, `dx += (du·A_cat) ⊙ mask`, `dA_cat += duᵀ·drop(x)`,
/// `dB_cat += dYᵀ·(u ⊙ G)`.
fn dense_block(c: &Ctx<'_>, (start, rows, _): Block, acc: &mut Partials) {
    let d = c.d;
    let (din, dout, big_r, e) = (d.d_in, d.d_out, d.total_rank(), d.ranks.len());
    let dyb = &c.dy[start * dout..(start + rows) * dout];
    let ub = &c.kept[start * big_r..(start + rows) * big_r];
    let g = d.expanded_gates(c.gates, start, rows);
    let mask = d.mask(start, rows);
    let mut dh = vec![0.0f32; rows * big_r];
    // SAFETY: block-local views; B_cat `[dout, R]`.
    unsafe {
        gemm(
            (rows, big_r, dout),
            dh.as_mut_ptr(),
            big_r,
            false,
            (dyb.as_ptr(), dout, 1),
            (c.b.as_ptr(), big_r, 1),
            1.0,
        );
    }
    if c.needs[5] {
        for row in 0..rows {
            for k in 0..e {
                let cols = row * big_r + d.offsets[k]..row * big_r + d.offsets[k] + d.ranks[k];
                let v: f32 = ub[cols.clone()]
                    .iter()
                    .zip(&dh[cols])
                    .map(|(p, q)| p * q)
                    .sum();
                // SAFETY: this block owns rows start..start+rows of d gates `[n, E]`.
                unsafe { *c.dg.get().add((start + row) * e + k) = v * d.scales[k] };
            }
        }
    }
    dh.iter_mut().zip(&g).for_each(|(v, gv)| *v *= gv);
    let du = dh;
    // SAFETY: this block owns its rows of dx; `acc` is this task's own.
    unsafe {
        if c.needs[0] {
            let dxb = std::slice::from_raw_parts_mut(c.dx.get().add(start * din), rows * din);
            add_input_grad(dxb, &du, big_r, c.a.as_ptr(), din, 1.0, mask.as_deref());
        }
        if c.needs[3] {
            let mut buf = Vec::new();
            let xd = d.dropped(c.x, start, rows, mask.as_deref(), &mut buf);
            gemm(
                (big_r, din, rows),
                acc.da.as_mut_ptr(),
                din,
                true,
                (du.as_ptr(), 1, big_r),
                (xd.as_ptr(), din, 1),
                1.0,
            );
        }
        if c.needs[4] {
            let h: Vec<f32> = ub.iter().zip(&g).map(|(p, q)| p * q).collect();
            gemm(
                (dout, big_r, rows),
                acc.db.as_mut_ptr(),
                big_r,
                true,
                (dyb.as_ptr(), 1, dout),
                (h.as_ptr(), big_r, 1),
                1.0,
            );
        }
    }
}

/// Gradients of `[x, weight, bias, A_cat, B_cat, gates]`; the frozen part's `dx = dY·W`,
/// `dW = dYᵀ·x`, `dbias = Σ_rows dY`, and the rank path block by block.
fn stacked_backward(
    grad: &FlexTensor,
    st: &StackedState,
    needs: [bool; 6],
) -> [Option<FlexTensor>; 6] {
    let d = &st.dims;
    let (n, din, dout, big_r, e) = (d.n, d.d_in, d.d_out, d.total_rank(), d.ranks.len());
    let dense = matches!(d.route, Route::Dense);
    let (dy, x) = (data(grad), data(&st.x));
    let w = st.w.view().expect("checked when recorded");
    let mut dx = if needs[0] {
        frozen_dx(dy, &w, n)
    } else {
        Vec::new()
    };
    let mut dg = vec![0.0f32; if needs[5] && dense { n * e } else { 0 }];
    let c = Ctx {
        d,
        dy,
        x,
        a: data(&st.a),
        b: data(&st.b),
        gates: if dense { data(&st.gates) } else { &[] },
        kept: data(&st.kept),
        needs,
        dx: SendPtr(dx.as_mut_ptr()),
        dg: SendPtr(dg.as_mut_ptr()),
    };
    let blocks = d.blocks();
    let groups: Vec<Partials> = blocks
        .par_chunks(GROUP)
        .map(|group| {
            let mut acc = Partials::new(d, needs);
            for &block in group {
                if dense {
                    dense_block(&c, block, &mut acc);
                } else {
                    routed_block(&c, block, &mut acc);
                }
            }
            acc
        })
        .collect();
    let sum = groups
        .into_iter()
        .reduce(Partials::add)
        .unwrap_or_else(|| Partials::new(d, needs));
    [
        needs[0].then(|| tensor(dx, &[n, din])),
        needs[1].then(|| base_dw(dy, x, n, din, dout)),
        needs[2].then(|| bias_grad(dy, dout)),
        needs[3].then(|| tensor(sum.da, &[big_r, din])),
        needs[4].then(|| tensor(sum.db, &[dout, big_r])),
        (needs[5] && dense).then(|| tensor(dg, &[n, e])),
    ]
}

/// `dY·W` `[n, in]` for a weight in any storage format: f32 by [`base_dx`], the others
/// by the tile-dequantizing product.
///
/// # Shapes
/// - dy: `[n, out]`, w: `[out, in]` → `[n, in]`
fn frozen_dx(dy: &[f32], w: &QuantView<'_>, n: usize) -> Vec<f32> {
    match w.data() {
        ViewData::F32(wf) => base_dx(dy, wf, n, w.cols(), w.rows()),
        _ => qgemm::base_dx(dy, w, n),
    }
}

/// `dY·W`, `[n, din]`: the input gradient of the frozen part.
pub(crate) fn base_dx(dy: &[f32], w: &[f32], n: usize, din: usize, dout: usize) -> Vec<f32> {
    let mut dx = vec![0.0f32; n * din];
    // SAFETY: dy [n, dout], w [dout, din], dx [n, din].
    unsafe {
        gemm_with(
            gemm::Parallelism::Rayon(0),
            (n, din, dout),
            dx.as_mut_ptr(),
            din,
            false,
            (dy.as_ptr(), dout, 1),
            (w.as_ptr(), din, 1),
            1.0,
        );
    }
    dx
}

/// `dYᵀ·x`, the weight gradient `[dout, din]` (only for a trainable base).
fn base_dw(dy: &[f32], x: &[f32], n: usize, din: usize, dout: usize) -> FlexTensor {
    let mut dw = vec![0.0f32; dout * din];
    // SAFETY: dy [n, dout] read as dYᵀ, x [n, din], dw [dout, din].
    unsafe {
        gemm_with(
            gemm::Parallelism::Rayon(0),
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
}

/// `Σ_rows dY`, the bias gradient `[dout]`.
fn bias_grad(dy: &[f32], dout: usize) -> FlexTensor {
    let mut s = vec![0.0f32; dout];
    dy.chunks(dout)
        .for_each(|row| s.iter_mut().zip(row).for_each(|(a, v)| *a += v));
    tensor(s, &[dout])
}

/// `dx_rows += beta·(lhs·A) ⊙ mask` (no mask: without it) for `lhs [rows, k]` and the
/// `k` rows of `A` at `a` (row stride `din`).
///
/// # Safety
/// `a` must address `k` rows of `din` elements; `dxb` holds `rows · din`.
unsafe fn add_input_grad(
    dxb: &mut [f32],
    lhs: &[f32],
    k: usize,
    a: *const f32,
    din: usize,
    beta: f32,
    mask: Option<&[f32]>,
) {
    let rows = dxb.len() / din;
    match mask {
        // SAFETY: per the function's contract.
        None => unsafe {
            gemm(
                (rows, din, k),
                dxb.as_mut_ptr(),
                din,
                true,
                (lhs.as_ptr(), k, 1),
                (a, din, 1),
                beta,
            )
        },
        Some(m) => {
            let mut t = vec![0.0f32; rows * din];
            // SAFETY: per the function's contract; `t` holds rows · din.
            unsafe {
                gemm(
                    (rows, din, k),
                    t.as_mut_ptr(),
                    din,
                    false,
                    (lhs.as_ptr(), k, 1),
                    (a, din, 1),
                    beta,
                )
            };
            dxb.iter_mut()
                .zip(t.iter().zip(m))
                .for_each(|(o, (tv, mv))| *o += tv * mv);
        }
    }
}

backward!(StackedBackward, 6, StackedState, stacked_backward);

type Args<B> = (
    Tensor<B, 2>,
    Tensor<B, 2>,
    Option<Tensor<B, 1>>,
    StackedLora<B>,
);

/// The kernel's route when the gating fits `n` rows and `e` experts.
fn route_of<B: Backend>(gating: &Gating<B>, n: usize, e: usize) -> Option<Route> {
    match gating {
        Gating::Single(i) => (*i < e).then_some(Route::Single(*i as u32)),
        Gating::Rows(rows) => {
            let fits = rows.len() == n && rows.iter().flatten().all(|i| *i < e);
            fits.then(|| Route::Rows(rows.iter().map(|r| r.map_or(NONE, |i| i as u32)).collect()))
        }
        Gating::Dense(g) => (g.dtype() == DType::F32 && g.dims() == [n, e]).then_some(Route::Dense),
    }
}

/// The sizes of a stacked LoRA linear when every tensor is f32 and the shapes agree
/// (`x [n, in]`, a weight `[out, in]` (`weight_ok`: stored as the kernel reads it),
/// `bias [out]`, `A_cat [R, in]`, `B_cat [out, R]`, `R = Σ ranks`); then, in training,
/// the dropout seed is drawn. `None`: the reference path takes the op (and no seed is
/// drawn).
fn fit<B: Backend>(
    mode: Mode,
    x: &Tensor<B, 2>,
    (weight_dims, weight_ok): ([usize; 2], bool),
    bias: Option<&Tensor<B, 1>>,
    lora: &StackedLora<B>,
) -> Option<Dims> {
    let (a, b) = (&lora.lora_a, &lora.lora_b);
    let ([n, din], [dout, win], [ar, ain], [bout, br]) =
        (x.dims(), weight_dims, a.dims(), b.dims());
    let mut dtypes = vec![x.dtype(), a.dtype(), b.dtype()];
    dtypes.extend(bias.map(|b| b.dtype()));
    let big_r: usize = lora.ranks.iter().sum();
    let e = lora.ranks.len();
    let fits = weight_ok
        && all_f32(&dtypes)
        && e > 0
        && lora.scales.len() == e
        && lora.ranks.iter().all(|r| *r > 0)
        && win == din
        && ain == din
        && bout == dout
        && ar == br
        && ar == big_r
        && bias.is_none_or(|b| b.dims() == [dout]);
    if !fits {
        return None;
    }
    let route = route_of(&lora.gating, n, e)?;
    let dropout = (mode == Mode::Autodiff && lora.dropout > 0.0)
        .then(|| (1.0 - lora.dropout, draw_seed::<B>(&x.device())));
    let offsets: Vec<usize> = lora
        .ranks
        .iter()
        .scan(0, |acc, r| {
            let o = *acc;
            *acc += r;
            Some(o)
        })
        .collect();
    Some(Dims {
        n,
        d_in: din,
        d_out: dout,
        ranks: lora.ranks.clone().into(),
        offsets: offsets.into(),
        scales: lora.scales.iter().map(|s| *s as f32).collect(),
        route,
        dropout,
    })
}

/// The forward on contiguous f32 slices and a weight view: `(y, kept)`.
fn forward(
    x: &[f32],
    w: &QuantView<'_>,
    bias: Option<&[f32]>,
    ab: (&[f32], &[f32]),
    gates: &[f32],
    d: &Dims,
) -> (Vec<f32>, Vec<f32>) {
    match d.route {
        Route::Dense => dense_forward(x, w, bias, ab, gates, d),
        _ => routed_forward(x, w, bias, ab, d),
    }
}

/// The base weight as the kernel receives it.
// Built once per call and moved once: boxing the large variant buys nothing.
#[allow(clippy::large_enum_variant)]
enum Base<B: Backend> {
    /// An f32 tensor, possibly trainable (an autodiff input).
    Tensor(Tensor<B, 2>),
    /// A frozen weight's primitives, in its storage format (no gradient).
    Frozen(FlexWeight),
}

/// The autodiff primitives of `[x, weight, bias, A_cat, B_cat, gates]`, contiguous, with
/// a zero bias (and an empty gate tensor, an empty weight for a frozen base) standing in
/// when there is none (an op's parents are a fixed list), and whether there was a bias.
fn ad_inputs<B: Backend>(
    x: Tensor<B, 2>,
    weight: Option<Tensor<B, 2>>,
    bias: Option<Tensor<B, 1>>,
    lora: StackedLora<B>,
    dout: usize,
) -> ([AdTensor; 6], bool) {
    let has_bias = bias.is_some();
    let device = x.device();
    let bias = bias.unwrap_or_else(|| Tensor::zeros([dout], &device));
    let weight = weight.unwrap_or_else(|| Tensor::zeros([0, 0], &device));
    let gates = match lora.gating {
        Gating::Dense(g) => g,
        _ => Tensor::zeros([0, 0], &device),
    };
    let mut t = [x, weight, lora.lora_a, lora.lora_b, gates]
        .map(ad_of)
        .into_iter()
        .collect::<Vec<_>>();
    t.insert(2, ad_of(bias));
    let mut t: [AdTensor; 6] = t.try_into().expect("six inputs");
    for p in t.iter_mut() {
        p.primitive = contiguous(p.primitive.clone());
    }
    (t, has_bias)
}

/// The fused op once [`fit`] has accepted its inputs.
fn run<B: Backend>(
    mode: Mode,
    x: Tensor<B, 2>,
    base: Base<B>,
    bias: Option<Tensor<B, 1>>,
    lora: StackedLora<B>,
    dims: Dims,
) -> Tensor<B, 2> {
    let (n, dout) = (dims.n, dims.d_out);
    let kept_cols = match dims.route {
        Route::Dense => dims.total_rank(),
        _ => dims.max_rank(),
    };
    let dense = |w: FlexTensor| FlexWeight::Dense {
        w,
        rows: dout,
        cols: dims.d_in,
    };
    match mode {
        Mode::Plain => {
            let gates = match &lora.gating {
                Gating::Dense(g) => Some(contiguous(flex_of(g.clone()))),
                _ => None,
            };
            let w = match base {
                Base::Tensor(t) => dense(contiguous(flex_of(t))),
                Base::Frozen(w) => w,
            };
            let [x, a, b] = [x, lora.lora_a, lora.lora_b].map(|t| contiguous(flex_of(t)));
            let bias = bias.map(|t| contiguous(flex_of(t)));
            let g = gates.as_ref().map_or(&[][..], data);
            let ab = (data(&a), data(&b));
            let view = w.view().expect("checked by `fit`");
            let (y, _) = forward(data(&x), &view, bias.as_ref().map(data), ab, g, &dims);
            from_flex(tensor(y, &[n, dout]))
        }
        Mode::Autodiff => {
            let (weight, frozen) = match base {
                Base::Tensor(t) => (Some(t), None),
                Base::Frozen(w) => (None, Some(w)),
            };
            let (inputs, has_bias) = ad_inputs(x, weight, bias, lora, dout);
            let [xa, wa, ba, aa, bb, ga] = &inputs;
            let w = frozen.unwrap_or_else(|| dense(wa.primitive.clone()));
            from_ad(record(
                StackedBackward,
                [xa, wa, ba, aa, bb, ga],
                |tracked| {
                    let bias = has_bias.then(|| data(&ba.primitive));
                    let (x, a, b, g) = (&xa.primitive, &aa.primitive, &bb.primitive, &ga.primitive);
                    let ab = (data(a), data(b));
                    let view = w.view().expect("checked by `fit`");
                    let (y, kept) = forward(data(x), &view, bias, ab, data(g), &dims);
                    let state = tracked.then(|| StackedState {
                        x: x.clone(),
                        w: w.clone(),
                        a: a.clone(),
                        b: b.clone(),
                        gates: g.clone(),
                        kept: tensor(kept, &[n, kept_cols]),
                        dims: dims.clone(),
                    });
                    (tensor(y, &[n, dout]), state)
                },
            ))
        }
    }
}

/// Fused [`crate::stacked_lora_linear`].
pub(crate) fn stacked_lora_linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    lora: StackedLora<B>,
) -> Result<Tensor<B, 2>, Args<B>> {
    let Some(mode) = mode::<B>() else {
        return Err((x, weight, bias, lora));
    };
    let w = (weight.dims(), weight.dtype() == DType::F32);
    let Some(dims) = fit(mode, &x, w, bias.as_ref(), &lora) else {
        return Err((x, weight, bias, lora));
    };
    Ok(run(mode, x, Base::Tensor(weight), bias, lora, dims))
}

type FrozenArgs<B> = (Tensor<B, 2>, Option<Tensor<B, 1>>, StackedLora<B>);

/// Fused [`crate::stacked_lora_frozen`]: the frozen weight's bytes read in place, tiles
/// dequantized inside the products (f32 weights: the same gemms as
/// [`stacked_lora_linear`]); the backward keeps the weight's primitives (shared).
pub(crate) fn stacked_lora_frozen<B: Backend>(
    x: Tensor<B, 2>,
    weight: &FrozenWeight<B>,
    bias: Option<Tensor<B, 1>>,
    lora: StackedLora<B>,
) -> Result<Tensor<B, 2>, FrozenArgs<B>> {
    let Some(mode) = mode::<B>() else {
        return Err((x, bias, lora));
    };
    let Some(fw) = FlexWeight::of(weight, mode) else {
        return Err((x, bias, lora));
    };
    let Some(dims) = fit(mode, &x, (weight.dims(), true), bias.as_ref(), &lora) else {
        return Err((x, bias, lora));
    };
    Ok(run(mode, x, Base::Frozen(fw), bias, lora, dims))
}
