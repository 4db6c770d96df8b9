//! `catapult bench ...`: benchmarks that print ratios against a baseline measured in the
//! same run. This module owns the subcommand's arguments, the dispatch to one module per
//! benchmark, and what several of them share: spinners, the Python baselines under
//! scripts/bench, and training runs (in this process, or as a `catapult train` child).
//!
//! - `data`: the data pipeline against pyarrow + tokenizers ([`data`]);
//! - `ckpt`: checkpoint save/load against torch.save/torch.load ([`ckpt`]);
//! - `ep`: expert-parallel steps with Single Batch Overlap on and off ([`ep`]);
//! - `launch`: `catapult launch` against plain mpirun ([`launch`]);
//! - `growth`: model growth against random init ([`growth`]);
//! - `transfer`: width transfer of the learning rate ([`transfer`]).

mod ckpt;
mod data;
mod ep;
mod growth;
mod launch;
mod transfer;

use crate::UsageError;
use anyhow::{bail, Context};
use catapult_trainer::supervision::env;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Model growth: the deep recipe from random init against its half-depth model
    /// trained for half the tokens, stacked and trained on (same total tokens);
    /// validation curves to growth.png (run from the project root).
    Growth {
        /// A recipe with a growth section.
        #[arg(long, default_value = "recipes/tiny-grown.yaml")]
        recipe: PathBuf,
        /// Steps of each run (growth at half).
        #[arg(long, default_value_t = 400)]
        steps: usize,
        /// Validation every this many steps.
        #[arg(long, default_value_t = 25)]
        eval_every: usize,
        /// Working directory for the runs, results.json and growth.png.
        #[arg(long, default_value = "bench-results/growth")]
        dir: PathBuf,
    },
    /// Width transfer: a learning-rate grid on the proxy, and the same grid at wider
    /// widths with transfer.proxy set; is the proxy's best within one grid step of each
    /// width's best? (run from the project root).
    Transfer {
        /// The proxy recipe.
        #[arg(long, default_value = "recipes/tiny-proxy.yaml")]
        proxy: PathBuf,
        /// Target widths as multiples of the proxy's.
        #[arg(long, value_delimiter = ',', default_value = "2,4")]
        widths: Vec<usize>,
        /// Learning-rate grid (ascending).
        #[arg(long, value_delimiter = ',', default_values_t = transfer::default_lrs())]
        lrs: Vec<f64>,
        /// Steps of each run.
        #[arg(long, default_value_t = 150)]
        steps: usize,
        /// Working directory for the runs, results.json and transfer.png.
        #[arg(long, default_value = "bench-results/transfer")]
        dir: PathBuf,
    },
    /// `catapult launch` against mpirun starting the same binary: time to the first
    /// training step for each rank count, and the time to detect a killed rank and train
    /// again (run from the project root; uses the built-in corpus).
    Launch {
        /// Recipe to train (its experts must split over every rank count).
        #[arg(long, default_value = "recipes/tiny.yaml")]
        recipe: PathBuf,
        /// Rank counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        ranks: Vec<usize>,
        /// Working directory for the runs and results.json.
        #[arg(long, default_value = "bench-results/launch")]
        dir: PathBuf,
    },
    /// Expert-parallel training with Single Batch Overlap on and off (ranks started with
    /// mpirun): step time, the share of all-to-all time hidden behind compute, and the
    /// exchanged volume against the analytic one (run from the project root).
    Ep {
        /// Recipe to train (it must divide its experts over `ranks`).
        #[arg(long, default_value = "recipes/tiny.yaml")]
        recipe: PathBuf,
        /// Ranks (expert-parallel size = ranks).
        #[arg(long, default_value_t = 2)]
        ranks: usize,
        /// Steps per run (the first 3 are warm-up and not counted).
        #[arg(long, default_value_t = 30)]
        steps: usize,
        /// Runs per setting, alternating on and off.
        #[arg(long, default_value_t = 2)]
        repeats: usize,
        /// Working directory for the runs and results.json.
        #[arg(long, default_value = "bench-results/ep")]
        dir: PathBuf,
    },
    /// Checkpoint save/load throughput against torch.save/torch.load, and the training
    /// loop's blocking time per asynchronous save (run from the project root).
    Ckpt {
        /// GiB of tensor state to save and load.
        #[arg(long, default_value_t = 1.0)]
        gib: f64,
        /// Recipe whose async-save blocking time is measured.
        #[arg(long, default_value = "recipes/tiny.yaml")]
        recipe: PathBuf,
        /// Python with torch and safetensors (scripts/setup's venv).
        #[arg(long, default_value = ".venv/bin/python")]
        python: PathBuf,
        /// Working directory (on the disk to measure).
        #[arg(long, default_value = "bench-results/ckpt")]
        dir: PathBuf,
    },
    /// Data pipeline throughput against pyarrow + tokenizers (run from the project root).
    Data {
        /// Text corpus (default: the built-in KJV text from scripts/prepare-corpus).
        #[arg(long, default_value = "data-cache/kjv.txt")]
        text: PathBuf,
        /// Copies of the text in the benchmark corpus.
        #[arg(long, default_value_t = 4)]
        repeat: usize,
        /// BPE vocabulary trained for the benchmark.
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        /// Recipe whose training rate is measured (20 steps).
        #[arg(long, default_value = "recipes/tiny.yaml")]
        recipe: PathBuf,
        /// Python with pyarrow and tokenizers (scripts/setup's venv).
        #[arg(long, default_value = ".venv/bin/python")]
        python: PathBuf,
        /// Working directory for the corpus, shards and results.
        #[arg(long, default_value = "bench-results/data")]
        dir: PathBuf,
    },
}

