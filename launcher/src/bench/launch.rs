//! `catapult bench launch`: `catapult launch` against mpirun starting the same binary —
//! time to the first training step for each rank count — and the time the supervisor
//! takes to detect a killed rank and train again.

use super::common::{create_dir, spinner};
use crate::UsageError;
use anyhow::Context;
use catapult_trainer::supervision::env;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Seconds to the first step: `[catapult launch, mpirun]`.
type Pair = [f64; 2];

pub(super) fn run(recipe: &Path, ranks: &[usize], dir: &Path) -> Result<(), crate::Failure> {
    if ranks.contains(&0) {
        return Err(UsageError::new("--ranks 0: every rank count must be at least 1").into());
    }
    let _ = std::fs::remove_dir_all(dir);
    create_dir(dir)?;
    let exe = std::env::current_exe()?;
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    let mut rows = Vec::new();
    for &n in ranks {
        rows.push((n, first_step(&exe, root, recipe, n, dir)?));
    }
    let (detected, resumed) = recovery(&exe, recipe, dir)?;
    report(recipe, &rows, detected, resumed, dir)
}

/// The `--set`s of every run: `steps` steps on `n` ranks, checkpoints every 2 steps,
/// outputs in `out`.
fn sets(n: usize, out: &Path, steps: usize) -> Vec<String> {
    [
        format!("train.steps={steps}"),
        "train.warmup_steps=0".into(),
        format!("train.eval_every={steps}"),
        "train.eval_sequences=8".into(),
        "train.log_every=1".into(),
        "checkpoint.every=2".into(),
        "checkpoint.async=false".into(),
        "launch.restart_backoff_s=0".into(),
        format!("parallel.expert={n}"),
        format!("train.micro_batch_size={}", 16 / n),
        format!("output.dir={}", out.display()),
    ]
    .into()
}

/// Seconds to the first step on `n` ranks under `catapult launch` and under mpirun: twice
/// each, alternating; the faster of the two counts (the first run of a rank count pays
/// for cold caches).
fn first_step(exe: &Path, root: bool, recipe: &Path, n: usize, dir: &Path) -> anyhow::Result<Pair> {
    let mut pair = [f64::INFINITY; 2];
    for (i, supervised, round) in [(0, true, 0), (1, false, 0), (0, true, 1), (1, false, 1)] {
        let out = dir.join(format!(
            "{}-{n}-{round}",
            if supervised { "launch" } else { "mpirun" }
        ));
        let mut cmd = if supervised {
            let mut c = Command::new(exe);
            c.args(["launch", "--nproc", &n.to_string()]).arg(recipe);
            c
        } else {
            let mut c = Command::new("mpirun");
            if root {
                c.arg("--allow-run-as-root");
            }
            c.args(["--oversubscribe", "-np", &n.to_string()])
                .arg(exe)
                .arg("train")
                .arg(recipe);
            c
        };
        for s in sets(n, &out, 3) {
            cmd.args(["--set", &s]);
        }
        let p = spinner(&format!(
            "{n} rank(s), {}: to the first step",
            if supervised {
                "catapult launch"
            } else {
                "mpirun"
            }
        ));
        let begun = unix_s();
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        let first = wait_for_step(&out.join("metrics.jsonl"), 1, &mut child);
        let status = child.wait()?;
        p.finish_and_clear();
        match first {
            Some(t) if status.success() => pair[i] = pair[i].min(t - begun),
            _ => anyhow::bail!(
                "the {n}-rank run in {} failed; its logs say why",
                out.display()
            ),
        }
    }
    Ok(pair)
}

/// A rank killed at the start of step 6 (checkpoints every 2 steps): seconds from its
/// last step to the supervisor ending the attempt, and to step 6 done again.
fn recovery(exe: &Path, recipe: &Path, dir: &Path) -> anyhow::Result<(f64, f64)> {
    let p = spinner("2 ranks: rank 1 killed at step 6, to training again");
    let out = dir.join("recover");
    let mut cmd = Command::new(exe);
    cmd.args(["launch", "--nproc", "2"])
        .arg(recipe)
        .env(env::FAULT, "kill:1:6");
    for s in sets(2, &out, 10) {
        cmd.args(["--set", &s]);
    }
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    let metrics = out.join("metrics.jsonl");
    let killed = wait_for_step(&metrics, 5, &mut child).context("the run stopped early")?;
    // The restarted attempt rewrites the metrics from its checkpoint (step 4) on.
    let mut resumed = None;
    while resumed.is_none() {
        let state: Option<serde_json::Value> = std::fs::read(out.join("supervisor.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if state.is_some_and(|s| s["attempts"].as_array().is_some_and(|a| a.len() == 2)) {
            resumed = wait_for_step(&metrics, 6, &mut child);
            if resumed.is_none() {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let status = child.wait()?;
    p.finish_and_clear();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("supervisor.json"))?)?;
    let detected = state["attempts"][0]["ended_unix_s"]
        .as_f64()
        .unwrap_or(f64::NAN)
        - killed;
    let resumed = resumed.context("the restarted run did not train")? - killed;
    if !status.success() {
        anyhow::bail!("the recovery run failed; see {}", out.display());
    }
    Ok((detected, resumed))
}

/// Prints the table and writes results.json.
fn report(
    recipe: &Path,
    rows: &[(usize, Pair)],
    detected: f64,
    resumed: f64,
    dir: &Path,
) -> Result<(), crate::Failure> {
    let results = serde_json::json!({
        "recipe": recipe.display().to_string(),
        "first_step_s": rows.iter().map(|(n, p)| serde_json::json!({
            "ranks": n, "launch": p[0], "mpirun": p[1], "overhead_s": p[0] - p[1], "ratio": p[0] / p[1],
        })).collect::<Vec<_>>(),
        "dead_rank": {"detected_s": detected, "training_again_s": resumed, "backoff_s": 0.0},
    });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&results).expect("a JSON value always serializes"),
    )?;
    println!(
        "time to the first training step, {} (same run, same binary)",
        recipe.display()
    );
    for (n, p) in rows {
        println!(
            "  {n} rank(s): catapult launch {:6.2} s   mpirun {:6.2} s   launch/mpirun {:.3}",
            p[0],
            p[1],
            p[0] / p[1]
        );
    }
    println!(
        "dead rank (2 ranks, SIGKILL at step 6, checkpoint at step 4, backoff 0): detected \
         {detected:.2} s after its last step, training again (step 6 done) {resumed:.2} s after"
    );
    println!("results: {}", dir.join("results.json").display());
    Ok(())
}

/// Unix time in seconds.
fn unix_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Unix time at which `metrics` first holds a training line for `step` (polling every
/// 10 ms while `child` runs); None if it exits first.
fn wait_for_step(metrics: &Path, step: u64, child: &mut Child) -> Option<f64> {
    loop {
        if let Ok(text) = std::fs::read_to_string(metrics) {
            let seen = text.lines().any(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .is_some_and(|v| v["step"] == step && v.get("loss").is_some())
            });
            if seen {
                return Some(unix_s());
            }
        }
        if let Ok(Some(_)) = child.try_wait() {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
