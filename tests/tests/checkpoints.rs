//! Sharded checkpoints through the `catapult` binary: SIGKILL at steps and inside saves,
//! then `--resume`, must reproduce an uninterrupted run bit for bit; corruption is named
//! and skipped; S3 round trip; Python reads the files; retention; shape checks.

use catapult_tests::{catapult, corpus, metrics, run_ok, scratch, workspace, S3Server};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const STEPS: usize = 12;

/// `catapult train` of a 12-step tiny run in `dir/name`, checkpointing every 3 steps.
fn train(dir: &Path, name: &str, extra: &[String]) -> Command {
    let mut cmd = catapult(dir);
    cmd.arg("train")
        .arg(workspace().join("recipes/tiny.yaml"))
        .args(["--set", &format!("data.path={}", corpus().display())])
        .args(["--set", &format!("train.steps={STEPS}")])
        .args([
            "--set",
            "train.warmup_steps=2",
            "--set",
            "train.eval_every=5",
        ])
        .args(["--set", "train.log_every=1", "--set", "checkpoint.every=3"])
        .args([
            "--set",
            "data.shuffle_buffer=16",
            "--set",
            "train.eval_sequences=16",
        ])
        // One torch thread per run: the tests run several trainings at once.
        .args(["--set", "system.threads=1", "--set", "parallel.expert=1"])
        .args(["--set", &format!("output.dir={name}")]);
    for e in extra {
        cmd.args(["--set", e]);
    }
    cmd
}

/// Every loss and validation loss line, by step (timing fields left out).
fn losses(run: &Path) -> Vec<(u64, String, f64)> {
    metrics(&run.join("metrics.jsonl"))
        .iter()
        .flat_map(|l| {
            let step = l["step"].as_u64().unwrap();
            ["loss", "val_loss", "grad_norm", "load_balance_loss"]
                .into_iter()
                .filter_map(move |k| Some((step, k.to_string(), l.get(k)?.as_f64()?)))
        })
        .collect()
}

fn final_weights(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("checkpoint/model.safetensors")).unwrap()
}

/// Rank 0's tensors (model and optimizer) and state (data, controller, schedule) at `step`.
fn rank_file(run: &Path, step: usize) -> Vec<u8> {
    let dir = run.join(format!("checkpoints/step-{step:08}"));
    let mut bytes = std::fs::read(dir.join("rank-00000.safetensors")).unwrap();
    bytes.extend(std::fs::read(dir.join("rank-00000.json")).unwrap());
    bytes
}

/// A straight run: its directory, losses, final weights and final rank-0 state.
type Reference = (PathBuf, Vec<(u64, String, f64)>, Vec<u8>, Vec<u8>);

/// A straight run, once per test process.
fn reference() -> &'static Reference {
    static REF: std::sync::OnceLock<Reference> = std::sync::OnceLock::new();
    REF.get_or_init(|| {
        let dir = scratch("ckpt-reference");
        run_ok(&mut train(&dir, "straight", &[]));
        let run = dir.join("straight");
        (
            run.clone(),
            losses(&run),
            final_weights(&run),
            rank_file(&run, STEPS),
        )
    })
}

fn assert_matches_reference(run: &Path, what: &str) {
    let (_, ref_losses, ref_weights, ref_rank) = reference();
    assert_eq!(&losses(run), ref_losses, "{what}: logged losses differ");
    assert!(
        final_weights(run) == *ref_weights,
        "{what}: final weights differ"
    );
    assert!(
        rank_file(run, STEPS) == *ref_rank,
        "{what}: final model, optimizer, data or controller state differs"
    );
}

fn killed(out: &std::process::Output) -> bool {
    out.status.signal() == Some(9)
}

#[test]
fn sigkill_at_a_step_then_resume_is_bitwise_identical() {
    let dir = scratch("ckpt-kill-step");
    // 3: right after a save was handed to the background saver (in flight when killed);
    // 7: one step after a save (maybe still in flight); 11: between saves.
    for k in [3, 7, 11] {
        let name = format!("k{k}");
        let out = train(&dir, &name, &[])
            .env("CATAPULT_FAULT", format!("step:{k}"))
            .output()
            .unwrap();
        assert!(
            killed(&out),
            "step {k}: expected SIGKILL, got {}",
            out.status
        );
        let resumed = run_ok(train(&dir, &name, &[]).arg("--resume"));
        let err = String::from_utf8_lossy(&resumed.stderr);
        if k >= 6 {
            assert!(err.contains("resuming from"), "{err}");
        }
        assert_matches_reference(&dir.join(&name), &format!("killed at step {k}"));
    }
}

