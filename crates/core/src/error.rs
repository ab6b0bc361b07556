//! One error type for loading and running models. Each variant names what was wrong (a config
//! field, a tensor, a file) so that a user can act on it without reading the code.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config.json field is missing, of the wrong type, or inconsistent with another field.
    #[error("config field `{field}`: {message}")]
    Config { field: String, message: String },

    /// A weight tensor is missing, has the wrong shape or dtype, or its bytes are truncated.
    #[error("tensor `{tensor}`: {message}")]
    Tensor { tensor: String, message: String },

    /// A file could not be read or parsed.
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },

    /// A model id or path that could not be resolved to files on disk.
    #[error("model `{0}` not found: {1}")]
    ModelNotFound(String, String),

    /// Tokenizer or chat template failures.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),

    /// Something the caller asked for that the model or backend cannot do.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// A backend failure (out of memory, device error, ...).
    #[error("backend: {0}")]
    Backend(String),
}

impl Error {
    pub fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config { field: field.into(), message: message.into() }
    }
    pub fn tensor(tensor: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Tensor { tensor: tensor.into(), message: message.into() }
    }
    pub fn file(path: impl Into<PathBuf>, message: impl std::fmt::Display) -> Self {
        Error::File { path: path.into(), message: message.to_string() }
    }
}
