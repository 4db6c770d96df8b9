//! The contract between a supervisor (`catapult launch`, `catapult submit`) and the ranks
//! it starts: the environment variables that carry it, heartbeats, stop requests
//! (signals or a stop file) and the test fault hooks. It owns no training state.

/// The environment variables of the launcher-rank contract, defined once: the launcher
/// sets them, the trainer reads them.
pub mod env {
    /// Directory where each rank rewrites `rank-R` with its last completed step.
    pub const HEARTBEAT_DIR: &str = "CATAPULT_HEARTBEAT_DIR";
    /// Directory (mode 0700) whose `stop` file asks every rank to checkpoint and exit.
    pub const CONTROL_DIR: &str = "CATAPULT_CONTROL_DIR";
    /// The supervisor's attempt number (0 for the first start).
    pub const ATTEMPT: &str = "CATAPULT_ATTEMPT";
    /// Test fault hooks (`kill:R:S`, `hang:R:S`, `sdc:R:S`, `save:PHASE:S`, `step:S`).
    pub const FAULT: &str = catapult_checkpoints::FAULT_ENV;
    /// Progress display: `bar`, `lines` or `off`.
    pub const PROGRESS: &str = "CATAPULT_PROGRESS";
    /// Every variable a supervisor passes through to the ranks (mpirun `-x`).
    pub const PASSED_TO_RANKS: [&str; 4] = [HEARTBEAT_DIR, CONTROL_DIR, ATTEMPT, FAULT];
}

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

/// Liveness for a supervisor: when `env::HEARTBEAT_DIR` is set, each rank rewrites
/// `rank-R` there (its last completed step) whenever it gets past a point every rank
/// must reach; a rank stuck in a collective stops updating it.
pub struct Heartbeat {
    file: Option<PathBuf>,
}

impl Heartbeat {
    /// The heartbeat of `rank`, if a supervisor asked for one.
    pub fn from_env(rank: usize) -> Self {
        let file = std::env::var_os(env::HEARTBEAT_DIR).map(|d| {
            let dir = PathBuf::from(d);
            let _ = std::fs::create_dir_all(&dir);
            dir.join(format!("rank-{rank}"))
        });
        Self { file }
    }

    /// Records that this rank got to `step`.
    pub fn beat(&self, step: usize) {
        if let Some(f) = &self.file {
            // Best effort: a full disk shows up as a hang, which the supervisor handles.
            let _ = std::fs::write(f, step.to_string());
        }
    }
}

/// Test hooks for supervision (`CATAPULT_FAULT=kill:RANK:STEP` or `hang:RANK:STEP`):
/// at the start of step STEP (1-based) that rank SIGKILLs itself or blocks forever, as
/// a crashed or wedged process would. Only in a job's first attempt (`env::ATTEMPT`
/// unset or 0), so that a restarted job runs through, unless the value ends in
/// `:always`. `kills:R0@S0,R1@S1,...` kills rank Rk at step Sk of attempt k.
pub fn fault_hook(rank: usize, step: usize) {
    let Ok(fault) = std::env::var(env::FAULT) else {
        return;
    };
    if let Some(list) = fault.strip_prefix("kills:") {
        let attempt: usize = std::env::var(env::ATTEMPT)
            .ok()
            .and_then(|a| a.parse().ok())
            .unwrap_or(0);
        if list.split(',').nth(attempt) == Some(format!("{rank}@{step}").as_str()) {
            catapult_checkpoints::kill_self();
        }
        return;
    }
    // `...:always` fires in every attempt (to exhaust the restarts).
    let (fault, always) = match fault.strip_suffix(":always") {
        Some(f) => (f.to_string(), true),
        None => (fault, false),
    };
    if !always && std::env::var(env::ATTEMPT).is_ok_and(|a| a != "0") {
        return;
    }
    if fault == format!("kill:{rank}:{step}") {
        catapult_checkpoints::kill_self();
    }
    if fault == format!("hang:{rank}:{step}") {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// The first preemption signal (SIGTERM or SIGUSR1) this process received, 0 if none.
static PREEMPT_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_preempt(sig: libc::c_int) {
    if PREEMPT_SIGNAL.swap(sig, Ordering::SeqCst) != 0 {
        // A second signal: leave now. Checkpoints are never half-visible (the manifest
        // is written last), so the last one stays loadable.
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + sig) };
    }
}

/// SIGTERM and SIGUSR1 (Slurm's `--signal=B:USR1@T`, a scheduler's preemption) make the
/// run finish its step, save a checkpoint and exit 0; a second signal exits at once.
pub fn install_preemption_handlers() {
    for sig in [libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: the handler only touches an atomic and calls _exit.
        unsafe {
            libc::signal(sig, on_preempt as *const () as libc::sighandler_t);
        }
    }
}

/// Whether this rank was asked to stop: a signal, or the supervisor's stop file
/// (`$CATAPULT_CONTROL_DIR/stop`).
pub fn stop_requested() -> bool {
    PREEMPT_SIGNAL.load(Ordering::SeqCst) != 0
        || std::env::var_os(env::CONTROL_DIR).is_some_and(|d| Path::new(&d).join("stop").exists())
}
