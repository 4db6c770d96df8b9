//! The collectives' conformance checks (`catapult comm check`) in a single process and
//! under mpirun with 2 and 4 ranks (oversubscribed), with and without timing jitter:
//! every check passes on every rank, and the reductions give the same bits regardless
//! of message timing.

use catapult_tests::{catapult_binary, scratch};
use std::process::Command;

fn check(ranks: usize, jitter_ms: u64) -> Vec<serde_json::Value> {
    let dir = scratch(&format!("comm-{ranks}-{jitter_ms}"));
    let mut cmd = if ranks == 1 {
        Command::new(catapult_binary())
    } else {
        let mut c = catapult_tests::mpirun(ranks);
        c.arg(catapult_binary());
        c
    };
    let out = cmd
        .current_dir(&dir)
        .args(["comm", "check", "--jitter-ms", &jitter_ms.to_string()])
        .output()
        .expect("mpirun (Open MPI, installed by scripts/setup) starts");
    assert!(
        out.status.success(),
        "{ranks} ranks: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    lines.sort_by_key(|l| l["rank"].as_u64());
    assert_eq!(lines.len(), ranks);
    for (r, l) in lines.iter().enumerate() {
        assert_eq!(l["rank"], r);
        assert_eq!(l["size"], ranks);
        assert_eq!(l["backend"], if ranks == 1 { "single" } else { "mpi" });
        assert_eq!(l["failures"], serde_json::json!([]), "{l}");
    }
    lines
}

#[test]
fn collectives_conform_and_reductions_ignore_timing() {
    for ranks in [1, 2, 4] {
        let calm = check(ranks, 0);
        let shaken = check(ranks, 5);
        let digest = &calm[0]["digest"];
        assert!(
            calm.iter().chain(&shaken).all(|l| &l["digest"] == digest),
            "{ranks} ranks: {calm:?} {shaken:?}"
        );
    }
}

#[test]
fn data_parallel_training_matches_one_process() {
    let dir = scratch("dp-train");
    let args = |out: &str| -> Vec<String> {
        let mut a = vec![
            "train".to_string(),
            catapult_tests::workspace()
                .join("recipes/tiny.yaml")
                .display()
                .to_string(),
        ];
        for set in [
            format!("data.path={}", catapult_tests::corpus().display()),
            "train.steps=8".into(),
            "train.warmup_steps=2".into(),
            "train.log_every=1".into(),
            "train.eval_every=4".into(),
            "train.eval_sequences=16".into(),
            "data.shuffle_buffer=16".into(),
            "system.threads=1".into(),
            "train.micro_batch_size=4".into(),
            "checkpoint.every=4".into(),
            format!("output.dir={out}"),
        ] {
            a.push("--set".into());
            a.push(set);
        }
        a
    };
    let one = Command::new(catapult_binary())
        .current_dir(&dir)
        .args(args("one"))
        .output()
        .unwrap();
    assert!(
        one.status.success(),
        "{}",
        String::from_utf8_lossy(&one.stderr)
    );
    for ranks in [2, 4] {
        let name = format!("dp{ranks}");
        let out = catapult_tests::mpirun(ranks)
            .arg(catapult_binary())
            .args(args(&name))
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let read = |p: &str| std::fs::read(dir.join(p)).unwrap();
        let losses = |run: &str| -> Vec<(u64, f64)> {
            catapult_tests::metrics(&dir.join(run).join("metrics.jsonl"))
                .iter()
                .filter_map(|l| Some((l["step"].as_u64()?, l.get("loss")?.as_f64()?)))
                .collect()
        };
        // Gradients are averaged in another association order than one process's
        // micro-batch accumulation, so the match is to rounding, step by step.
        let (a, b) = (losses("one"), losses(&name));
        assert_eq!(a.len(), 8);
        for ((s, x), (t, y)) in a.iter().zip(&b) {
            assert_eq!(s, t);
            assert!(
                (x - y).abs() / x.abs() < 1e-5,
                "{ranks} ranks, step {s}: {x} vs {y}"
            );
        }
        // Rank 0 saved a checkpoint covering every rank's data streams.
        let state: serde_json::Value = serde_json::from_slice(&read(&format!(
            "{name}/checkpoints/step-00000008/rank-00000.json"
        )))
        .unwrap();
        assert_eq!(
            state["state"]["data_state"]["streams"]
                .as_array()
                .unwrap()
                .len(),
            16
        );
    }
}

#[test]
fn a_data_parallel_run_is_bitwise_reproducible_under_timing_jitter() {
    let dir = scratch("dp-jitter");
    let run = |name: &str, jitter: &str| {
        let out = catapult_tests::mpirun(2)
            .args(["-x", "CATAPULT_COMM_JITTER_MS"])
            .env("CATAPULT_COMM_JITTER_MS", jitter)
            .arg(catapult_binary())
            .arg("train")
            .arg(catapult_tests::workspace().join("recipes/tiny.yaml"))
            .args([
                "--set",
                &format!("data.path={}", catapult_tests::corpus().display()),
            ])
            .args(["--set", "train.steps=6", "--set", "train.warmup_steps=1"])
            .args([
                "--set",
                "train.eval_sequences=16",
                "--set",
                "data.shuffle_buffer=16",
            ])
            .args([
                "--set",
                "system.threads=1",
                "--set",
                "train.micro_batch_size=4",
            ])
            .args(["--set", &format!("output.dir={name}")])
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read(dir.join(name).join("checkpoint/model.safetensors")).unwrap()
    };
    let calm = run("calm", "0");
    assert!(
        run("shaken", "20") == calm,
        "random delays changed the weights"
    );
}
