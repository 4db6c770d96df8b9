//! Training numerics: the canonical reduction tree gives bitwise-identical weights on 1,
//! 2 and 4 data-parallel ranks (and with gradient accumulation inside one), in every
//! shard mode, and across an elastic resume 4 -> 2 -> 1; the `ranks` order does not.
//! And the default expert-bias controller (`hold`) holds every layer's FFN experts per
//! token within 2% of K_e on three recipes.

use catapult_tests::{
    catapult_binary, copy_dir, corpus, final_weights, metrics, scratch, workspace,
};
use std::path::Path;
use std::process::Command;

/// `catapult train recipes/tiny.yaml` on `ranks` data-parallel ranks (one process for
/// 1): global batch 8, micro-batches of 2 (so 4, 2 and 1 per rank on 1, 2, 4 ranks),
/// 10 steps, a checkpoint every 5; writing to `dir/name`.
fn train(dir: &Path, name: &str, ranks: usize, sets: &[&str], resume: bool) {
    let mut cmd = match ranks {
        1 => Command::new(catapult_binary()),
        _ => {
            let mut c = catapult_tests::mpirun(ranks);
            c.arg(catapult_binary());
            c
        }
    };
    cmd.arg("train").arg(workspace().join("recipes/tiny.yaml"));
    if resume {
        cmd.arg("--resume");
    }
    for set in [
        format!("data.path={}", corpus().display()),
        "train.steps=10".into(),
        "train.warmup_steps=2".into(),
        "train.eval_every=5".into(),
        "train.eval_sequences=8".into(),
        "train.log_every=1".into(),
        "train.global_batch_size=8".into(),
        "train.micro_batch_size=2".into(),
        "data.streams=8".into(),
        "data.shuffle_buffer=16".into(),
        "checkpoint.every=5".into(),
        "system.threads=1".into(),
        "parallel.expert=1".into(),
        format!("output.dir={name}"),
    ]
    .iter()
    .map(String::as_str)
    .chain(sets.iter().copied())
    {
        cmd.args(["--set", set]);
    }
    let out = cmd.current_dir(dir).output().expect("catapult starts");
    assert!(
        out.status.success(),
        "{name}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// (step, loss, grad_norm) of every step line.
fn steps(dir: &Path, run: &str) -> Vec<(u64, f64, f64)> {
    metrics(&dir.join(run).join("metrics.jsonl"))
        .iter()
        .filter_map(|l| {
            Some((
                l["step"].as_u64()?,
                l.get("loss")?.as_f64()?,
                l.get("grad_norm")?.as_f64()?,
            ))
        })
        .collect()
}

#[test]
fn data_parallel_worlds_of_1_2_4_give_the_same_bits_in_every_shard_mode_and_resume_elastically() {
    let dir = scratch("dp-bitwise");
    train(&dir, "w1", 1, &[], false);
    let one = final_weights(&dir, "w1");
    let one_steps = steps(&dir, "w1");
    assert_eq!(one_steps.len(), 10);
    for (ranks, mode) in [
        (2, "none"),
        (4, "none"),
        (2, "optimizer"),
        (4, "optimizer"),
        (2, "gradients"),
        (4, "gradients"),
        (2, "parameters"),
        (4, "parameters"),
    ] {
        let name = format!("w{ranks}-{mode}");
        train(
            &dir,
            &name,
            ranks,
            &[&format!("parallel.shard={mode}")],
            false,
        );
        assert!(
            final_weights(&dir, &name) == one,
            "{name}: the weights differ from one process accumulating 4 micro-batches"
        );
        // The logged loss and gradient norm follow the same order: the same bits.
        assert_eq!(
            steps(&dir, &name),
            one_steps,
            "{name}: losses or norms differ"
        );
    }

    // The `ranks` order is deterministic on one layout only: one process folds its
    // micro-batches left to right, ((g0 + g1) + g2) + g3, two ranks add (g0 + g1) and
    // (g2 + g3). The comparison above would catch such a reduction.
    train(&dir, "ranks-w1", 1, &["parallel.reduction=ranks"], false);
    train(&dir, "ranks-w2", 2, &["parallel.reduction=ranks"], false);
    assert!(
        final_weights(&dir, "ranks-w1") != final_weights(&dir, "ranks-w2"),
        "the rank-order reduction gave the same bits on 1 and 2 ranks: the test would \
         not see a reduction that depends on the world"
    );

    // Elastic: the 4-rank run's step-5 checkpoint, resumed on 2 ranks and on 1.
    for (ranks, name) in [(2, "elastic-2"), (1, "elastic-1")] {
        copy_dir(
            &dir.join("w4-none/checkpoints/step-00000005"),
            &dir.join(name).join("checkpoints/step-00000005"),
        );
        train(&dir, name, ranks, &[], true);
        let resumed = metrics(&dir.join(name).join("metrics.jsonl"))
            .into_iter()
            .find(|l| l["resumed_from"].is_string())
            .unwrap_or_else(|| panic!("{name} did not resume"));
        assert_eq!(resumed["step"], 5, "{name}: {resumed}");
        let logged = steps(&dir, name);
        assert_eq!(
            logged.first().map(|s| s.0),
            Some(6),
            "{name} trained on from step 6"
        );
        assert!(
            final_weights(&dir, name) == one,
            "{name}: resuming the 4-rank checkpoint on {ranks} rank(s) changed the weights"
        );
        assert_eq!(logged, one_steps[5..].to_vec(), "{name}: losses differ");
    }
}

#[test]
fn every_bias_control_mode_resumes_bitwise() {
    let dir = scratch("bias-modes-resume");
    for (mode, extra) in [
        ("hold", None),
        ("longcat", None),
        ("pid", Some("moe.bias_control.kp=0.05")),
        ("sign", None),
    ] {
        let mut sets = vec![format!("moe.bias_control.mode={mode}")];
        sets.extend(extra.map(String::from));
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        let whole = format!("{mode}-whole");
        train(&dir, &whole, 2, &sets, false);
        let cut = format!("{mode}-resumed");
        copy_dir(
            &dir.join(&whole).join("checkpoints/step-00000005"),
            &dir.join(&cut).join("checkpoints/step-00000005"),
        );
        train(&dir, &cut, 2, &sets, true);
        assert_eq!(steps(&dir, &cut).first().map(|s| s.0), Some(6), "{mode}");
        assert!(
            final_weights(&dir, &cut) == final_weights(&dir, &whole),
            "{mode}: the run resumed at step 5 differs from the uninterrupted one"
        );
        let meta: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join(&cut).join("checkpoint/meta.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(meta["expert_bias_controller"]["updates"], 10, "{mode}");
    }
}

/// `catapult bench controller --modes hold`: the default mode on the three recipes.
#[test]
fn the_hold_controller_keeps_every_layer_within_2_percent_of_its_target() {
    let dir = scratch("bench-controller");
    let out = Command::new(catapult_binary())
        .current_dir(&dir)
        .args([
            "bench",
            "controller",
            "--modes",
            "hold",
            "--dir",
            "out",
            "--recipe",
        ])
        .arg(workspace().join("recipes/tiny.yaml"))
        .arg("--set")
        .arg(format!("data.path={}", corpus().display()))
        .output()
        .expect("catapult starts");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("out/results.json")).unwrap()).unwrap();
    let runs = results["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 3, "three recipes");
    for run in runs {
        let name = format!("{} ({})", run["recipe"], run["mode"]);
        let steps = run["steps"].as_u64().unwrap();
        assert!(
            dir.join(run["png"].as_str().unwrap()).exists(),
            "{name}: no PNG"
        );
        let layers = run["layers"].as_array().unwrap();
        assert!(!layers.is_empty());
        for (l, s) in layers.iter().enumerate() {
            let f = |k: &str| s[k].as_f64().unwrap();
            // Per step, the error holds the batch's sampling noise, which no bias set
            // before the batch removes: at K_e = 1 on 2048 tokens a step, the scatter
            // around the 20-step moving average is itself about 2%. The law must hold
            // the mean within 2% and add little beyond that noise floor.
            let floor = f("second_half_scatter") + 0.003;
            assert!(
                f("second_half_mae") <= floor.max(0.02),
                "{name} layer {l}: {s}"
            );
            assert!(
                f("second_half_mean_error").abs() <= 0.02,
                "{name} layer {l}: {s}"
            );
            let settle = s["settle_step"].as_u64();
            assert!(
                settle.is_some_and(|at| at <= steps / 2),
                "{name} layer {l} did not settle within 2% by half the run: {s}"
            );
            assert!(
                f("overshoot_after_settling") < 0.25,
                "{name} layer {l}: {s}"
            );
            assert!(
                f("undershoot_after_settling") < 0.25,
                "{name} layer {l}: {s}"
            );
        }
    }
}
