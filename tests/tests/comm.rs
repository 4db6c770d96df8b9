//! The collectives' conformance checks (`catapult comm check`) in a single process and
//! under mpirun with 2 and 4 ranks (oversubscribed), with and without timing jitter:
//! every check passes on every rank, and the reductions give the same bits regardless
//! of message timing.

use catapult_tests::{
    catapult_binary, copy_dir, corpus, file_hash, final_weights, metrics, scratch, workspace,
};
use std::path::Path;
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
#[ignore = "needs a CUDA GPU"]
fn nccl_collectives_conform_where_a_gpu_exists() {
    // Run with --ignored on a GPU machine (scripts/gpu-check does): a skip is a failure.
    let dir = scratch("nccl");
    let out = Command::new(catapult_binary())
        .current_dir(&dir)
        .args(["comm", "check", "--backend", "nccl"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert!(
        line.get("skipped").is_none(),
        "the NCCL checks did not run: {} (they need a CUDA device and libnccl)",
        line["skipped"]
    );
    assert_eq!(line["failures"], serde_json::json!([]), "{line}");
}

/// In `sets`: pass `--resume` (auto).
const RESUME: &str = "--resume";

/// `catapult train recipes/tiny.yaml` on `ranks` ranks (one process for 1) with expert
/// parallelism `expert`, micro-batches of 16 / ranks (one per rank and step, so that
/// every layout sees the same global micro-batch), writing to `dir/name`.
fn train(
    dir: &Path,
    name: &str,
    ranks: usize,
    expert: usize,
    sets: &[&str],
    env: &[(&str, &str)],
) -> std::process::Output {
    let mut cmd = if ranks == 1 {
        Command::new(catapult_binary())
    } else {
        let mut c = catapult_tests::mpirun(ranks);
        for (k, _) in env {
            c.args(["-x", k]);
        }
        c.arg(catapult_binary());
        c
    };
    cmd.envs(env.iter().copied())
        .arg("train")
        .arg(workspace().join("recipes/tiny.yaml"));
    if sets.contains(&RESUME) {
        cmd.arg("--resume");
    }
    let micro = 16 / ranks;
    for set in [
        format!("data.path={}", corpus().display()),
        "train.warmup_steps=2".into(),
        "train.log_every=1".into(),
        "train.eval_sequences=16".into(),
        "data.shuffle_buffer=16".into(),
        "system.threads=1".into(),
        format!("train.micro_batch_size={micro}"),
        format!("parallel.expert={expert}"),
        format!("output.dir={name}"),
    ]
    .iter()
    .map(String::as_str)
    .chain(sets.iter().copied().filter(|s| *s != RESUME))
    {
        cmd.args(["--set", set]);
    }
    cmd.current_dir(dir).output().expect("catapult starts")
}

fn ok(out: std::process::Output) -> std::process::Output {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn losses(dir: &Path, run: &str) -> Vec<(u64, f64)> {
    catapult_tests::metrics(&dir.join(run).join("metrics.jsonl"))
        .iter()
        .filter_map(|l| Some((l["step"].as_u64()?, l.get("loss")?.as_f64()?)))
        .collect()
}

fn assert_close(a: &[(u64, f64)], b: &[(u64, f64)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for ((s, x), (t, y)) in a.iter().zip(b) {
        assert_eq!(s, t);
        assert!(
            (x - y).abs() / x.abs() < 1e-5,
            "{what}, step {s}: {x} vs {y}"
        );
    }
}

#[test]
fn every_layout_matches_one_process_for_20_steps() {
    let dir = scratch("layouts");
    // Micro-batches of 4 sequences in every layout: the same canonical micro-batches
    // (4 per step in one process, 2 per rank on 2 ranks, 1 on 4).
    let steps = [
        "train.steps=20",
        "train.eval_every=10",
        "train.micro_batch_size=4",
    ];
    ok(train(&dir, "one", 1, 1, &steps, &[]));
    let one = losses(&dir, "one");
    assert_eq!(one.len(), 20);
    // (ranks, expert parallel): DP = P, EP = 1; DP = 1, EP = P; DP = 2, EP = 2.
    for (ranks, expert) in [(2, 1), (2, 2), (4, 1), (4, 4), (4, 2)] {
        let name = format!("p{ranks}-ep{expert}");
        ok(train(&dir, &name, ranks, expert, &steps, &[]));
        if expert == 1 {
            // Data parallelism alone: the canonical reduction tree gives the same bits.
            assert_eq!(losses(&dir, &name), one, "{name}");
            assert!(
                final_weights(&dir, &name) == final_weights(&dir, "one"),
                "{name}"
            );
        } else {
            // The experts compute on rows grouped by rank: the match is to rounding.
            assert_close(&one, &losses(&dir, &name), &name);
        }
        // The final sharded checkpoint: one file per expert-parallel rank of replica 0,
        // each holding its experts, and the export holds every expert whole.
        let step = dir.join(&name).join("checkpoints/step-00000020");
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(step.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest["world"]["expert_parallel"], expert);
        assert_eq!(manifest["world"]["data_parallel"], ranks / expert);
        for e in 0..expert {
            assert!(step.join(format!("rank-{e:05}.safetensors")).exists());
        }
        let full = final_weights(&dir, &name);
        assert_eq!(full.len(), final_weights(&dir, "one").len(), "{name}");
    }
}

#[test]
fn a_data_x_expert_parallel_run_is_bitwise_reproducible_under_timing_jitter() {
    let dir = scratch("ep-jitter");
    let steps = ["train.steps=6", "train.eval_every=6"];
    let jitter = |ms| [("CATAPULT_COMM_JITTER_MS", ms)];
    ok(train(&dir, "calm", 4, 2, &steps, &jitter("0")));
    ok(train(&dir, "shaken", 4, 2, &steps, &jitter("20")));
    let calm = final_weights(&dir, "calm");
    assert!(
        final_weights(&dir, "shaken") == calm,
        "random delays changed the weights"
    );
    // Overlap changes when the all-to-alls are waited on, never what they carry.
    let mut sets = steps.to_vec();
    sets.push("parallel.overlap=false");
    ok(train(&dir, "serial", 4, 2, &sets, &[]));
    assert!(
        final_weights(&dir, "serial") == calm,
        "overlap changed the weights"
    );
}

#[test]
fn expert_parallel_checkpoints_resume_bitwise_and_reshard() {
    let dir = scratch("ep-resume");
    let sets = ["train.steps=8", "train.eval_every=4", "checkpoint.every=4"];
    ok(train(&dir, "whole", 2, 2, &sets, &[]));
    // Killed at step 6 (after the step-4 checkpoint), then resumed: the same bits.
    let killed = train(&dir, "cut", 2, 2, &sets, &[("CATAPULT_FAULT", "step:6")]);
    assert!(!killed.status.success());
    let mut resumed = sets.to_vec();
    resumed.push(RESUME);
    ok(train(&dir, "cut", 2, 2, &resumed, &[]));
    assert!(
        final_weights(&dir, "cut") == final_weights(&dir, "whole"),
        "the resumed run's weights differ"
    );
    // The expert-parallel step-4 checkpoint, resumed by one process holding every
    // expert: the same losses (to rounding) as the 2-rank run.
    copy_dir(
        &dir.join("whole/checkpoints/step-00000004"),
        &dir.join("alone/checkpoints/step-00000004"),
    );
    ok(train(&dir, "alone", 1, 1, &resumed, &[]));
    let tail = |run: &str| -> Vec<(u64, f64)> {
        losses(&dir, run)
            .into_iter()
            .filter(|(s, _)| *s > 4)
            .collect()
    };
    assert_eq!(tail("alone").len(), 4);
    assert_close(&tail("whole"), &tail("alone"), "resharded");
    // Both resumed runs loaded step 4's checkpoint, not a fresh start: the resume line
    // names it, and the first loss they logged is step 5's.
    for run in ["cut", "alone"] {
        let line = metrics(&dir.join(run).join("metrics.jsonl"))
            .into_iter()
            .find(|l| l["resumed_from"].is_string())
            .unwrap_or_else(|| panic!("{run} did not resume"));
        assert!(
            line["resumed_from"]
                .as_str()
                .unwrap()
                .ends_with("step-00000004")
                && line["step"] == 4,
            "{run}: {line}"
        );
    }
    assert_eq!(losses(&dir, "alone").first().map(|l| l.0), Some(5));
}

#[test]
fn the_sdc_check_names_the_corrupt_rank_and_rolls_back() {
    let dir = scratch("sdc");
    let sets = |extra: &'static str| {
        vec![
            "train.steps=6",
            "train.eval_every=6",
            "checkpoint.every=2",
            "checkpoint.async=false",
            "train.sdc_check_every=2",
            extra,
        ]
    };
    ok(train(
        &dir,
        "clean",
        2,
        2,
        &sets("train.sdc_action=stop"),
        &[],
    ));
    let fault = [("CATAPULT_FAULT", "sdc:1:4")];
    let stopped = train(
        &dir,
        "stopped",
        2,
        2,
        &sets("train.sdc_action=stop"),
        &fault,
    );
    assert!(!stopped.status.success());
    let err = String::from_utf8_lossy(&stopped.stderr);
    assert!(
        err.contains("silent data corruption at step 4")
            && err.contains("rank 1: model.layers.")
            && err.contains("mlp.experts"),
        "{err}"
    );
    ok(train(
        &dir,
        "rolled",
        2,
        2,
        &sets("train.sdc_action=rollback"),
        &fault,
    ));
    let lines = catapult_tests::metrics(&dir.join("rolled/metrics.jsonl"));
    assert!(
        lines
            .iter()
            .any(|l| l["sdc_rollback"]["detected_at"] == 4 && l["step"] == 2),
        "no rollback recorded"
    );
    assert!(
        final_weights(&dir, "rolled") == final_weights(&dir, "clean"),
        "the rolled-back run's weights differ from a clean run's"
    );
    // A rank that computes wrongly every time: 3 rollbacks, then the run stops.
    let broken = train(
        &dir,
        "broken",
        2,
        2,
        &sets("train.sdc_action=rollback"),
        &[("CATAPULT_FAULT", "sdc:1:4:always")],
    );
    assert_eq!(broken.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&broken.stderr).contains("silent data corruption at step 4"));
    let rollbacks = catapult_tests::metrics(&dir.join("broken/metrics.jsonl"))
        .iter()
        .filter(|l| l["sdc_rollback"]["detected_at"] == 4)
        .count();
    assert_eq!(rollbacks, 3, "the rollback cap");
    // The check itself does not perturb training.
    ok(train(
        &dir,
        "unchecked",
        2,
        2,
        &["train.steps=6", "train.eval_every=6"],
        &[],
    ));
    assert!(final_weights(&dir, "unchecked") == final_weights(&dir, "clean"));
    let checked: Vec<f64> = catapult_tests::metrics(&dir.join("clean/metrics.jsonl"))
        .iter()
        .filter_map(|l| l.get("sdc_check_fraction")?.as_f64())
        .collect();
    assert_eq!(checked.len(), 3, "steps 2, 4, 6 are checked");
}

/// What a sharded run `runs.1` shares with its unsharded twin `runs.0` on `layout`
/// (ranks, expert): the checkpoint (moments whole), 1/P of the dense moments (and of
/// the gradients with `gradients`), and each category the dry-run predicts.
fn shard_checks(dir: &Path, runs: (&str, &str), layout: (usize, usize), sets: &[&str]) {
    let ((a, b), (ranks, expert)) = (runs, layout);
    let set = sets.join(" ");
    let mode = |m: &str| sets.iter().any(|s| s.ends_with(m));
    let step = |run: &str| {
        dir.join(run)
            .join("checkpoints/step-00000010/rank-00000.safetensors")
    };
    assert_eq!(
        file_hash(&step(a)),
        file_hash(&step(b)),
        "{ranks} ranks, {set}"
    );
    let bytes = |run: &str, what: &str| -> f64 {
        metrics(&dir.join(run).join("metrics.jsonl"))
            .iter()
            .find_map(|l| l[what].as_f64())
            .expect("the step lines report the bytes held")
    };
    let mut split = vec!["optimizer_bytes"];
    if mode("gradients") || mode("parameters") {
        split.push("grad_bytes");
    }
    if mode("parameters") && ranks == 4 {
        // 1/P slices plus the gather buffers (the ends and two layers, checked against
        // the dry-run below): below a whole copy from 4 layers on with 4 ranks.
        let ratio = bytes(b, "param_bytes") / bytes(a, "param_bytes");
        assert!(
            ratio < 0.9,
            "{ranks} ranks, {set}: param_bytes ratio {ratio}"
        );
    }
    for what in split {
        let ratio = bytes(b, what) / bytes(a, what);
        assert!(
            ratio < 1.0 / ranks as f64 + 0.15,
            "{ranks} ranks, {set}: {what} ratio {ratio}"
        );
    }
    let out = Command::new(catapult_binary())
        .current_dir(dir)
        .args([
            "train",
            "--dry-run",
            "--json",
            "--world",
            &ranks.to_string(),
        ])
        .arg(workspace().join("recipes/tiny.yaml"))
        .args([
            "--set",
            &format!("parallel.expert={expert}"),
            "--set",
            LAYERS,
        ])
        .args(sets.iter().flat_map(|s| ["--set", s]))
        .output()
        .unwrap();
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("dry-run JSON");
    let line = metrics(&dir.join(b).join("metrics.jsonl"))
        .into_iter()
        .find(|l| l["param_bytes"].is_number())
        .unwrap();
    for (measured, predicted) in [
        ("param_bytes", "weights"),
        ("grad_bytes", "gradients"),
        ("optimizer_bytes", "optimizer"),
    ] {
        let (m, p) = (
            line[measured].as_f64().unwrap(),
            plan["memory"][predicted].as_f64().unwrap(),
        );
        assert!(
            (m - p).abs() <= 0.05 * p,
            "{ranks} ranks, {set}: {measured} {m} vs predicted {p}"
        );
    }
}

/// The shard test's depth: enough layers that the gather buffers of `parameters` (the
/// ends and two layers) are not the whole model.
const LAYERS: &str = "model.num_layers=4";

#[test]
fn every_shard_mode_gives_the_bits_of_none_and_resumes_in_any_mode() {
    let dir = scratch("shard-optimizer");
    let sets = [
        "train.steps=10",
        "train.eval_every=5",
        "checkpoint.every=5",
        LAYERS,
    ];
    let with = |mode: &'static str| -> Vec<&str> {
        let mut v = sets.to_vec();
        v.push(mode);
        v
    };
    let (none, opt) = ("parallel.shard=none", "parallel.shard=optimizer");
    let grad = "parallel.shard=gradients";
    let param = "parallel.shard=parameters";
    // DP 4 (dense state split over 4 ranks) and DP 2 x EP 2 (dense over 4, experts
    // over their 2 replicas).
    for (ranks, expert) in [(4, 1), (4, 2)] {
        let a = format!("none-{ranks}-{expert}");
        ok(train(&dir, &a, ranks, expert, &with(none), &[]));
        for (mode, set) in [("opt", opt), ("grad", grad), ("param", param)] {
            let b = format!("{mode}-{ranks}-{expert}");
            ok(train(&dir, &b, ranks, expert, &with(set), &[]));
            assert!(
                final_weights(&dir, &a) == final_weights(&dir, &b),
                "{ranks} ranks: {set} changed the weights"
            );
            shard_checks(&dir, (&a, &b), (ranks, expert), &[set]);
        }
    }
    // Reductions not overlapped with backward, and 2 micro-batches per rank (the
    // gradients accumulate before any reduction starts): the same bits as none with
    // the same micro-batches.
    let mut two = with(none);
    two.push("train.micro_batch_size=2");
    ok(train(&dir, "none-micro-4", 4, 2, &two, &[]));
    let mut two_grad = with(grad);
    two_grad.extend(["train.micro_batch_size=2", "parallel.overlap=false"]);
    ok(train(&dir, "grad-micro-4", 4, 2, &two_grad, &[]));
    assert!(
        final_weights(&dir, "none-micro-4") == final_weights(&dir, "grad-micro-4"),
        "2 micro-batches, no overlap: sharded gradients changed the weights"
    );
    // Sharded parameters with 2 micro-batches (the layers gathered again for each),
    // every gather blocking where it is needed (no prefetch without overlap).
    let mut two_param = with(param);
    two_param.extend(["train.micro_batch_size=2", "parallel.overlap=false"]);
    ok(train(&dir, "param-micro-4", 4, 2, &two_param, &[]));
    assert!(
        final_weights(&dir, "none-micro-4") == final_weights(&dir, "param-micro-4"),
        "2 micro-batches, no overlap: sharded parameters changed the weights"
    );
    // Recomputing every layer in backward, with sharded gradients, on DP 2 x EP 2
    // (the rows each layer received are kept, so no all-to-all runs twice): the same bits.
    for (name, set) in [("recompute-4", grad), ("recompute-param-4", param)] {
        let mut both = with(set);
        both.push("train.recompute=layer");
        ok(train(&dir, name, 4, 2, &both, &[]));
        assert!(
            final_weights(&dir, name) == final_weights(&dir, "none-4-2"),
            "recomputation with {set} changed the weights"
        );
    }
    // With bf16 compute (fp32 master weights and moments; with parameters, bf16
    // working copies of the layers), against bf16 unsharded.
    let bf16 = |mode: &'static str| -> Vec<&str> {
        let mut v = with(mode);
        v.push("system.precision=bf16");
        v
    };
    ok(train(&dir, "bf16-none", 2, 1, &bf16(none), &[]));
    for (name, set) in [
        ("bf16-opt", opt),
        ("bf16-grad", grad),
        ("bf16-param", param),
    ] {
        ok(train(&dir, name, 2, 1, &bf16(set), &[]));
        assert!(
            final_weights(&dir, "bf16-none") == final_weights(&dir, name),
            "bf16: {set} changed the weights"
        );
    }
    // Clipping was at work (the norm is summed in the same order in every mode).
    let clipped = metrics(&dir.join("bf16-param/metrics.jsonl"))
        .iter()
        .filter_map(|l| l["grad_norm"].as_f64())
        .any(|n| n > 1.0);
    assert!(clipped, "no step's gradient norm exceeded train.grad_clip");
    // bf16 working copies of the gathered layers: half their buffer bytes, as predicted.
    let bf16_param = ["system.precision=bf16", param];
    shard_checks(&dir, ("bf16-none", "bf16-param"), (2, 1), &bf16_param);
    // A checkpoint of one mode resumes in the other, bitwise on the same layout.
    for (from, to, mode) in [
        ("opt-4-2", "opt-to-none", none),
        ("none-4-2", "none-to-grad", grad),
        ("grad-4-2", "grad-to-opt", opt),
        ("param-4-2", "param-to-none", none),
        ("none-4-2", "none-to-param", param),
    ] {
        copy_dir(
            &dir.join(from).join("checkpoints/step-00000005"),
            &dir.join(to).join("checkpoints/step-00000005"),
        );
        let mut resumed = with(mode);
        resumed.push(RESUME);
        ok(train(&dir, to, 4, 2, &resumed, &[]));
        assert!(
            final_weights(&dir, to) == final_weights(&dir, "none-4-2"),
            "{from} resumed as {mode}: the weights differ"
        );
        assert_eq!(
            losses(&dir, to).first().map(|l| l.0),
            Some(6),
            "restarted at step 6"
        );
    }
    // And in another world: saved on 4 ranks with sharded parameters, resumed on 2
    // without sharding: the same losses to rounding.
    copy_dir(
        &dir.join("param-4-2/checkpoints/step-00000005"),
        &dir.join("param-to-2/checkpoints/step-00000005"),
    );
    let mut resumed = with(none);
    resumed.push(RESUME);
    ok(train(&dir, "param-to-2", 2, 1, &resumed, &[]));
    let tail = |run: &str| -> Vec<(u64, f64)> {
        losses(&dir, run)
            .into_iter()
            .filter(|(s, _)| *s > 5)
            .collect()
    };
    assert_close(&tail("none-4-2"), &tail("param-to-2"), "resumed on 2 ranks");
}

