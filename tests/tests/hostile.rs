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
    assert!(err.contains("can't allocate memory"), "{err}");
    assert!(err.contains("ran out of memory"), "{err}");
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
