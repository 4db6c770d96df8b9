//! The data pipeline: parquet shards of documents in, fixed-length token sequences out.
//!
//! This crate yields token ids and knows nothing about tensors, devices or ranks (it
//! does not link libtorch). Its pieces: `prepare` turns text files into parquet shards,
//! `corpus` reads them back, `ByteTokenizer` maps text to ids, `PackedSequences` packs
//! documents into training sequences, and `SequenceOrder` shuffles them deterministically.

mod corpus;
mod order;
mod pack;
mod prepare;
mod tokenizer;

pub use corpus::{read_documents, shard_paths};
pub use order::{SequenceOrder, SplitMix64};
pub use pack::{is_validation_document, PackedSequences, Split};
pub use prepare::{prepare, DocumentSplit, PrepareOptions, PrepareSummary};
pub use tokenizer::ByteTokenizer;

use std::path::PathBuf;

/// Errors of the data pipeline; each names the file or column involved and the fix.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Filesystem failure on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A parquet file that cannot be read or written.
    #[error(
        "{path}: not a readable parquet file ({reason}); re-create it with `catapult data prepare`"
    )]
    Parquet {
        /// The shard.
        path: PathBuf,
        /// What the parquet reader said.
        reason: String,
    },
    /// The text column is absent or not a string column.
    #[error("{path}: {problem}; set data.text_column to the name of a string column")]
    Column {
        /// The shard.
        path: PathBuf,
        /// What is wrong with the column.
        problem: String,
    },
    /// Nothing to train on.
    #[error("{path}: {problem}")]
    Empty {
        /// The dataset path.
        path: PathBuf,
        /// What is missing and how to make it.
        problem: String,
    },
}