#[test]
fn initial_weights_are_the_same_in_every_layout_and_no_rank_draws_a_whole_tensor() {
    let dir = scratch("init");
    // One step at a learning rate whose update rounds to zero in fp32: the final
    // weights are the initial ones.
    let frozen = [
        "train.steps=1",
        "train.warmup_steps=1",
        "train.eval_every=1",
        "train.lr=1e-300",
        "train.min_lr=0",
    ];
    let layouts = [
        (1, 1, "none"),
        (2, 1, "none"),
        (2, 2, "none"),
        (4, 4, "none"),
        (4, 2, "optimizer"),
        (4, 1, "gradients"),
        (4, 2, "parameters"),
        (2, 1, "parameters"),
    ];
    let mut first: Option<(String, Vec<u8>)> = None;
    for (ranks, expert, mode) in layouts {
        let name = format!("w{ranks}-ep{expert}-{mode}");
        let shard = format!("parallel.shard={mode}");
        let mut sets = frozen.to_vec();
        sets.push(&shard);
        ok(train(&dir, &name, ranks, expert, &sets, &[]));
        let w = final_weights(&dir, &name);
        match &first {
            None => first = Some((name, w)),
            Some((a, v)) => assert!(*v == w, "{name} starts from other weights than {a}"),
        }
    }
    // 8 experts so wide that one whole expert tensor (8 x 8192 x 128 fp32: 32 MiB a
    // projection) dwarfs the rest of the model. A rank of EP 4 holds a quarter of each
    // (2 layers x 3 projections: 48 MiB): drawing only that adds its share to the peak
    // memory at the end of initialization (measured: 48.4 MiB); drawing a whole tensor
    // and cutting it, as before, would add a whole one on top (80 MiB).
    let wide = |ffn: usize| -> Vec<String> {
        [
            format!("model.expert_ffn_hidden_size={ffn}"),
            "train.steps=1".into(),
            "train.warmup_steps=1".into(),
            "train.eval_every=1".into(),
            "train.global_batch_size=4".into(),
            "data.streams=4".into(),
            "train.micro_batch_size=1".into(),
            "train.eval_sequences=4".into(),
            "data.seq_len=32".into(),
        ]
        .to_vec()
    };
    let peak = |run: &str, ffn: usize| -> f64 {
        let sets = wide(ffn);
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        ok(train(&dir, run, 4, 4, &sets, &[]));
        metrics(&dir.join(run).join("metrics.jsonl"))
            .iter()
            .find_map(|l| l["init_peak_rss_bytes"].as_f64())
            .expect("the step-0 line reports the peak memory after initialization")
    };
    let (narrow, broad) = (peak("narrow", 64), peak("wide", 8192));
    let whole = (8 * 8192 * 128 * 4) as f64;
    let share = 2.0 * 3.0 * whole / 4.0;
    let added = broad - narrow;
    assert!(
        added < share + whole / 2.0,
        "initialization added {added} bytes to the peak; this rank's share is {share}, one \
         whole expert tensor {whole}"
    );
}

