//! The trainer: recipes, the LongCat-Flash model, the optimizer and the training loop.
//! It owns what one rank computes; launching ranks and moving tokens between them live
//! elsewhere (launcher, kernels).

pub mod bias_control;
pub mod checkpoint;
pub mod engine;
pub mod exit;
pub mod export;
pub mod groups;
pub mod growth;
pub mod losses;
pub(crate) mod metrics;
pub mod model;
pub mod optim;
pub mod recipe;
pub mod router_metrics;
pub mod sizing;
pub mod supervision;
pub mod tensorboard;
pub mod train;
pub mod transfer;

pub use exit::exit_code;
pub use recipe::{Override, Recipe, RecipeError};
pub use train::{train, RunOptions, RunSummary, TrainError};
