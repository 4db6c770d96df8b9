//! The supervisor's state across attempts: the run directory's logs, heartbeats and
//! stop file, the restart policy, the progress bar, and `supervisor.json` (each
//! attempt's start, end and cause), written whole after every change.

use super::args::LaunchArgs;
use super::logs::Logs;
use super::ranks::Ranks;
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// One attempt of the job, as recorded in supervisor.json.
#[derive(serde::Serialize, Clone)]
pub(super) struct Attempt {
    pub(super) attempt: usize,
    pub(super) started_unix_s: f64,
    pub(super) ended_unix_s: Option<f64>,
    /// None while running and after success.
    pub(super) cause: Option<String>,
    /// Seconds from the failure (a rank's exit, or the heartbeat deadline) to every rank
    /// stopped.
    pub(super) stop_s: Option<f64>,
    /// The step it resumed from (0: it started afresh), as rank 0 reported it.
    pub(super) resume_step: Option<u64>,
    /// The checkpoint it loaded, as rank 0 reported it.
    pub(super) resumed_from: Option<String>,
    /// The newest complete checkpoint when it ended.
    pub(super) checkpoint_at_end: Option<u64>,
    /// Failures in a row without a new checkpoint, this one included.
    pub(super) consecutive_failures: Option<usize>,
    /// Seconds waited before the next attempt.
    pub(super) backoff_s: Option<f64>,
}

#[derive(serde::Serialize)]
pub(super) struct State {
    pub(super) status: &'static str,
    pub(super) recipe: String,
    pub(super) nproc: usize,
    pub(super) launcher_pid: u32,
    pub(super) max_restarts: usize,
    pub(super) max_failures_per_hour: usize,
    pub(super) attempts: Vec<Attempt>,
}

pub(super) fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub(super) fn write_state(run_dir: &Path, state: &State) -> anyhow::Result<()> {
    let path = run_dir.join("supervisor.json");
    let tmp = run_dir.join("supervisor.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(state)?)
        .with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}

/// What `launch` settings the supervisor acts on (the recipe's `launch` section).
pub(super) struct Policy {
    pub(super) max_restarts: usize,
    pub(super) max_failures_per_hour: usize,
    pub(super) heartbeat_timeout_s: f64,
    pub(super) restart_backoff_s: f64,
    pub(super) requeue: bool,
}

/// The supervisor's state across attempts.
pub(super) struct Supervisor {
    pub(super) args: LaunchArgs,
    pub(super) nproc: usize,
    pub(super) policy: Policy,
    pub(super) run_dir: PathBuf,
    pub(super) heartbeat_dir: PathBuf,
    pub(super) control_dir: PathBuf,
    /// `control/stop`: asks every rank to checkpoint and exit after its step.
    pub(super) stop_file: PathBuf,
    /// A first signal has asked the ranks to stop (a second stops them at once).
    pub(super) stopping: bool,
    pub(super) state: State,
    pub(super) logs: Logs,
    pub(super) bar: ProgressBar,
    pub(super) ranks: Ranks,
    /// Where the run's checkpoints are (to tell a failure after progress from one
    /// without).
    pub(super) checkpoints: Option<catapult_checkpoints::Checkpoints>,
}

impl Supervisor {
    /// The run directory (logs, heartbeats, the stop file's directory), the progress bar
    /// and the signal handlers, before the first attempt.
    pub(super) fn prepare(
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
            max_failures_per_hour: l.max_failures_per_hour,
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
            max_failures_per_hour: policy.max_failures_per_hour,
            attempts: Vec::new(),
        };
        if resuming {
            eprintln!(
                "{} holds an earlier run: resuming it (--overwrite starts over)",
                run_dir.display()
            );
        }
        super::signals::install_signal_handlers();
        let logs = Logs::new(run_dir.join("logs"));
        let bar = ProgressBar::new(recipe.train.steps as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("a static template that parses"),
        );
        bar.set_prefix(format!("{} x{nproc}", recipe.name));
        let ranks = Ranks::here()?;
        let checkpoints = catapult_checkpoints::Checkpoints::open(
            &recipe.checkpoint_root(),
            &recipe.checkpoint.storage.options(),
        )
        .ok();
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
            checkpoints,
        })
    }

    /// The newest complete checkpoint's step (None: none, or the store cannot be read).
    pub(super) fn newest_checkpoint(&self) -> Option<u64> {
        self.checkpoints.as_ref()?.steps().ok()?.last().copied()
    }

    /// The attempt in progress (every attempt is recorded when its ranks start).
    pub(super) fn current(&mut self) -> &mut Attempt {
        self.state
            .attempts
            .last_mut()
            .expect("an attempt is recorded when its ranks start, before anything ends it")
    }

    pub(super) fn write_state(&self) -> anyhow::Result<()> {
        write_state(&self.run_dir, &self.state)
    }
}
