//! The data pipeline: parquet shards of documents in, packed token sequences out.
//!
//! This crate yields token ids and document boundaries and knows nothing about tensors
//! or devices (it does not link libtorch). Its pieces: `store` reaches local files and
//! object stores, `Dataset` streams row groups of parquet shards, `Tokenizer` maps text to
//! ids, `Pipeline` packs, mixes and orders sequences deterministically and resumably
//! (`DataState`), and `prepare` turns text files into shards with a `dataset.json` index.

mod dataset;
pub mod line;
mod order;
mod pipeline;
mod prepare;
mod store;
mod tokenizer;

pub use dataset::{
    Column, Dataset, DatasetIndex, DatasetSpec, Documents, IndexShard, Split, INDEX_FILE,
};
pub use order::SplitMix64;
pub use pipeline::{
    Batch, BlockState, DataState, Phase, Pipeline, PipelineConfig, Position, StreamState, SubState,
    ValidationSet,
};
pub use prepare::{
    prepare, DocumentSplit, PrepareOptions, PrepareSummary, ShardSize, ShardSizeError,
};
pub use store::{Location, StorageOptions};
pub use tokenizer::{train_bpe, ByteTokenizer, Tokenizer, END_OF_TEXT};

/// Whether document `index` (its global row in the dataset) is held out for validation.
/// A hash of the index, not of the seed, so the split stays the same when the seed
/// changes.
pub fn is_validation_document(index: usize, valid_fraction: f64) -> bool {
    let h = SplitMix64::new(index as u64 ^ 0x005e_ed0f_da7a).next_u64();
    (h as f64 / u64::MAX as f64) < valid_fraction
}

/// Errors of the data pipeline; each names the file, column or setting involved and the fix.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Local filesystem failure on a named path.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An object store (or local file) could not be listed, read or written.
    #[error("{location}: {reason}")]
    Store {
        /// The object or prefix.
        location: String,
        /// What failed and what to check.
        reason: String,
    },
    /// A parquet file that cannot be read or written.
    #[error(
        "{location}: not a readable parquet file ({reason}); re-create it with `catapult data prepare`"
    )]
    Parquet {
        /// The shard.
        location: String,
        /// What the parquet reader said.
        reason: String,
    },
    /// The column is absent or has the wrong type.
    #[error("{location}: {problem}; set data.text_column (or data.tokens_column) to a column the shards have")]
    Column {
        /// The shard.
        location: String,
        /// What is wrong with the column.
        problem: String,
    },
    /// A dataset.json that cannot be used.
    #[error("{location}: {problem}")]
    Index {
        /// The index file.
        location: String,
        /// What is wrong.
        problem: String,
    },
    /// Nothing to train on.
    #[error("{location}: {problem}")]
    Empty {
        /// The dataset location.
        location: String,
        /// What is missing and how to make it.
        problem: String,
    },
    /// A tokenizer that cannot be loaded or used.
    #[error("tokenizer {path}: {problem}")]
    Tokenizer {
        /// The tokenizer.json (or `bytes`).
        path: String,
        /// What is wrong and the fix.
        problem: String,
    },
    /// A data state that does not fit this pipeline.
    #[error("data state: {problem}")]
    State {
        /// What is wrong.
        problem: String,
    },
    /// A pipeline setting that cannot work.
    #[error("data: {problem}")]
    Config {
        /// What is wrong.
        problem: String,
    },
    /// An output that already holds files, without `--overwrite`.
    #[error(
        "{location}: already holds {count} file(s) ({first}, ...); pass --overwrite to replace \
         what is there (stale shards are removed once the new index is written), or choose an \
         empty output"
    )]
    Occupied {
        /// The output.
        location: String,
        /// Files found there.
        count: usize,
        /// The first of them.
        first: String,
    },
}
