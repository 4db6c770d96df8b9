//! The `catapult` command: a thin layer of argument parsing over the library crates.
//! This file owns the command line (every subcommand's arguments or where they live) and
//! the dispatch to the module that runs each. Results go to stdout and files, progress
//! and errors to stderr; the exit code (0, 1 at run time, 2 bad input) is decided in
//! `failure`.

mod bench;
mod ckpt_cmd;
mod comm_cmd;
mod data_cmd;
mod dry_run;
mod failure;
mod grow;
mod launch;
mod plan_cmd;
mod plot;
mod slurm;
mod transfer;

pub use failure::{Failure, UsageContext, UsageError};

use catapult_trainer::checkpoint::Resume;
use catapult_trainer::{recipe, Override, RecipeError, RunOptions};
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

/// Distributed pretraining for LongCat-Flash-style mixture-of-experts models.
#[derive(Parser)]
#[command(
    name = "catapult",
    version,
    about,
    after_help = "Exit codes: 0 success; 1 failure at run time (I/O, a rank died, corruption); \
                  2 bad input (recipe, arguments, paths, a checkpoint that does not fit the \
                  recipe)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from a YAML recipe.
    Train {
        /// The recipe file, e.g. recipes/tiny.yaml.
        recipe: PathBuf,
        #[command(flatten)]
        overrides: OverrideArgs,
        /// Replace the outputs of an earlier run in the same run directory.
        #[arg(long, conflicts_with = "resume")]
        overwrite: bool,
        /// Continue from a checkpoint: `auto` (the newest valid one under the recipe's
        /// checkpoint root; a fresh start if there is none), a checkpoint root, or one
        /// step directory.
        #[arg(long, value_name = "auto|PATH", num_args = 0..=1, default_missing_value = "auto")]
        resume: Option<Resume>,
        /// Skip the BLAKE3 check of checkpoint files when resuming.
        #[arg(long)]
        no_verify: bool,
        /// Fail when the newest checkpoint is broken instead of falling back to an earlier one.
        #[arg(long)]
        no_fallback: bool,
        #[command(flatten)]
        dry_run: dry_run::DryRunArgs,
    },
    /// The layouts a recipe could train with on a cluster (expert-parallel size, shard
    /// mode, recomputation, micro-batch), the ones that fit memory ranked by predicted
    /// step time, as recipe overrides; nothing is allocated.
    Plan(plan_cmd::PlanArgs),
    /// Start the recipe's ranks on this machine (mpirun) and supervise them: rank-prefixed
    /// logs, one progress bar, restarts from the last checkpoint when a rank dies or hangs.
    Launch(launch::LaunchArgs),
    /// Submit the recipe as a Slurm batch job (the script is written into the run
    /// directory; ranks start with srun --mpi=pmix and are supervised as by `launch`).
    Submit(slurm::SubmitArgs),
    /// A run's state: Slurm job state, supervisor status, last step and loss, newest
    /// checkpoint (JSON).
    Status {
        /// The run directory (e.g. runs/tiny).
        run: PathBuf,
    },
    /// Cancel a submitted run's Slurm job (scancel).
    Cancel {
        /// The run directory.
        run: PathBuf,
    },
    /// Print a rank's log (written by launch and submit).
    Logs {
        /// The run directory.
        run: PathBuf,
        /// Which rank.
        #[arg(long, default_value_t = 0)]
        rank: usize,
        /// Keep printing new lines until the run ends.
        #[arg(long)]
        follow: bool,
    },
    /// Print the per-group init std and learning rate that width transfer derives from
    /// the recipe's proxy (and the rule behind each).
    Transfer(transfer::TransferArgs),
    /// Build a deeper model's checkpoint by stacking a trained one's layers (model growth).
    Grow(grow::GrowArgs),
    /// Render a run's metrics as PNG charts (several runs overlaid).
    Plot(plot::PlotArgs),
    /// Collectives: conformance checks in the current (MPI or single-process) world.
    Comm {
        #[command(subcommand)]
        command: comm_cmd::CommCommand,
    },
    /// Inspect sharded checkpoints.
    Ckpt {
        #[command(subcommand)]
        command: ckpt_cmd::CkptCommand,
    },
    /// Check or print recipes.
    Recipe {
        #[command(subcommand)]
        command: RecipeCommand,
    },
    /// Export a checkpoint to the Hugging Face format that transformers'
    /// LongcatFlashForCausalLM loads (config.json and model.safetensors, or
    /// model-0000N-of-0000M.safetensors with an index), streamed without holding it.
    Export {
        /// A run's final weights (e.g. runs/tiny/checkpoint), a sharded step checkpoint
        /// (runs/tiny/checkpoints/step-00000300), or a checkpoint root for its newest;
        /// local or an object-store URL.
        checkpoint: String,
        /// Output directory for the Hugging Face files.
        #[arg(long, value_name = "OUT_DIR")]
        hf: PathBuf,
        /// Largest weight file, in GiB: above it the weights go to
        /// model-0000N-of-0000M.safetensors files with an index, as transformers writes them.
        #[arg(long, default_value_t = 5.0, value_name = "GIB")]
        max_shard_gib: f64,
        /// S3-compatible endpoint for an s3:// checkpoint (e.g. http://127.0.0.1:8333).
        #[arg(long)]
        endpoint: Option<String>,
    },
    /// Benchmarks that print ratios against a baseline measured in the same run.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
    /// Prepare datasets, train tokenizers, inspect the data stream.
    Data {
        #[command(subcommand)]
        command: data_cmd::DataCommand,
    },
}

