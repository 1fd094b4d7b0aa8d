//! Fused kernels for `Flex` (forward) and `Autodiff<Flex>` (forward + hand-written
//! backward), chosen by type at run time.
//!
//! Each entry takes the op's tensors for any backend `B` and returns `Err(inputs)`
//! untouched when `B` is neither `Flex` nor `Autodiff<Flex>` (or a dtype is not f32), so
//! the caller falls back to the reference path.

mod attention;
mod dropout;
mod elementwise;
pub(crate) mod frozen;
mod math;
pub(crate) mod matvec;
mod nll;
pub(crate) mod qdot;
pub(crate) mod qgemm;
mod stacked;

use std::any::{Any, TypeId};

use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};

pub(crate) use attention::{attention, packed_attention};
pub(crate) use dropout::dropout;
pub(crate) use elementwise::{rms_norm, rotary, swiglu};
pub(crate) use nll::{linear_next_token_nll, next_token_nll};
pub(crate) use stacked::{stacked_lora_frozen, stacked_lora_linear};

/// The training backend the kernels differentiate.
type AdFlex = Autodiff<Flex>;
/// `Autodiff<Flex>`'s tensor: the inner `FlexTensor` (`.primitive`) and its graph node.
pub(crate) type AdTensor = burn::tensor::ops::FloatTensor<AdFlex>;

/// Which fused implementation, if any, serves backend `B`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Mode {
    /// `Autodiff<Flex>`: fused forward, one backward node.
    Autodiff,
    /// `Flex`: fused forward.
    Plain,
}

/// The mode for `B`, if it has fused kernels.
pub(crate) fn mode<B: Backend>() -> Option<Mode> {
    let id = TypeId::of::<B>();
    if id == TypeId::of::<AdFlex>() {
        Some(Mode::Autodiff)
    } else if id == TypeId::of::<Flex>() {
        Some(Mode::Plain)
    } else {
        None
    }
}

/// `x` as type `T`; only called once `mode` has established that the two are the same
/// type, which makes the downcast infallible.
fn cast<A: 'static, T: 'static>(x: A) -> T {
    let boxed: Box<dyn Any> = Box::new(x);
    match boxed.downcast::<T>() {
        Ok(t) => *t,
        Err(_) => unreachable!("cast between different types: checked by `mode` first"),
    }
}

/// The inner `FlexTensor` of a `Flex` tensor.
pub(crate) fn flex_of<B: Backend, const D: usize>(t: Tensor<B, D>) -> FlexTensor {
    cast::<Tensor<B, D>, Tensor<Flex, D>>(t)
        .into_primitive()
        .tensor()
}

/// The autodiff primitive of an `Autodiff<Flex>` tensor.
pub(crate) fn ad_of<B: Backend, const D: usize>(t: Tensor<B, D>) -> AdTensor {
    cast::<Tensor<B, D>, Tensor<AdFlex, D>>(t)
        .into_primitive()
        .tensor()
}

/// The inner `FlexTensor` of a tensor of either fused backend, dropping any graph node
/// (for constants: masks, cos/sin).
pub(crate) fn value_of<B: Backend, const D: usize>(t: Tensor<B, D>, mode: Mode) -> FlexTensor {
    match mode {
        Mode::Plain => flex_of(t),
        Mode::Autodiff => ad_of(t).primitive,
    }
}

/// Back to `Tensor<B, D>` from a `Flex` primitive.
pub(crate) fn from_flex<B: Backend, const D: usize>(t: FlexTensor) -> Tensor<B, D> {
    cast::<Tensor<Flex, D>, Tensor<B, D>>(Tensor::from_primitive(TensorPrimitive::Float(t)))
}

/// Back to `Tensor<B, D>` from an `Autodiff<Flex>` primitive.
pub(crate) fn from_ad<B: Backend, const D: usize>(t: AdTensor) -> Tensor<B, D> {
    cast::<Tensor<AdFlex, D>, Tensor<B, D>>(Tensor::from_primitive(TensorPrimitive::Float(t)))
}

/// Whether every dtype is f32 (the only one the kernels implement).
pub(crate) fn all_f32(dtypes: &[DType]) -> bool {
    dtypes.iter().all(|d| *d == DType::F32)
}

