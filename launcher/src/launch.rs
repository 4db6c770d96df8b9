//! `catapult launch RECIPE --nproc N`: starts N ranks of `catapult train` on this machine
//! through mpirun and supervises them.
//!
//! The launcher validates the recipe before anything starts, prefixes every rank's
//! output line with its rank (and appends it to `<run>/logs/rank-R.log`), shows one
//! progress bar from rank 0's metrics, and keeps `<run>/supervisor.json` up to date. When
//! a rank exits non-zero, or a rank stops heartbeating (`<run>/heartbeat/rank-R`, written
//! by the trainer after every step) for `launch.heartbeat_timeout_s`, it stops every
//! rank, waits `launch.restart_backoff_s` (doubling), and starts them again with
//! `--resume auto`, at most `launch.max_restarts` times; each attempt's cause is recorded.
//! Nothing listens on a socket: liveness travels through files in the run directory.

use crate::OverrideArgs;
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

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

/// The last signal the launcher received (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    SIGNAL.store(sig, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
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

/// Ranks' logs under `<run>/logs`, opened on first use.
struct Logs {
    dir: PathBuf,
    files: std::collections::BTreeMap<String, std::fs::File>,
}

impl Logs {
    fn write(&mut self, name: &str, line: &str) {
        if !self.files.contains_key(name) {
            let path = self.dir.join(format!("{name}.log"));
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
            {
                Ok(f) => {
                    self.files.insert(name.to_string(), f);
                }
                Err(e) => {
                    eprintln!("warning: {}: {e}", path.display());
                    return;
                }
            }
        }
        if let Some(f) = self.files.get_mut(name) {
            let _ = writeln!(f, "{line}");
        }
    }
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
        anyhow::bail!(
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
        );
    }
    Ok(())
}

