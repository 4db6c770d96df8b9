//! The trainer: recipes, the LongCat-Flash model, the parallel mesh and its schedule, the
//! optimizer, checkpoints of a run's state, and the training loop. It owns what one rank
//! computes; launching ranks lives in the launcher, tensor-level collectives and token
//! movement in kernels.
//!
//! Rooms, in the order a step uses them: `recipe` (what to train), `init` and `model`
//! (the LongCat-Flash model, parallelism-free), `parallel` (the mesh, the segmented
//! schedule, gradient reductions), `batch` and `losses`, `optim`, `bias_control`,
//! `train` (the loop and its parts), `checkpoint` (a run's saved state), `metrics` and
//! `tensorboard`, `supervision` (the launcher contract), `growth` and `transfer` (the
//! methods of sections 7-8), `sizing` (the dry run's arithmetic), `export`, and
//! `error`/`exit` (what failed and the exit code it maps to).

pub mod batch;
pub mod bias_control;
pub mod checkpoint;
pub mod device;
pub mod error;
pub mod exit;
pub mod export;
pub mod fit;
pub mod groups;
pub mod growth;
pub mod init;
pub mod losses;
pub(crate) mod metrics;
pub mod model;
pub mod optim;
pub mod parallel;
pub mod planner;
pub mod recipe;
pub mod router_metrics;
pub mod sizing;
pub mod supervision;
pub mod tensorboard;
pub mod train;
pub mod transfer;

pub use error::TrainError;
pub use exit::exit_code;
pub use recipe::{Override, Recipe, RecipeError};
pub use train::{train, RunOptions, RunSummary};
