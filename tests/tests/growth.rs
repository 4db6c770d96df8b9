//! Model growth and width transfer through the built binary: `catapult grow` stacks a
//! trained checkpoint's layers (every tensor checked byte for byte), the grown checkpoint
//! resumes under the target recipe, a recipe's growth schedule in one run equals growing
//! by hand bit for bit, `catapult launch` runs a schedule on 2 ranks, and `catapult
//! transfer` / training apply the width-transfer rules.

use catapult_tests::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;

/// Tensors of a safetensors file: name -> (shape, bytes).
fn tensors(path: &Path) -> BTreeMap<String, (Vec<u64>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let shape = v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            let o = v["data_offsets"].as_array().unwrap();
            let (a, b) = (
                o[0].as_u64().unwrap() as usize,
                o[1].as_u64().unwrap() as usize,
            );
            (k.clone(), (shape, data[a..b].to_vec()))
        })
        .collect()
}

/// The layer index in a tensor name, and the name with it replaced by `{}`.
fn layer_of(name: &str) -> Option<(usize, String)> {
    let at = name.find("model.layers.")? + "model.layers.".len();
    let end = at + name[at..].find('.')?;
    let i = name[at..end].parse().ok()?;
    Some((i, format!("{}{{}}{}", &name[..at], &name[end..])))
}

/// Short-run settings shared by the runs here (one process unless a test says so).
fn short(out: &Path, steps: usize) -> Vec<String> {
    vec![
        format!("data.path={}", corpus().display()),
        format!("output.dir={}", out.display()),
        format!("train.steps={steps}"),
        "train.warmup_steps=2".into(),
        "train.eval_every=100".into(),
        "train.eval_sequences=16".into(),
        "train.log_every=1".into(),
        "checkpoint.every=6".into(),
        "checkpoint.async=false".into(),
        "parallel.expert=1".into(),
        "system.threads=2".into(),
    ]
}

fn with_sets(cmd: &mut std::process::Command, sets: &[String]) {
    for s in sets {
        cmd.args(["--set", s]);
    }
}

fn train(dir: &Path, recipe: &str, sets: &[String], extra: &[&str]) -> Output {
    let mut c = catapult(dir);
    c.arg("train").arg(workspace().join(recipe)).args(extra);
    with_sets(&mut c, sets);
    run_ok(&mut c)
}

fn grow(dir: &Path, from: &Path, sets: &[String], extra: &[&str]) -> Output {
    let mut c = catapult(dir);
    c.arg("grow")
        .arg("--from")
        .arg(from)
        .arg("--recipe")
        .arg(workspace().join("recipes/tiny-grown.yaml"))
        .args(extra);
    with_sets(&mut c, sets);
    c.output().unwrap()
}

/// The target: tiny-grown at 2 layers without its schedule.
fn target_sets(out: &Path, steps: usize) -> Vec<String> {
    let mut s = short(out, steps);
    s.push("model.num_layers=2".into());
    s.push("growth=null".into());
    s
}

