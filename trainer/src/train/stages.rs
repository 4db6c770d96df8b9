//! Growth schedules (longcat-methods section 8): a recipe with `growth` trains its first
//! stage (`<run>/stage1`, `from_layers` layers) until `until_tokens`, stacks that model
//! into the run's own checkpoint root at that step, and trains the rest of the run from
//! it. A resumed run continues in whichever stage it stopped; every rank takes part,
//! rank 0 writes the grown checkpoint.

use super::agree::agree;
use super::options::{RunOptions, RunSummary};
use super::trainer::train_stage;
use crate::checkpoint::Resume;
use crate::error::TrainError;
use crate::parallel::Parallel;
use crate::recipe::{GrowthConfig, Recipe};
use catapult_checkpoints::Checkpoints;
use std::path::PathBuf;
use tch::Device;

/// Removes a start-over run's outputs of the grown stage (rank 0, with `--overwrite`).
fn clear_grown_stage(recipe: &Recipe, grown_exists: bool) -> Result<(), TrainError> {
    let run = recipe.run_dir();
    let mut stale: Vec<PathBuf> = vec![run.join("metrics.jsonl"), run.join("tensorboard")];
    if grown_exists && recipe.checkpoint.dir.is_none() {
        stale.push(run.join("checkpoints"));
    }
    for path in stale {
        let gone = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if let Err(source) = gone {
            if source.kind() != std::io::ErrorKind::NotFound {
                return Err(TrainError::Io { path, source });
            }
        }
    }
    Ok(())
}

/// Stacks the first stage's checkpoint at `at` into `store` (rank 0 only).
fn grow_into(
    recipe: &Recipe,
    g: &GrowthConfig,
    first: &RunSummary,
    at: usize,
    store: &Checkpoints,
) -> Result<(), TrainError> {
    let (s1, _) = Checkpoints::open_path(
        &first.checkpoint.display().to_string(),
        &recipe.checkpoint.storage.options(),
    )?;
    let loaded = s1.load(at as u64, true)?;
    let factor = recipe.model.num_layers / g.from_layers;
    let request = crate::growth::grow(&loaded, recipe, factor, g.optimizer)?;
    let manifest = store.save(request)?;
    catapult_data::log_line!(
        "grew {} layers to {} at step {} ({} tokens; optimizer state {:?})",
        g.from_layers,
        recipe.model.num_layers,
        manifest.step,
        manifest.tokens,
        g.optimizer
    );
    Ok(())
}

/// Runs a recipe with a growth schedule: stage 1, growth, then the grown run.
pub(super) fn train_growing(
    recipe: &Recipe,
    opts: &RunOptions,
    par: &Parallel,
    device: Device,
) -> Result<RunSummary, TrainError> {
    let g = recipe
        .growth
        .as_ref()
        .expect("train_growing runs recipes with a growth schedule");
    let store = Checkpoints::open(
        &recipe.checkpoint_root(),
        &recipe.checkpoint.storage.options(),
    )?;
    let grown = store.steps()?;
    if opts.resume.is_some() && !grown.is_empty() {
        return train_stage(recipe, opts, par, device, None);
    }
    if !grown.is_empty() && !opts.overwrite {
        return Err(TrainError::Occupied(format!(
            "{} already holds checkpoints; pass --resume to continue the run, or --overwrite to start over",
            store.root()
        )));
    }
    let stage1 = crate::growth::stage1_recipe(recipe)
        .expect("a recipe with a growth schedule has a first stage");
    let lead = par.world.rank() == 0;
    // The grown model is the larger one: refuse it before an overwrite removes anything.
    crate::fit::check(recipe, device, par.world.size())?;
    if lead && opts.overwrite {
        // Start over: the grown stage's outputs of an earlier run go too.
        clear_grown_stage(recipe, !grown.is_empty())?;
    }
    let first = train_stage(&stage1, opts, par, device, Some(g.until_tokens))?;
    let Some(at) = first.preempted_at else {
        return Err(TrainError::Recipe(format!(
            "{}: the first stage reached its last step before growth.until_tokens = {}; \
             lower growth.until_tokens below the run's tokens (data phases may shorten \
             sequences)",
            recipe.name, g.until_tokens
        )));
    };
    if !first.reached_tokens {
        // Preempted during the first stage: its checkpoint is written; a resumed run
        // continues it.
        return Ok(first);
    }
    let made = if lead {
        grow_into(recipe, g, &first, at, &store)
    } else {
        Ok(())
    };
    agree(&par.world, made)?;
    let resume = RunOptions {
        overwrite: false,
        resume: Some(Resume::Path(format!(
            "{}/{}",
            store.root(),
            catapult_checkpoints::step_dir(at as u64)
        ))),
        ..opts.clone()
    };
    let mut summary = train_stage(recipe, &resume, par, device, None)?;
    summary.first_val_loss = first.first_val_loss;
    Ok(summary)
}
