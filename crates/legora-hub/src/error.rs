//! The one error type of `legora-hub`.

use std::path::PathBuf;

use legora_models::ModelError;
use legora_nn::NnError;

/// Everything that can go wrong reading or writing model, adapter and mixture folders.
///
/// Every variant carries the file (or folder) involved; tensor errors name the tensor
/// and the expected and found shape.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// A file system operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A required file is absent.
    #[error("{}: missing {what}", path.display())]
    MissingFile {
        /// Where it was looked for.
        path: PathBuf,
        /// What the file is for.
        what: String,
    },
    /// A JSON file does not parse, or does not have the expected fields.
    #[error("{}: invalid JSON: {message}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// serde's message (names the field and line).
        message: String,
    },
    /// A safetensors file is truncated or malformed.
    #[error("{}: not a valid safetensors file: {message}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A tensor has the wrong shape.
    #[error("{}: tensor `{tensor}` has shape {found:?}, expected {expected:?}", path.display())]
    TensorShape {
        /// The file.
        path: PathBuf,
        /// The tensor's key.
        tensor: String,
        /// The shape the model needs.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor has a dtype legora cannot use.
    #[error("{}: tensor `{tensor}` has dtype {found}, expected F32, F16 or BF16", path.display())]
    TensorDtype {
        /// The file.
        path: PathBuf,
        /// The tensor's key.
        tensor: String,
        /// The dtype in the file.
        found: String,
    },
    /// A tensor holds NaN or an infinity (a corrupt or diverged checkpoint).
    #[error("{}: tensor `{tensor}` holds a non-finite value ({value} at element {index})", path.display())]
    NonFinite {
        /// The file.
        path: PathBuf,
        /// The tensor's key.
        tensor: String,
        /// Flat index of the first non-finite element.
        index: usize,
        /// That element (`NaN`, `inf` or `-inf`).
        value: f32,
    },
    /// A tensor the format requires is absent.
    #[error("{}: missing tensor `{tensor}`", path.display())]
    MissingTensor {
        /// The file (or folder for sharded checkpoints).
        path: PathBuf,
        /// The tensor's key.
        tensor: String,
    },
    /// The tokenizer could not be loaded or used.
    #[error("{}: tokenizer: {message}", path.display())]
    Tokenizer {
        /// tokenizer.json.
        path: PathBuf,
        /// The tokenizers crate's message.
        message: String,
    },
    /// The chat template does not parse or fails to render.
    #[error("chat template ({}): {message}", path.display())]
    Template {
        /// Where the template came from.
        path: PathBuf,
        /// minijinja's message.
        message: String,
    },
    /// An adapter or mixture folder does not fit the model.
    #[error("{}: {message}", path.display())]
    Adapter {
        /// The adapter folder or file.
        path: PathBuf,
        /// What does not fit.
        message: String,
    },
    /// The model rejected the folder's contents (config, weights, adapters).
    #[error("{}: {source}", path.display())]
    Model {
        /// The folder.
        path: PathBuf,
        /// The model's error.
        source: ModelError,
    },
    /// A model given by path or Hugging Face repo id is nowhere to be found.
    #[error(
        "model `{spec}` is neither a file or folder nor a repo id in the Hugging Face cache \
         (nothing is downloaded); looked at: {}",
        looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    ModelNotFound {
        /// The path or repo id given.
        spec: String,
        /// Every place looked at.
        looked: Vec<PathBuf>,
    },
    /// A path that must be a regular file is something else (a FIFO, a device, a folder).
    #[error("{}: expected a regular file, found {found}", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
        /// What it is.
        found: String,
    },
    /// A GGUF file's structure is invalid: magic, version, a truncated header, a count or
    /// length the file cannot hold.
    #[error("{}: not a valid GGUF file: {what} at byte {offset}: expected {expected}, found {found}", path.display())]
    GgufFormat {
        /// The file.
        path: PathBuf,
        /// Where in the file.
        offset: u64,
        /// The field read there.
        what: String,
        /// What the format requires.
        expected: String,
        /// What the file has.
        found: String,
    },
    /// A GGUF metadata entry is missing, has the wrong type or a value legora cannot use.
    #[error("{}: GGUF metadata `{key}`: expected {expected}, found {found}", path.display())]
    GgufMetadata {
        /// The file.
        path: PathBuf,
        /// The metadata key (`llama.block_count`, ...).
        key: String,
        /// What was expected.
        expected: String,
        /// What the file has.
        found: String,
    },
    /// A GGUF tensor info is invalid (type, dims, offset, size) or its data cannot be used.
    #[error("{}: GGUF tensor `{tensor}`: expected {expected}, found {found}", path.display())]
    GgufTensor {
        /// The file.
        path: PathBuf,
        /// The GGUF tensor name.
        tensor: String,
        /// What was expected.
        expected: String,
        /// What the file has.
        found: String,
    },
    /// A load option (dtype, quantization) is invalid.
    #[error("load option `{key}`: expected {expected}, found {found}")]
    Options {
        /// The option's name (transformers' `BitsAndBytesConfig` name where it has one).
        key: String,
        /// What is accepted.
        expected: String,
        /// What was given.
        found: String,
    },
    /// A tensor could not be converted to (or read in) its storage format.
    #[error("tensor `{tensor}`: {message}")]
    Quantization {
        /// The tensor's name.
        tensor: String,
        /// Why.
        message: String,
    },
    /// A layer rejected an adapter / router configuration.
    #[error("{}: {source}", path.display())]
    Nn {
        /// The file.
        path: PathBuf,
        /// The layer's error.
        source: NnError,
    },
}

/// `Result` with [`HubError`].
pub type Result<T> = std::result::Result<T, HubError>;

impl HubError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }

    pub(crate) fn model(path: impl Into<PathBuf>) -> impl FnOnce(ModelError) -> Self {
        let path = path.into();
        move |source| Self::Model { path, source }
    }

    pub(crate) fn nn<E: Into<NnError>>(path: impl Into<PathBuf>) -> impl FnOnce(E) -> Self {
        let path = path.into();
        move |source| Self::Nn {
            path,
            source: source.into(),
        }
    }

    pub(crate) fn adapter(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Adapter {
            path: path.into(),
            message: message.into(),
        }
    }
}