#[test]
fn every_rank_writes_its_own_checkpoint_and_any_layout_resumes_it() {
    let dir = scratch("per-rank-ckpt");
    let base = [
        "train.steps=10",
        "train.eval_every=5",
        "checkpoint.every=5",
        LAYERS,
    ];
    let with = |extra: &[&'static str]| -> Vec<&str> {
        let mut v = base.to_vec();
        v.extend(extra);
        v
    };
    let param = "parallel.shard=parameters";
    // Uninterrupted: DP 2 x EP 2 with sharded parameters.
    ok(train(&dir, "whole", 4, 2, &with(&[param]), &[]));
    // Every rank wrote its own files, about a quarter each; rank 0 received only their
    // sizes and hashes.
    let lines = metrics(&dir.join("whole/metrics.jsonl"));
    let complete: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["checkpoint_complete"].is_string())
        .collect();
    assert_eq!(complete.len(), 2, "steps 5 and 10 completed");
    for l in complete {
        let per: Vec<u64> = (l["ckpt_files_bytes"].as_array().unwrap().iter())
            .map(|b| b.as_u64().unwrap())
            .collect();
        let (lo, hi) = (*per.iter().min().unwrap(), *per.iter().max().unwrap());
        assert!(
            per.len() == 4 && lo > 0 && hi < 2 * lo,
            "unbalanced: {per:?}"
        );
        let total: u64 = per.iter().sum();
        let received = l["ckpt_received_bytes"].as_u64().unwrap();
        assert!(
            received * 100 < total,
            "rank 0 received {received} bytes of a {total}-byte checkpoint"
        );
    }
    let step10 = dir.join("whole/checkpoints/step-00000010");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(step10.join("manifest.json")).unwrap()).unwrap();
    let files = manifest["files"].as_array().unwrap();
    assert_eq!(files.len(), 8, "two files per rank");
    for f in files {
        let (name, rank) = (f["name"].as_str().unwrap(), f["rank"].as_u64().unwrap());
        assert!(
            name.starts_with(&format!("rank-{rank:05}.")),
            "{name} by rank {rank}"
        );
        let on_disk = std::fs::metadata(step10.join(name)).unwrap().len();
        assert_eq!(on_disk, f["bytes"].as_u64().unwrap(), "{name}");
    }

    // Rank 2 killed halfway through writing its file of step 10, checkpoints on S3:
    // step 10 never completes, the resumed run starts from step 5 (reading only each
    // rank's part, with ranged reads) and ends with the uninterrupted run's bits.
    let server = catapult_tests::S3Server::start("per-rank-s3");
    let set = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let root = set(format!("checkpoint.dir=s3://{}/runs/ep", server.bucket));
    let endpoint = set(format!("checkpoint.storage.endpoint={}", server.endpoint));
    let s3 = [root, endpoint, param];
    let keys = [
        ("AWS_ACCESS_KEY_ID", catapult_tests::S3Server::ACCESS_KEY),
        (
            "AWS_SECRET_ACCESS_KEY",
            catapult_tests::S3Server::SECRET_KEY,
        ),
    ];
    let mut killed_env = keys.to_vec();
    killed_env.push(("CATAPULT_FAULT", "save:mid-shard:10:2"));
    let cut = train(&dir, "cut", 4, 2, &with(&s3), &killed_env);
    assert!(!cut.status.success(), "rank 2 was to be killed mid-save");
    let mut resumed = with(&s3);
    resumed.push(RESUME);
    ok(train(&dir, "cut", 4, 2, &resumed, &keys));
    assert!(
        final_weights(&dir, "cut") == final_weights(&dir, "whole"),
        "the resumed run's weights differ"
    );
    let resumed_line = metrics(&dir.join("cut/metrics.jsonl"))
        .into_iter()
        .find(|l| l["resumed_from"].is_string())
        .expect("the resumed run logs what it read");
    assert!(
        resumed_line["resumed_from"]
            .as_str()
            .unwrap()
            .ends_with("step-00000005"),
        "{resumed_line}"
    );
    assert_eq!(resumed_line["step"], 5, "{resumed_line}");
    let stored = resumed_line["ckpt_stored_bytes"].as_u64().unwrap() as f64;
    for (rank, read) in resumed_line["ckpt_read_bytes"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let read = read.as_u64().unwrap() as f64;
        assert!(
            read > 0.0 && read < 0.35 * stored,
            "rank {rank} read {read} of {stored} bytes"
        );
    }

    // The 4-rank checkpoint resumed on 1, 2 and 4 ranks in other layouts and modes.
    let tail = |run: &str| -> Vec<(u64, f64)> {
        losses(&dir, run)
            .into_iter()
            .filter(|(s, _)| *s > 5)
            .collect()
    };
    for (name, ranks, expert, mode) in [
        ("to-1", 1, 1, "parallel.shard=none"),
        ("to-2", 2, 2, "parallel.shard=optimizer"),
        ("to-4", 4, 1, "parallel.shard=gradients"),
    ] {
        copy_dir(
            &dir.join("whole/checkpoints/step-00000005"),
            &dir.join(name).join("checkpoints/step-00000005"),
        );
        let mut sets = with(&[mode]);
        sets.push(RESUME);
        ok(train(&dir, name, ranks, expert, &sets, &[]));
        assert_eq!(
            tail(name).first().map(|l| l.0),
            Some(6),
            "{name}: restarted at step 6"
        );
        assert_close(&tail("whole"), &tail(name), name);
    }
}