#[test]
fn grow_stacks_every_layer_and_the_grown_checkpoint_resumes() {
    let dir = scratch("grow");
    let mut small = short(&dir.join("small"), 12);
    small.push("model.num_layers=1".into());
    train(&dir, "recipes/tiny-half.yaml", &small, &[]);
    let from = dir.join("small/checkpoints/step-00000006");

    let out = grow(
        &dir,
        &from,
        &target_sets(&dir.join("big"), 12),
        &["--factor", "2", "-o", "grown"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let source = tensors(&from.join("rank-00000.safetensors"));
    let grown = tensors(&dir.join("grown/step-00000006/rank-00000.safetensors"));
    let layer_tensors = source.keys().filter(|k| layer_of(k).is_some()).count();
    assert!(layer_tensors > 20, "{layer_tensors}");
    assert_eq!(grown.len(), source.len() + layer_tensors);
    for (name, value) in &grown {
        let original = match layer_of(name) {
            // Layer i + kL is layer i (L = 1 here): weights, expert bias and moments.
            Some((i, pattern)) => {
                assert!(i < 2, "{name}");
                pattern.replace("{}", "0")
            }
            None => name.clone(),
        };
        assert!(
            source.get(&original) == Some(value),
            "{name} differs from the small model's {original}"
        );
    }
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("grown/step-00000006/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["growth"]["optimizer"], "copy");
    assert_eq!(manifest["growth"]["factor"], 2);
    assert_eq!(manifest["step"], 6);
    assert_eq!(manifest["tokens"], 6 * 16 * 128);
    assert_eq!(manifest["recipe"]["model"]["num_layers"], 2);

    // The grown checkpoint resumes under the target recipe, continuing at step 7.
    train(
        &dir,
        "recipes/tiny-grown.yaml",
        &target_sets(&dir.join("big"), 12),
        &["--resume", "grown/step-00000006"],
    );
    let lines = metrics(&dir.join("big/metrics.jsonl"));
    let steps: Vec<u64> = lines
        .iter()
        .filter(|l| l.get("loss").is_some())
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (7..=12).collect::<Vec<_>>());
    assert!(lines
        .iter()
        .filter_map(|l| l.get("loss").and_then(|v| v.as_f64()))
        .all(f64::is_finite));
    let finished = tensors(&dir.join("big/checkpoint/model.safetensors"));
    assert!(finished.keys().any(|k| k.starts_with("model.layers.1.")));

    // Fresh optimizer state: zero moments, recorded as such.
    let out = grow(
        &dir,
        &from,
        &target_sets(&dir.join("big"), 12),
        &["--optimizer", "fresh", "-o", "grown-fresh"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fresh = tensors(&dir.join("grown-fresh/step-00000006/rank-00000.safetensors"));
    for (name, (_, bytes)) in &fresh {
        if name.starts_with("optimizer.") {
            assert!(bytes.iter().all(|&b| b == 0), "{name} is not zero");
        } else {
            assert!(grown[name].1 == *bytes, "{name}");
        }
    }
    let manifest =
        std::fs::read_to_string(dir.join("grown-fresh/step-00000006/manifest.json")).unwrap();
    assert!(manifest.contains("\"optimizer\": \"fresh\""), "{manifest}");

    // A target that differs in more than depth, or the wrong factor: refused, nothing written.
    let mut wide = target_sets(&dir.join("big"), 12);
    wide.push("model.hidden_size=96".into());
    let out = grow(&dir, &from, &wide, &["-o", "bad1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("model.hidden_size") && err.contains("depth only"),
        "{err}"
    );
    let out = grow(
        &dir,
        &from,
        &target_sets(&dir.join("big"), 12),
        &["--factor", "3", "-o", "bad2"],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("model.num_layers is 2"));
    assert!(!dir.join("bad1").exists() && !dir.join("bad2/step-00000006").exists());
    // An occupied output is refused.
    let out = grow(
        &dir,
        &from,
        &target_sets(&dir.join("big"), 12),
        &["-o", "grown"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already holds checkpoints"));
}

#[test]
fn a_growth_schedule_in_one_run_equals_growing_by_hand() {
    let dir = scratch("growth-schedule");
    // One command: 1 layer until 6 steps' tokens, stacked to 2, on to step 10.
    let mut one = short(&dir.join("one"), 10);
    one.extend([
        "model.num_layers=2".into(),
        "growth.from_layers=1".into(),
        format!("growth.until_tokens={}", 6 * 16 * 128),
    ]);
    let out = train(&dir, "recipes/tiny-grown.yaml", &one, &[]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("grew 1 layers to 2 at step 6"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stage1 = metrics(&dir.join("one/stage1/metrics.jsonl"));
    assert_eq!(
        stage1.iter().filter_map(|l| l["step"].as_u64()).max(),
        Some(6)
    );
    let stage2 = metrics(&dir.join("one/metrics.jsonl"));
    let first = stage2
        .iter()
        .filter(|l| l.get("loss").is_some())
        .map(|l| l["step"].as_u64().unwrap())
        .min();
    assert_eq!(first, Some(7));

    // By hand: the small model (its step-6 checkpoint), catapult grow, resume.
    let mut small = short(&dir.join("small"), 10);
    small.push("model.num_layers=1".into());
    train(&dir, "recipes/tiny-half.yaml", &small, &[]);
    let out = grow(
        &dir,
        &dir.join("small/checkpoints/step-00000006"),
        &target_sets(&dir.join("hand"), 10),
        &["-o", "hand-grown"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    train(
        &dir,
        "recipes/tiny-grown.yaml",
        &target_sets(&dir.join("hand"), 10),
        &["--resume", "hand-grown/step-00000006"],
    );
    assert!(
        file_hash(&dir.join("one/checkpoint/model.safetensors"))
            == file_hash(&dir.join("hand/checkpoint/model.safetensors")),
        "one-run growth and growth by hand give different weights"
    );

    // Killed right after the first stage's last checkpoint, before the grown one exists:
    // the resumed run grows at the same step and ends with the same weights.
    let mut crash = short(&dir.join("crash"), 10);
    crash.extend(one[short(&dir.join("one"), 10).len()..].iter().cloned());
    let mut c = catapult(&dir);
    c.env("CATAPULT_FAULT", "step:6")
        .arg("train")
        .arg(workspace().join("recipes/tiny-grown.yaml"));
    with_sets(&mut c, &crash);
    assert!(
        !c.output().unwrap().status.success(),
        "the fault should kill the run"
    );
    assert!(dir
        .join("crash/stage1/checkpoints/step-00000006/manifest.json")
        .exists());
    assert!(!dir.join("crash/checkpoints").exists());
    let out = train(&dir, "recipes/tiny-grown.yaml", &crash, &["--resume"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("grew 1 layers to 2 at step 6"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        file_hash(&dir.join("crash/checkpoint/model.safetensors"))
            == file_hash(&dir.join("one/checkpoint/model.safetensors")),
        "a run killed at growth resumes to different weights"
    );

    // Running the finished schedule again without --resume or --overwrite is refused.
    let mut c = catapult(&dir);
    c.arg("train")
        .arg(workspace().join("recipes/tiny-grown.yaml"));
    with_sets(&mut c, &one);
    let out = c.output().unwrap();
    assert!(!out.status.success());
}

#[test]
fn launch_runs_a_growth_schedule_on_two_ranks() {
    let dir = scratch("growth-launch");
    let mut sets = short(&dir.join("run"), 8);
    sets.retain(|s| s != "parallel.expert=1" && s != "system.threads=2");
    sets.extend([
        "model.num_layers=2".into(),
        "growth.from_layers=1".into(),
        format!("growth.until_tokens={}", 4 * 16 * 128),
        "launch.restart_backoff_s=0.2".into(),
    ]);
    let mut c = catapult(&dir);
    c.arg("launch")
        .arg(workspace().join("recipes/tiny-grown.yaml"))
        .args(["--nproc", "2"]);
    with_sets(&mut c, &sets);
    run_ok(&mut c);
    let supervisor: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("run/supervisor.json")).unwrap())
            .unwrap();
    assert_eq!(supervisor["status"], "completed", "{supervisor}");
    let stage1 = metrics(&dir.join("run/stage1/metrics.jsonl"));
    assert_eq!(
        stage1.iter().filter_map(|l| l["step"].as_u64()).max(),
        Some(4)
    );
    let final_weights = tensors(&dir.join("run/checkpoint/model.safetensors"));
    assert!(final_weights
        .keys()
        .any(|k| k.starts_with("model.layers.1.")));
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("run/checkpoints/step-00000004/manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["growth"]["from_layers"], 1);
}

#[test]
fn transfer_prints_the_rule_table_and_training_uses_it() {
    let dir = scratch("transfer");
    let widen = [
        "model.hidden_size=256",
        "model.num_attention_heads=8",
        "model.q_lora_rank=128",
        "model.kv_lora_rank=64",
        "model.ffn_hidden_size=512",
        "model.expert_ffn_hidden_size=128",
        "transfer.proxy.hidden_size=64",
        "transfer.proxy.groups.router.lr=0.001",
    ];
    let mut c = catapult(&dir);
    c.args(["transfer"])
        .arg(workspace().join("recipes/tiny-proxy.yaml"))
        .arg("--json");
    for s in widen {
        c.args(["--set", s]);
    }
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&run_ok(&mut c).stdout).unwrap();
    let row = |g: &str| rows.iter().find(|r| r["group"] == g).unwrap().clone();
    // s = 256 / 64 = 4: hidden groups get std / 2 and lr / 4; the embedding keeps both.
    assert_eq!(row("embedding")["lr"], 0.003);
    assert_eq!(row("embedding")["init_std"], 0.02);
    assert_eq!(row("experts")["lr"], 0.00075);
    assert_eq!(row("experts")["init_std"], 0.01);
    assert_eq!(row("head")["lr"], 0.00075);
    assert_eq!(row("router")["lr"], 0.00025);
    assert_eq!(row("norms")["init_std"], serde_json::Value::Null);
    assert_eq!(row("norms")["lr"], 0.003);
    let total: u64 = rows.iter().map(|r| r["params"].as_u64().unwrap()).sum();
    let plan: serde_json::Value = {
        let mut c = catapult(&dir);
        c.args(["train"])
            .arg(workspace().join("recipes/tiny-proxy.yaml"))
            .args(["--dry-run", "--json"]);
        for s in widen {
            c.args(["--set", s]);
        }
        serde_json::from_slice(&run_ok(&mut c).stdout).unwrap()
    };
    assert_eq!(total, plan["params"]["total"].as_u64().unwrap());

    // Training logs each group's rate: the schedule's times the group's factor.
    let mut sets = short(&dir.join("run"), 2);
    sets.extend(widen.iter().map(|s| s.to_string()));
    train(&dir, "recipes/tiny-proxy.yaml", &sets, &[]);
    for l in metrics(&dir.join("run/metrics.jsonl"))
        .iter()
        .filter(|l| l.get("loss").is_some())
    {
        let lr = l["lr"].as_f64().unwrap();
        assert_eq!(l["lr_embedding"].as_f64().unwrap(), lr);
        assert!((l["lr_attention"].as_f64().unwrap() - lr / 4.0).abs() < 1e-15);
        assert!((l["lr_router"].as_f64().unwrap() - lr / 12.0).abs() < 1e-15);
    }
}
