//! The labeling app's errors; the API maps each to a status (`routes`).

use std::path::{Path, PathBuf};

/// Errors of the labeling app; the API maps each to a status.
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error("{}: {cause}", path.display())]
    Db {
        path: PathBuf,
        cause: rusqlite::Error,
    },
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A bad file row: the file, its 1-based line and what is wrong.
    #[error("{}:{line}: {msg}", path.display())]
    Input {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    /// A bad value in a request or a setting.
    #[error("{0}")]
    Invalid(String),
    /// A request field with a bad value.
    #[error("{field}: {msg}")]
    Field { field: String, msg: String },
    /// A request that clashes with what is stored (not assigned, already labeled).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    /// The file holds something this code did not write.
    #[error("corrupt database: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Rlhf(#[from] crate::Error),
}

impl LabelError {
    pub(super) fn db(path: &Path, cause: rusqlite::Error) -> Self {
        LabelError::Db {
            path: path.to_path_buf(),
            cause,
        }
    }

    pub(super) fn input(path: &Path, line: usize, msg: impl Into<String>) -> Self {
        LabelError::Input {
            path: path.to_path_buf(),
            line,
            msg: msg.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, LabelError>;
