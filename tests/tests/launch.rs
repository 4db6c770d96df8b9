//! `catapult launch`: ranks started through mpirun, supervised. A rank killed or hung
//! mid-run is detected, every rank is stopped and the job restarts from the last
//! checkpoint, ending with the same weights as an undisturbed run; exhausted restarts
//! name every cause; bad input starts nothing.

use catapult_tests::{catapult_binary, corpus, final_weights, scratch, workspace};
use std::path::Path;
use std::process::{Command, Output};

/// The short 2-rank tiny run every test here uses.
fn sets(name: &str) -> Vec<String> {
    [
        format!("data.path={}", corpus().display()),
        "train.steps=8".into(),
        "train.warmup_steps=2".into(),
        "train.eval_every=8".into(),
        "train.eval_sequences=16".into(),
        "train.log_every=1".into(),
        "data.shuffle_buffer=16".into(),
        "checkpoint.every=2".into(),
        "checkpoint.async=false".into(),
        "launch.restart_backoff_s=0.2".into(),
        format!("output.dir={name}"),
    ]
    .into()
}

fn launch(dir: &Path, name: &str, extra: &[&str], fault: Option<&str>) -> Output {
    let mut cmd = Command::new(catapult_binary());
    cmd.current_dir(dir)
        .arg("launch")
        .arg(workspace().join("recipes/tiny.yaml"))
        .args(["--nproc", "2"]);
    for s in sets(name)
        .iter()
        .map(String::as_str)
        .chain(extra.iter().copied())
    {
        cmd.args(["--set", s]);
    }
    match fault {
        Some(f) => cmd.env("CATAPULT_FAULT", f),
        None => cmd.env_remove("CATAPULT_FAULT"),
    };
    cmd.output().expect("catapult starts")
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn state(dir: &Path, name: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join(name).join("supervisor.json")).unwrap()).unwrap()
}

#[test]
fn launch_prefixes_rank_logs_and_equals_mpirun_of_the_same_recipe() {
    let dir = scratch("launch");
    let out = ok(launch(&dir, "launched", &[], None));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("[rank 0] validation loss:"),
        "rank 0's summary, prefixed: {stdout}"
    );
    let rank1 = std::fs::read_to_string(dir.join("launched/logs/rank-1.log")).unwrap();
    assert!(rank1.contains("starting from step 0"), "{rank1}");
    let s = state(&dir, "launched");
    assert_eq!(s["status"], "completed");
    assert_eq!(s["attempts"].as_array().unwrap().len(), 1);
    // The same recipe started by hand.
    let mut direct = catapult_tests::mpirun(2);
    direct
        .current_dir(&dir)
        .arg(catapult_binary())
        .arg("train")
        .arg(workspace().join("recipes/tiny.yaml"));
    for s in sets("direct") {
        direct.args(["--set", &s]);
    }
    ok(direct.output().unwrap());
    assert!(final_weights(&dir, "launched") == final_weights(&dir, "direct"));
    // Launching it again resumes the finished run instead of overwriting it.
    let again = ok(launch(&dir, "launched", &[], None));
    assert!(String::from_utf8_lossy(&again.stderr).contains("resuming it"));
    assert!(final_weights(&dir, "launched") == final_weights(&dir, "direct"));
    // Every line arrived whole: no mpirun tag inside the console's or the logs' lines.
    let mut texts = vec![
        (
            "first launch",
            format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
        ),
        (
            "second launch",
            format!(
                "{}{}",
                String::from_utf8_lossy(&again.stdout),
                String::from_utf8_lossy(&again.stderr)
            ),
        ),
    ];
    for r in 0..2 {
        let log = dir.join(format!("launched/logs/rank-{r}.log"));
        texts.push(("a rank log", std::fs::read_to_string(log).unwrap()));
    }
    for (what, text) in texts {
        for tag in ["<stderr>:", "<stdout>:", "[1,"] {
            assert!(!text.contains(tag), "{what} holds {tag:?}: {text}");
        }
    }
}

