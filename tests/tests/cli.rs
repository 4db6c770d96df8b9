//! End-to-end: recipe commands and data preparation through the built binary.

use catapult_tests::*;

fn tiny() -> std::path::PathBuf {
    workspace().join("recipes").join("tiny.yaml")
}

#[test]
fn every_recipe_in_the_repository_validates() {
    let dir = scratch("validate-all");
    let mut count = 0;
    for entry in std::fs::read_dir(workspace().join("recipes")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            // The recipe alone: the 560B model fits no machine here, and data paths are
            // relative to the repository.
            run_ok(
                catapult(&dir)
                    .args(["recipe", "validate", "--schema-only"])
                    .arg(&path),
            );
            count += 1;
        }
    }
    assert!(count >= 5);
    // On this machine, with its corpus: the tiny recipes fit and find their data.
    for name in ["tiny", "tiny-half", "tiny-proxy", "tiny-grown"] {
        let recipe = workspace().join("recipes").join(format!("{name}.yaml"));
        let out = run_ok(
            catapult(&dir)
                .args(["recipe", "validate"])
                .arg(&recipe)
                .args(["--set", &format!("data.path={}", corpus().display())]),
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("valid recipe"));
    }
}

#[test]
fn recipe_validate_checks_this_machine_memory_and_data_paths() {
    let dir = scratch("validate-here");
    let data = format!("data.path={}", corpus().display());
    let validate = |sets: &[&str]| {
        let mut cmd = catapult(&dir);
        cmd.args(["recipe", "validate"]).arg(tiny());
        for s in sets {
            cmd.args(["--set", s]);
        }
        cmd.output().unwrap()
    };
    let out = validate(&[&data, "model.vocab_size=1000000000"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not fit this machine") && err.contains("model.vocab_size = 1000000000"),
        "{err}"
    );
    let out = validate(&["data.path=no/such/dataset"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("data.path no/such/dataset: does not exist"),
        "{err}"
    );
    let out = validate(&[&data, "data.tokenizer=no-such-tokenizer.json"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tokenizer no-such-tokenizer.json: cannot be read"),
        "{err}"
    );
    // --schema-only checks the recipe alone.
    let mut cmd = catapult(&dir);
    cmd.args(["recipe", "validate", "--schema-only"])
        .arg(tiny());
    run_ok(cmd.args(["--set", "data.path=no/such/dataset"]));
    // A GPU recipe on a host without one: checked as far as it can be, and said so.
    let big = workspace().join("recipes").join("longcat-flash-560b.yaml");
    let out = catapult(&dir)
        .args(["recipe", "validate"])
        .arg(&big)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    if !std::path::Path::new("/dev/nvidia0").exists() {
        assert!(out.status.success(), "{err}");
        assert!(err.contains("memory not checked"), "{err}");
    }
}

#[test]
fn recipe_show_prints_the_resolved_recipe_with_overrides() {
    let dir = scratch("show");
    let out = run_ok(
        catapult(&dir)
            .args(["recipe", "show"])
            .arg(tiny())
            .args(["--set", "model.num_layers=5"]),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("num_layers: 5"), "{text}");
    // Defaults are filled in.
    assert!(text.contains("rms_norm_eps:"), "{text}");
    assert!(text.contains("beta2:"), "{text}");
}

#[test]
fn bad_recipe_fails_before_training_naming_the_field() {
    let dir = scratch("bad-recipe");
    let bad = dir.join("bad.yaml");
    let text = std::fs::read_to_string(tiny())
        .unwrap()
        .replace("moe_topk: 3", "moe_topk: 30");
    std::fs::write(&bad, text).unwrap();
    let out = catapult(&dir)
        .arg("train")
        .arg(&bad)
        .args([
            "--set",
            &format!("output.dir={}", dir.join("run").display()),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "bad input exits with 2");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.yaml") && err.contains("`model.moe_topk`"),
        "{err}"
    );
    assert!(
        !dir.join("run").exists(),
        "nothing may be written for a rejected recipe"
    );
}

#[test]
fn unknown_key_in_file_names_line_and_suggestion() {
    let dir = scratch("unknown-key");
    let bad = dir.join("typo.yaml");
    let text = std::fs::read_to_string(tiny())
        .unwrap()
        .replace("  warmup_steps:", "  warmup_step:");
    std::fs::write(&bad, &text).unwrap();
    let line = text
        .lines()
        .position(|l| l.contains("warmup_step:"))
        .unwrap()
        + 1;
    let out = catapult(&dir)
        .args(["recipe", "validate"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`train.warmup_step`"), "{err}");
    assert!(err.contains(&format!("line {line}")), "{err}");
    assert!(err.contains("did you mean `train.warmup_steps`"), "{err}");
}

#[test]
fn a_missing_dataset_exits_2_naming_the_path_and_the_fix() {
    let dir = scratch("no-data");
    let out = catapult(&dir)
        .arg("train")
        .arg(tiny())
        .args(["--set", "data.path=does/not/exist"])
        .args(["--set", "parallel.expert=1"])
        .args([
            "--set",
            &format!("output.dir={}", dir.join("run").display()),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does/not/exist") && err.contains("catapult data prepare"),
        "{err}"
    );
}

#[test]
fn data_prepare_writes_parquet_that_training_reads() {
    let dir = scratch("prepare");
    let text: String = (0..400)
        .map(|i| format!("Document number {i} says hello to the world.\n\n"))
        .collect();
    std::fs::write(dir.join("in.txt"), text).unwrap();
    let out = run_ok(catapult(&dir).args([
        "data",
        "prepare",
        "in.txt",
        "-o",
        "shards",
        "--shard-size",
        "150",
    ]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("400 documents") && stdout.contains("3 shard(s)"),
        "{stdout}"
    );
    run_ok(catapult(&dir).arg("train").arg(tiny()).args([
        "--set",
        "data.path=shards",
        "--set",
        "data.seq_len=32",
        "--set",
        "data.valid_fraction=0.1",
        "--set",
        "train.steps=2",
        "--set",
        "train.warmup_steps=0",
        "--set",
        "output.dir=run",
        "--set",
        "parallel.expert=1",
    ]));
    assert!(dir.join("run/checkpoint/model.safetensors").exists());
}

/// `catapult train` of the tiny recipe on one process for `steps` steps into `run`.
fn train_tiny(
    dir: &std::path::Path,
    run: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    catapult(dir)
        .arg("train")
        .arg(tiny())
        .args(["--set", &format!("data.path={}", corpus().display())])
        .args(["--set", &format!("output.dir={}", run.display())])
        .args([
            "--set",
            "parallel.expert=1",
            "--set",
            "train.warmup_steps=0",
        ])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn a_bad_resume_path_exits_2_naming_the_path_and_the_fix() {
    let dir = scratch("bad-resume");
    let missing = dir.join("no-such-checkpoints");
    let out = train_tiny(
        &dir,
        &dir.join("run"),
        &[
            "--set",
            "train.steps=2",
            "--resume",
            &missing.display().to_string(),
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "bad input exits with 2: {err}");
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(err.contains("check the path or use --resume auto"), "{err}");
}

#[test]
fn a_checkpoint_of_another_model_shape_exits_2_naming_the_field() {
    let dir = scratch("other-shape");
    let run = dir.join("run");
    let first = train_tiny(&dir, &run, &["--set", "train.steps=2"]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let out = train_tiny(
        &dir,
        &run,
        &[
            "--set",
            "train.steps=4",
            "--set",
            "model.num_layers=3",
            "--resume",
            "auto",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "bad input exits with 2: {err}");
    assert!(
        err.contains(&run.join("checkpoints").display().to_string()),
        "{err}"
    );
    assert!(
        err.contains("model.num_layers is 3 in the recipe but 2 in the checkpoint"),
        "{err}"
    );
    assert!(
        err.contains("resume with the recipe the checkpoint was written with"),
        "{err}"
    );
}
