//! Observability end to end: a short 2-layer run writes TensorBoard events that the
//! `tensorboard` package's reader parses, `catapult plot` renders PNGs that decode (the
//! heatmap has layers x experts cells), progress is plain lines off a terminal, MFU in
//! the metrics is the arithmetic of its own fields, and the dry run's counts equal the
//! exported model's and LongCat-Flash's published sizes.

use catapult_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// One short single-process run shared by the tests (router metrics every 4 steps, a
/// stated peak so that MFU is reported): its run directory and stderr.
fn run() -> &'static (PathBuf, String) {
    static RUN: OnceLock<(PathBuf, String)> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = scratch("observability");
        let mut cmd = catapult(&dir);
        cmd.arg("train")
            .arg(workspace().join("recipes/tiny.yaml"))
            .env_remove("CATAPULT_PROGRESS");
        for s in [
            format!("data.path={}", corpus().display()),
            format!("output.dir={}", dir.join("run").display()),
            "parallel.expert=1".into(),
            "train.steps=12".into(),
            "train.warmup_steps=2".into(),
            "train.eval_every=6".into(),
            "train.eval_sequences=16".into(),
            "train.log_every=2".into(),
            "moe.metrics_every=4".into(),
            "checkpoint.every=6".into(),
            "system.peak_tflops=0.5".into(),
        ] {
            cmd.args(["--set", &s]);
        }
        let out = run_ok(&mut cmd);
        (
            dir.join("run"),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
}

fn python() -> PathBuf {
    workspace().join(".venv/bin/python3")
}

#[test]
fn tensorboard_reads_the_event_files_with_the_expected_tags() {
    let (run, _) = run();
    let script = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
tags = acc.Tags()["scalars"]
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags}))
"#;
    let out = Command::new(python())
        .args(["-c", script])
        .arg(run.join("tensorboard"))
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scalars: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for tag in [
        "train/loss",
        "train/lr",
        "train/lr_experts",
        "train/lr_embedding",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/achieved_tflops",
        "train/mfu",
        "train/model_flops_per_token",
        "train/memory_rss_bytes",
        "train/data_wait_s",
        "eval/val_loss",
        "checkpoint/ckpt_block_s",
        "router/ffn_experts_per_token_per_layer/0",
        "router/ffn_experts_per_token_per_layer/1",
        "router/expert_load_cv",
        "router/gradient_ratio_rg",
    ] {
        assert!(
            scalars.get(tag).is_some(),
            "tag {tag} missing; have {:?}",
            scalars.as_object().unwrap().keys().collect::<Vec<_>>()
        );
    }
    // The values are the JSON file's, step for step.
    let lines = metrics(&run.join("metrics.jsonl"));
    let json_loss: Vec<(u64, f64)> = lines
        .iter()
        .filter_map(|l| Some((l["step"].as_u64()?, l.get("loss")?.as_f64()?)))
        .collect();
    let tb_loss: Vec<(u64, f64)> = scalars["train/loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
        .collect();
    assert_eq!(json_loss.len(), 6, "log_every 2 over 12 steps");
    assert_eq!(tb_loss.len(), json_loss.len());
    for ((s1, a), (s2, b)) in json_loss.iter().zip(&tb_loss) {
        assert_eq!(s1, s2);
        assert!((a - b).abs() <= 1e-6 * a.abs(), "{a} vs {b}");
    }
    let val_steps: Vec<u64> = scalars["eval/val_loss"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_u64().unwrap())
        .collect();
    assert_eq!(val_steps, vec![0, 6, 12]);
}