#[derive(Args, Default)]
pub struct OverrideArgs {
    /// Override any recipe key, e.g. --set model.num_layers=4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Subcommand)]
enum RecipeCommand {
    /// Parse and check a recipe; exit 0 when it is valid.
    Validate {
        /// The recipe file.
        file: PathBuf,
        #[command(flatten)]
        overrides: OverrideArgs,
        /// Check the recipe only, not this machine (by default the model must fit this
        /// host's memory, or its GPU's where it has the recipe's device, and local data
        /// paths must exist).
        #[arg(long)]
        schema_only: bool,
    },
    /// Print the fully resolved recipe (defaults and overrides applied).
    Show {
        /// The recipe file.
        file: PathBuf,
        #[command(flatten)]
        overrides: OverrideArgs,
        /// Output format.
        #[arg(long, value_enum, default_value = "yaml")]
        format: ShowFormat,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ShowFormat {
    /// YAML, as recipes are written.
    Yaml,
    /// JSON, for scripts.
    Json,
}

pub fn load_recipe(
    file: &std::path::Path,
    overrides: &OverrideArgs,
) -> Result<catapult_trainer::Recipe, RecipeError> {
    let parsed: Vec<Override> = overrides
        .set
        .iter()
        .map(|s| Override::parse(s))
        .collect::<Result<_, _>>()?;
    recipe::load(file, &parsed)
}

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Train {
            recipe,
            overrides,
            overwrite,
            resume,
            no_verify,
            no_fallback,
            dry_run,
        } => {
            let recipe = load_recipe(&recipe, &overrides)?;
            if dry_run.dry_run {
                dry_run::run(&recipe, &dry_run)?;
                return Ok(());
            }
            let opts = RunOptions {
                overwrite,
                resume,
                no_verify,
                no_fallback,
            };
            let summary = catapult_trainer::train(&recipe, &opts)?;
            if summary.rank != 0 {
                return Ok(());
            }
            if let Some(step) = summary.preempted_at {
                println!(
                    "stopped on request after step {step}: checkpoint {}; run the same command \
                     with --resume to continue",
                    summary.checkpoint.display()
                );
                return Ok(());
            }
            println!(
                "validation loss: {:.4} -> {:.4}",
                summary.first_val_loss, summary.last_val_loss
            );
            println!("checkpoint: {}", summary.checkpoint.display());
            println!("metrics: {}", summary.metrics.display());
        }
        Command::Plan(args) => {
            let recipe = load_recipe(&args.recipe, &args.overrides)?;
            plan_cmd::run(&recipe, &args)?;
        }
        Command::Export {
            checkpoint,
            hf,
            max_shard_gib,
            endpoint,
        } => export(&checkpoint, &hf, max_shard_gib, endpoint)?,
        Command::Recipe {
            command:
                RecipeCommand::Validate {
                    file,
                    overrides,
                    schema_only,
                },
        } => {
            let r = load_recipe(&file, &overrides)?;
            if !schema_only {
                let notes = catapult_trainer::fit::check_here(&r, 1).map_err(|e| Failure {
                    code: catapult_trainer::exit_code(&e),
                    error: anyhow::anyhow!("{}: {e}", file.display()),
                })?;
                for note in notes {
                    eprintln!("note: {note}");
                }
            }
            println!("{}: valid recipe `{}`", file.display(), r.name);
        }
        Command::Recipe {
            command:
                RecipeCommand::Show {
                    file,
                    overrides,
                    format,
                },
        } => {
            let recipe = load_recipe(&file, &overrides)?;
            match format {
                ShowFormat::Yaml => print!("{}", recipe.to_yaml()),
                ShowFormat::Json => println!("{}", serde_json::to_string_pretty(&recipe)?),
            }
        }
        Command::Data { command } => data_cmd::run(command)?,
        Command::Bench { command } => bench::run(command)?,
        Command::Ckpt { command } => ckpt_cmd::run(command)?,
        Command::Comm { command } => comm_cmd::run(command)?,
        Command::Launch(args) => launch::run(args)?,
        Command::Plot(args) => plot::run(args)?,
        Command::Transfer(args) => transfer::run(args)?,
        Command::Grow(args) => grow::run(args)?,
        Command::Submit(args) => slurm::submit(args)?,
        Command::Status { run } => slurm::status(&run)?,
        Command::Cancel { run } => slurm::cancel(&run)?,
        Command::Logs { run, rank, follow } => slurm::logs(&run, rank, follow)?,
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            // One write, so mpirun and srun never split the line.
            let line = format!("error: {}\n", failure.message());
            let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), line.as_bytes());
            ExitCode::from(failure.code)
        }
    }
}