#[test]
fn a_sharded_export_of_a_4_rank_checkpoint_loads_in_transformers_within_a_chunk_of_memory() {
    let dir = scratch("sharded-export");
    // Wide experts (the fused gate/up projection of a layer is 48 MiB) over 4 layers, so
    // the model is several times its largest tensor.
    let sets = [
        "train.steps=2",
        "train.eval_every=2",
        "checkpoint.every=2",
        "model.num_layers=4",
        "model.expert_ffn_hidden_size=4096",
        "parallel.shard=parameters",
    ];
    ok(train(&dir, "run", 4, 2, &sets, &[]));
    let export = |from: &str, to: &str, extra: &[&str]| -> serde_json::Value {
        ok(Command::new(catapult_binary())
            .current_dir(&dir)
            .args(["export", from, "--hf", to])
            .args(extra)
            .output()
            .unwrap());
        serde_json::from_slice(&std::fs::read(dir.join(to).join("export.json")).unwrap()).unwrap()
    };
    // The sharded step checkpoint (every rank's pieces), in files of at most 40 MiB.
    let sharded = export(
        "run/checkpoints/step-00000002",
        "hf-sharded",
        &["--max-shard-gib", "0.04"],
    );
    let single = export("run/checkpoint", "hf-single", &[]);
    assert_eq!(single["files"].as_array().unwrap().len(), 1);
    assert!(dir.join("hf-single/model.safetensors").exists());
    let files = sharded["files"].as_array().unwrap();
    assert!(files.len() > 2, "{sharded}");
    assert_eq!(
        files[0].as_str().unwrap(),
        format!("model-00001-of-{:05}.safetensors", files.len())
    );
    assert!(dir.join("hf-sharded/model.safetensors.index.json").exists());
    assert!(!dir.join("hf-sharded/model.safetensors").exists());
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap() as f64;
    let (largest, total) = (n(&sharded, "largest_tensor_bytes"), n(&sharded, "bytes"));
    assert!(
        total > 3.0 * largest,
        "the model is not much larger than its largest tensor"
    );
    let grew = n(&sharded, "peak_rss_bytes") - n(&sharded, "start_rss_bytes");
    assert!(
        grew < 2.0 * largest,
        "the export's memory grew by {grew} bytes; its largest tensor has {largest}"
    );
    // transformers loads it with no missing or unexpected key: the same tensors and
    // logits as the single-file export of the final weights.
    let out = Command::new(workspace().join(".venv/bin/python3"))
        .arg(workspace().join("tests/python/hf_same.py"))
        .arg(dir.join("hf-sharded"))
        .arg(dir.join("hf-single"))
        .arg("1e-4")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["files"].as_u64().unwrap() as usize, files.len());
}

