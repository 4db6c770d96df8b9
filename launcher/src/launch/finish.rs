//! The final record of a launch: supervisor.json's last status (`completed`,
//! `preempted`, `stopped` or `failed`), the closing message, and after a preemption under
//! Slurm the job's requeue.

use super::supervisor::Supervisor;
use std::process::Command;

impl Supervisor {
    /// Every rank exited 0 after attempt `attempt` (0 first).
    pub(super) fn completed(&mut self, attempt: usize) -> Result<(), crate::Failure> {
        self.bar.finish_and_clear();
        self.state.status = "completed";
        self.write_state()?;
        eprintln!(
            "run completed after {} attempt(s); logs: {}",
            attempt + 1,
            self.run_dir.join("logs").display()
        );
        Ok(())
    }

    /// Every rank checkpointed and exited on a signal's request; under Slurm the job goes
    /// back into the queue when `launch.requeue` is set.
    pub(super) fn preempted(&mut self) -> Result<(), crate::Failure> {
        self.bar.finish_and_clear();
        self.state.status = "preempted";
        self.write_state()?;
        eprintln!("run stopped with a checkpoint on request; run the same command to resume");
        if let (true, Ok(job)) = (self.policy.requeue, std::env::var("SLURM_JOB_ID")) {
            requeue(&job);
        }
        Ok(())
    }

    /// A second signal stopped every rank without a checkpoint.
    pub(super) fn stopped(&mut self, sig: i32) -> Result<(), crate::Failure> {
        self.state.status = "stopped";
        self.current().cause = Some(format!("the launcher received signal {sig}"));
        self.write_state()?;
        Err(anyhow::anyhow!("stopped by signal {sig}; run the same command to resume").into())
    }

    /// No restart is left: the error names every attempt's cause.
    /// A rank refused its input (exit 2): the run stops without a restart, with exit 2.
    pub(super) fn refused(&mut self, cause: &str) -> Result<(), crate::Failure> {
        self.state.status = "failed";
        self.write_state()?;
        self.bar.abandon();
        Err(crate::UsageError::new(format!(
            "{cause}: bad input, which a restart cannot fix (its error is above and in {}); \
             no restart was made",
            self.run_dir.join("logs").display()
        ))
        .into())
    }

    pub(super) fn failed(&mut self, budget: &str) -> Result<(), crate::Failure> {
        self.state.status = "failed";
        self.write_state()?;
        self.bar.abandon();
        let causes: Vec<String> = self
            .state
            .attempts
            .iter()
            .map(|a| {
                format!(
                    "attempt {}: {}",
                    a.attempt + 1,
                    a.cause.as_deref().unwrap_or("?")
                )
            })
            .collect();
        Err(anyhow::anyhow!(
            "the run failed {} time(s), {budget}: the restart budget is spent: {}; logs are \
             in {}",
            causes.len(),
            causes.join("; "),
            self.run_dir.join("logs").display()
        )
        .into())
    }
}

/// Back into the queue: the same batch script resumes the run.
fn requeue(job: &str) {
    let out = Command::new("scontrol").args(["requeue", job]).output();
    match out {
        Ok(o) if o.status.success() => eprintln!("requeued Slurm job {job}"),
        Ok(o) => eprintln!(
            "warning: scontrol requeue {job} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => eprintln!("warning: scontrol requeue {job}: {e}"),
    }
}
