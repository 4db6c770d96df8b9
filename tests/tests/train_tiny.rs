//! End-to-end: the built binary trains the tiny recipe on the built-in corpus.

use catapult_tests::*;
use std::path::Path;

/// `catapult train recipes/tiny.yaml` in a scratch dir with a short-run variant.
fn train(dir: &Path, extra: &[&str]) -> std::process::Output {
    let recipe = workspace().join("recipes").join("tiny.yaml");
    let mut cmd = catapult(dir);
    cmd.arg("train").arg(&recipe);
    cmd.arg("--set")
        .arg(format!("data.path={}", corpus().display()));
    cmd.arg("--set")
        .arg(format!("output.dir={}", dir.join("run").display()));
    // Short variants: no warmup unless a test asks for one.
    cmd.arg("--set").arg("train.warmup_steps=0");
    for e in extra {
        cmd.arg("--set").arg(e);
    }
    run_ok(&mut cmd)
}

#[test]
fn short_tiny_run_cuts_validation_loss_below_60_percent() {
    let dir = scratch("loss");
    let out = train(
        &dir,
        &[
            "train.steps=40",
            "train.eval_every=20",
            "train.warmup_steps=5",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("checkpoint:") && stdout.contains("metrics:"),
        "{stdout}"
    );
    let lines = metrics(&dir.join("run/metrics.jsonl"));
    let val: Vec<(u64, f64)> = lines
        .iter()
        .filter_map(|l| Some((l["step"].as_u64()?, l.get("val_loss")?.as_f64()?)))
        .collect();
    assert_eq!(val.first().unwrap().0, 0);
    assert_eq!(val.last().unwrap().0, 40);
    let (first, last) = (val.first().unwrap().1, val.last().unwrap().1);
    assert!(
        last < 0.6 * first,
        "validation loss {first} -> {last} is not below 60%"
    );
    let train_lines: Vec<_> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    assert_eq!(train_lines.len(), 4, "log_every 10 over 40 steps");
    for l in train_lines {
        for key in ["lr", "grad_norm", "tokens_per_s", "ffn_experts_per_token"] {
            assert!(
                l[key].as_f64().is_some_and(f64::is_finite),
                "{key} missing in {l}"
            );
        }
        let per_token = l["ffn_experts_per_token"].as_f64().unwrap();
        assert!(
            (0.0..=3.0).contains(&per_token),
            "{per_token} outside 0..=K"
        );
    }
    assert!(dir.join("run/checkpoint/model.safetensors").exists());
}

#[test]
fn same_recipe_and_seed_give_bitwise_identical_weights() {
    let hash = |name: &str, seed: &str| {
        let dir = scratch(name);
        train(&dir, &["train.steps=6", "train.eval_every=3", seed]);
        file_hash(&dir.join("run/checkpoint/model.safetensors"))
    };
    let a = hash("det-a", "seed=7");
    let b = hash("det-b", "seed=7");
    let c = hash("det-c", "seed=8");
    assert_eq!(a, b, "two runs with the same seed differ");
    assert_ne!(a, c, "a different seed should give different weights");
}

#[test]
fn bf16_training_runs_and_stays_finite() {
    let dir = scratch("bf16");
    train(
        &dir,
        &[
            "train.steps=4",
            "train.eval_every=2",
            "system.precision=bf16",
        ],
    );
    let lines = metrics(&dir.join("run/metrics.jsonl"));
    let last = lines
        .iter()
        .rev()
        .find_map(|l| l.get("val_loss")?.as_f64())
        .unwrap();
    assert!(
        last.is_finite() && last < 5.7,
        "bf16 validation loss {last}"
    );
}

#[test]
fn cuda_training_runs_where_a_gpu_exists() {
    if !gpu_available() {
        eprintln!("skipped: no NVIDIA GPU on this machine");
        return;
    }
    let dir = scratch("cuda");
    train(
        &dir,
        &["train.steps=10", "train.eval_every=5", "system.device=cuda"],
    );
    let lines = metrics(&dir.join("run/metrics.jsonl"));
    assert!(lines.iter().any(|l| l.get("tokens_per_s").is_some()));
}

#[test]
fn existing_run_directory_is_not_overwritten_silently() {
    let dir = scratch("overwrite");
    train(&dir, &["train.steps=1", "train.eval_every=1"]);
    let recipe = workspace().join("recipes").join("tiny.yaml");
    let out = catapult(&dir)
        .arg("train")
        .arg(&recipe)
        .args(["--set", &format!("data.path={}", corpus().display())])
        .args([
            "--set",
            &format!("output.dir={}", dir.join("run").display()),
        ])
        .args(["--set", "train.steps=1", "--set", "train.warmup_steps=0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already holds a run") && err.contains("--overwrite"),
        "{err}"
    );
}
