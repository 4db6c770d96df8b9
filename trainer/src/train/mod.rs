//! The training loop and its rooms. `train` (here) lays out the mesh and runs the
//! recipe, through its growth stages when it has a schedule. The loop itself reads like
//! the method (`trainer::Trainer::run`): get batch -> micro-steps -> reduce -> clip ->
//! optimizer step -> expert-bias update -> log -> evaluate -> checkpoint.
//!
//! The loop composes pieces that each own their state and live in their own rooms:
//! the model (`init`, `model`), the mesh and its schedule (`parallel`), `AdamW`, the
//! expert-bias controller, the data pipeline, checkpoints (`checkpoint`), supervision
//! (`supervision`). Here: opening a run (`open`), one step's micro-batches (`step`), the
//! silent-data-corruption replay (`sdc`), the metrics lines (`line`), validation
//! (`eval`), saving (`save`), growth schedules (`stages`) and the options (`options`).
//! Submodules use their siblings, never this file.

mod agree;
mod eval;
mod guard;
mod line;
mod open;
mod options;
mod save;
mod sdc;
mod stages;
mod step;
mod trainer;

pub use options::{RunOptions, RunSummary};

use crate::error::TrainError;
use crate::parallel::{LayoutError, Parallel};
use crate::recipe::{Backend, Recipe, ShardMode};
use catapult_kernels::comm::Comm;
use tch::Device;

/// Trains `recipe` to the end and writes the run directory. A libtorch failure (an
/// allocation the memory check did not foresee) is an error, never a panic.
pub fn train(recipe: &Recipe, opts: &RunOptions) -> Result<RunSummary, TrainError> {
    crate::fit::without_panic(&recipe.name, || train_unguarded(recipe, opts))?
}

fn train_unguarded(recipe: &Recipe, opts: &RunOptions) -> Result<RunSummary, TrainError> {
    let device = crate::device::device_for(recipe)?;
    if recipe.system.threads > 0 {
        tch::set_num_threads(recipe.system.threads as i32);
    }
    // The MPI world (or a world of one), split into expert-parallel groups: every rank
    // reads its own slice of each global batch and holds the dense parameters and its
    // group's share of the experts.
    let p = &recipe.parallel;
    let nccl = match (p.backend, device) {
        (Backend::Nccl, _) | (Backend::Auto, Device::Cuda(_)) => Some(device),
        _ => None,
    };
    let world = Comm::from_env()?.fast_reductions(p.fast_reductions);
    let layout = |source| TrainError::Layout {
        recipe: recipe.name.clone(),
        source,
    };
    let par = Parallel::with_nccl(world, p.expert, p.data, p.overlap, nccl).map_err(layout)?;
    if p.shard != ShardMode::None && par.world.size() == 1 {
        return Err(layout(LayoutError::ShardAlone {
            mode: p.shard.name().into(),
        }));
    }
    if recipe.growth.is_some() {
        stages::train_growing(recipe, opts, &par, device)
    } else {
        trainer::train_stage(recipe, opts, &par, device, None)
    }
}
