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
    // One process (the recipe's 2-rank layout runs in the expert-parallel tests).
    cmd.arg("--set").arg("parallel.expert=1");
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
#[ignore = "needs a CUDA GPU"]
fn cuda_training_runs_where_a_gpu_exists() {
    // Run with --ignored on a GPU machine (scripts/gpu-check does): without one it fails.
    assert!(
        gpu_available(),
        "no NVIDIA GPU visible (nvidia-smi -L failed)"
    );
    let dir = scratch("cuda");
    train(
        &dir,
        &[
            "train.steps=20",
            "train.eval_every=20",
            "system.device=cuda",
        ],
    );
    let lines = metrics(&dir.join("run/metrics.jsonl"));
    let val: Vec<f64> = lines
        .iter()
        .filter_map(|l| l.get("val_loss")?.as_f64())
        .collect();
    assert!(
        val[val.len() - 1] < 0.8 * val[0],
        "CUDA validation loss {val:?} did not fall"
    );
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
        .args(["--set", "parallel.expert=1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already holds a run") && err.contains("--overwrite"),
        "{err}"
    );
}

#[test]
fn expert_bias_control_holds_ffn_experts_per_token_at_target() {
    let dir = scratch("bias-control");
    train(
        &dir,
        &[
            "train.steps=250",
            "train.eval_every=250",
            "train.warmup_steps=10",
            "train.log_every=5",
            "moe.bias_control.ki=0.02",
        ],
    );
    let lines = metrics(&dir.join("run/metrics.jsonl"));
    let per_token: Vec<(u64, f64)> = lines
        .iter()
        .filter(|l| l.get("loss").is_some())
        .map(|l| {
            (
                l["step"].as_u64().unwrap(),
                l["ffn_experts_per_token"].as_f64().unwrap(),
            )
        })
        .collect();
    // Without control the router picks ~K = 3 FFN experts per token; K_e = 2.
    assert!(per_token[0].1 > 2.8, "{:?}", per_token[0]);
    let tail: Vec<f64> = per_token
        .iter()
        .filter(|(s, _)| *s > 200)
        .map(|(_, v)| *v)
        .collect();
    assert!(tail.len() >= 10);
    for v in &tail {
        assert!(
            (v - 2.0).abs() / 2.0 <= 0.05,
            "FFN experts per token {v} not within 5% of K_e = 2: {tail:?}"
        );
    }
    let router: Vec<&serde_json::Value> = lines.iter().filter_map(|l| l.get("router")).collect();
    assert!(!router.is_empty());
    for r in &router {
        for key in [
            "expert_load_min",
            "expert_load_max",
            "expert_load_cv",
            "gradient_ratio_rg",
            "router_cosine_similarity",
            "hidden_rms",
            "grad_rms",
        ] {
            assert!(
                r[key].as_f64().is_some_and(f64::is_finite),
                "{key} missing in {r}"
            );
        }
        assert_eq!(
            r["ffn_experts_per_token_per_layer"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("run/checkpoint/meta.json")).unwrap(),
    )
    .unwrap();
    let bias = &meta["expert_bias_controller"]["bias"];
    assert_eq!(
        bias.as_array().unwrap().len(),
        2,
        "controller state is saved per layer"
    );
    assert_eq!(meta["expert_bias_controller"]["updates"], 250);
}

#[test]
fn exported_checkpoint_has_transformers_names() {
    let dir = scratch("export");
    train(&dir, &["train.steps=1", "train.eval_every=1"]);
    run_ok(catapult(&dir).args(["export", "run/checkpoint", "--hf", "hf"]));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("hf/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["model_type"], "longcat_flash");
    assert_eq!(config["zero_expert_num"], 4);
    let python = workspace().join(".venv/bin/python3");
    let out = run_ok(
        std::process::Command::new(python)
            .arg("-c")
            .arg(
                "import sys; from safetensors import safe_open\n\
         f = safe_open(sys.argv[1], 'pt')\n\
         print(tuple(f.get_slice('model.layers.1.mlp.experts.gate_up_proj').get_shape()))\n\
         print(len(list(f.keys())))",
            )
            .arg(dir.join("hf/model.safetensors")),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    // (N + Z) x 2I x H = 12 x 128 x 128 for the tiny recipe.
    assert!(text.contains("(12, 128, 128)"), "{text}");
}

#[test]
fn mtp_loss_switches_on_at_its_start_step() {
    let dir = scratch("mtp");
    train(
        &dir,
        &[
            "train.steps=6",
            "train.eval_every=6",
            "train.log_every=1",
            "model.mtp_layers=1",
            "train.mtp_start_step=3",
        ],
    );
    let lines = metrics(&dir.join("run/metrics.jsonl"));
    let mtp: Vec<(u64, f64)> = lines
        .iter()
        .filter(|l| l.get("loss").is_some())
        .map(|l| (l["step"].as_u64().unwrap(), l["mtp_loss"].as_f64().unwrap()))
        .collect();
    assert_eq!(mtp.len(), 6);
    for (step, loss) in mtp {
        // Metrics count steps from 1; step index 3 (the 4th step) is the first with MTP.
        if step <= 3 {
            assert_eq!(loss, 0.0, "step {step}");
        } else {
            assert!(loss > 1.0 && loss.is_finite(), "step {step}: {loss}");
        }
    }
    run_ok(catapult(&dir).args(["export", "run/checkpoint", "--hf", "hf"]));
    let python = workspace().join(".venv/bin/python3");
    let out = run_ok(
        std::process::Command::new(python)
            .arg("-c")
            .arg("import sys; from safetensors import safe_open\nprint(sorted(k for k in safe_open(sys.argv[1], 'pt').keys() if '.mtp.' in k))")
            .arg(dir.join("hf/model.safetensors")),
    );
    let keys = String::from_utf8_lossy(&out.stdout);
    for name in [
        "model.mtp.embed_tokens.weight",
        "model.mtp.layers.0.eh_proj.weight",
        "model.mtp.layers.0.enorm.m.weight",
        "model.mtp.layers.0.hnorm.m.weight",
        "model.mtp.layers.0.self_attn.q_a_proj.weight",
        "model.mtp.layers.0.transformer_layer.mlp.gate_proj.weight",
        "model.mtp.norm.weight",
    ] {
        assert!(keys.contains(name), "{name} missing from {keys}");
    }
}

#[test]
fn recomputation_gives_the_same_weights_in_under_60_percent_of_the_peak_memory() {
    let dir = scratch("recompute");
    // A model whose activations dominate: 8 layers of 1024 tokens, 2 sequences a step.
    let big = [
        "model.num_layers=8",
        "data.seq_len=1024",
        "train.global_batch_size=2",
        "train.micro_batch_size=2",
        "train.eval_sequences=2",
        "data.streams=2",
        "train.steps=2",
        "train.eval_every=2",
    ];
    let mut peak = Vec::new();
    for mode in ["none", "layer"] {
        let out = format!("output.dir={}", dir.join(mode).display());
        let recompute = format!("train.recompute={mode}");
        let mut sets = big.to_vec();
        sets.extend([out.as_str(), recompute.as_str()]);
        train(&dir, &sets);
        // Each run is a fresh process: its peak RSS is its own.
        let last = metrics(&dir.join(mode).join("metrics.jsonl"))
            .into_iter()
            .filter_map(|l| l["memory_peak_rss_bytes"].as_f64())
            .next_back()
            .expect("step lines report the peak RSS");
        peak.push(last);
    }
    let weights =
        |m: &str| std::fs::read(dir.join(m).join("checkpoint/model.safetensors")).unwrap();
    assert!(
        weights("none") == weights("layer"),
        "recomputation changed the weights"
    );
    assert!(
        peak[1] < 0.6 * peak[0],
        "peak RSS {} with recomputation vs {} without",
        peak[1],
        peak[0]
    );
}

/// `catapult train` of the tiny recipe on one process, expected to fail.
fn train_failing(
    dir: &Path,
    name: &str,
    extra: &[&str],
    fault: Option<&str>,
) -> std::process::Output {
    let mut cmd = catapult(dir);
    cmd.arg("train")
        .arg(workspace().join("recipes").join("tiny.yaml"));
    for s in [
        format!("data.path={}", corpus().display()),
        format!("output.dir={}", dir.join(name).display()),
        "train.warmup_steps=0".into(),
        "parallel.expert=1".into(),
        "train.eval_every=8".into(),
        "checkpoint.every=2".into(),
        "checkpoint.async=false".into(),
    ]
    .iter()
    .map(String::as_str)
    .chain(extra.iter().copied())
    {
        cmd.args(["--set", s]);
    }
    if let Some(f) = fault {
        cmd.env("CATAPULT_FAULT", f);
    }
    cmd.output().unwrap()
}

#[test]
fn a_non_finite_step_stops_the_run_before_it_reaches_the_weights() {
    let dir = scratch("nonfinite");
    // An infinite learning rate is bad input, refused before anything runs.
    let out = train_failing(&dir, "inf", &["train.steps=4", "train.lr=.inf"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`train.lr`: is inf"));
    // A learning rate that blows the weights up, a negative norm epsilon: exit 1 at the
    // first step whose loss is not finite, naming it, with no checkpoint written.
    for (name, set, at) in [
        ("lr", "train.lr=1e30", "non-finite values at step 2 (loss"),
        (
            "eps",
            "model.rms_norm_eps=-1",
            "non-finite values at step 1 (loss NaN",
        ),
    ] {
        let out = train_failing(&dir, name, &["train.steps=4", set], None);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(at), "{name}: {err}");
        assert!(
            !dir.join(name).join("checkpoints/latest").exists(),
            "{name}: no checkpoint was written"
        );
    }
    // A NaN gradient at step 5, after good checkpoints: the message names the step,
    // the rank and the tensor, and step 4's checkpoint stays the newest.
    let out = train_failing(&dir, "nan", &["train.steps=8"], Some("nan:0:5"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("non-finite values at step 5 (gradient norm NaN)")
            && err.contains("rank 0's first non-finite tensor is the gradient of"),
        "{err}"
    );
    let latest = std::fs::read_to_string(dir.join("nan/checkpoints/latest")).unwrap();
    assert_eq!(latest.trim(), "step-00000004");
}
