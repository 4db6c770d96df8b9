//! `catapult bench faults`: N SIGKILLs of random ranks at random moments (seeded) of a
//! run under `catapult launch`, against the same run undisturbed: kills survived,
//! restarts, steps lost per restart (the step a rank had finished when killed against
//! the step the next attempt resumed from), seconds from a death to training again, the
//! backoff of each restart, and whether the final weights are the undisturbed run's.

use super::common::{create_dir, spinner};
use crate::UsageError;
use catapult_data::SplitMix64;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One kill: which rank, the step it had reached, and the seconds until training again.
struct Kill {
    rank: usize,
    step: u64,
    resumed_s: Option<f64>,
}

/// The bench's settings.
pub(super) struct Faults<'a> {
    pub(super) recipe: &'a Path,
    pub(super) kills: usize,
    pub(super) steps: usize,
    pub(super) seed: u64,
    pub(super) dir: &'a Path,
    /// Overrides for both runs.
    pub(super) sets: &'a [String],
}

/// The `--set`s of both runs: 2 ranks, checkpoints every 5 steps, output in `out`, then
/// the user's.
fn sets(out: &Path, f: &Faults) -> Vec<String> {
    let (steps, kills) = (f.steps, f.kills);
    let mut sets: Vec<String> = [
        format!("train.steps={steps}"),
        "train.warmup_steps=0".into(),
        format!("train.eval_every={steps}"),
        "train.eval_sequences=8".into(),
        "train.log_every=1".into(),
        "checkpoint.every=5".into(),
        "launch.restart_backoff_s=0.5".into(),
        // Survival is measured, not the budget: every kill may come before a checkpoint.
        format!("launch.max_restarts={kills}"),
        format!("output.dir={}", out.display()),
    ]
    .into();
    sets.extend(f.sets.iter().cloned());
    sets
}

