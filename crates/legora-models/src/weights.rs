//! Where a model's weights come from. legora-models does no file I/O: a reader
//! (legora-hub's safetensors loader, a test's map, ...) implements [`WeightSource`].

use std::collections::HashMap;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor, TensorData};
use legora_kernels::quant::{QuantMatrix, Storage};
use legora_kernels::FrozenWeight;

use crate::error::{ModelError, Result};

/// The error type a [`WeightSource`] may return.
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// A provider of named host tensors, by HF name (`model.layers.0.self_attn.q_proj.weight`).
pub trait WeightSource {
    /// The tensor called `name`, or `Ok(None)` when the checkpoint has no such tensor.
    /// Any float dtype is accepted; it is cast to the backend's float type on upload.
    fn tensor(&mut self, name: &str) -> std::result::Result<Option<TensorData>, SourceError>;

    /// The frozen projection weight called `name` (`[out, in]`, every decoder projection
    /// and an untied `lm_head`) in the storage format it should keep on the device, or
    /// `Ok(None)` when absent. The default reads [`WeightSource::tensor`] and keeps it as
    /// f32; a loader that converts or quantizes tensor by tensor (or reads pre-quantized
    /// weights) overrides it.
    fn frozen(&mut self, name: &str) -> std::result::Result<Option<QuantMatrix>, SourceError> {
        let Some(data) = self.tensor(name)? else {
            return Ok(None);
        };
        let shape = data.shape.to_vec();
        let [rows, cols] = shape[..] else {
            return Err(format!("expected a 2-D weight, found shape {shape:?}").into());
        };
        let values = data
            .convert_dtype(DType::F32)
            .into_vec::<f32>()
            .map_err(|e| format!("not a float tensor: {e:?}"))?;
        Ok(Some(QuantMatrix::new(
            name,
            rows,
            cols,
            Storage::F32(values),
        )?))
    }
}

impl WeightSource for HashMap<String, TensorData> {
    fn tensor(&mut self, name: &str) -> std::result::Result<Option<TensorData>, SourceError> {
        Ok(self.get(name).cloned())
    }
}

/// A maker of frozen weights by name and `[out, in]` shape, in their storage format
/// ([`crate::CausalLm::random_frozen`]).
pub type FrozenMaker<'a> =
    dyn FnMut(&str, [usize; 2]) -> std::result::Result<QuantMatrix, SourceError> + 'a;

/// How the model builder obtains each tensor.
pub(crate) enum Init<'a> {
    /// From a checkpoint.
    Source(&'a mut dyn WeightSource),
    /// Normal(0, std) for projections and embeddings, ones for norms.
    Random(f64),
    /// As `Random`, with every frozen weight made by the maker.
    RandomFrozen(f64, &'a mut FrozenMaker<'a>),
}

impl Init<'_> {
    /// Read the frozen projection weight `name` in its storage format
    /// ([`WeightSource::frozen`]), check its shape and upload it.
    pub(crate) fn load_frozen<B: Backend>(
        &mut self,
        name: &str,
        expected: [usize; 2],
        device: &B::Device,
    ) -> Result<FrozenWeight<B>> {
        let m = match self {
            Init::Random(_) => return Ok(FrozenWeight::dense(self.load(name, expected, device)?)),
            Init::Source(src) => required(name, src.frozen(name))?,
            Init::RandomFrozen(_, make) => required(name, make(name, expected).map(Some))?,
        };
        check_shape(name, &expected, vec![m.rows(), m.cols()])?;
        Ok(FrozenWeight::from_quant(m, device))
    }

    /// Read `name`, check its shape and upload it.
    pub(crate) fn load<B: Backend, const D: usize>(
        &mut self,
        name: &str,
        expected: [usize; D],
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        let src = match self {
            Init::Random(std) | Init::RandomFrozen(std, _) => {
                return Ok(if name.ends_with("norm.weight") {
                    Tensor::ones(expected, device)
                } else {
                    Tensor::random(expected, Distribution::Normal(0.0, *std), device)
                })
            }
            Init::Source(src) => src,
        };
        let data = required(name, src.tensor(name))?;
        check_shape(name, &expected, data.shape.to_vec())?;
        if !matches!(
            data.dtype,
            DType::F32 | DType::F64 | DType::F16 | DType::BF16
        ) {
            return Err(ModelError::Weights {
                tensor: name.to_string(),
                source: format!("dtype {:?} is not a float type", data.dtype).into(),
            });
        }
        Ok(Tensor::from_data(data, device))
    }
}

/// A tensor a source was asked for: its read error or its absence as the model's error
/// naming it.
fn required<T>(name: &str, got: std::result::Result<Option<T>, SourceError>) -> Result<T> {
    got.map_err(|source| ModelError::Weights {
        tensor: name.to_string(),
        source,
    })?
    .ok_or_else(|| ModelError::MissingTensor {
        tensor: name.to_string(),
    })
}

/// The shape the model expects for `name`, or an error naming both.
fn check_shape(name: &str, expected: &[usize], found: Vec<usize>) -> Result<()> {
    if found != expected {
        return Err(ModelError::ShapeMismatch {
            tensor: name.to_string(),
            expected: expected.to_vec(),
            found,
        });
    }
    Ok(())
}
