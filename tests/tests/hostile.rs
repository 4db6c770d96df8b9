//! End-to-end: hostile input loses nothing and panics nowhere. A run replaced with
//! `--overwrite` by a model that cannot fit keeps every old file; a model beyond this
//! machine's memory is refused before anything is allocated (exit 2, naming the bytes
//! and the fields); an allocation that fails anyway is an error (exit 1), not a panic.

use catapult_tests::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

fn tiny() -> PathBuf {
    workspace().join("recipes").join("tiny.yaml")
}

/// `catapult train` of the tiny recipe on one process into `dir/run`, with `extra`.
fn train(dir: &Path, extra: &[&str]) -> Output {
    catapult(dir)
        .arg("train")
        .arg(tiny())
        .args(["--set", &format!("data.path={}", corpus().display())])
        .args([
            "--set",
            &format!("output.dir={}", dir.join("run").display()),
        ])
        .args([
            "--set",
            "parallel.expert=1",
            "--set",
            "train.warmup_steps=0",
        ])
        .args(["--set", "train.steps=2", "--set", "checkpoint.every=1"])
        .args(extra)
        .output()
        .unwrap()
}

/// Every file under `root` (relative path -> content hash).
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, file_hash(&path));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn overwriting_a_run_with_a_model_that_cannot_fit_keeps_every_old_file() {
    let dir = scratch("hostile-overwrite");
    let first = train(&dir, &[]);
    assert!(first.status.success(), "{}", stderr(&first));
    let before = snapshot(&dir.join("run"));
    assert!(
        before.keys().any(|k| k.starts_with("checkpoints/")),
        "{before:?}"
    );
    assert!(
        before.contains_key("checkpoint/model.safetensors"),
        "{before:?}"
    );
    let out = train(
        &dir,
        &["--overwrite", "--set", "model.hidden_size=1000000000"],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "bad input exits with 2: {err}");
    assert!(err.contains("does not fit this machine"), "{err}");
    assert!(err.contains("model.hidden_size = 1000000000"), "{err}");
    assert!(err.contains("GiB"), "{err}");
    assert!(!err.contains("panicked at"), "{err}");
    assert_eq!(
        snapshot(&dir.join("run")),
        before,
        "the old run must be untouched"
    );
}

#[test]
fn a_model_beyond_memory_is_refused_before_anything_is_written() {
    let dir = scratch("hostile-too-big");
    let out = train(&dir, &["--set", "model.vocab_size=1000000000"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("model.vocab_size = 1000000000"), "{err}");
    assert!(!err.contains("panicked at"), "{err}");
    assert!(
        !dir.join("run").exists(),
        "nothing may be written for a refused run"
    );
}

#[test]
fn an_allocation_that_fails_anyway_is_exit_1_not_a_panic() {
    let dir = scratch("hostile-alloc");
    // 6 GB of address space: libtorch loads; the run (6.8 GiB by the estimate, which
    // this machine's memory allows) does not.
    let cmd = format!(
        "ulimit -v 6000000; exec '{}' train '{}' --set data.path='{}' --set output.dir='{}' \
         --set parallel.expert=1 --set train.warmup_steps=0 --set train.steps=2 \
         --set model.hidden_size=32768",
        catapult_binary().display(),
        tiny().display(),
        corpus().display(),
        dir.join("run").display()
    );
    let out = std::process::Command::new("bash")
        .args(["-c", &cmd])
        .current_dir(&dir)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failure at run time exits with 1: {err}"
    );
    // libtorch's own cause varies with where the allocation failed (and under the limit
    // its message may not be computable at all); ours names the memory either way.
    assert!(err.contains("ran out of memory"), "{err}");
    assert!(!err.contains("bug in catapult"), "{err}");
    assert!(!err.contains("panicked at"), "{err}");
    assert!(!err.contains("frame #"), "no C++ frames: {err}");
}