/// Rank 0's log lines after its last `resuming from ...` line: the first step it
/// trained (from the progress lines, `NAME step N/M | ...`).
fn first_step_after_resume(dir: &Path, name: &str) -> Option<u64> {
    let log = std::fs::read_to_string(dir.join(name).join("logs/rank-0.log")).ok()?;
    let after = &log[log.rfind("resuming from")?..];
    after.lines().find_map(|l| {
        let rest = l.split(" step ").nth(1)?;
        rest.split('/').next()?.parse().ok()
    })
}

#[test]
fn a_killed_or_hung_rank_restarts_from_the_last_checkpoint_with_the_same_weights() {
    let dir = scratch("supervise");
    ok(launch(&dir, "calm", &[], None));
    ok(launch(&dir, "killed", &[], Some("kill:1:5")));
    let s = state(&dir, "killed");
    let attempts = s["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{s}");
    assert_eq!(attempts[0]["cause"], "rank 1 died on signal 9 (Killed)");
    assert!(final_weights(&dir, "killed") == final_weights(&dir, "calm"));
    // It restarted from step 4's checkpoint (killed at the start of step 5), and the
    // first step it trained again was 5: nothing before it was recomputed.
    assert_eq!(attempts[0]["resume_step"], 0, "{s}");
    assert_eq!(attempts[1]["resume_step"], 4, "{s}");
    assert!(
        attempts[1]["resumed_from"]
            .as_str()
            .is_some_and(|a| a.ends_with("step-00000004")),
        "{s}"
    );
    assert_eq!(first_step_after_resume(&dir, "killed"), Some(5));

    ok(launch(
        &dir,
        "hung",
        &["launch.heartbeat_timeout_s=4"],
        Some("hang:0:5"),
    ));
    let s = state(&dir, "hung");
    let attempts = s["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{s}");
    let cause = attempts[0]["cause"].as_str().unwrap();
    assert!(
        cause.starts_with("hang: no heartbeat for") && cause.contains("rank 0 after step 4"),
        "{cause}"
    );
    // Detected within the timeout plus the launcher's polling.
    let lasted = attempts[0]["ended_unix_s"].as_f64().unwrap()
        - attempts[0]["started_unix_s"].as_f64().unwrap();
    assert!(lasted < 60.0, "the hung attempt lasted {lasted} s");
    assert!(final_weights(&dir, "hung") == final_weights(&dir, "calm"));
}

#[test]
fn exhausted_restarts_stop_the_run_naming_each_cause() {
    let dir = scratch("exhausted");
    // A fault in every attempt: rank 1 dies at step 3 each time.
    let out = launch(
        &dir,
        "doomed",
        &["launch.max_restarts=1"],
        Some("kill:1:3:always"),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "failed 2 time(s), 2 failure(s) since the last new checkpoint, \
             launch.max_restarts = 1"
        ) && err.contains("attempt 1: rank 1 died on signal 9")
            && err.contains("attempt 2: rank 1 died on signal 9"),
        "{err}"
    );
    assert_eq!(state(&dir, "doomed")["status"], "failed");
}

