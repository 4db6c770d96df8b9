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