/// `catapult submit --dry-run` of the tiny recipe into `dir/run`, with `extra`.
fn submit(dir: &Path, extra: &[&str]) -> Output {
    catapult(dir)
        .arg("submit")
        .arg(tiny())
        .args([
            "--set",
            &format!("output.dir={}", dir.join("run").display()),
        ])
        .args(["--set", "parallel.expert=1", "--dry-run"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn slurm_inputs_cannot_inject_lines_or_commands_into_the_batch_script() {
    let dir = scratch("hostile-submit");
    let hostile = [
        "debug\nrm -rf ~",
        "x'$(touch PWNED)'",
        "`touch PWNED`",
        "a\"b",
        "x y",
    ];
    for flag in ["--partition", "--account", "--time"] {
        for value in hostile.iter().copied().chain(["banana"]) {
            if flag != "--time" && value == "banana" {
                continue;
            }
            let out = submit(&dir, &[flag, value]);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{flag} {value:?}: {err}");
            assert!(err.contains(flag), "{flag} {value:?}: {err}");
            assert!(
                !dir.join("run/job.sbatch").exists(),
                "{flag} {value:?} wrote a script"
            );
        }
    }
    // A recipe name with a newline would have put a line before the #SBATCH lines.
    let named = dir.join("named.yaml");
    let text = std::fs::read_to_string(tiny())
        .unwrap()
        .replace("name: tiny", "name: \"tiny\\n#SBATCH --wrap=id\"");
    std::fs::write(&named, text).unwrap();
    let out = catapult(&dir)
        .arg("submit")
        .arg(&named)
        .args(["--set", "parallel.expert=1", "--dry-run"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("`name`"), "{err}");

    // Accepted values with shell syntax reach the launcher as one argument each, and run
    // nothing: bash reads the script's command line back to exactly the arguments given.
    let data = format!(
        "data.path={}/d $(touch PWNED) `touch PWNED` 'q' \"dq\"",
        dir.display()
    );
    let ok = submit(
        &dir,
        &[
            "--partition",
            "gpu-a_1.x",
            "--time",
            "1-02:03:04",
            "--set",
            &data,
        ],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    let script = std::fs::read_to_string(dir.join("run/job.sbatch")).unwrap();
    assert!(
        script.contains("\n#SBATCH --partition=gpu-a_1.x\n"),
        "{script}"
    );
    assert!(script.contains("\n#SBATCH --time=1-02:03:04\n"), "{script}");
    let exec = script.lines().last().unwrap();
    let argv_of = exec.replacen("exec ", "printf '%s\\0' ", 1);
    let parsed = std::process::Command::new("bash")
        .args(["-c", &argv_of])
        .current_dir(&dir)
        .output()
        .unwrap();
    let args: Vec<String> = String::from_utf8(parsed.stdout)
        .unwrap()
        .split('\0')
        .filter(|a| !a.is_empty())
        .map(String::from)
        .collect();
    assert!(args.contains(&data), "{args:?}");
    assert_eq!(
        args[1..7],
        [
            "launch",
            &tiny().display().to_string(),
            "--via",
            "srun",
            "--nproc",
            "1"
        ]
    );
    assert!(!dir.join("PWNED").exists(), "a command ran");
}

#[test]
fn data_prepare_refuses_an_occupied_output_and_overwrite_removes_stale_shards() {
    let dir = scratch("hostile-prepare");
    let text = corpus().parent().unwrap().join("kjv.txt");
    let prepare = |extra: &[&str]| {
        catapult(&dir)
            .args(["data", "prepare"])
            .arg(&text)
            .args(["-o", "out", "--min-chars", "200"])
            .args(extra)
            .output()
            .unwrap()
    };
    let first = prepare(&["--shard-size", "1MB"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let before = snapshot(&dir.join("out"));
    assert!(before.len() >= 4, "several shards: {before:?}");
    let again = prepare(&["--shard-size", "256MB"]);
    let err = stderr(&again);
    assert_eq!(again.status.code(), Some(2), "{err}");
    assert!(err.contains("out") && err.contains("--overwrite"), "{err}");
    assert_eq!(
        snapshot(&dir.join("out")),
        before,
        "a refused prepare changes nothing"
    );
    let replaced = prepare(&["--shard-size", "256MB", "--overwrite"]);
    assert!(replaced.status.success(), "{}", stderr(&replaced));
    let after: Vec<String> = snapshot(&dir.join("out")).into_keys().collect();
    assert_eq!(
        after,
        ["dataset.json", "shard-00000.parquet"],
        "no stale shard is left"
    );
}

#[test]
fn ckpt_commands_on_something_that_is_not_a_checkpoint_exit_2_saying_what_it_is() {
    let dir = scratch("hostile-ckpt");
    let first = train(&dir, &[]);
    assert!(first.status.success(), "{}", stderr(&first));
    let recipe = tiny().display().to_string();
    let cases = [
        ("no-such-dir", "no such file or directory"),
        (recipe.as_str(), "a file, not a checkpoint root"),
        ("run", "a run directory, not a checkpoint root"),
        ("run/tensorboard", "a directory without checkpoints"),
    ];
    for command in ["verify", "list", "show"] {
        for (path, says) in cases {
            let out = catapult(&dir)
                .args(["ckpt", command, path])
                .output()
                .unwrap();
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "ckpt {command} {path}: {err}");
            assert!(
                err.contains(path) && err.contains(says),
                "ckpt {command} {path}: {err}"
            );
        }
        run_ok(catapult(&dir).args(["ckpt", command, "run/checkpoints"]));
    }
}

#[test]
fn an_unwritable_checkpoint_location_is_found_before_step_1() {
    let dir = scratch("hostile-ckpt-dir");
    std::fs::write(dir.join("a-file"), "not a directory").unwrap();
    let root = dir.join("a-file").join("checkpoints");
    let out = train(
        &dir,
        &["--set", &format!("checkpoint.dir={}", root.display())],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&root.display().to_string()) && err.contains("cannot write there"),
        "{err}"
    );
    assert!(err.contains("Not a directory"), "the OS error: {err}");
    assert!(!dir.join("run/metrics.jsonl").exists(), "no step ran");
}

#[test]
fn zero_ranks_nodes_or_an_empty_tokenizer_input_are_named() {
    let dir = scratch("hostile-zero");
    let cases: [(&[&str], &str); 3] = [
        (&["launch", "--nproc", "0"], "--nproc 0"),
        (&["submit", "--nodes", "0", "--dry-run"], "--nodes 0"),
        (
            &["submit", "--tasks-per-node", "0", "--dry-run"],
            "--tasks-per-node 0",
        ),
    ];
    for (args, says) in cases {
        let out = catapult(&dir).args(args).arg(tiny()).output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    std::fs::write(dir.join("empty.txt"), "").unwrap();
    let out = catapult(&dir)
        .args([
            "data",
            "tokenizer",
            "train",
            "--vocab-size",
            "300",
            "empty.txt",
        ])
        .args(["-o", "tok.json"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("empty.txt") && err.contains("no merge could be learned"),
        "{err}"
    );
    assert!(
        !dir.join("tok.json").exists(),
        "no tokenizer is left behind"
    );
}

/// Files the table of bad inputs points at, beside a trained run (`run/`, checkpoints
/// at steps 1 and 2, the final `run/checkpoint`).
fn bad_input_fixtures(dir: &Path) {
    run_ok_output(train(dir, &[]));
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
    write("empty.yaml", "");
    write("tab.yaml", "name: x\n\tseed: 1\n");
    write("dup.yaml", "name: a\nseed: 1\nseed: 2\n");
    write("one.txt", "hello world\n");
    write("a-file", "not a directory");
    std::fs::create_dir_all(dir.join("badrun")).unwrap();
    write("badrun/metrics.jsonl", "garbage{\n");
    std::fs::create_dir_all(dir.join("no-metrics")).unwrap();
    // A copy of the run's checkpoints whose newest manifest is torn.
    let torn = dir.join("torn");
    std::fs::create_dir_all(torn.join("step-00000002")).unwrap();
    write("torn/step-00000002/manifest.json", "{\"form");
    // The final weights, cut short.
    std::fs::create_dir_all(dir.join("damaged")).unwrap();
    for f in ["meta.json", "model.safetensors"] {
        std::fs::copy(
            dir.join("run/checkpoint").join(f),
            dir.join("damaged").join(f),
        )
        .unwrap();
    }
    let model = dir.join("damaged/model.safetensors");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..1000]).unwrap();
    // A grown checkpoint already in `grown`.
    run_ok(
        catapult(dir)
            .args(["grow", "--from", "run/checkpoints", "--recipe"])
            .arg(tiny())
            .args(["--set", "model.num_layers=4", "-o", "grown"]),
    );
}

fn run_ok_output(out: Output) {
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn every_bad_input_in_the_table_exits_with_its_code_naming_the_culprit() {
    let dir = scratch("hostile-table");
    bad_input_fixtures(&dir);
    let r = tiny().display().to_string();
    let data = format!("data.path={}", corpus().display());
    let shard = corpus().join("shard-00000.parquet").display().to_string();
    let train_sets = [
        "--set",
        "train.warmup_steps=0",
        "--set",
        "train.steps=1",
        "--set",
        "parallel.expert=1",
        "--set",
        &data,
    ];
    let with_train = |extra: &[&str]| -> Vec<String> {
        let mut v = vec!["train".to_string(), r.clone()];
        v.extend(train_sets.iter().map(|s| s.to_string()));
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let s = |args: &[&str]| -> Vec<String> { args.iter().map(|a| a.to_string()).collect() };
    let cases: Vec<(Vec<String>, i32, Vec<&str>)> = vec![
        // Recipes.
        (
            s(&["recipe", "validate", "missing.yaml"]),
            2,
            vec!["cannot read recipe missing.yaml"],
        ),
        (
            s(&["recipe", "validate", &shard]),
            2,
            vec!["cannot read recipe", "UTF-8"],
        ),
        (
            s(&["recipe", "validate", "empty.yaml"]),
            2,
            vec!["`name`", "is required"],
        ),
        (
            s(&["recipe", "validate", "tab.yaml"]),
            2,
            vec!["tab.yaml (line 2)", "invalid YAML"],
        ),
        (
            s(&["recipe", "validate", "dup.yaml"]),
            2,
            vec!["(line 3)", "duplicate field `seed`"],
        ),
        (
            s(&["recipe", "validate", &r, "--set", "novalue"]),
            2,
            vec!["--set novalue", "KEY=VALUE"],
        ),
        (
            s(&[
                "recipe",
                "validate",
                "--schema-only",
                &r,
                "--set",
                "train.grad_clip=.nan",
            ]),
            2,
            vec!["`train.grad_clip`", "is NaN"],
        ),
        (
            s(&[
                "recipe",
                "validate",
                "--schema-only",
                &r,
                "--set",
                "train.lr=.inf",
            ]),
            2,
            vec!["`train.lr`", "is inf"],
        ),
        (
            s(&[
                "recipe",
                "validate",
                "--schema-only",
                &r,
                "--set",
                "model.moe_topk=100",
            ]),
            2,
            vec!["with --set model.moe_topk=100", "`model.moe_topk`"],
        ),
        (
            s(&[
                "recipe",
                "validate",
                "--schema-only",
                &r,
                "--set",
                "name=../escape",
            ]),
            2,
            vec!["`name`", "not a usable name"],
        ),
        (
            s(&[
                "recipe",
                "validate",
                &r,
                "--set",
                &data,
                "--set",
                "model.num_layers=100000",
            ]),
            2,
            vec!["does not fit this machine", "model.num_layers = 100000"],
        ),
        // Data.
        (
            s(&["data", "prepare", "missing.txt", "-o", "out"]),
            2,
            vec!["missing.txt", "No such file"],
        ),
        (
            s(&[
                "data",
                "prepare",
                "one.txt",
                "-o",
                "out",
                "--shard-size",
                "banana",
            ]),
            2,
            vec!["--shard-size", "banana"],
        ),
        (
            s(&[
                "data",
                "stream",
                &r,
                "--set",
                "data.path=one.txt",
                "--batches",
                "1",
            ]),
            2,
            vec!["one.txt", "not a parquet shard"],
        ),
        (
            s(&[
                "data",
                "stream",
                &r,
                "--set",
                &data,
                "--batches",
                "1",
                "-o",
                "a-file/b.jsonl",
            ]),
            2,
            vec!["a-file/b.jsonl", "cannot create"],
        ),
        (
            s(&[
                "data",
                "tokenizer",
                "train",
                "--vocab-size",
                "10",
                "one.txt",
                "-o",
                "t.json",
            ]),
            2,
            vec!["--vocab-size 10", "257"],
        ),
        (
            s(&[
                "data",
                "tokenizer",
                "train",
                "--vocab-size",
                "300",
                "nothing.txt",
                "-o",
                "t.json",
            ]),
            2,
            vec!["nothing.txt"],
        ),
        // Checkpoints and export.
        (
            s(&["ckpt", "show", "run/checkpoints/step-00000099"]),
            2,
            vec!["step-00000099", "no such file"],
        ),
        (
            s(&["ckpt", "show", "torn/step-00000002"]),
            2,
            vec!["manifest.json", "unreadable manifest"],
        ),
        (
            s(&["export", "nowhere", "--hf", "hf"]),
            2,
            vec!["nowhere/meta.json"],
        ),
        (
            s(&["export", "damaged", "--hf", "hf"]),
            1,
            vec!["damaged/model.safetensors", "cannot read safetensors"],
        ),
        // Plot.
        (
            s(&["plot", "no-metrics"]),
            2,
            vec!["metrics.jsonl", "cannot read the metrics"],
        ),
        (
            s(&["plot", "badrun"]),
            2,
            vec!["badrun/metrics.jsonl", "line 1 is not JSON"],
        ),
        // Grow.
        (
            s(&["grow", "--from", "nowhere", "--recipe", &r, "-o", "g"]),
            2,
            vec!["nowhere", "holds no checkpoint"],
        ),
        (
            s(&[
                "grow",
                "--from",
                "run/checkpoints",
                "--recipe",
                &r,
                "-o",
                "g",
                "--factor",
                "1",
            ]),
            2,
            vec!["--factor 1", "grow by 2"],
        ),
        (
            s(&[
                "grow",
                "--from",
                "run/checkpoints",
                "--recipe",
                &r,
                "-o",
                "g",
                "--optimizer",
                "x",
            ]),
            2,
            vec!["`x`", "copy or fresh"],
        ),
        (
            s(&[
                "grow",
                "--from",
                "run/checkpoints",
                "--recipe",
                &r,
                "-o",
                "g",
                "--set",
                "model.num_layers=8000000000",
                "--factor",
                "4000000000",
            ]),
            2,
            vec!["--factor 4000000000", "GiB", "available"],
        ),
        (
            s(&[
                "grow",
                "--from",
                "run/checkpoints",
                "--recipe",
                &r,
                "--set",
                "model.num_layers=4",
                "-o",
                "grown",
            ]),
            2,
            vec!["grown", "already holds checkpoints", "--overwrite"],
        ),
        // Train.
        (
            with_train(&["--resume", "--overwrite"]),
            2,
            vec!["--resume", "--overwrite"],
        ),
        (
            with_train(&["--set", "output.dir=a-file"]),
            2,
            vec!["a-file/checkpoints", "cannot write there"],
        ),
        (
            with_train(&[
                "--set",
                "output.dir=fresh",
                "--set",
                "checkpoint.dir=a-file",
            ]),
            2,
            vec!["a-file", "a file, not a directory"],
        ),
        (
            with_train(&["--set", "output.dir=run"]),
            2,
            vec!["already holds a run", "--overwrite"],
        ),
        (
            with_train(&[
                "--set",
                "output.dir=fresh",
                "--set",
                "data.tokenizer=a-file",
            ]),
            2,
            vec!["a-file", "not a valid tokenizer.json"],
        ),
        (
            with_train(&[
                "--set",
                "output.dir=fresh",
                "--set",
                "parallel.shard=optimizer",
            ]),
            2,
            vec!["parallel.shard = optimizer", "1 rank", "set parallel.shard"],
        ),
        // Launch, submit and the run commands.
        (
            s(&[
                "launch",
                &r,
                "--nproc",
                "1",
                "--set",
                "parallel.expert=1",
                "--set",
                "parallel.shard=optimizer",
            ]),
            2,
            vec!["--nproc 1", "parallel.shard = optimizer"],
        ),
        (
            s(&["launch", &r, "--nproc", "3"]),
            2,
            vec!["--nproc 3", "multiple of 2"],
        ),
        (
            s(&["launch", "missing.yaml", "--nproc", "2"]),
            2,
            vec!["cannot read recipe missing.yaml"],
        ),
        (
            s(&["submit", &r, "--partition", "", "--dry-run"]),
            2,
            vec!["--partition \"\""],
        ),
        (s(&["status", "nothing"]), 2, vec!["not a run directory"]),
        (
            s(&["logs", "run", "--rank", "7"]),
            2,
            vec!["no log for rank 7"],
        ),
    ];
    assert!(cases.len() >= 40);
    for (args, code, says) in cases {
        let out = catapult(&dir).args(&args).output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        for s in &says {
            assert!(err.contains(s), "{args:?} should say {s:?}: {err}");
        }
        assert!(!err.contains("panicked at"), "{args:?}: {err}");
        // Each cause once: the OS error is not repeated after the message quoting it.
        assert!(
            !err.contains("(os error 2): No such file"),
            "{args:?}: {err}"
        );
    }
    // Nothing was written where the bad inputs pointed.
    for path in ["out", "g", "fresh/metrics.jsonl", "hf", "t.json"] {
        assert!(!dir.join(path).exists(), "{path} was written");
    }
}

#[test]
fn grow_overwrite_replaces_the_output_only_once_the_grown_checkpoint_is_built() {
    let dir = scratch("hostile-grow-overwrite");
    bad_input_fixtures(&dir);
    let before = snapshot(&dir.join("grown"));
    // A growth that fails (a factor this host cannot hold) leaves the output as it was.
    let out = catapult(&dir)
        .args(["grow", "--from", "run/checkpoints", "--recipe"])
        .arg(tiny())
        .args([
            "--set",
            "model.num_layers=8000000000",
            "--factor",
            "4000000000",
        ])
        .args(["-o", "grown", "--overwrite"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert_eq!(snapshot(&dir.join("grown")), before);
    // One that succeeds replaces it: from step 1 now, so step 2's checkpoint is gone.
    let out = run_ok(
        catapult(&dir)
            .args([
                "grow",
                "--from",
                "run/checkpoints/step-00000001",
                "--recipe",
            ])
            .arg(tiny())
            .args(["--set", "model.num_layers=4", "-o", "grown", "--overwrite"]),
    );
    assert!(
        stderr(&out).contains("removed 1 old checkpoint"),
        "{}",
        stderr(&out)
    );
    assert!(dir.join("grown/step-00000001/manifest.json").exists());
    assert!(!dir
        .join("grown/step-00000002")
        .join("manifest.json")
        .exists());
    run_ok(catapult(&dir).args(["ckpt", "verify", "grown"]));
}

#[test]
fn resuming_a_step_into_another_run_directory_ignores_the_source_roots_newer_steps() {
    let dir = scratch("hostile-branch");
    run_ok_output(train(&dir, &[]));
    let step1 = dir.join("run/checkpoints/step-00000001");
    let branch = dir.join("branch");
    let out = train(
        &dir,
        &[
            "--set",
            &format!("output.dir={}", branch.display()),
            "--resume",
            step1.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    // It restarted from step 1: the branch's metrics hold step 2 only.
    let steps: Vec<u64> = metrics(&branch.join("metrics.jsonl"))
        .iter()
        .filter(|m| m["loss"].is_number())
        .map(|m| m["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![2]);
    // Into the same root, the newer step would collide: refused, naming it.
    let out = train(&dir, &["--resume", step1.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("step-00000002"), "{}", stderr(&out));
}

/// `catapult launch` of the tiny recipe on one rank into `dir/run`, with `extra`.
fn launch(dir: &Path, extra: &[&str]) -> Output {
    catapult(dir)
        .arg("launch")
        .arg(tiny())
        .args(["--nproc", "1", "--set", "parallel.expert=1"])
        .args([
            "--set",
            &format!("output.dir={}", dir.join("run").display()),
        ])
        .args(["--set", "launch.restart_backoff_s=0.1"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn launch_refuses_bad_input_before_any_rank_starts_and_never_restarts_it() {
    let dir = scratch("hostile-launch");
    run_ok_output(train(&dir, &[]));
    let before = snapshot(&dir.join("run"));
    let data = format!("data.path={}", corpus().display());
    // A model this machine cannot hold: refused before any rank starts; --overwrite
    // removed nothing, wrote nothing (no logs, no supervisor state).
    let out = launch(
        &dir,
        &[
            "--set",
            &data,
            "--set",
            "model.vocab_size=1000000000",
            "--overwrite",
        ],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("does not fit this machine"), "{err}");
    assert!(!err.contains("[rank 0]"), "no rank started: {err}");
    assert_eq!(snapshot(&dir.join("run")), before);
    // Bad input only a rank can see (a dataset directory without shards): exit 2 after
    // one attempt, not launch.max_restarts of them.
    std::fs::create_dir_all(dir.join("no-shards")).unwrap();
    let out = launch(
        &dir,
        &["--set", "data.path=no-shards", "--set", "output.dir=fresh"],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("holds no *.parquet shards") && err.contains("no restart was made"),
        "{err}"
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("fresh/supervisor.json")).unwrap()).unwrap();
    assert_eq!(state["status"], "failed");
    assert_eq!(state["attempts"].as_array().unwrap().len(), 1, "{state}");
}