fn launch(exe: &Path, recipe: &Path, sets: &[String]) -> std::io::Result<Child> {
    let mut cmd = Command::new(exe);
    cmd.arg("launch")
        .arg(recipe)
        .args(["--nproc", "2", "--overwrite"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.spawn()
}

pub(super) fn run(f: &Faults) -> Result<(), crate::Failure> {
    if f.kills == 0 || f.steps < 10 {
        return Err(UsageError::new("--kills must be at least 1 and --steps at least 10").into());
    }
    let _ = std::fs::remove_dir_all(f.dir);
    create_dir(f.dir)?;
    let exe = std::env::current_exe()?;
    let (calm, hit) = (f.dir.join("undisturbed"), f.dir.join("killed"));
    let p = spinner("the undisturbed run");
    let started = Instant::now();
    let status = launch(&exe, f.recipe, &sets(&calm, f))?.wait()?;
    let calm_s = started.elapsed().as_secs_f64();
    p.finish_and_clear();
    if !status.success() {
        return Err(anyhow::anyhow!(
            "the undisturbed run failed: see {}",
            calm.join("logs").display()
        )
        .into());
    }
    let p = spinner(&format!("the same run with {} kills", f.kills));
    let started = Instant::now();
    let mut child = launch(&exe, f.recipe, &sets(&hit, f))?;
    let kills = kill_randomly(&mut child, &hit, f)?;
    let status = child.wait()?;
    let hit_s = started.elapsed().as_secs_f64();
    p.finish_and_clear();
    let weights = |run: &Path| std::fs::read(run.join("checkpoint/model.safetensors")).ok();
    let equal = status.success() && weights(&calm).is_some() && weights(&calm) == weights(&hit);
    report(f, &kills, (calm_s, hit_s, status.success(), equal), &hit)
}

/// The pids of the ranks of the run writing to `out` (by their command line), by rank.
fn rank_pids(out: &Path) -> Vec<(usize, i32)> {
    let needle = format!("output.dir={}", out.display());
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
        let is_rank =
            args.get(1).is_some_and(|a| *a == b"train") && args.contains(&needle.as_bytes());
        if !is_rank {
            continue;
        }
        let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
        let rank = environ.split(|&b| b == 0).find_map(|v| {
            let v = std::str::from_utf8(v).ok()?;
            v.strip_prefix("OMPI_COMM_WORLD_RANK=")?.parse().ok()
        });
        if let Some(rank) = rank {
            found.push((rank, pid));
        }
    }
    found.sort();
    found
}

/// The newest step any rank's heartbeat reports (the trainer writes it after each step).
fn heartbeat_step(out: &Path) -> Option<u64> {
    let dir = std::fs::read_dir(out.join("heartbeat")).ok()?;
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
        .max()
}

/// Attempts recorded in the run's supervisor.json so far.
fn attempts(out: &Path) -> usize {
    std::fs::read(out.join("supervisor.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["attempts"].as_array().map(Vec::len))
        .unwrap_or(0)
}

/// Whether attempt `n` (1 first) is training: recorded, both ranks up, a heartbeat.
fn training(out: &Path, n: usize) -> bool {
    attempts(out) >= n && heartbeat_step(out).is_some() && rank_pids(out).len() >= 2
}

/// Kills a random rank after a random 0.3-2.3 s of training, `f.kills` times, each once
/// the previous restart is training again; stops early if the run ends.
fn kill_randomly(child: &mut Child, out: &Path, f: &Faults) -> anyhow::Result<Vec<Kill>> {
    let mut rng = SplitMix64::new(f.seed);
    let mut kills: Vec<Kill> = Vec::new();
    let mut died_at: Option<Instant> = None;
    loop {
        let ended = child.try_wait()?.is_some();
        if ended || !training(out, kills.len() + 1) {
            if ended {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        if let (Some(t), Some(k)) = (died_at.take(), kills.last_mut()) {
            k.resumed_s = Some(t.elapsed().as_secs_f64());
        }
        if kills.len() == f.kills {
            break;
        }
        std::thread::sleep(Duration::from_millis(300 + rng.below(2000)));
        let pids = rank_pids(out);
        if pids.len() < 2 {
            continue;
        }
        let (rank, pid) = pids[rng.below(pids.len() as u64) as usize];
        let step = heartbeat_step(out).unwrap_or(0);
        // SAFETY: kill(2) on a rank process of this run.
        if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
            kills.push(Kill {
                rank,
                step,
                resumed_s: None,
            });
            died_at = Some(Instant::now());
        }
    }
    Ok(kills)
}

fn report(
    f: &Faults,
    kills: &[Kill],
    (calm_s, hit_s, completed, equal): (f64, f64, bool, bool),
    hit: &Path,
) -> Result<(), crate::Failure> {
    let state: serde_json::Value = std::fs::read(hit.join("supervisor.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let attempts = state["attempts"].as_array().cloned().unwrap_or_default();
    let resumed: Vec<u64> = (attempts.iter().skip(1))
        .map(|a| a["resume_step"].as_u64().unwrap_or(0))
        .collect();
    let lost: Vec<i64> = (kills.iter().zip(&resumed))
        .map(|(k, &r)| k.step as i64 - r as i64)
        .collect();
    let backoffs: Vec<f64> = (attempts.iter())
        .filter_map(|a| a["backoff_s"].as_f64())
        .collect();
    // A failed attempt made progress when a checkpoint newer than its start exists at
    // its end: the restart after it waits the base backoff.
    let progressed: Vec<&serde_json::Value> = (attempts.iter())
        .filter(|a| a["backoff_s"].is_number())
        .filter(|a| {
            a["checkpoint_at_end"].as_u64().unwrap_or(0) > a["resume_step"].as_u64().unwrap_or(0)
        })
        .collect();
    let after_progress = progressed.len();
    let at_base = (progressed.iter())
        .filter(|a| a["backoff_s"].as_f64() == Some(0.5))
        .count();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let back: Vec<f64> = kills.iter().filter_map(|k| k.resumed_s).collect();
    let survived = if completed { kills.len() } else { 0 };
    println!(
        "{}: 2 ranks, {} steps, {} kills of random ranks at random moments (seed {})",
        f.recipe.display(),
        f.steps,
        kills.len(),
        f.seed
    );
    println!("  survived             {survived} of {}", kills.len());
    println!(
        "  restarts             {}",
        attempts.len().saturating_sub(1)
    );
    println!(
        "  killed (rank@step)   {}",
        kills
            .iter()
            .map(|k| format!("{}@{}", k.rank, k.step))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!("  resumed from         {resumed:?}");
    println!(
        "  steps lost           {lost:?} (mean {:.1})",
        mean(&lost.iter().map(|&l| l as f64).collect::<Vec<_>>())
    );
    println!(
        "  death to training    mean {:.2} s, max {:.2} s",
        mean(&back),
        back.iter().cloned().fold(0.0, f64::max)
    );
    println!("  backoff at its base  {at_base} of {after_progress} restarts that followed a new checkpoint (backoffs {backoffs:?})");
    println!(
        "  wall time            {hit_s:.1} s against {calm_s:.1} s undisturbed ({:.2}x)",
        hit_s / calm_s
    );
    println!(
        "  final weights        {}",
        if equal {
            "bitwise equal to the undisturbed run's"
        } else {
            "DIFFER from the undisturbed run's"
        }
    );
    let results = serde_json::json!({
        "kills": kills.len(), "survived": survived, "restarts": attempts.len().saturating_sub(1),
        "killed": kills.iter().map(|k| serde_json::json!({"rank": k.rank, "step": k.step, "resumed_s": k.resumed_s})).collect::<Vec<_>>(),
        "resumed_from": resumed, "steps_lost": lost, "backoffs_s": backoffs,
        "backoff_at_base": at_base, "restarts_after_progress": after_progress,
        "wall_s": hit_s, "undisturbed_s": calm_s, "weights_equal": equal,
    });
    let out: PathBuf = f.dir.join("results.json");
    std::fs::write(&out, serde_json::to_string_pretty(&results)?)?;
    println!("results: {}", out.display());
    if !equal {
        return Err(anyhow::anyhow!(
            "the killed run did not end with the undisturbed run's weights"
        )
        .into());
    }
    Ok(())
}
