//! Checkpoints: trainable parameters only (never the frozen base), optimizer state,
//! data-stream and trainer state, written atomically; and the tensors-only "best"
//! snapshot used by early stopping.
//!
//! Layout of one checkpoint (`<stage dir>/checkpoints/step-000120/`):
//!
//! | file | content |
//! | --- | --- |
//! | `trainable.safetensors` | every parameter with `require_grad`, f32, keyed by its module path (`layers.0.q_proj.experts.1.lora_A`) |
//! | `optimizer.bin` | burn's AdamW record (`BinBytesRecorder`, full precision), keyed by parameter id |
//! | `state.json` | [`TrainerState`]: step, loader/sampler state, early-stopping state, the parameter ids by path |
//!
//! A checkpoint is written into a hidden temporary folder and renamed into place; the
//! `latest` file (also replaced by rename) names the newest one. A crash at any point
//! leaves the previous checkpoint intact. On load, optimizer moments are re-keyed from
//! the saved parameter ids to the ids of the rebuilt model through the module paths.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, Optimizer};
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Tensor, TensorData};
use legora_data::LoaderState;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Version of the checkpoint layout.
pub const CHECKPOINT_VERSION: u32 = 1;

/// The AdamW optimizer the trainer uses, over module `M`.
pub type AdamWOptimizer<M, B> = OptimizerAdaptor<AdamW, M, B>;

type OptRecord<M, B> = <AdamWOptimizer<M, B> as Optimizer<M, B>>::Record;

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
    /// Parameter ids of the saved run, by module path (to re-key optimizer state).
    pub param_ids: BTreeMap<String, u64>,
}

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

/// Write `bytes` to `path` atomically (temporary file in the same folder + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    write_file(&tmp, bytes)?;
    fs::rename(&tmp, path).map_err(|e| TrainError::io(path, e))
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
    let bytes = fs::read(path).map_err(|e| TrainError::io(path, e))?;
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
    let opt = BinBytesRecorder::<FullPrecisionSettings>::default()
        .record(optim.to_record(), ())
        .map_err(|e| TrainError::checkpoint(root, format!("cannot record optimizer state: {e}")))?;
    let json = serde_json::to_vec_pretty(&state).map_err(|e| TrainError::Json {
        path: root.join("state.json"),
        message: e.to_string(),
    })?;

    fs::create_dir_all(root).map_err(|e| TrainError::io(root, e))?;
    let name = checkpoint_name(state.step);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    write_file(&tmp.join("trainable.safetensors"), &st)?;
    write_file(&tmp.join("optimizer.bin"), &opt)?;
    write_file(&tmp.join("state.json"), &json)?;
    let dest = root.join(&name);
    if dest.exists() {
        fs::remove_dir_all(&dest).map_err(|e| TrainError::io(&dest, e))?;
    }
    fs::rename(&tmp, &dest).map_err(|e| TrainError::io(&dest, e))?;
    write_atomic(&root.join("latest"), name.as_bytes())?;
    Ok(dest)
}

/// The checkpoint `root/latest` points at, if any.
pub fn latest_checkpoint(root: &Path) -> Result<Option<PathBuf>> {
    let latest = root.join("latest");
    if !latest.exists() {
        return Ok(None);
    }
    let name = fs::read_to_string(&latest).map_err(|e| TrainError::io(&latest, e))?;
    let dir = root.join(name.trim());
    if !dir.is_dir() {
        return Err(TrainError::checkpoint(
            &latest,
            format!("expected a checkpoint folder `{}`, found none", name.trim()),
        ));
    }
    Ok(Some(dir))
}

/// Read a checkpoint's [`TrainerState`].
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join("state.json");
    let text = fs::read_to_string(&p).map_err(|e| TrainError::io(&p, e))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| TrainError::Json {
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
    let module = load_trainable(module, &st_path, device)?;
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
    let ids = param_ids(&module);
    let mut remap = BTreeMap::new();
    for (path, old) in &state.param_ids {
        if let Some(new) = ids.get(path) {
            remap.insert(*old, *new);
        }
    }
    let opt_path = dir.join("optimizer.bin");
    let bytes = fs::read(&opt_path).map_err(|e| TrainError::io(&opt_path, e))?;
    let record: OptRecord<M, B> = BinBytesRecorder::<FullPrecisionSettings>::default()
        .load(bytes, device)
        .map_err(|e| {
            TrainError::checkpoint(&opt_path, format!("cannot read optimizer state: {e}"))
        })?;
    let mut rekeyed: OptRecord<M, B> = Default::default();
    for (old, rec) in record.into_iter() {
        match remap.get(&old.val()) {
            Some(new) => {
                rekeyed.insert(*new, rec);
            }
            None => {
                return Err(TrainError::checkpoint(
                    &opt_path,
                    format!(
                        "optimizer state for parameter id {old} has no module path in state.json"
                    ),
                ))
            }
        }
    }
    Ok((module, optim.load_record(rekeyed), state))
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
