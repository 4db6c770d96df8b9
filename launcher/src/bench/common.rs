//! What the benchmarks share: a spinner, output directories, UTF-8 paths, running a
//! Python baseline for its JSON, and training a recipe in this process or a child one
//! with the settings every experiment uses.

use crate::UsageError;
use anyhow::{bail, Context};
use catapult_trainer::supervision::env;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::Path;
use std::process::Command;

pub(super) fn spinner(msg: &str) -> ProgressBar {
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
pub(super) fn create_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))
}

/// `path` as UTF-8 (the data and checkpoint libraries take string locations).
pub(super) fn utf8(path: &Path) -> Result<&str, UsageError> {
    path.to_str().ok_or_else(|| {
        UsageError::new(format!(
            "{}: the path is not UTF-8; give a --dir whose path is",
            path.display()
        ))
    })
}

/// Runs a baseline script of scripts/bench with the venv's Python; its stdout is JSON.
pub(super) fn python_json(
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
pub(super) fn train_here(
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
pub(super) fn train_child(recipe: &Path, sets: &[String], label: &str) -> anyhow::Result<f64> {
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
pub(super) fn common_sets(dir: &Path, steps: usize, eval_every: usize) -> Vec<String> {
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
pub(super) fn val_curve(metrics: &Path) -> anyhow::Result<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("{}: no metrics", metrics.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_f64()?, v.get("val_loss")?.as_f64()?)))
        .collect())
}

/// The median (NaN for none).
pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// One training run of `recipe` on `ranks` ranks under mpirun (oversubscribed), `steps`
/// steps with `sets`, into `out`; its per-step metric lines after 3 warm-up steps.
pub(super) fn mpirun_train(
    recipe: &Path,
    ranks: usize,
    steps: usize,
    sets: &[String],
    out: &Path,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut cmd = Command::new("mpirun");
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == 0 {
        cmd.arg("--allow-run-as-root");
    }
    cmd.args(["--oversubscribe", "-np", &ranks.to_string()])
        .arg(std::env::current_exe()?)
        .arg("train")
        .arg(recipe)
        .arg("--overwrite");
    let common = [
        format!("train.steps={steps}"),
        "train.warmup_steps=0".into(),
        format!("train.eval_every={steps}"),
        "train.eval_sequences=8".into(),
        "train.log_every=1".into(),
        "system.threads=1".into(),
        format!("output.dir={}", out.display()),
    ];
    for set in common.iter().chain(sets) {
        cmd.args(["--set", set]);
    }
    let result = cmd
        .env(env::PROGRESS, "off")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .context("mpirun (Open MPI; scripts/setup installs it) did not start")?;
    if !result.status.success() {
        bail!(
            "the {ranks}-rank run failed: {}",
            String::from_utf8_lossy(&result.stderr)
        );
    }
    step_lines_after_warmup(out)
}

/// The step lines of the run in `out` (its metrics.jsonl) after 3 warm-up steps.
pub(super) fn step_lines_after_warmup(out: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l.get("step_s").is_some() && l["step"].as_u64().is_some_and(|s| s > 3))
        .collect())
}
