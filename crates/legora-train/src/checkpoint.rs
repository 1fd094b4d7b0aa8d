//! Checkpoints: trainable parameters only (never the frozen base), optimizer state,
//! data-stream and trainer state, written atomically; and the tensors-only "best"
//! snapshot used by early stopping.
//!
//! Layout of one checkpoint (`<stage dir>/checkpoints/step-000120/`):
//!
//! | file | content |
//! | --- | --- |
//! | `trainable.safetensors` | every parameter with `require_grad`, f32, keyed by its module path (`layers.0.q_proj.experts.1.lora_A`) |
//! | `optimizer.safetensors` | AdamW's moments, f32, keyed by module path with PyTorch's names (`<path>.exp_avg`, `<path>.exp_avg_sq`), step counts in the metadata |
//! | `state.json` | [`TrainerState`]: step, loader/sampler state, early-stopping state, the parameter ids by path |
//!
//! A checkpoint is written into a hidden temporary folder and renamed into place; the
//! `latest` file (also replaced by rename) names the newest one. A crash at any point
//! leaves the previous checkpoint intact. On load, optimizer moments are matched to the
//! rebuilt model's parameters through their module paths and checked against their
//! shapes.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use legora_data::LoaderState;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};
use crate::optim_state::{optimizer_from_safetensors, optimizer_to_safetensors, OPTIMIZER_FILE};

/// Version of the checkpoint layout (2: `state.json` records the data files' sums;
/// 3: the optimizer state is `optimizer.safetensors`).
pub const CHECKPOINT_VERSION: u32 = 3;

/// The AdamW optimizer the trainer uses, over module `M`.
pub type AdamWOptimizer<M, B> = OptimizerAdaptor<AdamW, M, B>;

/// Everything besides tensors that a checkpoint restores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Layout version ([`CHECKPOINT_VERSION`]).
    pub version: u32,
    /// Stage name.
    pub stage: String,
    /// Optimizer steps completed.
    pub step: usize,
    /// Steps the stage was planned for.
    pub total_steps: usize,
    /// The data stream.
    pub loader: LoaderState,
    /// Best validation loss so far.
    pub best_val_loss: Option<f64>,
    /// Step of the best validation loss.
    pub best_step: Option<usize>,
    /// Validations without improvement since the best.
    pub bad_evals: usize,
    /// Length of `metrics.jsonl` when the checkpoint was written (lines after it are
    /// dropped on resume, so the file has no duplicate steps).
    pub metrics_len: Option<u64>,
    /// Parameter ids of the saved run, by module path: the trainable parameters the
    /// checkpoint holds.
    pub param_ids: BTreeMap<String, u64>,
    /// Length and FNV-1a 64 checksum of each data file of the checkpoint
    /// (`trainable.safetensors`, `optimizer.safetensors`), written at save and verified before
    /// either is parsed.
    #[serde(default)]
    pub files: BTreeMap<String, FileSum>,
}

/// A file's length and checksum, as recorded in `state.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSum {
    /// Length in bytes.
    pub len: u64,
    /// FNV-1a 64 of the bytes, as 16 hex digits.
    #[serde(with = "hex_u64")]
    pub fnv1a64: u64,
}

impl FileSum {
    /// The sum of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        Self {
            len: bytes.len() as u64,
            fnv1a64: h,
        }
    }
}

mod hex_u64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:016x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        u64::from_str_radix(&text, 16).map_err(serde::de::Error::custom)
    }
}

/// Data files of a checkpoint whose sums `state.json` records.
const SUMMED_FILES: [&str; 2] = ["trainable.safetensors", OPTIMIZER_FILE];

/// Host tensors by module path: `path → (shape, f32 values)`.
pub type TensorMap = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// One trainable tensor read to the host.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// Module path (`experts.0.lora_A`).
    pub path: String,
    /// Parameter id in this process.
    pub id: ParamId,
    /// Shape.
    pub shape: Vec<usize>,
    /// Values, f32.
    pub values: Vec<f32>,
}

