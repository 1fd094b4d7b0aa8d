//! [`GgufWeights`]: a GGUF file as a [`WeightSource`] (HF names, HF layout, f32).

use burn::tensor::TensorData;
use legora_models::{SourceError, WeightSource};

use super::file::GgufFile;
use super::names::{gguf_name, llama_unpermute_rows, norm_plus_one};
use crate::error::HubError;
use crate::load::{convert, LoadOptions};
use legora_kernels::quant::{Blob, QuantMatrix, Storage};

/// The tensors of a GGUF file by HF name (`model.layers.0.self_attn.q_proj.weight`),
/// dequantized to f32 one at a time as the model builder asks for them, in PyTorch shape
/// (GGML dims reversed) and HF row order and values (llama.cpp's Q/K permutation undone
/// when `heads` is set, the 1 it added to Gemma's norms taken off).
pub struct GgufWeights<'a> {
    file: &'a GgufFile,
    arch: &'a str,
    heads: Option<(usize, usize)>,
    options: LoadOptions,
    /// Whether the note that unaligned blocks are copied was given (once per file).
    said_copied: std::cell::Cell<bool>,
}

impl<'a> GgufWeights<'a> {
    /// Read `file` of architecture `arch` (`general.architecture`, which picks the tensor
    /// names); `heads` = `Some((num_attention_heads, num_key_value_heads))` for files
    /// whose `attn_q` / `attn_k` rows llama.cpp permuted (see
    /// [`permuted_qk`](super::config::permuted_qk)).
    pub fn new(file: &'a GgufFile, arch: &'a str, heads: Option<(usize, usize)>) -> Self {
        Self {
            file,
            arch,
            heads,
            options: LoadOptions::default(),
            said_copied: std::cell::Cell::new(false),
        }
    }

    /// Store the frozen projections as `options` says ([`WeightSource::frozen`]).
    pub fn with_options(mut self, options: LoadOptions) -> Self {
        self.options = options;
        self
    }

    /// The head count whose permutation tensor `gguf` carries, if any.
    fn permutation_heads(&self, gguf: &str) -> Option<usize> {
        let (q, kv) = self.heads?;
        if gguf.contains(".attn_q.") {
            Some(q)
        } else if gguf.contains(".attn_k.") {
            Some(kv)
        } else {
            None
        }
    }

    /// The rows of GGUF tensor `gguf` (`row_len` items each: values, or a row's block
    /// bytes) in HF order: llama.cpp's Q/K permutation undone where the tensor carries one.
    fn hf_rows<T: Copy>(
        &self,
        gguf: &str,
        data: Vec<T>,
        row_len: usize,
        shape: &[usize],
    ) -> std::result::Result<Vec<T>, SourceError> {
        let Some(n_head) = self.permutation_heads(gguf) else {
            return Ok(data);
        };
        llama_unpermute_rows(&data, row_len, n_head).ok_or_else(|| {
            Box::new(HubError::GgufTensor {
                path: self.file.path().to_path_buf(),
                tensor: gguf.to_string(),
                expected: format!(
                    "rows in 2 × {n_head} equal groups (llama.cpp's Q/K permutation)"
                ),
                found: format!("shape {shape:?}"),
            }) as SourceError
        })
    }
}

impl GgufWeights<'_> {
    /// The 2-D weight `name` as its GGML blocks, rows in HF order (llama.cpp's Q/K
    /// permutation undone on whole rows of blocks); `None` when the file has no such
    /// tensor or stores it in a type that is not a block type legora decodes (F32, F16,
    /// BF16: read as values instead).
    fn blocks(&self, name: &str) -> std::result::Result<Option<QuantMatrix>, SourceError> {
        let Some(g) = gguf_name(name, self.arch) else {
            return Ok(None);
        };
        let Some(t) = self.file.tensor(&g) else {
            return Ok(None);
        };
        let ty = t.info.ggml_type;
        let [rows, cols] = t.info.shape()[..] else {
            return Ok(None);
        };
        if !legora_kernels::quant::ggml::is_block_storage(ty) {
            return Ok(None);
        }
        // In place in the mapping unless llama.cpp's Q/K permutation must be undone.
        let shared = match self.permutation_heads(&g) {
            Some(_) => None,
            None => self.file.shared_words(&g).or_else(|| {
                self.say_copied(t.data);
                None
            }),
        };
        let data = match shared {
            Some(words) => Blob::Mapped(words),
            None => {
                let row_bytes = t.data.len() / rows.max(1);
                Blob::Owned(self.hf_rows(&g, t.data.to_vec(), row_bytes, &[rows, cols])?)
            }
        };
        let m = QuantMatrix::new(name, rows, cols, Storage::Ggml { ty, data })?;
        Ok(Some(m.with_exact_decode(self.options.gguf_exact_decode)))
    }

    /// Says (once per file) that blocks whose data does not start on a 4-byte boundary
    /// are copied into memory instead of read from the mapping.
    fn say_copied(&self, data: &[u8]) {
        if data.as_ptr() as usize % 4 != 0 && !self.said_copied.replace(true) {
            tracing::warn!(
                "{}: tensor data aligned to {} bytes (general.alignment), not 4: GGML \
                 blocks are copied into memory instead of read from the mapped file",
                self.file.path().display(),
                self.file.alignment()
            );
        }
    }
}

impl WeightSource for GgufWeights<'_> {
    fn tensor(&mut self, name: &str) -> std::result::Result<Option<TensorData>, SourceError> {
        let Some(g) = gguf_name(name, self.arch) else {
            return Ok(None);
        };
        let Some(info) = self.file.tensor_info(&g) else {
            return Ok(None);
        };
        let shape = info.shape();
        let values = self
            .file
            .dequantize(&g)
            .map_err(|e| Box::new(e) as SourceError)?
            .unwrap_or_default();
        let row_len = if shape.len() > 1 {
            info.ne0() as usize
        } else {
            1
        };
        let mut values = self.hf_rows(&g, values, row_len, &shape)?;
        if norm_plus_one(name, self.arch) {
            values.iter_mut().for_each(|v| *v -= 1.0);
        }
        Ok(Some(TensorData::new(values, shape)))
    }

    fn frozen(&mut self, name: &str) -> std::result::Result<Option<QuantMatrix>, SourceError> {
        if self.options.keeps_gguf_blocks(name) {
            if let Some(m) = self.blocks(name)? {
                return Ok(Some(m));
            }
        }
        let Some(data) = self.tensor(name)? else {
            return Ok(None);
        };
        let [rows, cols] = data.shape[..] else {
            return Err(format!("expected a 2-D weight, found shape {:?}", data.shape).into());
        };
        let values = data
            .into_vec::<f32>()
            .map_err(|e| format!("not an f32 tensor: {e:?}"))?;
        let m = QuantMatrix::new(name, rows, cols, Storage::F32(values))?;
        let format = self.options.format_of(name);
        let m = convert(name, m, format).map_err(|e| Box::new(e) as SourceError)?;
        Ok(Some(m))
    }
}
