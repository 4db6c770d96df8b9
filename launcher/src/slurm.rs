//! Slurm: `catapult submit` writes a readable batch script into the run directory and
//! submits it; inside the allocation the script runs `catapult launch --via srun`, which
//! starts the ranks with `srun --mpi=pmix` and supervises them as it does locally
//! (restarts, hang detection, preemption by `--signal=B:USR1@120`, requeue).
//! `catapult status|cancel|logs RUN` read the run directory and ask Slurm.

use crate::{OverrideArgs, UsageContext, UsageError};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Arguments of `catapult submit`.
#[derive(clap::Args)]
pub struct SubmitArgs {
    /// The recipe file, e.g. recipes/tiny.yaml.
    recipe: PathBuf,
    /// Nodes to allocate.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Ranks per node on CPU machines.
    #[arg(long, conflicts_with = "gpus_per_node")]
    tasks_per_node: Option<usize>,
    /// GPUs per node (one rank per GPU).
    #[arg(long)]
    gpus_per_node: Option<usize>,
    /// Slurm partition (default: the cluster's default).
    #[arg(long)]
    partition: Option<String>,
    /// Time limit (Slurm syntax, e.g. 2:00:00).
    #[arg(long)]
    time: Option<String>,
    /// Account to charge.
    #[arg(long)]
    account: Option<String>,
    /// Seconds before the time limit at which Slurm signals the job to checkpoint.
    #[arg(long, default_value_t = 120)]
    signal_before_s: u32,
    #[command(flatten)]
    overrides: OverrideArgs,
    /// Start over instead of resuming an earlier run in the same run directory.
    #[arg(long)]
    overwrite: bool,
    /// Write and print the batch script, submit nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Single-quotes `s` for bash.
fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A Slurm name (partition, account): letters, digits, '-', '_' and '.'; anything else
/// (a newline, a quote, `$(...)`) would end or change the `#SBATCH` line it is written to.
fn check_slurm_name(flag: &str, value: &str) -> Result<(), UsageError> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
    if !value.is_empty() && value.chars().all(ok) {
        return Ok(());
    }
    Err(UsageError::new(format!(
        "--{flag} {value:?}: a Slurm {flag} name holds only letters, digits, '-', '_' and '.'; \
         give the name `sinfo` (partitions) or `sacctmgr show assoc` (accounts) lists"
    )))
}

/// Whether `t` is a time limit in one of Slurm's formats: `M`, `M:S`, `H:M:S`, `D-H`,
/// `D-H:M`, `D-H:M:S`, or `UNLIMITED`/`INFINITE`.
fn is_slurm_time(t: &str) -> bool {
    if t == "UNLIMITED" || t == "INFINITE" {
        return true;
    }
    let number = |s: &str| !s.is_empty() && s.len() <= 9 && s.chars().all(|c| c.is_ascii_digit());
    let (days, clock) = match t.split_once('-') {
        Some((d, rest)) => (Some(d), rest),
        None => (None, t),
    };
    let parts: Vec<&str> = clock.split(':').collect();
    if days.is_some_and(|d| !number(d)) || !parts.iter().all(|p| number(p)) {
        return false;
    }
    (1..=3).contains(&parts.len())
}

fn check_slurm_time(value: &str) -> Result<(), UsageError> {
    if is_slurm_time(value) {
        return Ok(());
    }
    Err(UsageError::new(format!(
        "--time {value:?}: not a Slurm time limit; use minutes (90), M:S, H:M:S (2:00:00), \
         D-H, D-H:M or D-H:M:S (1-12:00:00), or UNLIMITED"
    )))
}

