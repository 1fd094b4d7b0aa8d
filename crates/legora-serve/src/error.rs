//! The crate's error type, and its mapping to HTTP statuses and OpenAI error objects.

use std::path::PathBuf;

/// Errors of the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Loading a model, adapter or mixture folder failed.
    #[error(transparent)]
    Hub(#[from] legora_hub::HubError),
    /// The model refused an input or a change.
    #[error(transparent)]
    Model(#[from] legora_models::ModelError),
    /// A layer refused a change (e.g. an expert's shapes).
    #[error(transparent)]
    Nn(#[from] legora_nn::NnError),
    /// A request field is missing, of the wrong type or out of range.
    #[error("{0}")]
    Invalid(String),
    /// A model or adapter that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// No or a wrong API key.
    #[error("{0}")]
    Unauthorized(String),
    /// A request body over the size cap.
    #[error("{0}")]
    TooLarge(String),
    /// A name already taken.
    #[error("{0}")]
    Conflict(String),
    /// A path outside every `--adapter-dir`.
    #[error("{path}: {reason}")]
    Forbidden {
        /// The path asked for.
        path: PathBuf,
        /// Why it is refused.
        reason: String,
    },
    /// The queue or a memory cap is full.
    #[error("{0}")]
    Busy(String),
    /// The engine thread stopped.
    #[error("the engine has stopped")]
    EngineStopped,
    /// Binding or serving the socket failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, ServeError>;

impl ServeError {
    /// The HTTP status and OpenAI error `type` of this error.
    pub fn status(&self) -> (u16, &'static str) {
        match self {
            ServeError::Invalid(_) | ServeError::Model(_) | ServeError::Nn(_) => {
                (400, "invalid_request_error")
            }
            ServeError::Hub(_) => (400, "invalid_request_error"),
            ServeError::NotFound(_) => (404, "not_found_error"),
            ServeError::Unauthorized(_) => (401, "invalid_request_error"),
            ServeError::TooLarge(_) => (413, "invalid_request_error"),
            ServeError::Conflict(_) => (409, "invalid_request_error"),
            ServeError::Forbidden { .. } => (403, "permission_error"),
            ServeError::Busy(_) => (429, "rate_limit_error"),
            ServeError::EngineStopped | ServeError::Io { .. } => (500, "server_error"),
        }
    }
}
