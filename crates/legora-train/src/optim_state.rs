//! AdamW state in a checkpoint: `optimizer.safetensors`, keyed by the trainable
//! parameter's module path with PyTorch's names (`<path>.exp_avg`, `<path>.exp_avg_sq`,
//! `<path>.max_exp_avg_sq` under AMSGrad; each parameter's step count in the file's
//! metadata as `<path>.step`).
//!
//! Reading it is checked like any other user file: every tensor must belong to a
//! trainable parameter of the model and have that parameter's shape, every moment must
//! be finite (the second ones non-negative), and every step count a number no larger
//! than the checkpoint's step. Nothing is sized by the file beyond what the safetensors
//! reader has already checked against the file's own length.

use std::collections::HashMap;
use std::path::Path;

use burn::module::AutodiffModule;
use burn::optim::record::AdaptorRecord;
use burn::optim::{AdamW, AdamWState, AdaptiveMomentumState, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use safetensors::SafeTensors;

use crate::checkpoint::{tensors_from_safetensors, tensors_to_safetensors, NamedTensor};
use crate::checkpoint::{AdamWOptimizer, TensorMap};
use crate::error::{Result, TrainError};

type OptRecord<M, B> = <AdamWOptimizer<M, B> as Optimizer<M, B>>::Record;

/// The file name of the optimizer state inside a checkpoint folder.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// The PyTorch names of one parameter's AdamW moments.
const MOMENTS: [&str; 3] = ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"];

/// One parameter's AdamW state on the host.
struct HostState {
    step: usize,
    /// `exp_avg`, `exp_avg_sq` and (AMSGrad only) `max_exp_avg_sq`.
    moments: Vec<Vec<f32>>,
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .unwrap_or_default()
}

fn take<B: AutodiffBackend, const D: usize>(rec: AdaptorRecord<AdamW, B>) -> HostState {
    let m = rec.into_state::<D>().momentum;
    let mut moments = vec![host(m.moment_1), host(m.moment_2)];
    moments.extend(m.max_moment_2.map(host));
    HostState {
        step: m.time,
        moments,
    }
}

fn give<B: AutodiffBackend, const D: usize>(
    s: HostState,
    shape: &[usize],
    device: &B::Device,
) -> AdaptorRecord<AdamW, B> {
    let mut t = s.moments.into_iter().map(|v| {
        Tensor::<B::InnerBackend, D>::from_data(TensorData::new(v, shape.to_vec()), device)
    });
    let (moment_1, moment_2) = (t.next().expect("exp_avg"), t.next().expect("exp_avg_sq"));
    let momentum = AdaptiveMomentumState {
        time: s.step,
        moment_1,
        moment_2,
        max_moment_2: t.next(),
    };
    AdaptorRecord::from_state::<D>(AdamWState { momentum })
}

/// Dispatch on a parameter's rank (legora's trainable parameters have rank 1 or 2).
macro_rules! by_rank {
    ($rank:expr, $f:ident :: <$b:ty> ($($arg:expr),*)) => {
        match $rank {
            1 => Some($f::<$b, 1>($($arg),*)),
            2 => Some($f::<$b, 2>($($arg),*)),
            3 => Some($f::<$b, 3>($($arg),*)),
            4 => Some($f::<$b, 4>($($arg),*)),
            _ => None,
        }
    };
}

/// Serialize `optim`'s state for the trainable `tensors` of its module.
pub(crate) fn optimizer_to_safetensors<B, M>(
    optim: &AdamWOptimizer<M, B>,
    tensors: &[NamedTensor],
) -> Result<Vec<u8>>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
{
    let mut out = Vec::new();
    let mut steps = HashMap::new();
    for (id, rec) in optim.to_record() {
        let Some(p) = tensors.iter().find(|t| t.id == id) else {
            continue; // state of a parameter that is no longer trainable
        };
        let s = by_rank!(p.shape.len(), take::<B>(rec)).ok_or_else(|| {
            TrainError::invalid(p.path.clone(), "a parameter of rank 1 to 4", p.shape.len())
        })?;
        steps.insert(format!("{}.step", p.path), s.step.to_string());
        for (name, values) in MOMENTS.iter().zip(s.moments) {
            out.push(NamedTensor {
                path: format!("{}.{name}", p.path),
                id: p.id,
                shape: p.shape.clone(),
                values,
            });
        }
    }
    tensors_to_safetensors(&out, Some(steps))
}

/// Read the optimizer state for the trainable parameters `current` of a freshly built
/// model (after `step` optimizer steps) from `optimizer.safetensors` bytes.
pub(crate) fn optimizer_from_safetensors<B, M>(
    bytes: &[u8],
    file: &Path,
    current: &[NamedTensor],
    step: usize,
    device: &B::Device,
) -> Result<OptRecord<M, B>>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
{
    let mut tensors = tensors_from_safetensors(bytes, file)?;
    let steps = step_metadata(bytes, file)?;
    let mut record: OptRecord<M, B> = Default::default();
    for p in current {
        let Some(s) = host_state(&mut tensors, &steps, p, step, file)? else {
            continue;
        };
        let rec = by_rank!(p.shape.len(), give::<B>(s, &p.shape, device))
            .ok_or_else(|| TrainError::invalid(p.path.clone(), "rank 1 to 4", p.shape.len()))?;
        record.insert(p.id, rec);
    }
    if let Some(name) = tensors.keys().next() {
        return Err(TrainError::checkpoint(
            file,
            format!("tensor `{name}`: expected the moments of a trainable parameter of the model, found no such parameter"),
        ));
    }
    if record.is_empty() && !current.is_empty() && step > 0 {
        return Err(TrainError::checkpoint(
            file,
            format!(
                "expected optimizer state for the {} trainable parameters, found none",
                current.len()
            ),
        ));
    }
    Ok(record)
}

/// The `<path>.step` metadata of the file.
fn step_metadata(bytes: &[u8], file: &Path) -> Result<HashMap<String, String>> {
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| TrainError::checkpoint(file, format!("not a safetensors file: {e}")))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Take parameter `p`'s moments out of `tensors` and check them; `None` when the file
/// has none for it (a parameter that has not had a gradient yet).
fn host_state(
    tensors: &mut TensorMap,
    steps: &HashMap<String, String>,
    p: &NamedTensor,
    max_step: usize,
    file: &Path,
) -> Result<Option<HostState>> {
    let names: Vec<String> = MOMENTS.iter().map(|m| format!("{}.{m}", p.path)).collect();
    if !tensors.contains_key(&names[0]) && !tensors.contains_key(&names[1]) {
        return Ok(None);
    }
    let mut moments = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let Some((shape, values)) = tensors.remove(name) else {
            if i == 2 {
                break; // AMSGrad's maximum is optional
            }
            return Err(TrainError::checkpoint(
                file,
                format!(
                    "expected tensor `{name}` beside the other moment of `{}`, found none",
                    p.path
                ),
            ));
        };
        if shape != p.shape {
            return Err(TrainError::checkpoint(
                file,
                format!(
                    "tensor `{name}`: expected shape {:?} (the parameter's), found {shape:?}",
                    p.shape
                ),
            ));
        }
        if let Some(v) = values
            .iter()
            .find(|v| !v.is_finite() || (i > 0 && **v < 0.0))
        {
            return Err(TrainError::checkpoint(
                file,
                format!(
                    "tensor `{name}`: expected finite values{}, found {v}",
                    if i > 0 { " ≥ 0" } else { "" }
                ),
            ));
        }
        moments.push(values);
    }
    let key = format!("{}.step", p.path);
    let step = steps.get(&key).and_then(|s| s.parse::<usize>().ok());
    match step {
        Some(step) if (1..=max_step).contains(&step) => Ok(Some(HostState { step, moments })),
        _ => Err(TrainError::checkpoint(
            file,
            format!(
                "metadata `{key}`: expected a step count from 1 to {max_step}, found {:?}",
                steps.get(&key)
            ),
        )),
    }
}