#[test]
fn failures_after_progress_never_spend_the_budget_and_the_backoff_stays_at_its_base() {
    let dir = scratch("budget");
    ok(launch(&dir, "calm", &[], None));
    // Rank 1 dies at steps 3, 5 and 7 of attempts 1, 2 and 3, each after a new
    // checkpoint: with launch.max_restarts = 1 the run still completes.
    ok(launch(
        &dir,
        "kills",
        &["launch.max_restarts=1"],
        Some("kills:1@3,1@5,1@7"),
    ));
    let s = state(&dir, "kills");
    let attempts = s["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 4, "{s}");
    let resumed: Vec<u64> = attempts
        .iter()
        .map(|a| a["resume_step"].as_u64().unwrap())
        .collect();
    assert_eq!(resumed, [0, 2, 4, 6], "{s}");
    for a in &attempts[..3] {
        assert_eq!(a["consecutive_failures"], 1, "{s}");
        assert_eq!(a["backoff_s"], 0.2, "the backoff stays at its base: {s}");
    }
    assert!(final_weights(&dir, "kills") == final_weights(&dir, "calm"));
    let status = ok(Command::new(catapult_binary())
        .current_dir(&dir)
        .args(["status", "kills"])
        .output()
        .unwrap());
    let shown: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(shown["history"][2]["resume_step"], 4, "{shown}");
}

#[test]
fn bad_input_starts_no_rank() {
    let dir = scratch("launch-bad");
    let out = launch(&dir, "bad", &["model.moe_topk=40"], None);
    assert_eq!(out.status.code(), Some(2), "a recipe error exits with 2");
    assert!(String::from_utf8_lossy(&out.stderr).contains("model.moe_topk"));
    assert!(!dir.join("bad").exists(), "nothing was started or written");
    let out = Command::new(catapult_binary())
        .current_dir(&dir)
        .args(["launch", "--nproc", "3"])
        .arg(workspace().join("recipes/tiny.yaml"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--nproc 3 does not fit"));
}

#[test]
fn preemption_checkpoints_stops_cleanly_and_resumes_to_the_same_weights() {
    let dir = scratch("preempt");
    let long = [
        "train.steps=30",
        "train.eval_every=30",
        "checkpoint.every=10",
    ];
    ok(launch(&dir, "calm", &long, None));
    let mut cmd = Command::new(catapult_binary());
    cmd.current_dir(&dir)
        .arg("launch")
        .arg(workspace().join("recipes/tiny.yaml"))
        .args(["--nproc", "2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for s in sets("cut").iter().map(String::as_str).chain(long) {
        cmd.args(["--set", s]);
    }
    let child = cmd.spawn().unwrap();
    // Once a few steps are done, the scheduler's signal (sbatch --signal=B:USR1@120).
    let metrics = dir.join("cut/metrics.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !std::fs::read_to_string(&metrics).is_ok_and(|t| t.contains("\"step\":3,")) {
        assert!(std::time::Instant::now() < deadline, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let status = Command::new("kill")
        .args(["-USR1", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("run stopped with a checkpoint on request"),
        "{err}"
    );
    assert_eq!(state(&dir, "cut")["status"], "preempted");
    assert!(
        !dir.join("cut/checkpoint").exists(),
        "stopped before the end"
    );
    let saved: Vec<String> = std::fs::read_dir(dir.join("cut/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert!(
        saved
            .iter()
            .any(|n| n != "step-00000010" && n != "step-00000020"),
        "a checkpoint at the preempted step: {saved:?}"
    );
    // The same command again finishes the run, as if it had never stopped: it resumed
    // from the preemption's checkpoint and trained on from the step after it.
    let preempted: u64 = saved
        .iter()
        .filter_map(|n| n.strip_prefix("step-")?.parse().ok())
        .max()
        .unwrap();
    ok(launch(&dir, "cut", &long, None));
    assert!(final_weights(&dir, "cut") == final_weights(&dir, "calm"));
    let s = state(&dir, "cut");
    assert_eq!(s["attempts"][0]["resume_step"], preempted, "{s}");
    assert_eq!(first_step_after_resume(&dir, "cut"), Some(preempted + 1));
}

#[test]
fn random_kills_under_launch_end_with_the_undisturbed_weights() {
    let dir = scratch("faults");
    let out = ok(Command::new(catapult_binary())
        .current_dir(&dir)
        .args([
            "bench", "faults", "--kills", "3", "--steps", "60", "--seed", "7",
        ])
        .arg("--recipe")
        .arg(workspace().join("recipes/tiny.yaml"))
        .args(["--dir", "faults", "--set"])
        .arg(format!("data.path={}", corpus().display()))
        .output()
        .unwrap());
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("faults/results.json")).unwrap()).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(results["kills"], 3, "{text}");
    assert_eq!(results["survived"], 3, "{text}");
    assert_eq!(results["weights_equal"], true, "{text}");
    // Every restart resumed from a checkpoint no newer than the step its rank reached.
    for (k, r) in results["killed"]
        .as_array()
        .unwrap()
        .iter()
        .zip(results["resumed_from"].as_array().unwrap())
    {
        assert!(r.as_u64().unwrap() <= k["step"].as_u64().unwrap(), "{text}");
    }
}
