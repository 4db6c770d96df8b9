//! `catapult transfer RECIPE`: prints the per-group init std and learning rate that width
//! transfer derives from the recipe's proxy, and the rule behind each (a table, or JSON).

use crate::OverrideArgs;
use anyhow::Context;
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

pub fn run(args: TransferArgs) -> Result<(), crate::Failure> {
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