pub fn run(args: LaunchArgs) -> Result<(), crate::Failure> {
    // Bad input fails here, before any rank starts.
    let recipe = crate::load_recipe(&args.recipe, &args.overrides)?;
    let par = &recipe.parallel;
    let nproc = args.nproc.unwrap_or(par.expert * par.data.max(1));
    check_nproc(&recipe, &args.recipe, nproc)?;
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
    let mut stopping = false;
    let l = recipe.launch.clone();
    let mut state = State {
        status: "running",
        recipe: args.recipe.display().to_string(),
        nproc,
        launcher_pid: std::process::id(),
        max_restarts: l.max_restarts,
        attempts: Vec::new(),
    };
    if resuming {
        eprintln!(
            "{} holds an earlier run: resuming it (--overwrite starts over)",
            run_dir.display()
        );
    }
    install_signal_handlers();
    let mut logs = Logs {
        dir: run_dir.join("logs"),
        files: Default::default(),
    };
    let bar = ProgressBar::new(recipe.train.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("static template"),
    );
    bar.set_prefix(format!("{} x{nproc}", recipe.name));
    let exe = std::env::current_exe()?;
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());

    for attempt in 0.. {
        let _ = std::fs::remove_dir_all(&heartbeat_dir);
        std::fs::create_dir_all(&heartbeat_dir)?;
        let mut cmd;
        if args.via == "srun" {
            // Inside the allocation: srun forwards the whole environment.
            cmd = Command::new("srun");
            cmd.args([
                "--mpi=pmix",
                "--label",
                "--kill-on-bad-exit=1",
                "--ntasks",
                &nproc.to_string(),
            ]);
        } else {
            cmd = Command::new("mpirun");
            if root {
                cmd.arg("--allow-run-as-root");
            }
            if nproc > cores {
                cmd.arg("--oversubscribe");
            }
            cmd.args(["--tag-output", "-np", &nproc.to_string()]);
            for var in [
                "CATAPULT_HEARTBEAT_DIR",
                "CATAPULT_CONTROL_DIR",
                "CATAPULT_ATTEMPT",
                "CATAPULT_FAULT",
            ] {
                cmd.args(["-x", var]);
            }
        }
        cmd.arg(&exe).arg("train").arg(&args.recipe);
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
            cmd.env("CATAPULT_PROGRESS", "off");
        }
        cmd.env("CATAPULT_HEARTBEAT_DIR", &heartbeat_dir)
            .env("CATAPULT_CONTROL_DIR", &control_dir)
            .env("CATAPULT_ATTEMPT", attempt.to_string())
            .env(
                "CATAPULT_FAULT",
                std::env::var("CATAPULT_FAULT").unwrap_or_default(),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let started = SystemTime::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(anyhow::anyhow!(
                    "mpirun not found: install Open MPI (scripts/setup does: openmpi-bin) or \
                     put it on PATH"
                )
                .into())
            }
            Err(e) => return Err(anyhow::Error::new(e).context("mpirun did not start").into()),
        };
        state.attempts.push(Attempt {
            attempt,
            started_unix_s: unix_now(),
            ended_unix_s: None,
            cause: None,
            stop_s: None,
        });
        write_state(&run_dir, &state)?;
        let (tx, rx) = mpsc::channel::<(bool, String)>();
        for (is_out, pipe) in [
            (
                true,
                Box::new(child.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
            ),
            (false, Box::new(child.stderr.take().expect("piped"))),
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
        drop(tx);
        let mut mpirun_lines = Vec::new();
        let mut tail = MetricsTail {
            path: run_dir.join("metrics.jsonl"),
            before: run_dir.join("stage1/metrics.jsonl"),
            following: PathBuf::new(),
            offset: 0,
        };
        let mut last_poll = Instant::now();
        let outcome: Result<(), (String, f64)> = loop {
            // Output first, so that nothing a rank printed is lost.
            while let Ok((is_out, line)) = rx.try_recv() {
                match untag(&line, is_out) {
                    Some((rank, out, text)) => {
                        logs.write(&format!("rank-{rank}"), text);
                        let shown = format!("[rank {rank}] {text}");
                        bar.suspend(|| {
                            if out {
                                println!("{shown}");
                            } else {
                                eprintln!("{shown}");
                            }
                        });
                    }
                    None => {
                        logs.write("mpirun", &line);
                        if !line.trim().is_empty() && !line.starts_with("---") {
                            bar.suspend(|| {
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
            if let Some(status) = child.try_wait()? {
                // Drain what is left of the output.
                std::thread::sleep(Duration::from_millis(50));
                while let Ok((is_out, line)) = rx.try_recv() {
                    match untag(&line, is_out) {
                        Some((rank, _, text)) => {
                            logs.write(&format!("rank-{rank}"), text);
                            bar.suspend(|| eprintln!("[rank {rank}] {text}"));
                        }
                        None => {
                            logs.write("mpirun", &line);
                            mpirun_lines.push(line);
                        }
                    }
                }
                if status.success() {
                    break Ok(());
                }
                break Err((failure_cause(&mpirun_lines, status.code()), 0.0));
            }
            let sig = SIGNAL.swap(0, Ordering::SeqCst);
            if sig != 0 && !stopping {
                // Preemption: the ranks finish their step, checkpoint and exit 0.
                stopping = true;
                std::fs::write(&stop_file, format!("signal {sig}\n"))?;
                bar.suspend(|| {
                    eprintln!(
                        "launcher: signal {sig}: every rank checkpoints after its current step \
                         and stops (a second signal stops them at once)"
                    )
                });
            } else if sig != 0 {
                bar.suspend(|| eprintln!("launcher: signal {sig}: stopping every rank now"));
                stop_group(&mut child, Duration::from_secs(10));
                state.status = "stopped";
                if let Some(a) = state.attempts.last_mut() {
                    a.ended_unix_s = Some(unix_now());
                    a.cause = Some(format!("the launcher received signal {sig}"));
                }
                write_state(&run_dir, &state)?;
                return Err(anyhow::anyhow!(
                    "stopped by signal {sig}; run the same command to resume"
                )
                .into());
            }
            if last_poll.elapsed() > Duration::from_millis(500) {
                last_poll = Instant::now();
                if let Some((step, loss, rate)) = tail.newest() {
                    bar.set_position(step);
                    bar.set_message(format!("loss {loss:.4} | {rate:.0} tok/s"));
                }
                let beats = heartbeats(&heartbeat_dir, nproc, started);
                let stuck: Vec<usize> = (0..nproc)
                    .filter(|&r| beats[r].0 > l.heartbeat_timeout_s)
                    .collect();
                if let Some(&first) = stuck.first() {
                    let detected = Instant::now();
                    stop_group(&mut child, Duration::from_secs(5));
                    // A rank stuck in a collective stalls the others too: every rank
                    // past the limit is named, with the step each last finished.
                    let named: Vec<String> = stuck
                        .iter()
                        .map(|&r| match &beats[r].1 {
                            Some(s) => format!("rank {r} after step {}", s.trim()),
                            None => format!("rank {r} before its first step"),
                        })
                        .collect();
                    break Err((
                        format!(
                            "hang: no heartbeat for {:.1} s (limit launch.heartbeat_timeout_s \
                             = {} s) from {}",
                            beats[first].0,
                            l.heartbeat_timeout_s,
                            named.join(", ")
                        ),
                        detected.elapsed().as_secs_f64(),
                    ));
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let a = state.attempts.last_mut().expect("pushed above");
        a.ended_unix_s = Some(unix_now());
        match outcome {
            Ok(()) if stopping => {
                bar.finish_and_clear();
                state.status = "preempted";
                write_state(&run_dir, &state)?;
                eprintln!(
                    "run stopped with a checkpoint on request; run the same command to resume"
                );
                if let (true, Ok(job)) = (l.requeue, std::env::var("SLURM_JOB_ID")) {
                    // Back into the queue: the same batch script resumes the run.
                    let out = Command::new("scontrol").args(["requeue", &job]).output();
                    match out {
                        Ok(o) if o.status.success() => eprintln!("requeued Slurm job {job}"),
                        Ok(o) => eprintln!(
                            "warning: scontrol requeue {job} failed: {}",
                            String::from_utf8_lossy(&o.stderr).trim()
                        ),
                        Err(e) => eprintln!("warning: scontrol requeue {job}: {e}"),
                    }
                }
                return Ok(());
            }
            Ok(()) => {
                bar.finish_and_clear();
                state.status = "completed";
                write_state(&run_dir, &state)?;
                eprintln!(
                    "run completed after {} attempt(s); logs: {}",
                    attempt + 1,
                    run_dir.join("logs").display()
                );
                return Ok(());
            }
            Err((cause, stop_s)) => {
                a.cause = Some(cause.clone());
                a.stop_s = Some(stop_s);
                if attempt >= l.max_restarts {
                    state.status = "failed";
                    write_state(&run_dir, &state)?;
                    bar.abandon();
                    let causes: Vec<String> = state
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
                    return Err(anyhow::anyhow!(
                        "the run failed {} time(s), launch.max_restarts = {} exhausted: {}; \
                         logs are in {}",
                        causes.len(),
                        l.max_restarts,
                        causes.join("; "),
                        run_dir.join("logs").display()
                    )
                    .into());
                }
                write_state(&run_dir, &state)?;
                let wait = l.restart_backoff_s * 2f64.powi(attempt as i32);
                bar.suspend(|| {
                    eprintln!(
                        "launcher: {cause}; restarting from the last checkpoint in {wait:.1} s \
                         (restart {} of {})",
                        attempt + 1,
                        l.max_restarts
                    )
                });
                std::thread::sleep(Duration::from_secs_f64(wait));
            }
        }
    }
    unreachable!("the attempt loop returns")
}
