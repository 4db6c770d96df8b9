//! The trainer's errors: each names what failed (file, field, rank) and how to fix it,
//! and says whether it is bad input (the user must change a recipe, an argument or a
//! path: exit code 2) or a failure at run time (exit code 1).

use catapult_checkpoints::ShardError;
use catapult_data::DataError;
use std::path::PathBuf;

/// Errors of a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The recipe does not fit this machine, this world of ranks or this dataset.
    #[error("{0}")]
    Recipe(String),
    /// The world of ranks cannot be laid out as the recipe's `parallel` section asks.
    #[error("{recipe}: {source}")]
    Layout {
        /// The recipe's name.
        recipe: String,
        /// What does not divide.
        source: crate::parallel::LayoutError,
    },
    /// A run directory or checkpoint root that is not free for this run.
    #[error("{0}")]
    Occupied(String),
    /// The checkpoint named to resume from does not exist or does not fit the recipe.
    #[error("{0}")]
    Checkpoint(String),
    /// Stacking a checkpoint's layers for a growth schedule failed.
    #[error(transparent)]
    Growth(#[from] GrowthError),
    /// Reading the dataset failed.
    #[error(transparent)]
    Data(#[from] catapult_data::DataError),
    /// Writing outputs failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Writing the final checkpoint failed.
    #[error(transparent)]
    Export(#[from] catapult_checkpoints::CheckpointError),
    /// Saving or loading a sharded checkpoint failed.
    #[error(transparent)]
    Shard(#[from] catapult_checkpoints::ShardError),
    /// A collective failed (MPI initialization, an NCCL call, an exchange).
    #[error(transparent)]
    Comm(#[from] catapult_kernels::CommError),
    /// libtorch could not allocate what the run needs (the memory check did not foresee it).
    #[error("{0}")]
    Allocation(String),
    /// A silent-data-corruption check found a rank computing different gradients twice.
    #[error("{0}")]
    Corruption(String),
    /// A step's loss, gradient norm or learning rate, or a checkpoint's weights, are not
    /// finite.
    #[error("{0}")]
    NonFinite(String),
    /// Another rank failed; its own message says why.
    #[error("rank {ranks} failed to start; its message above says why")]
    Peer {
        /// The ranks that failed, comma-separated.
        ranks: String,
        /// Whether a failed rank's error was bad input.
        bad_input: bool,
    },
}

/// A growth that cannot be done; each names what to change.
#[derive(Debug, thiserror::Error)]
pub enum GrowthError {
    /// The target recipe is not the source deepened by the factor.
    #[error("{0}")]
    Target(String),
    /// The source checkpoint cannot be grown.
    #[error("{0}")]
    Source(String),
}

impl TrainError {
    /// Whether the user must change the recipe, an argument or a path (exit code 2).
    pub fn is_bad_input(&self) -> bool {
        match self {
            TrainError::Recipe(_)
            | TrainError::Layout { .. }
            | TrainError::Occupied(_)
            | TrainError::Checkpoint(_)
            | TrainError::Growth(_) => true,
            TrainError::Peer { bad_input, .. } => *bad_input,
            TrainError::Data(e) => data_is_bad_input(e),
            TrainError::Shard(e) => shard_is_bad_input(e),
            TrainError::Io { .. }
            | TrainError::Export(_)
            | TrainError::Comm(_)
            | TrainError::Allocation(_)
            | TrainError::Corruption(_)
            | TrainError::NonFinite(_) => false,
        }
    }
}

/// A dataset that is not there, has no usable column or tokenizer, or a data state that
/// does not fit the recipe; reading failures (I/O, a store, a broken parquet file) are
/// run time.
pub fn data_is_bad_input(e: &DataError) -> bool {
    match e {
        DataError::Io { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
        DataError::Store { .. } | DataError::Parquet { .. } => false,
        _ => true,
    }
}

/// A location that holds no usable checkpoint; a corrupt one is run time (a fallback
/// may find an older one).
pub fn shard_is_bad_input(e: &ShardError) -> bool {
    match e {
        ShardError::Invalid { .. } => true,
        ShardError::Store(d) => data_is_bad_input(d),
        _ => false,
    }
}