struct Collect {
    stack: Vec<String>,
    out: Vec<NamedTensor>,
    all: bool,
}

impl<B: Backend> ModuleVisitor<B> for Collect {
    fn enter_module(&mut self, name: &str, _container: &str) {
        self.stack.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container: &str) {
        self.stack.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !self.all && !param.is_require_grad() {
            return;
        }
        let t = param.val();
        let shape = t.dims().to_vec();
        let values = t
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .unwrap_or_default();
        self.out.push(NamedTensor {
            path: self.stack.join("."),
            id: param.id,
            shape,
            values,
        });
    }
}

/// The trainable parameters (`require_grad`) of `module`, by module path. Call it on
/// the training module (an autodiff backend tracks trainability).
pub fn trainable_tensors<B: Backend, M: Module<B>>(module: &M) -> Vec<NamedTensor> {
    let mut c = Collect {
        stack: Vec::new(),
        out: Vec::new(),
        all: false,
    };
    module.visit(&mut c);
    c.out
}

/// Every float parameter of `module` (frozen ones too), by module path.
pub fn all_tensors<B: Backend, M: Module<B>>(module: &M) -> Vec<NamedTensor> {
    let mut c = Collect {
        stack: Vec::new(),
        out: Vec::new(),
        all: true,
    };
    module.visit(&mut c);
    c.out
}

/// Parameter ids by module path, for every float parameter.
pub fn param_ids<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, ParamId> {
    struct Ids {
        stack: Vec<String>,
        out: BTreeMap<String, ParamId>,
    }
    impl<B: Backend> ModuleVisitor<B> for Ids {
        fn enter_module(&mut self, name: &str, _c: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _c: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.out.insert(self.stack.join("."), param.id);
        }
    }
    let mut v = Ids {
        stack: Vec::new(),
        out: BTreeMap::new(),
    };
    module.visit(&mut v);
    v.out
}

/// Serialize tensors as safetensors (f32, little endian), with string metadata.
pub fn tensors_to_safetensors(
    tensors: &[NamedTensor],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for (t, b) in tensors.iter().zip(&bytes) {
        let view = TensorView::new(Dtype::F32, t.shape.clone(), b).map_err(|e| {
            TrainError::invalid(t.path.clone(), "a tensor whose data fits its shape", e)
        })?;
        views.push((t.path.clone(), view));
    }
    safetensors::serialize(views, metadata)
        .map_err(|e| TrainError::invalid("safetensors", "serializable tensors", e))
}

/// Read `(path → (shape, values))` from safetensors bytes (f32 only).
pub fn tensors_from_safetensors(bytes: &[u8], file: &Path) -> Result<TensorMap> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| TrainError::checkpoint(file, format!("not a safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(TrainError::checkpoint(
                file,
                format!(
                    "tensor `{name}`: expected dtype F32, found {:?}",
                    view.dtype()
                ),
            ));
        }
        let values = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(name, (view.shape().to_vec(), values));
    }
    Ok(out)
}

struct Load<'a, B: Backend> {
    stack: Vec<String>,
    tensors: &'a TensorMap,
    device: B::Device,
    loaded: Vec<String>,
    error: Option<String>,
}

impl<B: Backend> ModuleMapper<B> for Load<'_, B> {
    fn enter_module(&mut self, name: &str, _c: &str) {
        self.stack.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _c: &str) {
        self.stack.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let path = self.stack.join(".");
        let Some((shape, values)) = self.tensors.get(&path) else {
            return param;
        };
        let (id, tensor, mapper) = param.consume();
        if tensor.dims().as_slice() != shape.as_slice() {
            self.error.get_or_insert(format!(
                "tensor `{path}`: expected shape {:?} (the model's), found {shape:?}",
                tensor.dims()
            ));
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let trainable = tensor.is_require_grad();
        let value: Tensor<B, D> =
            Tensor::from_data(TensorData::new(values.clone(), shape.clone()), &self.device);
        self.loaded.push(path);
        Param::from_mapped_value(id, value, mapper).set_require_grad(trainable)
    }
}

