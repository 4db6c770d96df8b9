//! `catapult launch RECIPE --nproc N`: starts N ranks of `catapult train` on this machine
//! through mpirun (or inside a Slurm allocation through srun) and supervises them.
//!
//! The launcher validates the recipe before anything starts, prefixes every rank's
//! output line with its rank (and appends it to `<run>/logs/rank-R.log`), shows one
//! progress bar from rank 0's metrics, and keeps `<run>/supervisor.json` up to date. When
//! a rank exits non-zero, or a rank stops heartbeating (`<run>/heartbeat/rank-R`, written
//! by the trainer after every step) for `launch.heartbeat_timeout_s`, it stops every
//! rank, waits `launch.restart_backoff_s` (doubling), and starts them again with
//! `--resume auto`, at most `launch.max_restarts` times; each attempt's cause is recorded.
//! Nothing listens on a socket: liveness travels through files in the run directory.
//!
//! This module owns the arguments, the supervisor's state and `supervisor.json`, and the
//! attempt loop; each phase of an attempt has its own module:
//! - [`spawn`]: the mpirun/srun command line and the environment of the ranks
//!   (`catapult_trainer::supervision::env`), and the pipes of their output;
//! - [`watch`]: the ranks' output, exit codes, heartbeats, signals and the progress bar,
//!   until the attempt ends;
//! - [`restart`]: a failed attempt's cause, the backoff, the decision to start again;
//! - [`finish`]: the final record (completed, preempted and requeued, stopped, failed).

mod finish;
mod restart;
mod spawn;
mod watch;

use crate::{OverrideArgs, UsageError};
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::SystemTime;
use watch::{Logs, Outcome};

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

/// One attempt of the job, as recorded in supervisor.json.
#[derive(serde::Serialize, Clone)]
struct Attempt {
    attempt: usize,
    started_unix_s: f64,
    ended_unix_s: Option<f64>,
    /// None while running and after success.
    cause: Option<String>,
    /// Seconds from the failure (a rank's exit, or the heartbeat deadline) to every rank
    /// stopped.
    stop_s: Option<f64>,
}

#[derive(serde::Serialize)]
struct State {
    status: &'static str,
    recipe: String,
    nproc: usize,
    launcher_pid: u32,
    max_restarts: usize,
    attempts: Vec<Attempt>,
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn write_state(run_dir: &Path, state: &State) -> anyhow::Result<()> {
    let path = run_dir.join("supervisor.json");
    let tmp = run_dir.join("supervisor.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}

/// What `launch` settings the supervisor acts on (the recipe's `launch` section).
struct Policy {
    max_restarts: usize,
    heartbeat_timeout_s: f64,
    restart_backoff_s: f64,
    requeue: bool,
}

/// The supervisor's state across attempts.
struct Supervisor {
    args: LaunchArgs,
    nproc: usize,
    policy: Policy,
    run_dir: PathBuf,
    heartbeat_dir: PathBuf,
    control_dir: PathBuf,
    /// `control/stop`: asks every rank to checkpoint and exit after its step.
    stop_file: PathBuf,
    /// A first signal has asked the ranks to stop (a second stops them at once).
    stopping: bool,
    state: State,
    logs: Logs,
    bar: ProgressBar,
    ranks: spawn::Ranks,
}

/// Refuses a rank count the recipe's layout cannot use.
pub fn check_nproc(
    recipe: &catapult_trainer::Recipe,
    file: &Path,
    nproc: usize,
) -> anyhow::Result<()> {
    let par = &recipe.parallel;
    if nproc == 0
        || !nproc.is_multiple_of(par.expert)
        || (par.data > 0 && nproc != par.data * par.expert)
    {
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

pub fn run(args: LaunchArgs) -> Result<(), crate::Failure> {
    // Bad input fails here, before any rank starts.
    let recipe = crate::load_recipe(&args.recipe, &args.overrides)?;
    let par = &recipe.parallel;
    let nproc = args.nproc.unwrap_or(par.expert * par.data.max(1));
    check_nproc(&recipe, &args.recipe, nproc)?;
    let mut supervisor = Supervisor::prepare(args, &recipe, nproc)?;
    let mut attempt = 0;
    loop {
        let (mut child, output, started) = supervisor.spawn(attempt)?;
        let outcome = supervisor.watch(&mut child, output, started)?;
        match outcome {
            Outcome::Stopped(sig) => return supervisor.stopped(sig),
            Outcome::Exited if supervisor.stopping => return supervisor.preempted(),
            Outcome::Exited => return supervisor.completed(attempt),
            Outcome::Failed { cause, stop_s } => supervisor.restart(attempt, cause, stop_s)?,
        }
        attempt += 1;
    }
}

impl Supervisor {
    /// The run directory (logs, heartbeats, the stop file's directory), the progress bar
    /// and the signal handlers, before the first attempt.
    fn prepare(
        args: LaunchArgs,
        recipe: &catapult_trainer::Recipe,
        nproc: usize,
    ) -> anyhow::Result<Self> {
        let run_dir = recipe.run_dir();
        // A run with a growth schedule may have only its first stage so far.
        let resuming = (run_dir.join("metrics.jsonl").exists()
            || run_dir.join("stage1/metrics.jsonl").exists())
            && !args.overwrite;
        std::fs::create_dir_all(run_dir.join("logs"))
            .with_context(|| format!("{}: cannot create", run_dir.display()))?;
        let heartbeat_dir = run_dir.join("heartbeat");
        // The stop file (`control/stop`) asks every rank to checkpoint and exit after its
        // step; only this user can create it.
        let control_dir = run_dir.join("control");
        std::fs::create_dir_all(&control_dir)?;
        std::fs::set_permissions(
            &control_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
        let stop_file = control_dir.join("stop");
        let _ = std::fs::remove_file(&stop_file);
        let l = &recipe.launch;
        let policy = Policy {
            max_restarts: l.max_restarts,
            heartbeat_timeout_s: l.heartbeat_timeout_s,
            restart_backoff_s: l.restart_backoff_s,
            requeue: l.requeue,
        };
        let state = State {
            status: "running",
            recipe: args.recipe.display().to_string(),
            nproc,
            launcher_pid: std::process::id(),
            max_restarts: policy.max_restarts,
            attempts: Vec::new(),
        };
        if resuming {
            eprintln!(
                "{} holds an earlier run: resuming it (--overwrite starts over)",
                run_dir.display()
            );
        }
        watch::install_signal_handlers();
        let logs = Logs::new(run_dir.join("logs"));
        let bar = ProgressBar::new(recipe.train.steps as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("a static template that parses"),
        );
        bar.set_prefix(format!("{} x{nproc}", recipe.name));
        let ranks = spawn::Ranks::here()?;
        Ok(Self {
            args,
            nproc,
            policy,
            run_dir,
            heartbeat_dir,
            control_dir,
            stop_file,
            stopping: false,
            state,
            logs,
            bar,
            ranks,
        })
    }

    /// The attempt in progress (every attempt is recorded when its ranks start).
    fn current(&mut self) -> &mut Attempt {
        self.state
            .attempts
            .last_mut()
            .expect("an attempt is recorded when its ranks start, before anything ends it")
    }

    fn write_state(&self) -> anyhow::Result<()> {
        write_state(&self.run_dir, &self.state)
    }
}