#[test]
fn sigkill_inside_a_save_falls_back_to_the_previous_checkpoint() {
    let dir = scratch("ckpt-kill-save");
    for phase in ["mid-shard", "before-manifest", "mid-manifest"] {
        let out = train(&dir, phase, &[])
            .env("CATAPULT_FAULT", format!("save:{phase}:6"))
            .output()
            .unwrap();
        assert!(
            killed(&out),
            "{phase}: expected SIGKILL, got {}",
            out.status
        );
        let resumed = run_ok(train(&dir, phase, &[]).arg("--resume"));
        let err = String::from_utf8_lossy(&resumed.stderr);
        assert!(err.contains("step-00000003"), "{phase}: {err}");
        if phase == "mid-manifest" {
            assert!(err.contains("skipping checkpoint step-00000006"), "{err}");
        }
        assert_matches_reference(&dir.join(phase), phase);
    }
}

#[test]
fn a_flipped_byte_is_named_and_resume_falls_back() {
    let dir = scratch("ckpt-corrupt");
    // A finished run (so no save is in flight); then its newest checkpoint is damaged.
    run_ok(&mut train(&dir, "run", &[]));
    let shard = dir.join("run/checkpoints/step-00000012/rank-00000.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x01;
    std::fs::write(&shard, bytes).unwrap();

    let verify = catapult(&dir)
        .args(["ckpt", "verify", "run/checkpoints"])
        .output()
        .unwrap();
    assert_eq!(verify.status.code(), Some(1));
    let text = String::from_utf8_lossy(&verify.stdout);
    assert!(
        text.contains("step-00000012: FAILED")
            && text.contains("rank 0")
            && text.contains("rank-00000.safetensors"),
        "{text}"
    );
    assert!(text.contains("step-00000009: ok"), "{text}");

    let strict = train(&dir, "run", &[])
        .args(["--resume", "--no-fallback"])
        .output()
        .unwrap();
    assert_eq!(strict.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&strict.stderr).contains("rank-00000.safetensors"));

    let resumed = run_ok(train(&dir, "run", &[]).arg("--resume"));
    let err = String::from_utf8_lossy(&resumed.stderr);
    assert!(
        err.contains("skipping checkpoint step-00000012") && err.contains("step-00000009"),
        "{err}"
    );
    assert_matches_reference(&dir.join("run"), "after falling back");
    // The broken step was moved aside before the first save (so the new save of step 12
    // could not collide with it), with the reason; the resumed run wrote step 12 afresh.
    let quarantined = dir.join("run/checkpoints/quarantine/step-00000012");
    let reason = std::fs::read_to_string(quarantined.join("reason.txt")).unwrap();
    assert!(
        reason.contains("rank-00000.safetensors") && reason.contains("BLAKE3"),
        "{reason}"
    );
    assert!(
        err.contains("moved the broken checkpoint step-00000012"),
        "{err}"
    );
    run_ok(catapult(&dir).args(["ckpt", "verify", "run/checkpoints/step-00000012"]));
    let list = run_ok(catapult(&dir).args(["ckpt", "list", "run/checkpoints"]));
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        listed.contains("quarantined") && listed.contains("step-00000012"),
        "{listed}"
    );
}