pub fn run(command: BenchCommand) -> Result<(), crate::Failure> {
    match command {
        BenchCommand::Growth {
            recipe,
            steps,
            eval_every,
            dir,
        } => growth::run(&recipe, steps, eval_every, &dir),
        BenchCommand::Transfer {
            proxy,
            widths,
            lrs,
            steps,
            dir,
        } => transfer::run(&proxy, &widths, &lrs, steps, &dir),
        BenchCommand::Data {
            text,
            repeat,
            vocab_size,
            recipe,
            python,
            dir,
        } => data::run(&text, repeat, vocab_size, &recipe, &python, &dir),
        BenchCommand::Ckpt {
            gib,
            recipe,
            python,
            dir,
        } => ckpt::run(gib, &recipe, &python, &dir),
        BenchCommand::Ep {
            recipe,
            ranks,
            steps,
            repeats,
            dir,
        } => ep::run(&recipe, ranks, steps, repeats, &dir),
        BenchCommand::Launch { recipe, ranks, dir } => launch::run(&recipe, &ranks, &dir),
    }
}

fn spinner(msg: &str) -> ProgressBar {
    let p = ProgressBar::new_spinner();
    p.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .expect("a static template that parses"),
    );
    p.set_message(msg.to_string());
    p.enable_steady_tick(std::time::Duration::from_millis(200));
    p
}

/// Creates the benchmark's working directory (`--dir`).
fn create_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))
}

/// `path` as UTF-8 (the data and checkpoint libraries take string locations).
fn utf8(path: &Path) -> Result<&str, UsageError> {
    path.to_str().ok_or_else(|| {
        UsageError::new(format!(
            "{}: the path is not UTF-8; give a --dir whose path is",
            path.display()
        ))
    })
}

/// Runs a baseline script of scripts/bench with the venv's Python; its stdout is JSON.
fn python_json(
    python: &Path,
    script: &str,
    args: &[&std::ffi::OsStr],
) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new(python)
        .arg(Path::new("scripts/bench").join(script))
        .args(args)
        .output()
        .with_context(|| {
            format!(
                "{}: cannot run the baseline (run scripts/setup)",
                python.display()
            )
        })?;
    if !out.status.success() {
        bail!(
            "baseline {script} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("baseline {script}: output is not JSON"))
}

/// Trains `recipe` with `sets` in this process, replacing an earlier run in its output
/// directory; the recipe as loaded and the run's metrics lines.
fn train_here(
    recipe: &Path,
    sets: &[String],
) -> anyhow::Result<(catapult_trainer::Recipe, Vec<serde_json::Value>)> {
    let overrides: Vec<catapult_trainer::Override> = sets
        .iter()
        .map(|s| catapult_trainer::Override::parse(s))
        .collect::<Result<_, _>>()?;
    let r = catapult_trainer::recipe::load(recipe, &overrides)?;
    let opts = catapult_trainer::RunOptions {
        overwrite: true,
        ..Default::default()
    };
    let summary = catapult_trainer::train(&r, &opts)?;
    let lines = std::fs::read_to_string(&summary.metrics)?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    Ok((r, lines))
}

/// One `catapult train RECIPE --overwrite --set ...` to completion; its wall time.
fn train_child(recipe: &Path, sets: &[String], label: &str) -> anyhow::Result<f64> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg("train").arg(recipe).arg("--overwrite");
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.env(env::PROGRESS, "off");
    eprintln!("bench: {label}");
    let started = std::time::Instant::now();
    let out = cmd.output().context("catapult starts")?;
    if !out.status.success() {
        bail!(
            "{label} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Settings every growth and transfer run shares: one process on both cores, regular
/// validation.
fn common_sets(dir: &Path, steps: usize, eval_every: usize) -> Vec<String> {
    vec![
        format!("output.dir={}", dir.display()),
        format!("train.steps={steps}"),
        format!("train.eval_every={eval_every}"),
        "train.eval_sequences=64".into(),
        "train.log_every=10".into(),
        "parallel.expert=1".into(),
        "system.threads=2".into(),
        "checkpoint.every=0".into(),
    ]
}

/// (step, validation loss) of a metrics file, in order.
fn val_curve(metrics: &Path) -> anyhow::Result<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("{}: no metrics", metrics.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_f64()?, v.get("val_loss")?.as_f64()?)))
        .collect())
}