#[test]
fn mfu_in_the_metrics_is_flops_times_throughput_over_the_peak() {
    let (run, _) = run();
    let lines = metrics(&run.join("metrics.jsonl"));
    let train: Vec<&serde_json::Value> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    assert!(!train.is_empty());
    let plan: Vec<f64> = dry_run("recipes/tiny.yaml", &[])["flops_per_token"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    for l in train {
        let flops = l["model_flops_per_token"].as_f64().unwrap();
        let tps = l["tokens_per_s"].as_f64().unwrap();
        let achieved = l["achieved_tflops"].as_f64().unwrap();
        let mfu = l["mfu"].as_f64().unwrap();
        assert!(
            (achieved - flops * tps / 1e12).abs() <= 1e-9 * achieved,
            "{l}"
        );
        assert!((mfu - achieved / 0.5).abs() <= 1e-9 * mfu, "{l}");
        // The FLOPs of the experts actually used: between the plan's at 0 and K = 3 FFN
        // experts per token (the dry run, same recipe and sequence length).
        assert!(
            plan[0] < flops && flops <= plan[2],
            "{flops} outside {plan:?}"
        );
        assert!(l["memory_peak_rss_bytes"].as_u64().unwrap() > 1 << 20);
    }
}

#[test]
fn progress_off_a_terminal_is_plain_periodic_lines() {
    let (_, stderr) = run();
    let steps: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("tiny step "))
        .collect();
    assert_eq!(
        steps.len(),
        6,
        "one line per log_every = 2 steps:\n{stderr}"
    );
    assert!(
        steps[5].starts_with("tiny step 12/12 | loss "),
        "{}",
        steps[5]
    );
    assert!(steps
        .iter()
        .all(|l| l.contains("tok/s") && l.contains("eta")));
    assert!(
        !stderr.contains('\r') && !stderr.contains('\x1b'),
        "control characters in a non-terminal log:\n{stderr:?}"
    );
}

fn png_pixels(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    ));
    let mut reader = decoder.read_info().expect("a PNG header");
    let mut buf = vec![0; reader.output_buffer_size().expect("a size")];
    let info = reader.next_frame(&mut buf).expect("PNG data decodes");
    let channels = info.color_type.samples();
    let pixels = buf[..info.buffer_size()]
        .chunks(channels)
        .map(|c| [c[0], c[1], c[2]])
        .collect();
    (info.width, info.height, pixels)
}

/// Runs of non-white pixels along a line of pixels.
fn runs(line: impl Iterator<Item = [u8; 3]>) -> usize {
    let mut count = 0;
    let mut inside = false;
    for p in line {
        let white = p == [255, 255, 255];
        if !white && !inside {
            count += 1;
        }
        inside = !white;
    }
    count
}

#[test]
fn plot_writes_decodable_pngs_and_a_layers_by_experts_heatmap() {
    let (run, _) = run();
    let out_dir = run.parent().unwrap().join("plots");
    let out = run_ok(
        catapult(run.parent().unwrap())
            .args(["plot"])
            .arg(run)
            .arg(run) // overlaying a second run draws too
            .args(["--steps", "4,12"])
            .arg("-o")
            .arg(&out_dir),
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    let index: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("plots.json")).unwrap())
            .unwrap();
    let files: Vec<&str> = index.iter().map(|v| v["file"].as_str().unwrap()).collect();
    for name in [
        "loss.png",
        "lr.png",
        "grad_norm.png",
        "tokens_per_s.png",
        "ffn_experts_per_token.png",
        "expert_load_step4.png",
        "expert_load_step12.png",
    ] {
        assert!(files.contains(&name), "{name} not in {files:?}");
        assert!(printed.contains(name));
        let (w, h, px) = png_pixels(&out_dir.join(name));
        assert!(w >= 400 && h >= 200, "{name}: {w}x{h}");
        let distinct: std::collections::BTreeSet<[u8; 3]> = px.iter().copied().collect();
        assert!(distinct.len() > 3, "{name} is nearly blank");
    }
    // The heatmap: 2 layers x 8 experts, counted from the pixels along the middle of the
    // first layer's row and of the first expert's column.
    for grid in index.iter().filter(|v| v.get("layers").is_some()) {
        assert_eq!(grid["layers"], 2);
        assert_eq!(grid["experts"], 8);
        let (w, _, px) = png_pixels(&out_dir.join(grid["file"].as_str().unwrap()));
        let g = |k: &str| grid[k].as_u64().unwrap() as usize;
        let (x0, y0, cw, ch) = (g("x0"), g("y0"), g("cell_w"), g("cell_h"));
        let at = |x: usize, y: usize| px[y * w as usize + x];
        let row = (x0..x0 + 8 * cw).map(|x| at(x, y0 + ch / 2));
        assert_eq!(runs(row), 8, "cells along layer 0");
        let column = (y0..y0 + 2 * ch).map(|y| at(x0 + cw / 2, y));
        assert_eq!(runs(column), 2, "cells along expert 0");
    }
}

