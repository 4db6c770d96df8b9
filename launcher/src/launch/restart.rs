//! After a failed attempt: its cause, stop time and the newest checkpoint go into
//! supervisor.json, and the ranks start again from the last checkpoint, unless a rank
//! exited with code 2 (bad input, which no restart can fix) or the budget is spent.
//! Failures are budgeted by progress, not by the run's lifetime: `launch.max_restarts`
//! counts failures in a row without a new checkpoint (a month-long run survives any
//! number of failures that each come after progress), `launch.max_failures_per_hour`
//! (when set) caps failures in any hour whatever they did, and the backoff
//! (`launch.restart_backoff_s`, doubling per failure in a row) returns to its base after
//! a new checkpoint.

use super::supervisor::{unix_now, Supervisor};
use std::time::Duration;

impl Supervisor {
    /// Records why the current attempt failed and waits out the backoff; an error (the
    /// run failed, every cause named) when no restart is left.
    pub(super) fn restart(&mut self, cause: String, stop_s: f64) -> Result<(), crate::Failure> {
        let newest = self.newest_checkpoint();
        let (consecutive, per_hour) = self.failures_after(newest);
        let base = self.policy.restart_backoff_s;
        let wait = base * 2f64.powi(consecutive.saturating_sub(1).min(16) as i32);
        let a = self.current();
        a.cause = Some(cause.clone());
        a.stop_s = Some(stop_s);
        a.checkpoint_at_end = newest;
        a.consecutive_failures = Some(consecutive);
        if cause.ends_with(&format!(
            "exited with code {}",
            catapult_trainer::exit::BAD_INPUT
        )) {
            return self.refused(&cause);
        }
        let max_restarts = self.policy.max_restarts;
        let max_hour = self.policy.max_failures_per_hour;
        if consecutive > max_restarts {
            return self.failed(&format!(
                "{consecutive} failure(s) since the last new checkpoint, \
                 launch.max_restarts = {max_restarts}"
            ));
        }
        if max_hour > 0 && per_hour > max_hour {
            return self.failed(&format!(
                "{per_hour} failures within an hour, launch.max_failures_per_hour = {max_hour}"
            ));
        }
        self.current().backoff_s = Some(wait);
        self.write_state()?;
        self.bar.suspend(|| {
            catapult_data::log_line!(
                "launcher: {cause}; restarting from the last checkpoint in {wait:.1} s \
                 (failure {consecutive} since the last new checkpoint; the run stops at {})",
                max_restarts + 1
            )
        });
        std::thread::sleep(Duration::from_secs_f64(wait));
        Ok(())
    }

    /// For the attempt that just failed, the newest checkpoint being `newest`: the
    /// failures in a row without a new checkpoint (this one included: an attempt made
    /// progress when a checkpoint newer than the one it resumed from exists at its
    /// end), and the failures in the last hour.
    fn failures_after(&self, newest: Option<u64>) -> (usize, usize) {
        let attempts = &self.state.attempts;
        let progressed = |i: usize| {
            let a = &attempts[i];
            let end = if i + 1 == attempts.len() {
                newest
            } else {
                a.checkpoint_at_end
            };
            end.unwrap_or(0) > a.resume_step.unwrap_or(0)
        };
        // Back from this failure to the last one that came after progress, inclusive.
        let mut consecutive = 0;
        for i in (0..attempts.len()).rev() {
            consecutive += 1;
            if progressed(i) {
                break;
            }
        }
        let now = unix_now();
        let per_hour = (attempts.iter())
            .filter(|a| a.ended_unix_s.is_some_and(|t| now - t <= 3600.0))
            .count();
        (consecutive.max(1), per_hour)
    }
}
