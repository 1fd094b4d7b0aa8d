//! The one error type of `legora-nn`.

use legora_config::ConfigError;

/// Everything that can go wrong when building or running legora's layers.
///
/// Each variant names the offending field, adapter or tensor together with the
/// expected and the found value, so a message can be acted on without a debugger.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum NnError {
    /// A setting outside its domain, or one legora does not implement.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A tensor did not have the shape the layer needs.
    #[error("shape mismatch for `{tensor}`: expected {expected:?}, found {found:?}")]
    ShapeMismatch {
        /// Which tensor (PEFT/HF name where there is one).
        tensor: String,
        /// The required shape.
        expected: Vec<usize>,
        /// The shape given.
        found: Vec<usize>,
    },
    /// An adapter name that the layer does not hold.
    #[error("unknown adapter `{name}` (the layer has: {available:?})")]
    UnknownAdapter {
        /// The name asked for.
        name: String,
        /// The names the layer holds.
        available: Vec<String>,
    },
    /// An adapter name used twice.
    #[error("adapter `{name}` already exists")]
    DuplicateAdapter {
        /// The name.
        name: String,
    },
    /// An operation that is not valid in the layer's current state.
    #[error("{0}")]
    InvalidState(String),
}

/// `Result` with [`NnError`].
pub type Result<T> = std::result::Result<T, NnError>;

impl NnError {
    /// Shorthand for [`ConfigError::InvalidConfig`].
    pub fn config(
        field: impl Into<String>,
        expected: impl Into<String>,
        found: impl std::fmt::Display,
    ) -> Self {
        Self::Config(ConfigError::invalid(field, expected, found))
    }

    /// Shorthand for [`NnError::ShapeMismatch`].
    pub fn shape(tensor: impl Into<String>, expected: &[usize], found: &[usize]) -> Self {
        Self::ShapeMismatch {
            tensor: tensor.into(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        }
    }
}
