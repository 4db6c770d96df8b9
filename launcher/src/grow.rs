//! `catapult grow --from CKPT --recipe DEEP -o OUT`: builds a deeper model's checkpoint by
//! stacking a trained one's layers (model growth), into an empty checkpoint root, and
//! says how to continue training from it.

use crate::{OverrideArgs, UsageError};
use catapult_checkpoints::Checkpoints;
use catapult_trainer::growth::{grow, OptimizerInit};
use std::path::PathBuf;

/// Arguments of `catapult grow`.
#[derive(clap::Args)]
pub struct GrowArgs {
    /// The trained model: a checkpoint step directory, or a checkpoint root (its newest
    /// valid checkpoint).
    #[arg(long = "from")]
    pub from: String,
    /// The target recipe: the source's model with `factor` times the layers.
    #[arg(long)]
    pub recipe: PathBuf,
    #[command(flatten)]
    pub overrides: OverrideArgs,
    /// Stack the layers this many times.
    #[arg(long, default_value_t = 2)]
    pub factor: usize,
    /// Optimizer state of the grown model: `copy` (stacked like the weights) or `fresh`.
    #[arg(long, default_value = "copy")]
    pub optimizer: OptimizerInit,
    /// Checkpoint root to write the grown checkpoint into (it must hold no checkpoint,
    /// unless --overwrite).
    #[arg(short, long)]
    pub output: String,
    /// Replace the checkpoints the output holds: they are removed only once the grown
    /// checkpoint is built in memory, just before it is written.
    #[arg(long)]
    pub overwrite: bool,
}

pub fn run(args: GrowArgs) -> Result<(), crate::Failure> {
    let target = crate::load_recipe(&args.recipe, &args.overrides)?;
    // Checked first (read-only); replaced only once the grown checkpoint is built.
    let out = Checkpoints::open(&args.output, &Default::default())?;
    let occupied = out.steps()?;
    if let (Some(newest), false) = (occupied.last(), args.overwrite) {
        return Err(UsageError::new(format!(
            "{}: already holds checkpoints (newest step {newest}); write the grown model to an \
             empty location, or pass --overwrite to replace them",
            out.root()
        ))
        .into());
    }
    let (store, step) = Checkpoints::open_path(&args.from, &Default::default())?;
    let loaded = match step {
        Some(s) => store.load(s, true)?,
        None => store.load_newest(true, false)?.ok_or_else(|| {
            UsageError::new(format!(
                "{}: holds no checkpoint to grow from; train the smaller model with \
                     checkpoint.every set, or name a step directory",
                store.root()
            ))
        })?,
    };
    let request =
        grow(&loaded, &target, args.factor, args.optimizer).map_err(|e| crate::Failure {
            code: 2,
            error: anyhow::anyhow!("{}: {e}", args.recipe.display()),
        })?;
    if !occupied.is_empty() {
        let removed = out.clear()?;
        eprintln!(
            "--overwrite: removed {} old checkpoint(s) from {}",
            removed.len(),
            out.root()
        );
    }
    let manifest = out.save(request)?;
    println!(
        "grew {} ({} layers) to {} layers at step {} ({} tokens): {}/{}",
        loaded.location,
        target.model.num_layers / args.factor,
        target.model.num_layers,
        manifest.step,
        manifest.tokens,
        out.root(),
        catapult_checkpoints::step_dir(manifest.step)
    );
    println!(
        "continue with: catapult train {} --resume {}/{}",
        args.recipe.display(),
        out.root(),
        catapult_checkpoints::step_dir(manifest.step)
    );
    Ok(())
}