/// Set `module`'s parameters from `tensors` (by module path), keeping each parameter's
/// id and trainability. Every tensor must find a parameter of the same shape.
pub fn load_tensors<B: Backend, M: Module<B>>(
    module: M,
    tensors: &TensorMap,
    device: &B::Device,
    file: &Path,
) -> Result<M> {
    let mut l = Load::<B> {
        stack: Vec::new(),
        tensors,
        device: device.clone(),
        loaded: Vec::new(),
        error: None,
    };
    let module = module.map(&mut l);
    if let Some(e) = l.error {
        return Err(TrainError::checkpoint(file, e));
    }
    if let Some(missing) = tensors.keys().find(|k| !l.loaded.contains(k)) {
        return Err(TrainError::checkpoint(
            file,
            format!("tensor `{missing}` has no parameter of that path in the model"),
        ));
    }
    Ok(module)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).map_err(|e| TrainError::io(path, e))?;
    f.write_all(bytes).map_err(|e| TrainError::io(path, e))?;
    f.sync_all().map_err(|e| TrainError::io(path, e))
}

/// Write `bytes` to `path` atomically: legora-hub's [`write_atomic`](legora_hub::write_atomic)
/// (temporary file, fsync, rename, fsync of the folder; the temporary file removed on
/// error).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(legora_hub::write_atomic(path, bytes)?)
}

/// Check that every value is finite; the error names the first bad tensor.
fn check_finite(tensors: &[NamedTensor]) -> std::result::Result<(), (String, f64)> {
    for t in tensors {
        if let Some(v) = t.values.iter().find(|v| !v.is_finite()) {
            return Err((t.path.clone(), f64::from(*v)));
        }
    }
    Ok(())
}

/// Save the trainable tensors of `module` alone (the early-stopping "best" snapshot).
pub fn save_trainable<B: Backend, M: Module<B>>(module: &M, path: &Path) -> Result<()> {
    let t = trainable_tensors(module);
    write_atomic(path, &tensors_to_safetensors(&t, None)?)
}

/// Load tensors saved by [`save_trainable`] into `module`.
pub fn load_trainable<B: Backend, M: Module<B>>(
    module: M,
    path: &Path,
    device: &B::Device,
) -> Result<M> {
    let bytes = legora_hub::io::read_regular(path)?;
    let tensors = tensors_from_safetensors(&bytes, path)?;
    load_tensors(module, &tensors, device, path)
}

/// Name of the checkpoint folder of `step`.
pub fn checkpoint_name(step: usize) -> String {
    format!("step-{step:06}")
}

