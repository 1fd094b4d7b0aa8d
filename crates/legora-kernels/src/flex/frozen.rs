//! [`crate::quant::frozen_linear`] on `Flex` / `Autodiff<Flex>`: the frozen weight's
//! tensors are read in place (their `FlexTensor` bytes, no copy) as a [`QuantView`], and
//! the products are the tile-dequantizing ones of [`super::qgemm`]. Under autodiff one
//! backward node gives `dx = dy·W` and `dbias = Σ dy`; the weight gets no gradient.

use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

use super::qgemm::{base_dx, base_forward};
use super::{
    ad_of, all_f32, backward, cast, contiguous, data, flex_of, from_ad, from_flex, mode, record,
    tensor, value_of, AdFlex, Mode,
};
use crate::quant::bnb::{AbsmaxView, Bnb4View};
use crate::quant::frozen::{QuantMeta, Scheme};
use crate::quant::{FrozenWeight, QuantView, ViewData};
use burn::backend::Flex;

/// The tensors of a frozen weight as `Flex` primitives (shared, not copied).
// One per product call: the size gap between the variants is of no consequence.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub(crate) enum FlexWeight {
    /// A dense weight (f32, bf16 or f16).
    Dense {
        w: FlexTensor,
        rows: usize,
        cols: usize,
    },
    /// Codes and scales of a quantized weight.
    Quantized {
        codes: FlexTensor,
        scales: FlexTensor,
        nested: Option<FlexTensor>,
        meta: QuantMeta,
    },
}

impl FlexWeight {
    /// The primitives of `w` when `B` is a fused backend (`None` otherwise, or when a
    /// tensor is not stored as expected).
    pub(crate) fn of<B: Backend>(w: &FrozenWeight<B>, mode: Mode) -> Option<Self> {
        let out = match w {
            FrozenWeight::Dense(p) => {
                let t = p.val();
                let [rows, cols] = t.dims();
                let w = contiguous_any(value_of(t, mode));
                FlexWeight::Dense { w, rows, cols }
            }
            FrozenWeight::Quantized(q) => FlexWeight::Quantized {
                codes: int_of(q.codes.val(), mode),
                scales: value_of(q.scales.val(), mode),
                nested: q.nested_codes.as_ref().map(|c| int_of(c.val(), mode)),
                meta: q.meta.clone(),
            },
        };
        let valid = out.view().is_some();
        valid.then_some(out)
    }

    /// `[out, in]`.
    fn dims(&self) -> [usize; 2] {
        match self {
            FlexWeight::Dense { rows, cols, .. } => [*rows, *cols],
            FlexWeight::Quantized { meta, .. } => [meta.rows, meta.cols],
        }
    }

    /// The weight's bytes as a checked [`QuantView`] (`None`: not stored as expected).
    pub(crate) fn view(&self) -> Option<QuantView<'_>> {
        match self {
            FlexWeight::Dense { w, rows, cols } => {
                let data = match w.dtype() {
                    DType::F32 => ViewData::F32(w.as_slice::<f32>()?),
                    DType::BF16 => ViewData::Bf16(bits(w.as_slice::<half::bf16>()?)),
                    DType::F16 => ViewData::F16(bits(w.as_slice::<half::f16>()?)),
                    _ => return None,
                };
                QuantView::new("frozen weight", *rows, *cols, data).ok()
            }
            FlexWeight::Quantized {
                codes,
                scales,
                nested,
                meta,
            } => {
                let code_bytes = bytes_of(codes)?;
                let scales = scales.as_slice::<f32>()?;
                let data = match &meta.scheme {
                    Scheme::Int8 => ViewData::Int8 {
                        codes: as_i8(code_bytes),
                        scales,
                    },
                    Scheme::Bnb4 {
                        kind,
                        blocksize,
                        nested: nq,
                    } => {
                        let absmax = match (nq, nested) {
                            (None, _) => AbsmaxView::F32(scales),
                            (Some((nbs, offset, code)), Some(words)) => {
                                let blocks = (meta.rows * meta.cols).div_ceil(*blocksize);
                                AbsmaxView::Nested {
                                    codes: bytes_of(words)?.get(..blocks)?,
                                    absmax: scales,
                                    code,
                                    blocksize: *nbs,
                                    offset: *offset,
                                }
                            }
                            (Some(_), None) => return None,
                        };
                        ViewData::Bnb4(Bnb4View {
                            kind: *kind,
                            blocksize: *blocksize,
                            packed: code_bytes,
                            absmax,
                        })
                    }
                    Scheme::Ggml(ty) => ViewData::Ggml {
                        ty: *ty,
                        data: code_bytes,
                    },
                };
                QuantView::new("frozen weight", meta.rows, meta.cols, data)
                    .ok()
                    .map(|v| v.with_exact_decode(meta.exact_decode))
            }
        }
    }
}

/// A float tensor made contiguous in its own dtype.
fn contiguous_any(t: FlexTensor) -> FlexTensor {
    if t.is_contiguous() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The `Flex` int primitive of an int tensor of either fused backend (int tensors carry no
/// graph node), made contiguous.
fn int_of<B: Backend>(t: Tensor<B, 1, Int>, mode: Mode) -> FlexTensor {
    let t = match mode {
        Mode::Plain => cast::<Tensor<B, 1, Int>, Tensor<Flex, 1, Int>>(t).into_primitive(),
        Mode::Autodiff => cast::<Tensor<B, 1, Int>, Tensor<AdFlex, 1, Int>>(t).into_primitive(),
    };
    contiguous_any(t)
}

/// The bytes of a contiguous `i32` tensor.
fn bytes_of(t: &FlexTensor) -> Option<&[u8]> {
    let words = t.as_slice::<i32>()?;
    // SAFETY: an `i32` slice is `4 · len` initialized bytes; `u8` has alignment 1.
    Some(unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), 4 * words.len()) })
}

