//! Shared helpers of legora-hub's tests: fixture paths, reference tensors, temp dirs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use safetensors::SafeTensors;

/// A GGUF writer for the GGUF tests.
pub mod gguf_writer;

pub type B = Flex;

/// `tests/fixtures/models` (made by tests/fixtures/make_model_fixtures.py).
pub use legora_testing::model_fixtures as fixtures;

pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// The reference tensors transformers / PEFT produced for `family`.
pub struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    pub fn load(family: &str) -> Self {
        let path = fixtures()
            .join("reference")
            .join(format!("{family}.safetensors"));
        Self {
            bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }

    fn view(&self, name: &str) -> (Vec<usize>, safetensors::Dtype, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let v = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("reference has no `{name}`"));
        (v.shape().to_vec(), v.dtype(), v.data().to_vec())
    }

    pub fn ints(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        let (shape, dtype, data) = self.view(name);
        assert_eq!(dtype, safetensors::Dtype::I64, "{name}");
        (
            shape,
            data.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        )
    }

    pub fn rows(&self, name: &str) -> Vec<Vec<u32>> {
        let (shape, v) = self.ints(name);
        v.chunks(*shape.last().unwrap())
            .map(|r| r.iter().map(|&x| x as u32).collect())
            .collect()
    }

    pub fn int_tensor(&self, name: &str) -> Tensor<B, 2, Int> {
        let (shape, v) = self.ints(name);
        Tensor::from_data(
            TensorData::new(v, [shape[0], shape[1]]),
            &Default::default(),
        )
    }

    pub fn floats(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (shape, dtype, data) = self.view(name);
        assert_eq!(dtype, safetensors::Dtype::F32, "{name}");
        (
            shape,
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        )
    }

    pub fn f64_scalar(&self, name: &str) -> f64 {
        let (_, dtype, data) = self.view(name);
        assert_eq!(dtype, safetensors::Dtype::F64, "{name}");
        f64::from_le_bytes(data[..8].try_into().unwrap())
    }

    /// Max |logits - reference `name`| over the real (non-padding) positions of the
    /// reference batch, checking shapes. Logits at left-padding positions are not
    /// compared: no token is predicted there, and transformers fills fully masked
    /// attention rows differently from legora (which keeps them finite).
    pub fn max_diff(&self, logits: Tensor<B, 3>, name: &str) -> f32 {
        let (shape, want) = self.floats(name);
        assert_eq!(logits.dims().to_vec(), shape, "{name}: logits shape");
        let [b, s, v] = logits.dims();
        let got: Vec<f32> = logits
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap();
        let (_, mask) = self.ints("attention_mask");
        let mut worst = 0f32;
        for (pos, _) in mask.iter().enumerate().take(b * s).filter(|(_, &m)| m == 1) {
            for k in pos * v..(pos + 1) * v {
                worst = worst.max((got[k] - want[k]).abs());
            }
        }
        worst
    }

    /// (input_ids, attention_mask, position_ids) of the reference batch.
    pub fn batch(&self) -> legora_models::LmInput<B> {
        legora_models::LmInput::new(self.int_tensor("input_ids"))
            .with_attention_mask(self.int_tensor("attention_mask"))
            .with_position_ids(self.int_tensor("position_ids"))
    }

    /// The prompts without their left padding.
    pub fn prompts(&self) -> Vec<Vec<u32>> {
        let ids = self.rows("input_ids");
        let mask = self.rows("attention_mask");
        ids.iter()
            .zip(&mask)
            .map(|(r, m)| {
                r.iter()
                    .zip(m)
                    .filter(|(_, &m)| m == 1)
                    .map(|(&t, _)| t)
                    .collect()
            })
            .collect()
    }
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh empty folder under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("legora-hub-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A copy of a fixture folder's files (not sub-folders).
    pub fn copy_of(tag: &str, src: &Path) -> Self {
        let t = Self::new(tag);
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            if e.path().is_file() {
                std::fs::copy(e.path(), t.0.join(e.file_name())).unwrap();
            }
        }
        t
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
