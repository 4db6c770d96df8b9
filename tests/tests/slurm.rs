//! `catapult submit` against a real Slurm cluster that this test starts itself
//! (scripts/dev-slurm, in a private directory) and stops at the end: a 2-rank job runs
//! to completion with the same weights as `catapult launch`, a killed rank is restarted
//! inside the job, SIGUSR1 to the batch step checkpoints and requeues, two simulated
//! nodes work, and bad input submits nothing.

use catapult_tests::{catapult_binary, corpus, final_weights, scratch, workspace};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A dev cluster under `dir`, stopped on drop.
struct Cluster {
    dir: PathBuf,
}

impl Cluster {
    fn start(dir: &Path, nodes: usize) -> Cluster {
        let c = Cluster {
            dir: dir.to_path_buf(),
        };
        let out = c.script(&["start", "--nodes", &nodes.to_string()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        c
    }

    fn script(&self, args: &[&str]) -> Output {
        Command::new(workspace().join("scripts/dev-slurm"))
            .args(args)
            .env("CATAPULT_DEV_SLURM_DIR", &self.dir)
            .output()
            .unwrap()
    }

    fn conf(&self) -> PathBuf {
        self.dir.join("slurm.conf")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.script(&["stop"]);
    }
}

fn sets(name: &str, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = [
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
    .into();
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn catapult(dir: &Path, conf: &Path) -> Command {
    let mut c = Command::new(catapult_binary());
    c.current_dir(dir)
        .env("SLURM_CONF", conf)
        .env_remove("CATAPULT_FAULT");
    c
}

fn submit(dir: &Path, conf: &Path, name: &str, layout: &[&str], extra: &[&str]) -> Output {
    let mut c = catapult(dir, conf);
    c.arg("submit")
        .arg(workspace().join("recipes/tiny.yaml"))
        .args(layout);
    for s in sets(name, extra) {
        c.args(["--set", &s]);
    }
    c.output().unwrap()
}

fn status(dir: &Path, conf: &Path, name: &str) -> serde_json::Value {
    let out = catapult(dir, conf).args(["status", name]).output().unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// Waits until the run's job leaves the queue; its final status.
fn wait(dir: &Path, conf: &Path, name: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let s = status(dir, conf, name);
        let state = s["job_state"].as_str().unwrap_or("");
        if ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"].contains(&state) {
            return s;
        }
        assert!(Instant::now() < deadline, "job still {state}: {s}");
        std::thread::sleep(Duration::from_millis(300));
    }
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

#[test]
fn slurm_jobs_complete_restart_requeue_and_refuse_bad_input() {
    let dir = scratch("slurm");
    // Bad input with no Slurm reachable: sbatch missing names the fix, nothing written.
    let out = catapult(&dir, Path::new("/nonexistent"))
        .env("PATH", "/nonexistent")
        .arg("submit")
        .arg(workspace().join("recipes/tiny.yaml"))
        .args(["--tasks-per-node", "2", "--set", "output.dir=nosbatch"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("sbatch not found"));

    let cluster = Cluster::start(&dir.join("cluster"), 1);
    let conf = cluster.conf();
    let two = ["--nodes", "1", "--tasks-per-node", "2"];

    // Recipe errors and unknown partitions submit nothing.
    let out = submit(&dir, &conf, "bad", &two, &["model.moe_topk=40"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(!dir.join("bad/slurm.json").exists());
    let mut layout = two.to_vec();
    layout.extend(["--partition", "nope"]);
    let out = submit(&dir, &conf, "nopart", &layout, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sbatch refused") && err.contains("no job submitted"),
        "{err}"
    );
    assert!(!dir.join("nopart/slurm.json").exists());

    // A 2-rank job: COMPLETED, and the same weights as `catapult launch --nproc 2`.
    ok(submit(&dir, &conf, "job", &two, &[]));
    let s = wait(&dir, &conf, "job");
    assert_eq!(s["job_state"], "COMPLETED", "{s}");
    assert_eq!(s["supervisor"], "completed");
    assert_eq!(s["step"], 8);
    let mut launch = catapult(&dir, &conf);
    launch
        .arg("launch")
        .arg(workspace().join("recipes/tiny.yaml"))
        .args(["--nproc", "2"]);
    for s in sets("local", &[]) {
        launch.args(["--set", &s]);
    }
    ok(launch.output().unwrap());
    assert!(final_weights(&dir, "job") == final_weights(&dir, "local"));
    let log = ok(catapult(&dir, &conf)
        .args(["logs", "job", "--rank", "1"])
        .output()
        .unwrap());
    assert!(String::from_utf8_lossy(&log.stdout).contains("starting from step 0"));

    // A rank killed inside the job: restarted from the last checkpoint, same weights.
    let mut c = catapult(&dir, &conf);
    c.env("CATAPULT_FAULT", "kill:1:5")
        .arg("submit")
        .arg(workspace().join("recipes/tiny.yaml"))
        .args(two);
    for s in sets("killed", &[]) {
        c.args(["--set", &s]);
    }
    ok(c.output().unwrap());
    let s = wait(&dir, &conf, "killed");
    assert_eq!(s["job_state"], "COMPLETED", "{s}");
    assert_eq!(s["attempts"], 2, "{s}");
    // Killed at the start of step 5: the restart loaded step 4's checkpoint.
    assert_eq!(s["history"][1]["resume_step"], 4, "{s}");
    assert!(final_weights(&dir, "killed") == final_weights(&dir, "local"));

    // Preemption: SIGUSR1 to the batch step checkpoints, requeues, and finishes.
    let long = [
        "train.steps=30",
        "train.eval_every=30",
        "checkpoint.every=10",
    ];
    ok(submit(&dir, &conf, "preempted", &two, &long));
    let metrics = dir.join("preempted/metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&metrics).is_ok_and(|t| t.contains("\"step\":3,")) {
        assert!(Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let job = status(&dir, &conf, "preempted")["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let sig = Command::new("scancel")
        .env("SLURM_CONF", &conf)
        .args(["--signal=USR1", "--batch", &job])
        .output()
        .unwrap();
    assert!(
        sig.status.success(),
        "{}",
        String::from_utf8_lossy(&sig.stderr)
    );
    let s = wait(&dir, &conf, "preempted");
    assert_eq!(s["job_state"], "COMPLETED", "{s}");
    let out = std::fs::read_to_string(dir.join(format!("preempted/logs/slurm-{job}.out"))).unwrap();
    assert!(out.contains("requeued Slurm job"), "{out}");
    // The requeued job resumed from the checkpoint the signal wrote (after step 3 or
    // later), not from step 0.
    let resumed = s["history"][0]["resume_step"].as_u64().unwrap_or(0);
    assert!(resumed >= 3, "{s}");
    let mut calm = catapult(&dir, &conf);
    calm.arg("launch")
        .arg(workspace().join("recipes/tiny.yaml"))
        .args(["--nproc", "2"]);
    for s in sets("calm", &long) {
        calm.args(["--set", &s]);
    }
    ok(calm.output().unwrap());
    assert!(final_weights(&dir, "preempted") == final_weights(&dir, "calm"));
    drop(cluster);

    // Two simulated nodes, one rank each.
    let cluster = Cluster::start(&dir.join("cluster2"), 2);
    let conf = cluster.conf();
    ok(submit(
        &dir,
        &conf,
        "nodes2",
        &["--nodes", "2", "--tasks-per-node", "1"],
        &[],
    ));
    let s = wait(&dir, &conf, "nodes2");
    assert_eq!(s["job_state"], "COMPLETED", "{s}");
    assert!(final_weights(&dir, "nodes2") == final_weights(&dir, "local"));
}