#[test]
fn the_planner_predicts_the_memory_of_every_layout_it_proposes() {
    let dir = scratch("planner");
    let plan = |recipe: &str, args: &[&str]| -> serde_json::Value {
        let out = Command::new(catapult_binary())
            .current_dir(&dir)
            .arg("plan")
            .arg(workspace().join("recipes").join(recipe))
            .args(args)
            .arg("--json")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("plan JSON")
    };
    // The flagship on 8192 H800s: at least one layout under 80 GiB per GPU.
    let big = plan(
        "longcat-flash-560b.yaml",
        &["--gpu", "h800", "--world", "8192", "--tokens", "20e12"],
    );
    let best = &big["fits"][0];
    assert!(
        best["memory_bytes"].as_f64().unwrap() < 80.0 * (1u64 << 30) as f64,
        "{best}"
    );
    assert!(best["days"].as_f64().unwrap() > 0.0);
    // Every layout it proposes for the tiny recipe on 4 ranks, run for 2 steps: the
    // model and optimizer state it measures is what it predicted, within 10%.
    let small = plan(
        "tiny.yaml",
        &[
            "--gpu", "h100", "--world", "4", "--top", "4", "--set", LAYERS,
        ],
    );
    let fits = small["fits"].as_array().unwrap();
    assert_eq!(fits.len(), 4, "{small}");
    for (i, layout) in fits.iter().enumerate() {
        let mut sets: Vec<&str> = vec!["train.steps=2", "train.eval_every=2", LAYERS];
        sets.extend(
            layout["overrides"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap()),
        );
        let expert = layout["expert"].as_u64().unwrap() as usize;
        let name = format!("layout-{i}");
        ok(train(&dir, &name, 4, expert, &sets, &[]));
        let line = metrics(&dir.join(&name).join("metrics.jsonl"))
            .into_iter()
            .find(|l| l["param_bytes"].is_number())
            .unwrap();
        let field = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap();
        let measured: f64 = ["param_bytes", "grad_bytes", "optimizer_bytes"]
            .iter()
            .map(|k| field(&line, k))
            .sum();
        let predicted: f64 = ["weights", "gradients", "optimizer"]
            .iter()
            .map(|k| field(&layout["memory"], k))
            .sum();
        assert!(
            (measured - predicted).abs() <= 0.1 * predicted,
            "layout {i} {:?}: measured {measured} bytes, predicted {predicted}",
            layout["overrides"]
        );
    }
}

