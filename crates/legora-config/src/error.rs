//! The one error type of `legora-config`.

/// A setting outside its domain, or one legora does not implement.
///
/// Each variant names the key with PEFT / MixLoRA spelling and the found value.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ConfigError {
    /// A configuration field holds a value outside its domain.
    #[error("invalid value for `{field}`: expected {expected}, found {found}")]
    InvalidConfig {
        /// The config key (e.g. `lora_dropout`).
        field: String,
        /// What would have been accepted.
        expected: String,
        /// What was given.
        found: String,
    },
    /// An option that PEFT knows but legora does not implement (yet).
    #[error("unsupported option `{field}` = {found}: {reason}")]
    Unsupported {
        /// The config key.
        field: String,
        /// The given value.
        found: String,
        /// Why, and what to use instead.
        reason: String,
    },
}

/// `Result` with [`ConfigError`].
pub type Result<T> = std::result::Result<T, ConfigError>;

impl ConfigError {
    /// Shorthand for [`ConfigError::InvalidConfig`].
    pub fn invalid(
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

    /// Shorthand for [`ConfigError::Unsupported`].
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

    /// The key the error is about.
    pub fn field(&self) -> &str {
        match self {
            Self::InvalidConfig { field, .. } | Self::Unsupported { field, .. } => field,
        }
    }

    /// The message without the key (`expected …, found …` or the unsupported reason),
    /// for callers that print the key themselves (run-file errors with a line number).
    pub fn message(&self) -> String {
        match self {
            Self::InvalidConfig {
                expected, found, ..
            } => format!("expected {expected}, found {found}"),
            Self::Unsupported { found, reason, .. } => {
                format!("unsupported value {found}: {reason}")
            }
        }
    }
}