/// A path written into an `#SBATCH` line (not a shell line): control characters, quotes
/// and backslashes would end or change the line, so they are refused; spaces are kept
/// inside double quotes, which sbatch reads as one value.
fn sbatch_path(what: &str, p: &Path) -> Result<String, UsageError> {
    let s = p.display().to_string();
    if s.chars().any(|c| c.is_control() || "\"'\\".contains(c)) {
        return Err(UsageError::new(format!(
            "{what} {s:?}: a path with control characters, quotes or backslashes cannot be \
             written into the batch script; choose another directory (output.dir)"
        )));
    }
    Ok(if s.contains(' ') {
        format!("\"{s}\"")
    } else {
        s
    })
}

/// `s` for a `#` comment line: control characters (a newline would start a new line of
/// the script) shown escaped.
fn comment_text(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().collect()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(p))
            .unwrap_or_else(|_| p.to_path_buf())
    }
}

/// The run directory's Slurm record.
#[derive(serde::Serialize, serde::Deserialize)]
struct JobRecord {
    job_id: String,
    script: String,
    cluster_conf: Option<String>,
}

/// Refuses partition, account and time values that are not Slurm's (exit 2).
fn check_inputs(args: &SubmitArgs) -> Result<(), UsageError> {
    for (flag, v) in [("partition", &args.partition), ("account", &args.account)] {
        if let Some(v) = v {
            check_slurm_name(flag, v)?;
        }
    }
    match &args.time {
        Some(t) => check_slurm_time(t),
        None => Ok(()),
    }
}

/// The batch script's `#SBATCH` header.
fn sbatch_header(
    args: &SubmitArgs,
    recipe: &catapult_trainer::Recipe,
    per_node: usize,
    slurm_out: &str,
) -> Vec<String> {
    let mut lines = vec![
        "#!/bin/bash".to_string(),
        format!(
            "# Written by `catapult submit` for {}: {} node(s) x {} rank(s).",
            comment_text(&args.recipe.display().to_string()),
            args.nodes,
            per_node
        ),
        "# Resubmitting (or a requeue) resumes the run from its newest valid checkpoint."
            .to_string(),
        format!("#SBATCH --job-name=catapult-{}", recipe.name),
        format!("#SBATCH --nodes={}", args.nodes),
        format!("#SBATCH --ntasks-per-node={per_node}"),
        format!("#SBATCH --output={slurm_out}"),
        "#SBATCH --open-mode=append".to_string(),
        // The batch shell (the launcher, by exec) gets USR1 before the time limit.
        format!("#SBATCH --signal=B:USR1@{}", args.signal_before_s),
        if recipe.launch.requeue {
            "#SBATCH --requeue".to_string()
        } else {
            "#SBATCH --no-requeue".to_string()
        },
    ];
    if let Some(g) = args.gpus_per_node {
        lines.push(format!("#SBATCH --gpus-per-node={g}"));
    }
    for (flag, v) in [
        ("partition", &args.partition),
        ("time", &args.time),
        ("account", &args.account),
    ] {
        if let Some(v) = v {
            lines.push(format!("#SBATCH --{flag}={v}"));
        }
    }
    lines
}

