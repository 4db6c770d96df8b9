//! The arguments of `catapult launch` and the check that a rank count fits a recipe's
//! layout (also used by `catapult submit`).

use crate::{OverrideArgs, UsageError};
use std::path::{Path, PathBuf};

/// Arguments of `catapult launch`.
#[derive(clap::Args)]
pub struct LaunchArgs {
    /// The recipe file, e.g. recipes/tiny.yaml.
    pub recipe: PathBuf,
    /// Ranks to start (default: what the recipe's `parallel` section needs, at least
    /// parallel.expert).
    #[arg(long)]
    pub nproc: Option<usize>,
    #[command(flatten)]
    pub overrides: OverrideArgs,
    /// Start over: replace an earlier run in the same run directory instead of resuming it.
    #[arg(long)]
    pub overwrite: bool,
    /// How ranks start: `mpirun` on this machine, or `srun --mpi=pmix` inside a Slurm
    /// allocation (what `catapult submit`'s batch script uses).
    #[arg(long, default_value = "mpirun", value_parser = ["mpirun", "srun"])]
    pub via: String,
}

/// Refuses a rank count the recipe's layout cannot use.
pub fn check_nproc(
    recipe: &catapult_trainer::Recipe,
    file: &Path,
    nproc: usize,
) -> anyhow::Result<()> {
    let par = &recipe.parallel;
    if nproc == 0 {
        return Err(UsageError::new(format!(
            "--nproc 0: {} needs at least parallel.expert = {} rank(s); give --nproc {} or more",
            file.display(),
            par.expert,
            par.expert * par.data.max(1)
        ))
        .into());
    }
    if nproc == 1 && par.shard != catapult_trainer::recipe::ShardMode::None {
        return Err(UsageError::new(format!(
            "--nproc 1 does not fit {}: parallel.shard = {} splits state over the ranks that \
             replicate it; give --nproc 2 or more, or set parallel.shard=none",
            file.display(),
            par.shard.name()
        ))
        .into());
    }
    if !nproc.is_multiple_of(par.expert) || (par.data > 0 && nproc != par.data * par.expert) {
        return Err(UsageError::new(format!(
            "--nproc {nproc} does not fit {}: parallel.expert = {} and parallel.data = {} need a \
             multiple of {} ranks{}",
            file.display(),
            par.expert,
            par.data,
            par.expert,
            if par.data > 0 {
                format!(" (exactly {})", par.data * par.expert)
            } else {
                String::new()
            }
        ))
        .into());
    }
    Ok(())
}