/// Bytes read as `i8` codes.
fn as_i8(b: &[u8]) -> &[i8] {
    // SAFETY: `u8` and `i8` have the same size and alignment; every bit pattern is valid.
    unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<i8>(), b.len()) }
}

/// The bit patterns of half floats.
fn bits<T: half::slice::HalfFloatSliceExt + ?Sized>(h: &T) -> &[u16] {
    h.reinterpret_cast()
}

/// [`FrozenWeight::has_fused_path`].
pub(crate) fn has_fused_path<B: Backend>(w: &FrozenWeight<B>) -> bool {
    mode::<B>().and_then(|m| FlexWeight::of(w, m)).is_some()
}

/// [`FrozenWeight::dequantize`] on a fused backend (`None` elsewhere).
pub(crate) fn dequantize<B: Backend>(w: &FrozenWeight<B>) -> Option<Tensor<B, 2>> {
    let mode = mode::<B>()?;
    let fw = FlexWeight::of(w, mode)?;
    let view = fw.view()?;
    let data = TensorData::new(view.dequantize(), [view.rows(), view.cols()]);
    Some(Tensor::from_data(data, &Default::default()))
}

/// [`FrozenWeight::rows`] of a quantized weight on a fused backend: only the rows `ids`
/// dequantized (an embedding lookup over GGML blocks or 4-bit codes never expands the
/// whole table). `None` elsewhere, or when an id is out of range (the caller's path then
/// reports it as burn's `select` does).
pub(crate) fn rows<B: Backend>(
    w: &FrozenWeight<B>,
    ids: &Tensor<B, 1, Int>,
) -> Option<Tensor<B, 2>> {
    let mode = mode::<B>()?;
    let fw = FlexWeight::of(w, mode)?;
    let view = fw.view()?;
    let ids = ids.clone().into_data().convert::<i64>();
    let ids = ids.as_slice::<i64>().ok()?;
    let cols = view.cols();
    let mut out = vec![0.0f32; ids.len() * cols];
    for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(cols.max(1))) {
        let row = usize::try_from(id).ok().filter(|&r| r < view.rows())?;
        view.dequantize_rows(row, 1, dst).ok()?;
    }
    let data = TensorData::new(out, [ids.len(), cols]);
    Some(Tensor::from_data(data, &Default::default()))
}

/// State of the backward: the weight's primitives and the row count.
#[derive(Clone, Debug)]
pub(crate) struct FrozenState {
    w: FlexWeight,
    n: usize,
}

/// Gradients of `[x, bias]`: `dx = dy·W`, `dbias = Σ_rows dy`.
fn frozen_backward(
    grad: &FlexTensor,
    st: &FrozenState,
    needs: [bool; 2],
) -> [Option<FlexTensor>; 2] {
    let view = st.w.view().expect("checked when recorded");
    let dy = data(grad);
    let (dout, din) = (view.rows(), view.cols());
    let dx = needs[0].then(|| tensor(base_dx(dy, &view, st.n), &[st.n, din]));
    let db = needs[1].then(|| {
        let mut s = vec![0.0f32; dout];
        dy.chunks(dout.max(1))
            .for_each(|row| s.iter_mut().zip(row).for_each(|(a, v)| *a += v));
        tensor(s, &[dout])
    });
    [dx, db]
}

backward!(FrozenBackward, 2, FrozenState, frozen_backward);

type Args<B> = (Tensor<B, 2>, Option<Tensor<B, 1>>);

/// Fused [`crate::quant::frozen_linear`]; `Err(inputs)` when `B` is not a fused backend,
/// a dtype is not f32 or the shapes disagree.
pub(crate) fn frozen_linear<B: Backend>(
    x: Tensor<B, 2>,
    weight: &FrozenWeight<B>,
    bias: Option<Tensor<B, 1>>,
) -> Result<Tensor<B, 2>, Args<B>> {
    let Some(mode) = mode::<B>() else {
        return Err((x, bias));
    };
    let mut dtypes = vec![x.dtype()];
    dtypes.extend(bias.as_ref().map(|b| b.dtype()));
    let [n, din] = x.dims();
    let Some(fw) = FlexWeight::of(weight, mode) else {
        return Err((x, bias));
    };
    let [dout, win] = fw.dims();
    let fits = all_f32(&dtypes) && win == din && bias.as_ref().is_none_or(|b| b.dims() == [dout]);
    if !fits {
        return Err((x, bias));
    }
    Ok(match mode {
        Mode::Plain => {
            let x = contiguous(flex_of(x));
            let bias = bias.map(|b| contiguous(flex_of(b)));
            let view = fw.view().expect("checked by FlexWeight::of");
            let y = base_forward(data(&x), &view, bias.as_ref().map(data), n);
            from_flex(tensor(y, &[n, dout]))
        }
        Mode::Autodiff => {
            let has_bias = bias.is_some();
            let bias = bias.unwrap_or_else(|| Tensor::zeros([dout], &x.device()));
            let mut xa = ad_of(x);
            let mut ba = ad_of(bias);
            xa.primitive = contiguous(xa.primitive.clone());
            ba.primitive = contiguous(ba.primitive.clone());
            from_ad(record(FrozenBackward, [&xa, &ba], |tracked| {
                let view = fw.view().expect("checked by FlexWeight::of");
                let b = has_bias.then(|| data(&ba.primitive));
                let y = base_forward(data(&xa.primitive), &view, b, n);
                let state = tracked.then(|| FrozenState { w: fw.clone(), n });
                (tensor(y, &[n, dout]), state)
            }))
        }
    })
}