/// Write a checkpoint of `module` (trainable tensors), `optim` and `state` under
/// `root/step-NNNNNN/` atomically and point `root/latest` at it. Refuses (with
/// [`TrainError::NonFinite`]) to write non-finite parameters.
pub fn save_checkpoint<B, M>(
    root: &Path,
    module: &M,
    optim: &AdamWOptimizer<M, B>,
    state: &TrainerState,
) -> Result<PathBuf>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
{
    let tensors = trainable_tensors(module);
    if let Err((path, value)) = check_finite(&tensors) {
        return Err(TrainError::NonFinite {
            stage: state.stage.clone(),
            step: state.step,
            quantity: format!("parameter `{path}`"),
            value,
            last_checkpoint: latest_checkpoint(root)?,
        });
    }
    let mut state = state.clone();
    state.param_ids = tensors
        .iter()
        .map(|t| (t.path.clone(), t.id.val()))
        .collect();
    let st = tensors_to_safetensors(&tensors, None)?;
    let opt = optimizer_to_safetensors(optim, &tensors)?;
    state.files = SUMMED_FILES
        .iter()
        .zip([&st, &opt])
        .map(|(name, bytes)| (name.to_string(), FileSum::of(bytes)))
        .collect();
    let json = serde_json::to_vec_pretty(&state).map_err(|e| TrainError::Json {
        path: root.join("state.json"),
        message: e.to_string(),
    })?;

    fs::create_dir_all(root).map_err(|e| TrainError::io(root, e))?;
    let name = checkpoint_name(state.step);
    // folders of a save cut short by a kill
    legora_hub::io::remove_stale_temps(root, ".tmp-step-");
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    let written = write_file(&tmp.join("trainable.safetensors"), &st)
        .and_then(|_| write_file(&tmp.join(OPTIMIZER_FILE), &opt))
        .and_then(|_| write_file(&tmp.join("state.json"), &json))
        .and_then(|_| legora_hub::io::sync_dir(&tmp).map_err(|e| TrainError::io(&tmp, e)));
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let dest = root.join(&name);
    if dest.exists() {
        fs::remove_dir_all(&dest).map_err(|e| TrainError::io(&dest, e))?;
    }
    fs::rename(&tmp, &dest).map_err(|e| TrainError::io(&dest, e))?;
    legora_hub::io::sync_dir(root).map_err(|e| TrainError::io(root, e))?;
    write_atomic(&root.join("latest"), name.as_bytes())?;
    Ok(dest)
}

/// The checkpoint `root/latest` points at, if any.
pub fn latest_checkpoint(root: &Path) -> Result<Option<PathBuf>> {
    let latest = root.join("latest");
    if !latest.exists() {
        return Ok(None);
    }
    let bytes = legora_hub::io::read_regular(&latest)?;
    let name = String::from_utf8_lossy(&bytes);
    // `latest` names a `step-NNNNNN` folder of `root` and nothing else (no path, no
    // `..`, no link out of the run folder)
    if step_of_name(name.trim()).is_none() {
        return Err(TrainError::checkpoint(
            &latest,
            format!(
                "expected the name of a checkpoint folder (step-NNNNNN), found {:?}",
                name.trim()
            ),
        ));
    }
    let dir = root.join(name.trim());
    let meta = fs::symlink_metadata(&dir);
    if meta.as_ref().is_ok_and(|m| !m.is_dir()) {
        return Err(TrainError::checkpoint(
            &latest,
            format!("`{}` is not a folder of the run", name.trim()),
        ));
    }
    if !dir.is_dir() {
        return Err(TrainError::checkpoint(
            &latest,
            format!("expected a checkpoint folder `{}`, found none", name.trim()),
        ));
    }
    Ok(Some(dir))
}

