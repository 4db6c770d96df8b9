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
//! This module owns the attempt loop (`run`); the rest has a room each, and no room uses
//! this file: [`args`] (the arguments, `check_nproc`), [`supervisor`] (the state across
//! attempts and `supervisor.json`), [`ranks`], [`logs`] and [`signals`], and one module
//! per phase of an attempt:
//! - [`spawn`]: the mpirun/srun command line and the environment of the ranks
//!   (`catapult_trainer::supervision::env`), and the pipes of their output;
//! - [`watch`]: the ranks' output, exit codes, heartbeats, signals and the progress bar,
//!   until the attempt ends;
//! - [`restart`]: a failed attempt's cause, the backoff, the decision to start again;
//! - [`finish`]: the final record (completed, preempted and requeued, stopped, failed).

mod args;
mod finish;
mod logs;
mod ranks;
mod restart;
mod signals;
mod spawn;
mod supervisor;
mod watch;

pub use args::{check_nproc, LaunchArgs};

use supervisor::Supervisor;
use watch::Outcome;

pub fn run(args: LaunchArgs) -> Result<(), crate::Failure> {
    // Bad input fails here, before any rank starts.
    let recipe = crate::load_recipe(&args.recipe, &args.overrides)?;
    let par = &recipe.parallel;
    let nproc = args.nproc.unwrap_or(par.expert * par.data.max(1));
    check_nproc(&recipe, &args.recipe, nproc)?;
    // Every rank runs here: the model must fit this machine's memory nproc times.
    let notes = catapult_trainer::fit::check_here(&recipe, nproc).map_err(|e| crate::Failure {
        code: catapult_trainer::exit_code(&e),
        error: anyhow::anyhow!("{}: {e}", args.recipe.display()),
    })?;
    for note in notes {
        eprintln!("note: {note}");
    }
    let mut supervisor = Supervisor::prepare(args, &recipe, nproc)?;
    let mut attempt = 0;
    loop {
        let (mut child, output, started) = supervisor.spawn(attempt)?;
        let outcome = supervisor.watch(&mut child, output, started)?;
        match outcome {
            Outcome::Stopped(sig) => return supervisor.stopped(sig),
            Outcome::Exited if supervisor.stopping => return supervisor.preempted(),
            Outcome::Exited => return supervisor.completed(attempt),
            Outcome::Failed { cause, stop_s } => supervisor.restart(cause, stop_s)?,
        }
        attempt += 1;
    }
}
