//! Starting an attempt's ranks: the mpirun (or srun) command line around `catapult train`,
//! the environment of the launcher-rank contract (`catapult_trainer::supervision::env`),
//! the attempt's record in supervisor.json, and the threads that pipe the ranks' output
//! to the watcher.

use super::ranks::Output;
use super::supervisor::{unix_now, Attempt, Supervisor};
use catapult_trainer::supervision::env;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::SystemTime;

impl Supervisor {
    /// Starts attempt `attempt` (0 first) and records it; the process group's leader
    /// (mpirun or srun), its output and when it started.
    pub(super) fn spawn(&mut self, attempt: usize) -> anyhow::Result<(Child, Output, SystemTime)> {
        let _ = std::fs::remove_dir_all(&self.heartbeat_dir);
        std::fs::create_dir_all(&self.heartbeat_dir)?;
        let mut cmd = self.command(attempt);
        let started = SystemTime::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                anyhow::bail!(
                    "mpirun not found: install Open MPI (scripts/setup does: openmpi-bin) or \
                     put it on PATH"
                )
            }
            Err(e) => return Err(anyhow::Error::new(e).context("mpirun did not start")),
        };
        self.state.attempts.push(Attempt {
            attempt,
            started_unix_s: unix_now(),
            ended_unix_s: None,
            cause: None,
            stop_s: None,
            // A fresh start (--overwrite) begins at step 0 and says nothing of it.
            resume_step: (attempt == 0 && self.args.overwrite).then_some(0),
            resumed_from: None,
            checkpoint_at_end: None,
            consecutive_failures: None,
            backoff_s: None,
        });
        self.write_state()?;
        let output = pipe_output(&mut child);
        Ok((child, output, started))
    }

    /// `mpirun ... catapult train RECIPE --set ... --overwrite|--resume`, in a process
    /// group of its own, with the contract's environment and piped output.
    fn command(&self, attempt: usize) -> Command {
        let args = &self.args;
        let mut cmd = self.starter();
        cmd.arg(&self.ranks.exe).arg("train").arg(&args.recipe);
        for s in &args.overrides.set {
            cmd.args(["--set", s]);
        }
        if attempt == 0 && args.overwrite {
            cmd.arg("--overwrite");
        } else {
            cmd.arg("--resume");
        }
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            // The launcher's bar follows the metrics; the ranks' plain progress lines
            // would only repeat it.
            cmd.env(env::PROGRESS, "off");
        }
        cmd.env(env::HEARTBEAT_DIR, &self.heartbeat_dir)
            .env(env::CONTROL_DIR, &self.control_dir)
            .env(env::ATTEMPT, attempt.to_string())
            .env(env::FAULT, std::env::var(env::FAULT).unwrap_or_default())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd
    }

    /// srun inside a Slurm allocation, else mpirun on this machine, with their flags.
    fn starter(&self) -> Command {
        let nproc = self.nproc.to_string();
        if self.args.via == "srun" {
            // Inside the allocation: srun forwards the whole environment.
            let mut cmd = Command::new("srun");
            cmd.args([
                "--mpi=pmix",
                "--label",
                "--kill-on-bad-exit=1",
                "--ntasks",
                &nproc,
            ]);
            return cmd;
        }
        let mut cmd = Command::new("mpirun");
        if self.ranks.root {
            cmd.arg("--allow-run-as-root");
        }
        if self.nproc > self.ranks.cores {
            cmd.arg("--oversubscribe");
        }
        cmd.args(["--tag-output", "-np", &nproc]);
        for var in env::PASSED_TO_RANKS {
            cmd.args(["-x", var]);
        }
        cmd
    }
}

/// One thread per pipe sends the child's output lines on, until the pipe closes.
fn pipe_output(child: &mut Child) -> Output {
    let (tx, rx) = mpsc::channel::<(bool, String)>();
    let stdout = child.stdout.take().expect("stdout is piped by command()");
    let stderr = child.stderr.take().expect("stderr is piped by command()");
    for (is_out, pipe) in [
        (true, Box::new(stdout) as Box<dyn std::io::Read + Send>),
        (false, Box::new(stderr)),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if tx.send((is_out, line)).is_err() {
                    break;
                }
            }
        });
    }
    rx
}