#[test]
fn checkpoints_round_trip_through_s3() {
    let dir = scratch("ckpt-s3");
    let server = S3Server::start("ckpt-s3-server");
    let s3 = [
        format!("checkpoint.dir=s3://{}/runs/tiny", server.bucket),
        format!("checkpoint.storage.endpoint={}", server.endpoint),
    ];
    let out = server
        .credentials(&mut train(&dir, "run", &s3))
        .env("CATAPULT_FAULT", "step:10")
        .output()
        .unwrap();
    assert!(killed(&out), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        !dir.join("run/checkpoints").exists(),
        "checkpoints went to S3"
    );
    let list = run_ok(
        server.credentials(
            catapult(&dir)
                .args(["ckpt", "list", &format!("s3://{}/runs/tiny", server.bucket)])
                .args(["--endpoint", &server.endpoint]),
        ),
    );
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("step-00000006") && text.contains('*'),
        "{text}"
    );
    run_ok(server.credentials(train(&dir, "run", &s3).arg("--resume")));
    let (_, ref_losses, ref_weights, _) = reference();
    assert_eq!(&losses(&dir.join("run")), ref_losses);
    assert!(final_weights(&dir.join("run")) == *ref_weights);
    run_ok(
        server.credentials(
            catapult(&dir)
                .args([
                    "ckpt",
                    "verify",
                    &format!("s3://{}/runs/tiny/step-00000012", server.bucket),
                ])
                .args(["--endpoint", &server.endpoint]),
        ),
    );
}

#[test]
fn python_safetensors_reads_the_shards_and_retention_keeps_what_it_should() {
    let (run, _, _, _) = reference();
    let script = r#"
import sys, json
from safetensors.torch import load_file
shard = load_file(sys.argv[1])
final = load_file(sys.argv[2])
assert "optimizer.exp_avg.model.embed_tokens.weight" in shard, sorted(shard)[:5]
for name, t in final.items():
    assert name in shard, name
    assert shard[name].dtype == t.dtype and bool((shard[name] == t).all()), name
print(json.dumps({"tensors": len(shard), "model": len(final)}))
"#;
    let out = Command::new(workspace().join(".venv/bin/python"))
        .arg("-c")
        .arg(script)
        .arg(run.join(format!(
            "checkpoints/step-{STEPS:08}/rank-00000.safetensors"
        )))
        .arg(run.join("checkpoint/model.safetensors"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // The shard holds the model plus two moments per trainable tensor.
    assert!(counts["tensors"].as_u64().unwrap() > 2 * counts["model"].as_u64().unwrap());

    // Retention (keep_last 3): of steps 3, 6, 9, 12 the first is gone, manifest first.
    let kept: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| {
            n.starts_with("step-")
                && run
                    .join("checkpoints")
                    .join(n)
                    .join("manifest.json")
                    .exists()
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(kept, ["step-00000006", "step-00000009", "step-00000012"]);
    assert_eq!(
        std::fs::read_to_string(run.join("checkpoints/latest")).unwrap(),
        "step-00000012"
    );
    let show = run_ok(catapult(run).args(["ckpt", "show", "checkpoints"]));
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.contains("step 12")
            && text.contains("optimizer")
            && text.contains("expert-parallel 1"),
        "{text}"
    );
}

#[test]
fn resume_refuses_a_rollback_into_newer_checkpoints() {
    let (run, _, _, _) = reference();
    let dir = run.parent().unwrap();
    let out = train(dir, "straight", &[])
        .args(["--resume", "straight/checkpoints/step-00000006"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("newer checkpoints (step-00000009, step-00000012)"),
        "{err}"
    );
}

#[test]
fn resume_refuses_a_different_model() {
    let (run, _, _, _) = reference();
    let dir = run.parent().unwrap();
    let out = train(dir, "straight", &["model.num_layers=3".into()])
        .arg("--resume")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("model.num_layers is 3 in the recipe but 2 in the checkpoint"),
        "{err}"
    );
}

#[test]
fn a_new_run_never_mixes_with_old_checkpoints() {
    let dir = scratch("ckpt-overwrite");
    let short = [
        "train.steps=3".to_string(),
        "train.warmup_steps=1".to_string(),
    ];
    run_ok(&mut train(&dir, "run", &short));
    // --overwrite replaces the run, its default checkpoint directory included.
    let mut lr = short.to_vec();
    lr.push("train.lr=0.001".into());
    run_ok(train(&dir, "run", &lr).arg("--overwrite"));
    run_ok(catapult(&dir).args(["ckpt", "verify", "run/checkpoints"]));
    // A checkpoint.dir named in the recipe is never deleted: a fresh run refuses it.
    let mut custom = short.to_vec();
    custom.push(format!(
        "checkpoint.dir={}",
        dir.join("run/checkpoints").display()
    ));
    let out = train(&dir, "other", &custom).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already holds checkpoints (newest step-00000003)")
            && err.contains("--resume"),
        "{err}"
    );
}
