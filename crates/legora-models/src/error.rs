//! The one error type of `legora-models`.

use legora_nn::NnError;

/// Everything that can go wrong when building, adapting or running a model.
///
/// Variants name the config key, the HF tensor name or the module path involved,
/// with the expected and the found value.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `model_type` is not a family legora implements.
    #[error("unknown model_type \"{found}\": legora implements {supported:?}")]
    UnknownModelType {
        /// The `model_type` of config.json.
        found: String,
        /// The families legora knows.
        supported: Vec<&'static str>,
    },
    /// A config.json field holds a value outside its domain.
    #[error("config.json: invalid `{field}`: expected {expected}, found {found}")]
    InvalidConfig {
        /// The config.json key (HF spelling).
        field: String,
        /// What would have been accepted.
        expected: String,
        /// What was given.
        found: String,
    },
    /// A config option that transformers knows but legora does not implement.
    #[error("config.json: unsupported `{field}` = {found}: {reason}")]
    Unsupported {
        /// The config key.
        field: String,
        /// The given value.
        found: String,
        /// Why, and what to do instead.
        reason: String,
    },
    /// A weight the architecture needs is not in the checkpoint.
    #[error("missing tensor `{tensor}`")]
    MissingTensor {
        /// HF tensor name, e.g. `model.layers.0.self_attn.q_proj.weight`.
        tensor: String,
    },
    /// A weight with the wrong shape.
    #[error("tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// HF tensor name.
        tensor: String,
        /// The shape config.json implies.
        expected: Vec<usize>,
        /// The shape in the checkpoint.
        found: Vec<usize>,
    },
    /// The weight source (a file reader) failed on one tensor.
    #[error("cannot read tensor `{tensor}`: {source}")]
    Weights {
        /// HF tensor name.
        tensor: String,
        /// The reader's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No module of the model matched an adapter's `target_modules`.
    #[error(
        "adapter `{adapter}`: target_modules {target_modules} match no module of this model \
         (its adapter slots are {slots})"
    )]
    NoTargetMatched {
        /// Adapter name.
        adapter: String,
        /// `target_modules` as JSON.
        target_modules: String,
        /// The model's slot names, space-separated (`q_proj k_proj ... lm_head`).
        slots: String,
    },
    /// A LoRA rank larger than the module it adapts (`r` > max(out, in)).
    #[error(
        "`{module}`: LoRA rank r = {r} is larger than the module ({in_features} -> \
         {out_features}): expected r <= the larger of the two"
    )]
    RankTooLarge {
        /// Module path.
        module: String,
        /// The rank asked for.
        r: usize,
        /// The module's input width.
        in_features: usize,
        /// The module's output width.
        out_features: usize,
    },
    /// A module path that is not an adapter slot of the model.
    #[error("`{path}` is not an adapter slot of this model")]
    UnknownModule {
        /// The module path asked for.
        path: String,
    },
    /// Bad input to a forward or generate call.
    #[error("invalid input: {0}")]
    Input(String),
    /// An operation that is not valid in the model's current state.
    #[error("{0}")]
    InvalidState(String),
    /// An error from a legora-nn layer, with the module path it happened in.
    #[error("{path}: {source}")]
    Layer {
        /// Module path (e.g. `model.layers.1.mlp.up_proj`).
        path: String,
        /// The layer's error (boxed: keeps `ModelError` small).
        source: Box<NnError>,
    },
}

/// `Result` with [`ModelError`].
pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    /// Shorthand for [`ModelError::InvalidConfig`].
    pub fn config(
        field: impl Into<String>,
        expected: impl Into<String>,
        found: impl std::fmt::Display,
    ) -> Self {
        Self::InvalidConfig {
            field: field.into(),
            expected: expected.into(),
            found: found.to_string(),
        }
    }

    /// Shorthand for [`ModelError::Unsupported`].
    pub fn unsupported(
        field: impl Into<String>,
        found: impl std::fmt::Display,
        reason: impl Into<String>,
    ) -> Self {
        Self::Unsupported {
            field: field.into(),
            found: found.to_string(),
            reason: reason.into(),
        }
    }

    /// Wrap a layer error with its module path.
    pub fn layer(path: impl std::fmt::Display) -> impl FnOnce(NnError) -> Self {
        let path = path.to_string();
        move |source| Self::Layer {
            path,
            source: Box::new(source),
        }
    }
}