#[test]
fn plot_names_bad_metrics_and_skips_a_live_runs_partial_line() {
    let dir = scratch("plot-missing");
    let out = catapult(&dir)
        .args(["plot", "no-such-run"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no-such-run/metrics.jsonl") && err.contains("run directory"),
        "{err}"
    );
    // A run still writing: its unterminated last line is skipped.
    let (run, _) = run();
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    std::fs::create_dir_all(dir.join("live")).unwrap();
    std::fs::write(
        dir.join("live/metrics.jsonl"),
        format!("{text}{{\"step\": 13, \"lo"),
    )
    .unwrap();
    run_ok(catapult(&dir).args(["plot", "live"]));
    assert!(dir.join("live/plots/loss.png").exists());
    // A broken complete line is named.
    std::fs::write(dir.join("live/metrics.jsonl"), format!("{text}not json\n")).unwrap();
    let out = catapult(&dir).args(["plot", "live"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "a metrics file that is not JSON is bad input"
    );
    let line = text.lines().count() + 1;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("line {line} is not JSON")), "{err}");
}

fn dry_run(recipe: &str, extra: &[&str]) -> serde_json::Value {
    let out = run_ok(
        catapult(&workspace())
            .args(["train", recipe, "--dry-run", "--json"])
            .args(extra),
    );
    serde_json::from_slice(&out.stdout).expect("dry-run JSON")
}

#[test]
fn dry_run_counts_equal_the_exported_model() {
    let (run, _) = run();
    // The exported weights hold every parameter plus the expert-bias buffers.
    let bytes = std::fs::read(run.join("checkpoint/model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let count: u64 = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__" && !k.contains("e_score_correction_bias"))
        .map(|(_, v)| {
            v["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .product::<u64>()
        })
        .sum();
    let plan = dry_run("recipes/tiny.yaml", &[]);
    assert_eq!(plan["params"]["total"].as_u64().unwrap(), count);
    assert_eq!(plan["world"], 2, "tiny.yaml's layout: expert 2");
}

#[test]
fn dry_run_sizes_longcat_flash_as_published() {
    let plan = dry_run(
        "recipes/longcat-flash-560b.yaml",
        &["--gpu", "h800", "--world", "8192", "--tokens", "20e12"],
    );
    let total = plan["params"]["total"].as_f64().unwrap();
    assert!((total / 560e9 - 1.0).abs() < 0.005, "total {total}");
    let act: Vec<f64> = plan["activated"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert!(
        (act[0] / 18.6e9 - 1.0).abs() < 0.01,
        "at 0 FFN experts: {}",
        act[0]
    );
    assert!(
        (act[2] / 31.3e9 - 1.0).abs() < 0.01,
        "at K FFN experts: {}",
        act[2]
    );
    assert!(act[0] < act[1] && act[1] < act[2]);
    let days = plan["train_days"].as_f64().unwrap();
    assert!(days > 0.0 && days.is_finite());
    // Its layout (the planner's best on 8192 H800s) fits an 80 GiB GPU in under 30
    // days; with dense parameters replicated the model does not fit.
    let gpu = 80.0 * (1u64 << 30) as f64;
    assert!(
        plan["memory"]["total"].as_f64().unwrap() < gpu,
        "{}",
        plan["memory"]
    );
    assert!(days < 30.0, "{days} days");
    let replicated = dry_run(
        "recipes/longcat-flash-560b.yaml",
        &[
            "--gpu",
            "h800",
            "--world",
            "8192",
            "--set",
            "parallel.shard=none",
        ],
    );
    assert!(replicated["memory"]["total"].as_f64().unwrap() > gpu);
    // Bad flags name themselves.
    let out = catapult(&workspace())
        .args([
            "train",
            "recipes/longcat-flash-560b.yaml",
            "--dry-run",
            "--world",
            "100",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--world 100"));
}