pub fn submit(args: SubmitArgs) -> Result<(), crate::Failure> {
    let recipe = crate::load_recipe(&args.recipe, &args.overrides)?;
    check_inputs(&args)?;
    let per_node = args.tasks_per_node.or(args.gpus_per_node).unwrap_or(1);
    for (flag, n) in [
        ("--nodes", args.nodes),
        ("--tasks-per-node", args.tasks_per_node.unwrap_or(1)),
        ("--gpus-per-node", args.gpus_per_node.unwrap_or(1)),
    ] {
        if n == 0 {
            return Err(UsageError::new(format!("{flag} 0: give 1 or more")).into());
        }
    }
    let nproc = args.nodes * per_node;
    crate::launch::check_nproc(&recipe, &args.recipe, nproc)?;
    let run_dir = absolute(&recipe.run_dir());
    let slurm_out = sbatch_path("output.dir", &run_dir.join("logs").join("slurm-%j.out"))?;
    std::fs::create_dir_all(run_dir.join("logs"))
        .with_context(|| format!("{}: cannot create", run_dir.display()))?;
    let exe = std::env::current_exe()?;
    let workdir = std::env::current_dir()?;
    let mut lines = sbatch_header(&args, &recipe, per_node, &slurm_out);
    lines.push("set -euo pipefail".into());
    lines.push(format!("cd {}", quote(&workdir.display().to_string())));
    let mut launch = vec![
        "exec".to_string(),
        quote(&exe.display().to_string()),
        "launch".into(),
        quote(&absolute(&args.recipe).display().to_string()),
        "--via".into(),
        "srun".into(),
        "--nproc".into(),
        nproc.to_string(),
    ];
    for s in &args.overrides.set {
        launch.push("--set".into());
        launch.push(quote(s));
    }
    if args.overwrite {
        launch.push("--overwrite".into());
    }
    lines.push(launch.join(" "));
    let script = lines.join("\n") + "\n";
    let path = run_dir.join("job.sbatch");
    std::fs::write(&path, &script).with_context(|| format!("{}: cannot write", path.display()))?;
    if args.dry_run {
        print!("{script}");
        eprintln!("(dry run: {} written, nothing submitted)", path.display());
        return Ok(());
    }
    let out = match Command::new("sbatch").arg("--parsable").arg(&path).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(anyhow::anyhow!(
                "sbatch not found: Slurm is not installed on this machine (scripts/dev-slurm \
                 starts a local one); no job submitted"
            )
            .into())
        }
        Err(e) => return Err(anyhow::Error::new(e).context("sbatch did not start").into()),
    };
    if !out.status.success() {
        return Err(anyhow::anyhow!(
            "sbatch refused {}: {}; no job submitted",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    let job_id = String::from_utf8_lossy(&out.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap_or("")
        .to_string();
    let record = JobRecord {
        job_id: job_id.clone(),
        script: path.display().to_string(),
        cluster_conf: std::env::var("SLURM_CONF").ok(),
    };
    std::fs::write(
        run_dir.join("slurm.json"),
        serde_json::to_vec_pretty(&record)?,
    )?;
    println!("{job_id}");
    eprintln!(
        "submitted job {job_id} ({}); `catapult status {}` follows it",
        path.display(),
        run_dir.display()
    );
    Ok(())
}

fn record(run: &Path) -> anyhow::Result<JobRecord> {
    let path = run.join("slurm.json");
    let bytes = std::fs::read(&path).usage_context(|| {
        format!(
            "{}: no Slurm job recorded here (was the run submitted with `catapult submit`?)",
            path.display()
        )
    })?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// The job's state: squeue while it is queued or running, then scontrol (while Slurm
/// keeps the record).
fn job_state(job: &str) -> String {
    let squeue = Command::new("squeue")
        .args(["-h", "-j", job, "-o", "%T"])
        .output();
    if let Ok(o) = squeue {
        let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if o.status.success() && !s.is_empty() {
            return s;
        }
    }
    if let Ok(o) = Command::new("scontrol").args(["show", "job", job]).output() {
        let text = String::from_utf8_lossy(&o.stdout);
        if let Some(state) = text
            .split_whitespace()
            .find_map(|w| w.strip_prefix("JobState="))
        {
            return state.to_string();
        }
    }
    "UNKNOWN (Slurm no longer holds the job's record)".into()
}

/// `catapult status RUN`.
pub fn status(run: &Path) -> Result<(), crate::Failure> {
    let mut out = serde_json::json!({"run": run.display().to_string()});
    if let Ok(r) = record(run) {
        out["job_id"] = r.job_id.clone().into();
        out["job_state"] = job_state(&r.job_id).into();
    }
    if let Ok(b) = std::fs::read(run.join("supervisor.json")) {
        if let Ok(s) = serde_json::from_slice::<serde_json::Value>(&b) {
            out["supervisor"] = s["status"].clone();
            let attempts = s["attempts"].as_array().cloned().unwrap_or_default();
            out["attempts"] = attempts.len().into();
            // Where each attempt started and how it ended.
            out["history"] = attempts
                .iter()
                .map(|a| {
                    serde_json::json!({
                        "attempt": a["attempt"], "resume_step": a["resume_step"],
                        "resumed_from": a["resumed_from"], "cause": a["cause"],
                        "checkpoint_at_end": a["checkpoint_at_end"],
                        "consecutive_failures": a["consecutive_failures"],
                        "backoff_s": a["backoff_s"],
                    })
                })
                .collect::<Vec<_>>()
                .into();
        }
    }
    if let Ok(text) = std::fs::read_to_string(run.join("metrics.jsonl")) {
        if let Some(last) = text
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v.get("loss").is_some())
        {
            out["step"] = last["step"].clone();
            out["loss"] = last["loss"].clone();
        }
    }
    if let Ok(latest) = std::fs::read_to_string(run.join("checkpoints/latest")) {
        out["checkpoint"] = latest.trim().into();
    }
    if out.get("job_id").is_none() && out.get("supervisor").is_none() {
        return Err(UsageError::new(format!(
            "{}: not a run directory (no slurm.json or supervisor.json)",
            run.display()
        ))
        .into());
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// `catapult cancel RUN`.
pub fn cancel(run: &Path) -> Result<(), crate::Failure> {
    let r = record(run)?;
    let out = Command::new("scancel")
        .arg(&r.job_id)
        .output()
        .context("scancel did not start (is Slurm installed?)")?;
    if !out.status.success() {
        return Err(anyhow::anyhow!(
            "scancel {}: {}",
            r.job_id,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    println!("cancelled job {}", r.job_id);
    Ok(())
}

/// `catapult logs RUN [--rank R] [--follow]`.
pub fn logs(run: &Path, rank: usize, follow: bool) -> Result<(), crate::Failure> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let path = run.join("logs").join(format!("rank-{rank}.log"));
    let mut offset = 0u64;
    loop {
        if let Ok(mut f) = std::fs::File::open(&path) {
            f.seek(SeekFrom::Start(offset))?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            offset += buf.len() as u64;
            std::io::stdout().write_all(&buf)?;
            std::io::stdout().flush()?;
        } else if !follow {
            return Err(UsageError::new(format!(
                "{}: no log for rank {rank} yet (logs are written by `catapult launch` and \
                 `catapult submit`)",
                path.display()
            ))
            .into());
        }
        if !follow {
            return Ok(());
        }
        let done = std::fs::read(run.join("supervisor.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|s| s["status"] != "running");
        if done {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_time_limits_are_checked_in_slurms_formats() {
        for ok in [
            "90",
            "30:00",
            "2:00:00",
            "1-12",
            "1-12:30",
            "1-12:30:00",
            "UNLIMITED",
        ] {
            assert!(is_slurm_time(ok), "{ok}");
        }
        for bad in [
            "banana",
            "",
            "1:2:3:4",
            "-1",
            "1-",
            "2:00\n#SBATCH",
            "$(id)",
            "1h",
        ] {
            assert!(!is_slurm_time(bad), "{bad:?}");
        }
    }

    #[test]
    fn names_and_paths_that_would_change_the_script_are_refused() {
        assert!(check_slurm_name("partition", "gpu-a100.large_1").is_ok());
        for bad in ["debug\nrm -rf ~", "a b", "x'y", "$(id)", "`id`", ""] {
            assert!(check_slurm_name("partition", bad).is_err(), "{bad:?}");
        }
        assert_eq!(sbatch_path("d", Path::new("/a b/c")).unwrap(), "\"/a b/c\"");
        assert!(sbatch_path("d", Path::new("/a\nb")).is_err());
        assert!(sbatch_path("d", Path::new("/a\"b")).is_err());
        assert_eq!(comment_text("a\nb"), "a\\nb");
    }
}