/// The step of a checkpoint folder name `step-NNNNNN` (digits only).
fn step_of_name(name: &str) -> Option<usize> {
    let digits = name.strip_prefix("step-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Read a checkpoint data file and check it against the length and checksum
/// `state.json` recorded at save.
fn read_summed(dir: &Path, name: &str, state: &TrainerState) -> Result<Vec<u8>> {
    let path = dir.join(name);
    let expected = state.files.get(name).ok_or_else(|| {
        TrainError::checkpoint(
            dir.join("state.json"),
            format!("`files.{name}`: expected the file's length and checksum, found none"),
        )
    })?;
    let len = fs::metadata(&path)
        .map_err(|e| TrainError::io(&path, e))?
        .len();
    if len != expected.len {
        return Err(TrainError::checkpoint(
            &path,
            format!("expected {} bytes (state.json), found {len}", expected.len),
        ));
    }
    let bytes = legora_hub::io::read_regular(&path)?;
    let found = FileSum::of(&bytes);
    if found != *expected {
        return Err(TrainError::checkpoint(
            &path,
            format!(
                "checksum {:016x} does not match state.json's {:016x}: the file is corrupt",
                found.fnv1a64, expected.fnv1a64
            ),
        ));
    }
    Ok(bytes)
}

/// Read a checkpoint's [`TrainerState`].
///
/// Checks the layout version, that `step` is the folder's step and at most
/// `total_steps`, and that it records the data files' sums.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join("state.json");
    let bytes = legora_hub::io::read_regular(&p)?;
    let state: TrainerState = serde_json::from_slice(&bytes).map_err(|e| TrainError::Json {
        path: p.clone(),
        message: e.to_string(),
    })?;
    if state.version != CHECKPOINT_VERSION {
        return Err(TrainError::checkpoint(
            &p,
            format!(
                "expected layout version {CHECKPOINT_VERSION}, found {}",
                state.version
            ),
        ));
    }
    let folder = dir.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if let Some(step) = step_of_name(folder) {
        if state.step != step {
            return Err(TrainError::checkpoint(
                &p,
                format!(
                    "`step`: expected {step} (the folder's step), found {}",
                    state.step
                ),
            ));
        }
    }
    if state.step > state.total_steps {
        return Err(TrainError::checkpoint(
            &p,
            format!(
                "`step`: expected at most total_steps = {}, found {}",
                state.total_steps, state.step
            ),
        ));
    }
    Ok(state)
}

/// Restore a checkpoint into a freshly built `module` (same architecture, frozen base
/// already loaded) and optimizer. Returns both and the trainer state.
pub fn load_checkpoint<B, M>(
    dir: &Path,
    module: M,
    optim: AdamWOptimizer<M, B>,
    device: &B::Device,
) -> Result<(M, AdamWOptimizer<M, B>, TrainerState)>
where
    B: AutodiffBackend,
    M: AutodiffModule<B>,
{
    let state = read_state(dir)?;
    let st_path = dir.join("trainable.safetensors");
    let st_bytes = read_summed(dir, "trainable.safetensors", &state)?;
    let opt_bytes = read_summed(dir, OPTIMIZER_FILE, &state)?;
    let tensors = tensors_from_safetensors(&st_bytes, &st_path)?;
    let module = load_tensors(module, &tensors, device, &st_path)?;
    // every trainable parameter of the model must come from the checkpoint
    let current = trainable_tensors(&module);
    if let Some(t) = current
        .iter()
        .find(|t| !state.param_ids.contains_key(&t.path))
    {
        return Err(TrainError::checkpoint(
            &st_path,
            format!(
                "the model's trainable parameter `{}` is not in the checkpoint",
                t.path
            ),
        ));
    }
    let opt_path = dir.join(OPTIMIZER_FILE);
    let record =
        optimizer_from_safetensors::<B, M>(&opt_bytes, &opt_path, &current, state.step, device)?;
    Ok((module, optim.load_record(record), state))
}

/// The first `checkpoints` folder holding a `latest` pointer found under `dir`, at
/// most `depth` folders down (folders only; links are not followed).
pub fn find_checkpoints(dir: &Path, depth: usize) -> Option<PathBuf> {
    let ckpt = dir.join("checkpoints");
    if ckpt.join("latest").is_file() {
        return Some(ckpt);
    }
    if depth == 0 {
        return None;
    }
    let mut subdirs: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    subdirs.sort();
    subdirs.iter().find_map(|d| find_checkpoints(d, depth - 1))
}

/// Delete the oldest `step-*` checkpoints so that at most `keep` remain (the one
/// `latest` points at is never deleted).
pub fn prune_checkpoints(root: &Path, keep: usize) -> Result<()> {
    let latest = latest_checkpoint(root)?;
    let mut dirs: Vec<PathBuf> = fs::read_dir(root)
        .map_err(|e| TrainError::io(root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    dirs.sort();
    let excess = dirs.len().saturating_sub(keep.max(1));
    for d in dirs.into_iter().take(excess) {
        if Some(&d) != latest.as_ref() {
            fs::remove_dir_all(&d).map_err(|e| TrainError::io(&d, e))?;
        }
    }
    Ok(())
}
