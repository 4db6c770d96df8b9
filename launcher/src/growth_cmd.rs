//! `catapult transfer RECIPE`: the per-group hyperparameters that width transfer derives;
//! `catapult grow`: a deeper model's checkpoint stacked from a trained one.

use crate::OverrideArgs;
use anyhow::Context;
use catapult_checkpoints::Checkpoints;
use catapult_trainer::growth::{grow, OptimizerInit};
use catapult_trainer::transfer::table;
use std::path::PathBuf;

/// Arguments of `catapult transfer`.
#[derive(clap::Args)]
pub struct TransferArgs {
    /// The recipe (its `transfer.proxy` section names the proxy width).
    pub recipe: PathBuf,
    #[command(flatten)]
    pub overrides: OverrideArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

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
    /// Checkpoint root to write the grown checkpoint into (it must hold no checkpoint).
    #[arg(short, long)]
    pub output: String,
}

pub fn transfer(args: TransferArgs) -> Result<(), crate::Failure> {
    let recipe = crate::load_recipe(&args.recipe, &args.overrides)?;
    let rows = table(&recipe);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).context("serialize")?
        );
        return Ok(());
    }
    match &recipe.transfer {
        Some(t) => println!(
            "{}: width {} from proxy width {} (s = {})",
            recipe.name,
            recipe.model.hidden_size,
            t.proxy.hidden_size,
            recipe.model.hidden_size as f64 / t.proxy.hidden_size as f64
        ),
        None => println!(
            "{}: no transfer.proxy: one learning rate and init std",
            recipe.name
        ),
    }
    println!(
        "{:<10} {:>14} {:>12} {:>12}  rule",
        "group", "parameters", "init std", "lr"
    );
    for r in rows {
        let std = r
            .init_std
            .map_or("1 (const)".to_string(), |s| format!("{s:.6}"));
        println!(
            "{:<10} {:>14} {:>12} {:>12.6e}  {}",
            r.group.name(),
            r.params,
            std,
            r.lr,
            r.rule
        );
    }
    Ok(())
}

pub fn grow_cmd(args: GrowArgs) -> Result<(), crate::Failure> {
    let target = crate::load_recipe(&args.recipe, &args.overrides)?;
    let (store, step) = Checkpoints::open_path(&args.from, &Default::default())?;
    let loaded = match step {
        Some(s) => store.load(s, true)?,
        None => store.load_newest(true, false)?.ok_or_else(|| {
            anyhow::anyhow!(
                "{}: holds no checkpoint to grow from; train the smaller model with \
                     checkpoint.every set, or name a step directory",
                store.root()
            )
        })?,
    };
    let request =
        grow(&loaded, &target, args.factor, args.optimizer).map_err(|e| crate::Failure {
            code: 2,
            error: anyhow::anyhow!("{}: {e}", args.recipe.display()),
        })?;
    let out = Checkpoints::open(&args.output, &Default::default())?;
    if let Some(newest) = out.steps()?.last() {
        return Err(anyhow::anyhow!(
            "{}: already holds checkpoints (newest step {newest}); write the grown model to an empty location",
            out.root()
        )
        .into());
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
