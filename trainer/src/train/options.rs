//! What a run is asked beyond its recipe (`RunOptions`) and what it reports back
//! (`RunSummary`).

use crate::checkpoint::{LoadPolicy, Resume};
use std::path::PathBuf;

/// How `train` behaves beyond the recipe.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Replace an existing run directory's outputs instead of refusing.
    pub overwrite: bool,
    /// Continue from a checkpoint.
    pub resume: Option<Resume>,
    /// Skip the BLAKE3 check of checkpoint files on load.
    pub no_verify: bool,
    /// Fail instead of falling back to an earlier checkpoint when the newest is broken.
    pub no_fallback: bool,
}

impl RunOptions {
    /// How checkpoints are read.
    pub fn load_policy(&self) -> LoadPolicy {
        LoadPolicy {
            verify: !self.no_verify,
            fallback: !self.no_fallback,
        }
    }
}

/// Where a finished run put its outputs.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The final checkpoint directory.
    pub checkpoint: PathBuf,
    /// The JSON-lines metrics file.
    pub metrics: PathBuf,
    /// Validation loss before the first step.
    pub first_val_loss: f64,
    /// Validation loss after the last step.
    pub last_val_loss: f64,
    /// This process's rank (only rank 0 writes the run directory).
    pub rank: usize,
    /// The run stopped early on a preemption request, after saving a checkpoint at this
    /// step (None: it ran to the end).
    pub preempted_at: Option<usize>,
    /// The stop was the first stage of a growth schedule reaching its token count.
    pub reached_tokens: bool,
}
