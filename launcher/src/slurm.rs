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

pub fn submit(args: SubmitArgs) -> Result<(), crate::Failure> {
    let recipe = crate::load_recipe(&args.recipe, &args.overrides)?;
    let per_node = args.tasks_per_node.or(args.gpus_per_node).unwrap_or(1);
    let nproc = args.nodes * per_node;
    crate::launch::check_nproc(&recipe, &args.recipe, nproc)?;
    let run_dir = absolute(&recipe.run_dir());
    std::fs::create_dir_all(run_dir.join("logs"))
        .with_context(|| format!("{}: cannot create", run_dir.display()))?;
    let exe = std::env::current_exe()?;
    let workdir = std::env::current_dir()?;
    let mut lines = vec![
        "#!/bin/bash".to_string(),
        format!(
            "# Written by `catapult submit` for {}: {} node(s) x {} rank(s).",
            args.recipe.display(),
            args.nodes,
            per_node
        ),
        "# Resubmitting (or a requeue) resumes the run from its newest valid checkpoint."
            .to_string(),
        format!("#SBATCH --job-name=catapult-{}", recipe.name),
        format!("#SBATCH --nodes={}", args.nodes),
        format!("#SBATCH --ntasks-per-node={per_node}"),
        format!("#SBATCH --output={}/logs/slurm-%j.out", run_dir.display()),
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
            out["attempts"] = s["attempts"].as_array().map_or(0, |a| a.len()).into();
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