#[test]
fn non_finite_steps_are_skipped_or_rolled_back_alike_on_every_rank() {
    let dir = scratch("nonfinite-ranks");
    let sets = [
        "train.steps=8",
        "train.eval_every=8",
        "checkpoint.every=2",
        "checkpoint.async=false",
    ];
    let with = |extra: &'static str| -> Vec<&str> {
        let mut v = sets.to_vec();
        v.push(extra);
        v
    };
    ok(train(&dir, "calm", 2, 2, &sets, &[]));
    // Skip: a NaN in rank 1's gradient at step 5 drops the step on both ranks; twice the
    // same bits, not those of the undisturbed run.
    for name in ["skip-a", "skip-b"] {
        let out = ok(train(
            &dir,
            name,
            2,
            2,
            &with("train.nonfinite=skip"),
            &[("CATAPULT_FAULT", "nan:1:5")],
        ));
        assert!(String::from_utf8_lossy(&out.stderr).contains("step skipped"));
    }
    assert!(final_weights(&dir, "skip-a") == final_weights(&dir, "skip-b"));
    assert!(final_weights(&dir, "skip-a") != final_weights(&dir, "calm"));
    let skipped: Vec<u64> = metrics(&dir.join("skip-a/metrics.jsonl"))
        .iter()
        .filter(|l| l["nonfinite"]["action"] == "skip")
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(skipped, [5]);
    // Rollback: a transient NaN (once) rolls both ranks back to step 4, after which the
    // run ends with the undisturbed run's bits.
    ok(train(
        &dir,
        "rolled",
        2,
        2,
        &with("train.nonfinite=rollback"),
        &[("CATAPULT_FAULT", "nan:1:5")],
    ));
    assert!(final_weights(&dir, "rolled") == final_weights(&dir, "calm"));
    let back: Vec<serde_json::Value> = metrics(&dir.join("rolled/metrics.jsonl"))
        .into_iter()
        .filter(|l| l["nonfinite_rollback"].is_object())
        .collect();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0]["step"], 4, "rolled back to step 4's checkpoint");
    // A NaN that comes back every time: 3 rollbacks, then exit 1 naming the cause.
    let out = train(
        &dir,
        "stuck",
        2,
        2,
        &with("train.nonfinite=rollback"),
        &[("CATAPULT_FAULT", "nan:1:5:always")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("3 rollbacks to the last checkpoint reached it again")
            && err.contains("rank 1's first non-finite tensor is the gradient of"),
        "{err}"
    );
}
