//! After a failed attempt: its cause and stop time go into supervisor.json, and the
//! ranks start again from the last checkpoint after `launch.restart_backoff_s` (doubling
//! with each restart), unless `launch.max_restarts` is spent (then the run has failed)
//! or a rank exited with code 2: bad input, which no restart can fix.

use super::supervisor::Supervisor;
use std::time::Duration;

impl Supervisor {
    /// Records why attempt `attempt` failed and waits out the backoff; an error (the run
    /// failed, every cause named) when no restart is left.
    pub(super) fn restart(
        &mut self,
        attempt: usize,
        cause: String,
        stop_s: f64,
    ) -> Result<(), crate::Failure> {
        let a = self.current();
        a.cause = Some(cause.clone());
        a.stop_s = Some(stop_s);
        let max_restarts = self.policy.max_restarts;
        if cause.ends_with(&format!(
            "exited with code {}",
            catapult_trainer::exit::BAD_INPUT
        )) {
            return self.refused(&cause);
        }
        if attempt >= max_restarts {
            return self.failed();
        }
        self.write_state()?;
        let wait = self.policy.restart_backoff_s * 2f64.powi(attempt as i32);
        self.bar.suspend(|| {
            eprintln!(
                "launcher: {cause}; restarting from the last checkpoint in {wait:.1} s \
                 (restart {} of {max_restarts})",
                attempt + 1,
            )
        });
        std::thread::sleep(Duration::from_secs_f64(wait));
        Ok(())
    }
}