/// The tensor with a contiguous f32 buffer (a copy only when it is a strided view).
pub(crate) fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// The f32 elements of a tensor made [`contiguous`].
pub(crate) fn data(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("`contiguous` gives a contiguous f32 tensor")
}

/// A contiguous f32 tensor of the given shape.
pub(crate) fn tensor(values: Vec<f32>, shape: &[usize]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.to_vec()))
}

/// A raw pointer that may cross threads: each task writes its own disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: every use hands each parallel task a disjoint set of elements.
unsafe impl Send for SendPtr {}
// SAFETY: as for `Send`: tasks sharing the pointer write disjoint elements only.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer (a method, so closures capture the `Send` wrapper, not the field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// `dst[m×n] (+)= beta·(lhs·rhs)` for row-major `dst` with row stride `dst_rs`; `lhs` and
/// `rhs` given as (pointer, row stride, column stride); on the calling thread.
///
/// # Safety
/// Every pointer must address the whole strided matrix it describes, and `dst` must not
/// be written by anyone else meanwhile.
pub(crate) unsafe fn gemm(
    mnk: (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    beta: f32,
) {
    gemm_with(
        gemm::Parallelism::None,
        mnk,
        dst,
        dst_rs,
        accumulate,
        lhs,
        rhs,
        beta,
    )
}

/// [`gemm`] with a chosen parallelism (`Rayon(0)`: every core, for the full-size frozen
/// products).
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_with(
    parallelism: gemm::Parallelism,
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
        parallelism,
    )
}

/// A differentiable op of `N` tracked inputs for `Autodiff<Flex>`: `forward` runs the
/// kernel (returning the output and, when the op is tracked, the state its backward
/// needs), and `B: Backward` turns that state and the output gradient into the inputs'
/// gradients.
pub(crate) fn record<BO, S, const N: usize>(
    backward: BO,
    inputs: [&AdTensor; N],
    forward: impl FnOnce(bool) -> (FlexTensor, Option<S>),
) -> AdTensor
where
    BO: Backward<Flex, N, State = S>,
    S: Clone + Send + std::fmt::Debug + 'static,
{
    let nodes = inputs.map(|t| t.node.clone());
    match backward
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (out, state) = forward(true);
            prep.finish(state.expect("a tracked forward returns its state"), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(false).0),
    }
}

/// Which of an op's inputs need a gradient.
pub(crate) fn needs<S, const N: usize>(ops: &Ops<S, N>) -> [bool; N] {
    std::array::from_fn(|i| ops.parents[i].is_some())
}

/// The output gradient of an op's node (contiguous), then each input's gradient from
/// `backward(output_grad, state, needs)` registered for the parents that require one.
pub(crate) fn backprop<S, const N: usize>(
    ops: Ops<S, N>,
    grads: &mut Gradients,
    backward: impl FnOnce(&FlexTensor, &S, [bool; N]) -> [Option<FlexTensor>; N],
) {
    let grad = contiguous(grads.consume::<Flex>(&ops.node));
    let values = backward(&grad, &ops.state, needs(&ops));
    for (parent, value) in ops.parents.into_iter().zip(values) {
        if let (Some(node), Some(value)) = (parent, value) {
            grads.register::<Flex>(node.id, value);
        }
    }
}

/// Implements `Backward<Flex, N>` for a unit struct whose state type is `$state`, by
/// calling `$f(output_grad, state, needs)` (see [`backprop`]).
macro_rules! backward {
    ($name:ident, $n:literal, $state:ty, $f:path) => {
        #[derive(Debug)]
        pub(crate) struct $name;

        impl burn::backend::autodiff::ops::Backward<burn::backend::Flex, $n> for $name {
            type State = $state;

            fn backward(
                self,
                ops: burn::backend::autodiff::ops::Ops<Self::State, $n>,
                grads: &mut burn::backend::autodiff::grads::Gradients,
                _checkpointer: &mut burn::backend::autodiff::checkpoint::base::Checkpointer,
            ) {
                $crate::flex::backprop(ops, grads, $f);
            }
        }
    };
}
pub(crate) use backward;