/// `catapult export`: the Hugging Face files, a summary line, and `export.json` beside them.
fn export(
    checkpoint: &str,
    hf: &std::path::Path,
    max_shard_gib: f64,
    endpoint: Option<String>,
) -> Result<(), Failure> {
    let storage = catapult_data::StorageOptions {
        endpoint,
        ..Default::default()
    };
    let max = (max_shard_gib * (1u64 << 30) as f64).max(1.0) as u64;
    let done = catapult_trainer::export::export_hf(checkpoint, hf, max, &storage)?;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!(
        "exported {checkpoint} to {}: {} tensors, {:.1} MiB in {} file(s); peak memory \
         {:.1} MiB above the start (largest tensor {:.1} MiB)",
        hf.display(),
        done.tensors,
        mib(done.bytes),
        done.files.len(),
        mib(done.peak_rss_bytes.saturating_sub(done.start_rss_bytes)),
        mib(done.largest_tensor_bytes),
    );
    let summary = serde_json::to_string_pretty(&done).expect("JSON values serialize");
    let path = hf.join("export.json");
    std::fs::write(&path, summary).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent_and_documents_exit_codes() {
        Cli::command().debug_assert();
        let help = Cli::command().render_long_help().to_string();
        assert!(
            help.contains("Exit codes: 0 success; 1 failure at run time"),
            "{help}"
        );
    }

    #[test]
    fn resume_is_parsed_by_the_command_line() {
        let resume = |args: &[&str]| match Cli::try_parse_from(args).map(|c| c.command) {
            Ok(Command::Train { resume, .. }) => resume,
            _ => panic!("{args:?} does not parse as train"),
        };
        let bare = ["catapult", "train", "r.yaml"];
        assert_eq!(resume(&bare), None);
        assert_eq!(
            resume(&[&bare[..], &["--resume"]].concat()),
            Some(Resume::Auto)
        );
        assert_eq!(
            resume(&[&bare[..], &["--resume", "runs/x/checkpoints"]].concat()),
            Some(Resume::Path("runs/x/checkpoints".into()))
        );
    }
}
