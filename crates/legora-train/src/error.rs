//! The one error type of `legora-train`.

use std::path::{Path, PathBuf};

use legora_data::DataError;
use legora_nn::NnError;

/// Everything that can go wrong while configuring, running, saving or reporting a
/// training run. Messages name the file, line, key, step or tensor involved.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The run file is invalid: `file:line: key: message` (expected vs found).
    #[error("{}: `{key}`: {message}", location(file, *line, *column))]
    Config {
        /// The run file.
        file: PathBuf,
        /// 1-based line of the key (when known).
        line: Option<usize>,
        /// 1-based column (when known).
        column: Option<usize>,
        /// Dotted key path, e.g. `stages.experts.learning_rate`, `tasks[1].train`.
        key: String,
        /// What is wrong: expected vs found.
        message: String,
    },
    /// A file or folder could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A data-pipeline error.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A layer / adapter configuration error.
    #[error(transparent)]
    Nn(#[from] NnError),
    /// A file of the model, an adapter or a mixture could not be read or written.
    #[error(transparent)]
    Hub(#[from] legora_hub::HubError),
    /// The model refused an operation (adapters, mixtures, generation).
    #[error(transparent)]
    Models(#[from] legora_models::ModelError),
    /// A plugin call failed.
    #[error(transparent)]
    Plugin(#[from] legora_plugin_host::HostError),
    /// The model's loss computation failed.
    #[error("stage `{stage}`, step {step}: model: {message}")]
    Model {
        /// Stage name.
        stage: String,
        /// Optimizer step at which it failed.
        step: usize,
        /// The model's error.
        message: String,
    },
    /// A loss, gradient norm or parameter became NaN or infinite. Training stopped
    /// before applying that update; the last good checkpoint is kept.
    #[error(
        "stage `{stage}`, step {step}: {quantity} is {value} (not finite); training stopped, \
         last good checkpoint: {}",
        last_checkpoint.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none".into())
    )]
    NonFinite {
        /// Stage name.
        stage: String,
        /// The optimizer step that produced it (0-based: the step being computed).
        step: usize,
        /// `loss`, `grad_norm` or `parameter <path>`.
        quantity: String,
        /// The value.
        value: f64,
        /// The newest checkpoint on disk, untouched.
        last_checkpoint: Option<PathBuf>,
    },
    /// A checkpoint is missing, corrupt or does not fit the model.
    #[error("checkpoint {}: {message}", path.display())]
    Checkpoint {
        /// The checkpoint folder or file.
        path: PathBuf,
        /// What does not fit: expected vs found.
        message: String,
    },
    /// A plot could not be drawn.
    #[error("plot {}: {message}", path.display())]
    Plot {
        /// The PNG file.
        path: PathBuf,
        /// The drawing error.
        message: String,
    },
    /// A JSON file could not be written or read.
    #[error("{}: {message}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The serde error.
        message: String,
    },
    /// Data-parallel training: a peer closed its connection (it stopped or died), so
    /// every rank stops; restart them all with `--resume`.
    #[error(
        "data-parallel rank {rank}: rank {peer} closed the connection during {during} (it \
         stopped or died); every rank stops: restart all of them with --resume"
    )]
    PeerLost {
        /// This process's rank.
        rank: usize,
        /// The rank that went away.
        peer: usize,
        /// What was being exchanged (`handshake`, `stage experts step 3`).
        during: String,
    },
    /// Data-parallel training: a peer sent nothing within the timeout.
    #[error(
        "data-parallel rank {rank}: rank {peer} sent nothing for {secs} s during {during} \
         (`[distributed] timeout_s`); every rank stops: restart all of them with --resume"
    )]
    PeerTimeout {
        /// This process's rank.
        rank: usize,
        /// The silent rank.
        peer: usize,
        /// What was being exchanged.
        during: String,
        /// The timeout.
        secs: f64,
    },
    /// Data-parallel training: a peer is not running the same thing (another world
    /// size, run file, stage, step or parameter count).
    #[error(
        "data-parallel rank {rank}: rank {peer} differs in {what}: expected {expected}, found \
         {found}"
    )]
    PeerMismatch {
        /// This process's rank.
        rank: usize,
        /// The other rank.
        peer: usize,
        /// What differs.
        what: String,
        /// This side's value.
        expected: String,
        /// The other side's.
        found: String,
    },
    /// Data-parallel training: the coordinator address could not be bound or reached.
    #[error("data-parallel rank {rank}: coordinator {addr}: {message}")]
    Coordinator {
        /// This process's rank.
        rank: usize,
        /// The `host:port` given.
        addr: String,
        /// What failed.
        message: String,
    },
    /// An argument outside its domain (e.g. an empty validation set with early stopping).
    #[error("invalid value for `{key}`: expected {expected}, found {found}")]
    Invalid {
        /// Option name.
        key: String,
        /// What would be accepted.
        expected: String,
        /// What was given.
        found: String,
    },
}

fn location(file: &Path, line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("{}:{l}:{c}", file.display()),
        (Some(l), None) => format!("{}:{l}", file.display()),
        _ => file.display().to_string(),
    }
}

/// `Result` with [`TrainError`].
pub type Result<T> = std::result::Result<T, TrainError>;

impl TrainError {
    /// Wrap an I/O error with its path.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// Shorthand for [`TrainError::Invalid`].
    pub fn invalid(
        key: impl Into<String>,
        expected: impl Into<String>,
        found: impl std::fmt::Display,
    ) -> Self {
        Self::Invalid {
            key: key.into(),
            expected: expected.into(),
            found: found.to_string(),
        }
    }

    /// Shorthand for [`TrainError::Checkpoint`].
    pub fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }
}
