//! Watching an attempt until it ends: the ranks' output (rank-prefixed on the terminal,
//! appended to `<run>/logs/rank-R.log`), their exit (and the cause mpirun or srun names),
//! heartbeats past `launch.heartbeat_timeout_s`, the launcher's signals (the first asks
//! for a checkpoint and a clean stop, the second stops every rank at once), and the
//! progress bar from rank 0's metrics.

use super::ranks::Output;
use super::supervisor::{unix_now, Supervisor};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant, SystemTime};

/// How an attempt ended.
pub(super) enum Outcome {
    /// Every rank exited 0 (after a first signal: checkpointed and stopped on request).
    Exited,
    /// A rank failed or hung: why, and seconds from detecting it to every rank stopped.
    Failed { cause: String, stop_s: f64 },
    /// A second signal stopped every rank at once.
    Stopped(i32),
}

impl Supervisor {
    /// Follows the attempt until it ends; records when.
    pub(super) fn watch(
        &mut self,
        child: &mut Child,
        output: Output,
        started: SystemTime,
    ) -> anyhow::Result<Outcome> {
        let mut mpirun_lines = Vec::new();
        let mut tail = MetricsTail::new(&self.run_dir);
        let mut last_poll = Instant::now();
        let outcome = loop {
            // Output first, so that nothing a rank printed is lost.
            while let Ok((is_out, line)) = output.try_recv() {
                self.show(is_out, line, &mut mpirun_lines);
            }
            if let Some(status) = child.try_wait()? {
                self.drain(&output, &mut mpirun_lines);
                if status.success() {
                    break Outcome::Exited;
                }
                break Outcome::Failed {
                    cause: failure_cause(&mpirun_lines, status.code()),
                    stop_s: 0.0,
                };
            }
            if let Some(stopped) = self.check_signal(child)? {
                break stopped;
            }
            if last_poll.elapsed() > Duration::from_millis(500) {
                last_poll = Instant::now();
                if let Some((step, loss, rate)) = tail.newest() {
                    self.bar.set_position(step);
                    self.bar
                        .set_message(format!("loss {loss:.4} | {rate:.0} tok/s"));
                }
                if let Some(hung) = self.check_heartbeats(child, started) {
                    break hung;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        self.current().ended_unix_s = Some(unix_now());
        Ok(outcome)
    }

    /// Logs and shows one output line while the ranks run: a rank's on the stream it
    /// was written to, mpirun's own (kept for `failure_cause`) unless blank or a rule.
    fn show(&mut self, is_out: bool, line: String, mpirun_lines: &mut Vec<String>) {
        match untag(&line, is_out) {
            Some((rank, out, text)) => {
                self.logs.write(&format!("rank-{rank}"), text);
                if rank == 0 {
                    self.note_resume(text);
                }
                let shown = format!("[rank {rank}] {text}");
                self.bar.suspend(|| {
                    if out {
                        println!("{shown}");
                    } else {
                        eprintln!("{shown}");
                    }
                });
            }
            None => {
                self.logs.write("mpirun", &line);
                if !line.trim().is_empty() && !line.starts_with("---") {
                    self.bar.suspend(|| {
                        if is_out {
                            println!("[mpirun] {line}")
                        } else {
                            eprintln!("[mpirun] {line}")
                        }
                    });
                }
                mpirun_lines.push(line);
            }
        }
    }

    /// Rank 0's word on where the attempt started: `resuming from LOC (step N)`, or
    /// `... starting from step 0`.
    fn note_resume(&mut self, text: &str) {
        let parsed = match text.strip_prefix("resuming from ") {
            Some(rest) => rest.rsplit_once(" (step ").and_then(|(at, step)| {
                let step = step.strip_suffix(')')?.parse().ok()?;
                Some((step, Some(at.to_string())))
            }),
            None if text.ends_with("starting from step 0") => Some((0, None)),
            None => None,
        };
        if let Some((step, at)) = parsed {
            let a = self.current();
            a.resume_step = Some(step);
            a.resumed_from = at;
            let _ = self.write_state();
        }
    }

    /// After mpirun exited: what is left of the output (ranks' lines to stderr).
    fn drain(&mut self, output: &Output, mpirun_lines: &mut Vec<String>) {
        std::thread::sleep(Duration::from_millis(50));
        while let Ok((is_out, line)) = output.try_recv() {
            match untag(&line, is_out) {
                Some((rank, _, text)) => {
                    self.logs.write(&format!("rank-{rank}"), text);
                    self.bar.suspend(|| eprintln!("[rank {rank}] {text}"));
                }
                None => {
                    self.logs.write("mpirun", &line);
                    mpirun_lines.push(line);
                }
            }
        }
    }

    /// A first signal writes the stop file (preemption: the ranks finish their step,
    /// checkpoint and exit 0); a second stops every rank now.
    fn check_signal(&mut self, child: &mut Child) -> anyhow::Result<Option<Outcome>> {
        let sig = super::signals::take();
        if sig != 0 && !self.stopping {
            self.stopping = true;
            std::fs::write(&self.stop_file, format!("signal {sig}\n"))?;
            self.bar.suspend(|| {
                eprintln!(
                    "launcher: signal {sig}: every rank checkpoints after its current step \
                     and stops (a second signal stops them at once)"
                )
            });
        } else if sig != 0 {
            self.bar
                .suspend(|| eprintln!("launcher: signal {sig}: stopping every rank now"));
            stop_group(child, Duration::from_secs(10));
            return Ok(Some(Outcome::Stopped(sig)));
        }
        Ok(None)
    }

    /// Every rank whose heartbeat is older than `launch.heartbeat_timeout_s`: all ranks
    /// are stopped and the hung ones named.
    fn check_heartbeats(&mut self, child: &mut Child, started: SystemTime) -> Option<Outcome> {
        let limit = self.policy.heartbeat_timeout_s;
        let beats = heartbeats(&self.heartbeat_dir, self.nproc, started);
        let stuck: Vec<usize> = (0..self.nproc).filter(|&r| beats[r].0 > limit).collect();
        let &first = stuck.first()?;
        let detected = Instant::now();
        stop_group(child, Duration::from_secs(5));
        // A rank stuck in a collective stalls the others too, and which of them crossed
        // the limit first is timing: every rank that got no further than the last step
        // of a rank past the limit is named, with the step each last finished.
        let step_of = |r: usize| {
            beats[r]
                .1
                .as_deref()
                .and_then(|s| s.trim().parse::<u64>().ok())
        };
        let furthest = stuck.iter().map(|&r| step_of(r)).max().flatten();
        let named: Vec<String> = (0..self.nproc)
            .filter(|&r| stuck.contains(&r) || step_of(r) <= furthest)
            .map(|r| match &beats[r].1 {
                Some(s) => format!("rank {r} after step {}", s.trim()),
                None => format!("rank {r} before its first step"),
            })
            .collect();
        Some(Outcome::Failed {
            cause: format!(
                "hang: no heartbeat for {:.1} s (limit launch.heartbeat_timeout_s = {} s) \
                 from {}",
                beats[first].0,
                limit,
                named.join(", ")
            ),
            stop_s: detected.elapsed().as_secs_f64(),
        })
    }
}

/// A rank's output line: mpirun's `--tag-output` (`[JOB,RANK]<stdout>:text`) or srun's
/// `--label` (`RANK: text`, on the stream it was written to).
fn untag(line: &str, is_out: bool) -> Option<(usize, bool, &str)> {
    if let Some((label, text)) = line.split_once(": ") {
        if let Ok(rank) = label.trim_start().parse() {
            return Some((rank, is_out, text));
        }
    }
    let rest = line.strip_prefix('[')?;
    let (ids, rest) = rest.split_once(']')?;
    let rank = ids.split_once(',')?.1.parse().ok()?;
    if let Some(text) = rest.strip_prefix("<stdout>:") {
        Some((rank, true, text))
    } else {
        rest.strip_prefix("<stderr>:").map(|t| (rank, false, t))
    }
}

/// Why mpirun (or srun) failed, from its own (untagged) messages.
fn failure_cause(mpirun_lines: &[String], status: Option<i32>) -> String {
    let text = mpirun_lines.join("\n");
    // srun: "srun: error: vm: task 1: Killed" / "... task 0: Exited with exit code 2"
    if let Some(at) = text.find(": task ") {
        let tail = &text[at + ": task ".len()..];
        let rank: String = tail.chars().take_while(|c| c.is_ascii_digit()).collect();
        let what = tail[rank.len()..]
            .trim_start_matches(':')
            .lines()
            .next()
            .unwrap_or("")
            .trim();
        if what == "Killed" {
            return format!("rank {rank} died on signal 9 (Killed)");
        }
        if let Some(code) = what.strip_prefix("Exited with exit code ") {
            return format!("rank {rank} exited with code {code}");
        }
    }
    // "mpirun noticed that process rank 1 with PID 123 on node x exited on signal 9 (Killed)."
    if let Some(at) = text.find("noticed that process rank ") {
        let tail = &text[at + "noticed that process rank ".len()..];
        let rank: String = tail.chars().take_while(|c| c.is_ascii_digit()).collect();
        if let Some(s) = tail.find("exited on signal ") {
            let sig = tail[s + "exited on signal ".len()..]
                .split(['.', '\n'])
                .next()
                .unwrap_or("")
                .trim();
            return format!("rank {rank} died on signal {sig}");
        }
    }
    // "Process name: [[9185,1],0]\n  Exit code:    2"
    if let (Some(p), Some(e)) = (text.find("Process name: [["), text.find("Exit code:")) {
        let rank: String = text[p..]
            .split("],")
            .nth(1)
            .unwrap_or("")
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        let code: String = text[e + "Exit code:".len()..]
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        return format!("rank {rank} exited with code {code}");
    }
    match status {
        Some(c) => format!("mpirun exited with code {c}"),
        None => "mpirun was killed by a signal".into(),
    }
}

/// Stops the process group of `child` (mpirun and every rank): SIGTERM, then SIGKILL
/// after `grace`. Returns once mpirun has exited.
fn stop_group(child: &mut Child, grace: Duration) {
    let pgid = child.id() as libc::pid_t;
    // SAFETY: signalling our own child's process group.
    unsafe {
        libc::kill(-pgid, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: as above; the ranks may outlive mpirun, so the group is killed regardless.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
    let _ = child.wait();
}

/// Follows rank 0's metrics file for the progress bar.
struct MetricsTail {
    path: PathBuf,
    /// Followed while `path` does not exist: a growth schedule's first stage.
    before: PathBuf,
    following: PathBuf,
    offset: u64,
}

impl MetricsTail {
    fn new(run_dir: &Path) -> Self {
        Self {
            path: run_dir.join("metrics.jsonl"),
            before: run_dir.join("stage1/metrics.jsonl"),
            following: PathBuf::new(),
            offset: 0,
        }
    }

    /// The newest training line (step, loss, tokens/s) since the last call.
    fn newest(&mut self) -> Option<(u64, f64, f64)> {
        use std::io::{Read, Seek, SeekFrom};
        let now = if self.path.exists() {
            self.path.clone()
        } else {
            self.before.clone()
        };
        if now != self.following {
            self.following = now;
            self.offset = 0;
        }
        let mut f = std::fs::File::open(&self.following).ok()?;
        let len = f.metadata().ok()?.len();
        if len < self.offset {
            self.offset = 0; // rewritten by a resume
        }
        f.seek(SeekFrom::Start(self.offset)).ok()?;
        let mut text = String::new();
        f.read_to_string(&mut text).ok()?;
        let complete = text.rfind('\n').map(|i| i + 1).unwrap_or(0);
        self.offset += complete as u64;
        text[..complete]
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| {
                Some((
                    v["step"].as_u64()?,
                    v.get("loss")?.as_f64()?,
                    v["tokens_per_s"].as_f64().unwrap_or(0.0),
                ))
            })
            .next()
    }
}

/// Each rank's heartbeat age (seconds since it was written, a rank that has not written
/// one yet counted from `since`) and its last step.
fn heartbeats(dir: &Path, ranks: usize, since: SystemTime) -> Vec<(f64, Option<String>)> {
    let now = SystemTime::now();
    (0..ranks)
        .map(|r| {
            let path = dir.join(format!("rank-{r}"));
            let (when, step) = match std::fs::metadata(&path).and_then(|m| m.modified()) {
                Ok(t) => (t.max(since), std::fs::read_to_string(&path).ok()),
                Err(_) => (since, None),
            };
            let age = now.duration_since(when).unwrap_or_default().as_secs_f64();
            (age, step)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_lines_are_untagged_for_mpirun_and_srun() {
        assert_eq!(
            untag("[1,0]<stdout>:step 3", false),
            Some((0, true, "step 3"))
        );
        assert_eq!(untag("[1,2]<stderr>:oops", true), Some((2, false, "oops")));
        assert_eq!(untag("1: hello", true), Some((1, true, "hello")));
        assert_eq!(untag("mpirun noticed something", false), None);
    }

    #[test]
    fn failure_causes_name_the_rank() {
        let lines = |s: &str| s.lines().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(
            failure_cause(&lines("srun: error: vm: task 1: Killed"), Some(137)),
            "rank 1 died on signal 9 (Killed)"
        );
        assert_eq!(
            failure_cause(
                &lines("srun: error: vm: task 0: Exited with exit code 2"),
                Some(2)
            ),
            "rank 0 exited with code 2"
        );
        assert_eq!(
            failure_cause(
                &lines(
                    "mpirun noticed that process rank 1 with PID 123 on node x exited on \
                     signal 9 (Killed)."
                ),
                Some(137)
            ),
            "rank 1 died on signal 9 (Killed)"
        );
        assert_eq!(
            failure_cause(
                &lines("Process name: [[9185,1],0]\n  Exit code:    2"),
                Some(2)
            ),
            "rank 0 exited with code 2"
        );
        assert_eq!(failure_cause(&[], Some(3)), "mpirun exited with code 3");
        assert_eq!(failure_cause(&[], None), "mpirun was killed by a signal");
    }
}
