//! Helpers shared by the examples that write what the fixture scripts' `--check` modes load.

use anyhow::Context;
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// The reference file at `path`, read whole (its tensors are read by [`int_tensor`]).
pub fn read(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| path.display().to_string())
}

/// The 2-D i64 tensor `name` of a safetensors file's bytes (ids, masks, positions).
pub fn int_tensor<B: Backend>(
    bytes: &[u8],
    name: &str,
    device: &B::Device,
) -> anyhow::Result<Tensor<B, 2, Int>> {
    let st = safetensors::SafeTensors::deserialize(bytes)?;
    let v = st.tensor(name)?;
    let data: Vec<i64> = v
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Ok(Tensor::from_data(
        TensorData::new(data, [v.shape()[0], v.shape()[1]]),
        device,
    ))
}
