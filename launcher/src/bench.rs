//! `catapult bench data`: tokens/s the data pipeline delivers from raw-text and
//! pre-tokenized parquet on 1 and 2 worker threads, against a baseline measured in the
//! same run on the same files (pyarrow plus the Python `tokenizers` package), and beside
//! the rate at which the trainer consumes tokens.

use anyhow::{bail, Context};
use catapult_data::{
    DatasetSpec, DocumentSplit, Phase, Pipeline, PipelineConfig, PrepareOptions, ShardSize,
    StorageOptions,
};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Model growth: the deep recipe from random init against its half-depth model
    /// trained for half the tokens, stacked and trained on (same total tokens);
    /// validation curves to growth.png (run from the project root).
    Growth {
        /// A recipe with a growth section.
        #[arg(long, default_value = "recipes/tiny-grown.yaml")]
        recipe: PathBuf,
        /// Steps of each run (growth at half).
        #[arg(long, default_value_t = 400)]
        steps: usize,
        /// Validation every this many steps.
        #[arg(long, default_value_t = 25)]
        eval_every: usize,
        /// Working directory for the runs, results.json and growth.png.
        #[arg(long, default_value = "bench-results/growth")]
        dir: PathBuf,
    },
    /// Width transfer: a learning-rate grid on the proxy, and the same grid at wider
    /// widths with transfer.proxy set; is the proxy's best within one grid step of each
    /// width's best? (run from the project root).
    Transfer {
        /// The proxy recipe.
        #[arg(long, default_value = "recipes/tiny-proxy.yaml")]
        proxy: PathBuf,
        /// Target widths as multiples of the proxy's.
        #[arg(long, value_delimiter = ',', default_value = "2,4")]
        widths: Vec<usize>,
        /// Learning-rate grid (ascending).
        #[arg(long, value_delimiter = ',', default_values_t = crate::bench_methods::default_lrs())]
        lrs: Vec<f64>,
        /// Steps of each run.
        #[arg(long, default_value_t = 150)]
        steps: usize,
        /// Working directory for the runs, results.json and transfer.png.
        #[arg(long, default_value = "bench-results/transfer")]
        dir: PathBuf,
    },
    /// `catapult launch` against mpirun starting the same binary: time to the first
    /// training step for each rank count, and the time to detect a killed rank and train
    /// again (run from the project root; uses the built-in corpus).
    Launch {
        /// Recipe to train (its experts must split over every rank count).
        #[arg(long, default_value = "recipes/tiny.yaml")]
        recipe: PathBuf,
        /// Rank counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        ranks: Vec<usize>,
        /// Working directory for the runs and results.json.
        #[arg(long, default_value = "bench-results/launch")]
        dir: PathBuf,
    },
    /// Expert-parallel training with Single Batch Overlap on and off (ranks started with
    /// mpirun): step time, the share of all-to-all time hidden behind compute, and the
    /// exchanged volume against the analytic one (run from the project root).
    Ep {
        /// Recipe to train (it must divide its experts over `ranks`).
        #[arg(long, default_value = "recipes/tiny.yaml")]
        recipe: PathBuf,
        /// Ranks (expert-parallel size = ranks).
        #[arg(long, default_value_t = 2)]
        ranks: usize,
        /// Steps per run (the first 3 are warm-up and not counted).
        #[arg(long, default_value_t = 30)]
        steps: usize,
        /// Runs per setting, alternating on and off.
        #[arg(long, default_value_t = 2)]
        repeats: usize,
        /// Working directory for the runs and results.json.
        #[arg(long, default_value = "bench-results/ep")]
        dir: PathBuf,
    },
    /// Checkpoint save/load throughput against torch.save/torch.load, and the training
    /// loop's blocking time per asynchronous save (run from the project root).
    Ckpt {
        /// GiB of tensor state to save and load.
        #[arg(long, default_value_t = 1.0)]
        gib: f64,
        /// Recipe whose async-save blocking time is measured.
        #[arg(long, default_value = "recipes/tiny.yaml")]
        recipe: PathBuf,
        /// Python with torch and safetensors (scripts/setup's venv).
        #[arg(long, default_value = ".venv/bin/python")]
        python: PathBuf,
        /// Working directory (on the disk to measure).
        #[arg(long, default_value = "bench-results/ckpt")]
        dir: PathBuf,
    },
    /// Data pipeline throughput against pyarrow + tokenizers (run from the project root).
    Data {
        /// Text corpus (default: the built-in KJV text from scripts/prepare-corpus).
        #[arg(long, default_value = "data-cache/kjv.txt")]
        text: PathBuf,
        /// Copies of the text in the benchmark corpus.
        #[arg(long, default_value_t = 4)]
        repeat: usize,
        /// BPE vocabulary trained for the benchmark.
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        /// Recipe whose training rate is measured (20 steps).
        #[arg(long, default_value = "recipes/tiny.yaml")]
        recipe: PathBuf,
        /// Python with pyarrow and tokenizers (scripts/setup's venv).
        #[arg(long, default_value = ".venv/bin/python")]
        python: PathBuf,
        /// Working directory for the corpus, shards and results.
        #[arg(long, default_value = "bench-results/data")]
        dir: PathBuf,
    },
}

fn spinner(msg: &str) -> ProgressBar {
    let p = ProgressBar::new_spinner();
    p.set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("template"));
    p.set_message(msg.to_string());
    p.enable_steady_tick(std::time::Duration::from_millis(200));
    p
}

/// Streams three passes over `dataset` (so that read-ahead past the end of the
/// measurement is a small share) and returns (tokens, seconds).
fn pipeline_rate(
    dataset: &Path,
    tokenizer: &str,
    workers: usize,
    tokens: u64,
) -> anyhow::Result<(u64, f64)> {
    let cfg = PipelineConfig {
        datasets: vec![DatasetSpec {
            name: "bench".into(),
            location: dataset.to_str().context("UTF-8 path")?.into(),
            text_column: "text".into(),
            tokens_column: None,
        }],
        phases: vec![Phase {
            start_tokens: 0,
            weights: vec![1.0],
            seq_len: 1024,
        }],
        global_batch: 64,
        streams: 8,
        shuffle_buffer: 64,
        mixture_window: 100,
        workers,
        read_ahead_bytes: 256 << 20,
        valid_fraction: 0.001,
        seed: 1,
        tokenizer: tokenizer.into(),
        eod_token: None,
        storage: StorageOptions::default(),
    };
    let started = Instant::now();
    let mut pipeline = Pipeline::open(cfg, 0, 1)?;
    let mut delivered = 0u64;
    while delivered < tokens * 3 {
        let batch = pipeline.next_batch()?;
        delivered += (batch.sequences.len() * batch.seq_len) as u64;
    }
    Ok((delivered, started.elapsed().as_secs_f64()))
}

/// Runs a baseline script of scripts/bench with the venv's Python; its stdout is JSON.
fn python_json(
    python: &Path,
    script: &str,
    args: &[&std::ffi::OsStr],
) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new(python)
        .arg(Path::new("scripts/bench").join(script))
        .args(args)
        .output()
        .with_context(|| {
            format!(
                "{}: cannot run the baseline (run scripts/setup)",
                python.display()
            )
        })?;
    if !out.status.success() {
        bail!(
            "baseline {script} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("baseline {script}: output is not JSON"))
}

fn baseline_rate(
    python: &Path,
    dataset: &Path,
    format: &str,
    tokenizer: &Path,
    threads: usize,
) -> anyhow::Result<(u64, f64)> {
    let threads = threads.to_string();
    let v = python_json(
        python,
        "data_baseline.py",
        &[
            dataset.as_os_str(),
            "--format".as_ref(),
            format.as_ref(),
            "--threads".as_ref(),
            threads.as_ref(),
            "--tokenizer".as_ref(),
            tokenizer.as_os_str(),
        ],
    )?;
    Ok((
        v["tokens"].as_u64().context("tokens")?,
        v["seconds"].as_f64().context("seconds")?,
    ))
}

pub fn run(command: BenchCommand) -> Result<(), crate::Failure> {
    let (text, repeat, vocab_size, recipe, python, dir) = match command {
        BenchCommand::Growth {
            recipe,
            steps,
            eval_every,
            dir,
        } => return crate::bench_methods::growth(&recipe, steps, eval_every, &dir),
        BenchCommand::Transfer {
            proxy,
            widths,
            lrs,
            steps,
            dir,
        } => return crate::bench_methods::transfer(&proxy, &widths, &lrs, steps, &dir),
        BenchCommand::Data {
            text,
            repeat,
            vocab_size,
            recipe,
            python,
            dir,
        } => (text, repeat, vocab_size, recipe, python, dir),
        BenchCommand::Ckpt {
            gib,
            recipe,
            python,
            dir,
        } => return bench_ckpt(gib, &recipe, &python, &dir),
        BenchCommand::Ep {
            recipe,
            ranks,
            steps,
            repeats,
            dir,
        } => return bench_ep(&recipe, ranks, steps, repeats, &dir),
        BenchCommand::Launch { recipe, ranks, dir } => return bench_launch(&recipe, &ranks, &dir),
    };
    let source = std::fs::read_to_string(&text).with_context(|| {
        format!(
            "{}: cannot read (run scripts/prepare-corpus)",
            text.display()
        )
    })?;
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, source.repeat(repeat))?;

    let p = spinner(&format!(
        "training a {vocab_size}-id BPE on {}",
        text.display()
    ));
    let tokenizer = dir.join("tokenizer.json");
    let lines: Vec<String> = source
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    catapult_data::train_bpe(lines.into_iter(), vocab_size, &tokenizer)?;
    p.finish_and_clear();
    let tok = tokenizer.to_str().context("UTF-8 path")?.to_string();

    let p = spinner("writing raw-text and pre-tokenized shards");
    let prep = |out: &Path, tokenizer: Option<String>| {
        let _ = std::fs::remove_dir_all(out);
        catapult_data::prepare(
            std::slice::from_ref(&corpus),
            out.to_str().expect("UTF-8 path"),
            &PrepareOptions {
                split: DocumentSplit::Paragraph,
                min_chars: 200,
                shard_size: ShardSize::Bytes(8 << 20),
                row_group_size: ShardSize::Bytes(1 << 20),
                keep_text: tokenizer.is_none(),
                tokenizer,
                workers: 2,
                storage: StorageOptions::default(),
            },
        )
    };
    let text_dir = dir.join("text");
    let tokens_dir = dir.join("tokens");
    prep(&text_dir, None)?;
    let index = prep(&tokens_dir, Some(tok.clone()))?.index;
    let corpus_tokens = index.tokens.unwrap_or(0);
    p.finish_and_clear();

    let mut rows = Vec::new();
    for (format, dataset) in [("text", &text_dir), ("tokens", &tokens_dir)] {
        for workers in [1usize, 2] {
            let p = spinner(&format!(
                "{format}, {workers} worker(s): catapult, then the baseline"
            ));
            let (t, s) = pipeline_rate(dataset, &tok, workers, corpus_tokens)?;
            let (bt, bs) = baseline_rate(&python, dataset, format, &tokenizer, workers)?;
            p.finish_and_clear();
            rows.push((format, workers, t as f64 / s, bt as f64 / bs));
        }
    }

    // Memory in a fresh process (this one's heap already holds earlier runs' pages).
    let p = spinner("memory: one pass with a 1 MiB read-ahead budget, in a new process");
    let summary = dir.join("memory.json");
    let status = std::process::Command::new(std::env::current_exe()?)
        .args(["data", "stream"])
        .arg(&recipe)
        .args(["--set", &format!("data.path={}", text_dir.display())])
        .args(["--set", &format!("data.tokenizer={tok}")])
        .args(["--set", &format!("model.vocab_size={vocab_size}")])
        .args([
            "--set",
            "data.read_ahead_mb=1",
            "--set",
            "data.seq_len=1024",
        ])
        .args([
            "--set",
            "train.global_batch_size=64",
            "--set",
            "data.streams=8",
        ])
        .args(["--set", "data.shuffle_buffer=64", "--set", "data.workers=2"])
        .args(["--batches", &(corpus_tokens / 65536).to_string()])
        .arg("--summary")
        .arg(&summary)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    if !status.success() {
        return Err(anyhow::anyhow!("the memory run failed ({status})").into());
    }
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary)?)?;
    let growth = m["rss_anon_peak_bytes"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(m["rss_anon_baseline_bytes"].as_u64().unwrap_or(0));
    p.finish_and_clear();

    let p = spinner(&format!("training {} for 20 steps", recipe.display()));
    let overrides: Vec<catapult_trainer::Override> = [
        "train.steps=20".to_string(),
        "train.warmup_steps=0".to_string(),
        "train.eval_sequences=8".to_string(),
        "parallel.expert=1".to_string(),
        format!("output.dir={}", dir.join("train-run").display()),
    ]
    .iter()
    .map(|s| catapult_trainer::Override::parse(s))
    .collect::<Result<_, _>>()?;
    let r = catapult_trainer::recipe::load(&recipe, &overrides)?;
    let opts = catapult_trainer::RunOptions {
        overwrite: true,
        ..Default::default()
    };
    let summary = catapult_trainer::train(&r, &opts)?;
    let lines = std::fs::read_to_string(&summary.metrics)?;
    let rates: Vec<f64> = lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["tokens_per_s"].as_f64())
        .collect();
    let trainer_rate = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
    p.finish_and_clear();

    println!(
        "data pipeline: {} MB of text, {corpus_tokens} BPE tokens ({vocab_size} ids); catapult streams 3 passes, the baseline reads 1",
        source.len() * repeat / 1_000_000
    );
    println!(
        "{:<8} {:>7} {:>16} {:>22} {:>7}",
        "format", "workers", "catapult tok/s", "pyarrow+tokenizers tok/s", "ratio"
    );
    let mut results = Vec::new();
    for (format, workers, ours, base) in &rows {
        println!(
            "{format:<8} {workers:>7} {ours:>16.0} {base:>24.0} {:>7.2}",
            ours / base
        );
        results.push(serde_json::json!({
            "format": format, "workers": workers, "catapult_tokens_per_s": ours,
            "baseline_tokens_per_s": base, "ratio": ours / base,
        }));
    }
    println!(
        "memory: one pass over the corpus ({:.0} MB of text, {:.0} MB as ids) in a new process with a 1 MiB \
         read-ahead budget grew resident memory by {:.1} MiB; the bound is the budget plus, per stream \
         (8 here), one decoded 1 MB row group with its ids and one shuffle block of 64 x 1025 ids",
        (source.len() * repeat) as f64 / 1e6,
        corpus_tokens as f64 * 4.0 / 1e6,
        growth as f64 / (1u64 << 20) as f64
    );
    let slowest = rows.iter().map(|r| r.2).fold(f64::INFINITY, f64::min);
    println!(
        "trainer ({}, 20 steps): consumes {trainer_rate:.0} tok/s; the slowest pipeline setting delivers {:.0}x that",
        recipe.display(),
        slowest / trainer_rate
    );
    let report = serde_json::json!({
        "corpus_bytes": source.len() * repeat,
        "corpus_tokens": corpus_tokens,
        "results": results,
        "trainer_tokens_per_s": trainer_rate,
        "memory_growth_bytes_at_1mib_budget": growth,
    });
    let out = dir.join("results.json");
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("results: {}", out.display());
    Ok(())
}

/// `catapult bench ckpt`.
fn bench_ckpt(gib: f64, recipe: &Path, python: &Path, dir: &Path) -> Result<(), crate::Failure> {
    use catapult_checkpoints::{
        Checkpoints, Dtype, HostTensor, RankLayout, RankState, SaveRequest, World,
    };
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    // 64 MiB fp32 tensors filled from a fixed generator, `gib` GiB in all.
    let per = 64usize << 20;
    let count = ((gib * (1u64 << 30) as f64) as usize).div_ceil(per).max(1);
    let p = spinner(&format!("filling {count} x 64 MiB tensors"));
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let tensors: Vec<HostTensor> = (0..count)
        .map(|i| {
            let data: Vec<u8> = (0..per / 8)
                .flat_map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()
                })
                .collect();
            HostTensor {
                name: format!("model.layers.{i}.weight"),
                dtype: Dtype::F32,
                shape: vec![per / 4 / 4096, 4096],
                data: data.into(),
            }
        })
        .collect();
    let total = (count * per) as f64;
    p.finish_and_clear();
    let store = Checkpoints::open(
        dir.join("ckpt").to_str().context("UTF-8 path")?,
        &Default::default(),
    )?;
    let request = SaveRequest {
        step: 1,
        tokens: 0,
        recipe: serde_json::json!({"name": "bench"}),
        world: World {
            data_parallel: 1,
            expert_parallel: 1,
            ranks: vec![RankLayout {
                rank: 0,
                data_parallel_rank: 0,
                experts: [0, 0],
            }],
        },
        ranks: vec![RankState {
            rank: 0,
            tensors,
            slices: Default::default(),
            state: serde_json::json!({}),
        }],
        growth: None,
    };
    let p = spinner("catapult: save (serialize, BLAKE3, write, fsync), then verified load");
    let started = Instant::now();
    store.save(request)?;
    let shard = dir.join("ckpt/step-00000001/rank-00000.safetensors");
    let save_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let loaded = store.load(1, true)?;
    let load_s = started.elapsed().as_secs_f64();
    drop(loaded);
    p.finish_and_clear();

    let p = spinner("baseline: torch.save / torch.load of the same tensors");
    let torch_file = dir.join("torch.pt");
    let base = python_json(
        python,
        "ckpt_baseline.py",
        &[shard.as_os_str(), torch_file.as_os_str()],
    )?;
    let (base_save, base_load) = (
        base["save_s"].as_f64().unwrap_or(f64::NAN),
        base["load_s"].as_f64().unwrap_or(f64::NAN),
    );
    p.finish_and_clear();

    let p = spinner(&format!(
        "training {} for 40 steps, async save every 10",
        recipe.display()
    ));
    let overrides: Vec<catapult_trainer::Override> = [
        "train.steps=40".to_string(),
        "train.warmup_steps=0".to_string(),
        "train.log_every=1".to_string(),
        "train.eval_sequences=8".to_string(),
        "checkpoint.every=10".to_string(),
        "parallel.expert=1".to_string(),
        format!("output.dir={}", dir.join("train-run").display()),
    ]
    .iter()
    .map(|s| catapult_trainer::Override::parse(s))
    .collect::<Result<_, _>>()?;
    let r = catapult_trainer::recipe::load(recipe, &overrides)?;
    let opts = catapult_trainer::RunOptions {
        overwrite: true,
        ..Default::default()
    };
    let summary = catapult_trainer::train(&r, &opts)?;
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&summary.metrics)?
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let step_s: Vec<f64> = lines
        .iter()
        .filter_map(|v| {
            Some(
                r.train.global_batch_size as f64 * v["seq_len"].as_f64()?
                    / v["tokens_per_s"].as_f64()?,
            )
        })
        .collect();
    let block_s: Vec<f64> = lines
        .iter()
        .filter_map(|v| v["ckpt_block_s"].as_f64())
        .collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    p.finish_and_clear();

    let gb = total / 1e9;
    println!(
        "checkpoint of {:.2} GB ({count} fp32 tensors), local disk {}",
        gb,
        dir.display()
    );
    println!(
        "{:<6} {:>14} {:>22} {:>7}",
        "", "catapult GB/s", "torch.save/load GB/s", "ratio"
    );
    println!(
        "{:<6} {:>14.2} {:>22.2} {:>7.2}",
        "save",
        gb / save_s,
        gb / base_save,
        base_save / save_s
    );
    println!(
        "{:<6} {:>14.2} {:>22.2} {:>7.2}",
        "load",
        gb / load_s,
        gb / base_load,
        base_load / load_s
    );
    println!(
        "(catapult's save includes BLAKE3 hashing and the manifest; its load verifies every hash)"
    );
    println!(
        "async save in training ({}): blocks {:.2} ms per save = {:.1}% of a {:.1} ms step",
        recipe.display(),
        mean(&block_s) * 1e3,
        100.0 * mean(&block_s) / mean(&step_s),
        mean(&step_s) * 1e3
    );
    let report = serde_json::json!({
        "bytes": total, "save_gb_per_s": gb / save_s, "load_gb_per_s": gb / load_s,
        "torch_save_gb_per_s": gb / base_save, "torch_load_gb_per_s": gb / base_load,
        "async_block_s": mean(&block_s), "step_s": mean(&step_s),
    });
    let _ = std::fs::remove_dir_all(dir.join("ckpt"));
    let out = dir.join("results.json");
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("results: {}", out.display());
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// One expert-parallel training run under mpirun; its per-step metric lines after
/// warm-up.
fn ep_run(
    recipe: &Path,
    ranks: usize,
    steps: usize,
    overlap: bool,
    out: &Path,
) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut cmd = std::process::Command::new("mpirun");
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } == 0 {
        cmd.arg("--allow-run-as-root");
    }
    cmd.args(["--oversubscribe", "-np", &ranks.to_string()])
        .arg(std::env::current_exe()?)
        .arg("train")
        .arg(recipe)
        .arg("--overwrite");
    for set in [
        format!("train.steps={steps}"),
        "train.warmup_steps=0".into(),
        format!("train.eval_every={steps}"),
        "train.eval_sequences=8".into(),
        "train.log_every=1".into(),
        format!("parallel.expert={ranks}"),
        format!("parallel.overlap={overlap}"),
        format!("output.dir={}", out.display()),
    ] {
        cmd.args(["--set", &set]);
    }
    let result = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .context("mpirun (Open MPI; scripts/setup installs it) did not start")?;
    if !result.status.success() {
        anyhow::bail!(
            "the {ranks}-rank run failed: {}",
            String::from_utf8_lossy(&result.stderr)
        );
    }
    let text = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l.get("step_s").is_some() && l["step"].as_u64().is_some_and(|s| s > 3))
        .collect())
}

fn bench_ep(
    recipe: &Path,
    ranks: usize,
    steps: usize,
    repeats: usize,
    dir: &Path,
) -> Result<(), crate::Failure> {
    if steps < 5 {
        return Err(anyhow::anyhow!("--steps {steps}: use at least 5 (3 are warm-up)").into());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let r = catapult_trainer::recipe::load(
        recipe,
        &[catapult_trainer::Override::parse(&format!(
            "parallel.expert={ranks}"
        ))?],
    )?;
    let mut lines: [Vec<serde_json::Value>; 2] = [Vec::new(), Vec::new()];
    for rep in 0..repeats {
        for (i, overlap) in [(0, true), (1, false)] {
            let p = spinner(&format!(
                "run {}/{repeats}: {ranks} ranks, {steps} steps, overlap {}",
                rep + 1,
                if overlap { "on" } else { "off" }
            ));
            let out = dir.join(format!("run-{}-{rep}", if overlap { "on" } else { "off" }));
            lines[i].extend(ep_run(recipe, ranks, steps, overlap, &out)?);
            p.finish_and_clear();
        }
    }
    let field = |i: usize, key: &str| -> f64 {
        median(lines[i].iter().filter_map(|l| l[key].as_f64()).collect())
    };
    let step = [field(0, "step_s"), field(1, "step_s")];
    let fwd = [
        field(0, "all_to_all_forward_exposed_s"),
        field(1, "all_to_all_forward_exposed_s"),
    ];
    let bwd = [
        field(0, "all_to_all_backward_exposed_s"),
        field(1, "all_to_all_backward_exposed_s"),
    ];
    let bytes = field(0, "all_to_all_bytes");
    let remote = field(0, "all_to_all_remote_bytes");
    let ffn_per_token = field(0, "ffn_experts_per_token");
    let m = &r.model;
    let tokens = (r.train.global_batch_size * r.data.seq_len) as f64;
    // Per layer and step: dispatch and combine forward, and their mirrors backward, each
    // carrying one fp32 row of `hidden` per routed selection.
    let per_selection = 4.0 * m.num_layers as f64 * m.hidden_size as f64 * 4.0;
    let analytic_k = tokens * m.moe_topk as f64 * per_selection;
    let analytic_ffn = tokens * ffn_per_token * per_selection;
    let hidden_fwd = 1.0 - fwd[0] / fwd[1];
    let hidden_all = 1.0 - (fwd[0] + bwd[0]) / (fwd[1] + bwd[1]);
    let results = serde_json::json!({
        "recipe": recipe.display().to_string(),
        "ranks": ranks,
        "steps_counted": lines[0].len(),
        "step_s": {"overlap_on": step[0], "overlap_off": step[1], "off_over_on": step[1] / step[0]},
        "forward_exposed_s": {"overlap_on": fwd[0], "overlap_off": fwd[1]},
        "backward_exposed_s": {"overlap_on": bwd[0], "overlap_off": bwd[1]},
        "hidden_fraction_forward": hidden_fwd,
        "hidden_fraction_all": hidden_all,
        "bytes_per_step": bytes,
        "remote_bytes_per_step": remote,
        "analytic_bytes_tokens_k_hidden": analytic_k,
        "analytic_bytes_ffn_selections": analytic_ffn,
        "ffn_experts_per_token": ffn_per_token,
    });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&results).expect("JSON"),
    )?;
    println!(
        "expert-parallel step, {} on {ranks} ranks (medians over {} steps per setting)",
        recipe.display(),
        lines[0].len()
    );
    println!(
        "  step time       overlap on {:8.1} ms   off {:8.1} ms   off/on {:.3}",
        step[0] * 1e3,
        step[1] * 1e3,
        step[1] / step[0]
    );
    println!(
        "  exposed a2a     forward on {:6.2} ms off {:6.2} ms   backward on {:6.2} ms off {:6.2} ms",
        fwd[0] * 1e3,
        fwd[1] * 1e3,
        bwd[0] * 1e3,
        bwd[1] * 1e3
    );
    println!(
        "  hidden by overlap: {:.1}% of forward all-to-all time, {:.1}% of all of it",
        hidden_fwd * 100.0,
        hidden_all * 100.0
    );
    println!(
        "  volume per step {:.2} MB ({:.2} MB to other ranks); analytic tokens x K x hidden x 4 B x 4 x layers = {:.2} MB (ratio {:.3}); with the measured {:.3} FFN experts per token instead of K = {}: {:.2} MB (ratio {:.3})",
        bytes / 1e6,
        remote / 1e6,
        analytic_k / 1e6,
        bytes / analytic_k,
        ffn_per_token,
        m.moe_topk,
        analytic_ffn / 1e6,
        bytes / analytic_ffn
    );
    println!("results: {}", dir.join("results.json").display());
    Ok(())
}

/// Unix time in seconds.
fn unix_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Unix time at which `metrics` first holds a training line for `step` (polling every
/// 10 ms while `child` runs); None if it exits first.
fn wait_for_step(metrics: &Path, step: u64, child: &mut std::process::Child) -> Option<f64> {
    loop {
        if let Ok(text) = std::fs::read_to_string(metrics) {
            let seen = text.lines().any(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .is_some_and(|v| v["step"] == step && v.get("loss").is_some())
            });
            if seen {
                return Some(unix_s());
            }
        }
        if let Ok(Some(_)) = child.try_wait() {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn bench_launch(recipe: &Path, ranks: &[usize], dir: &Path) -> Result<(), crate::Failure> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let exe = std::env::current_exe()?;
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    let sets = |n: usize, out: &Path, steps: usize| -> Vec<String> {
        [
            format!("train.steps={steps}"),
            "train.warmup_steps=0".into(),
            format!("train.eval_every={steps}"),
            "train.eval_sequences=8".into(),
            "train.log_every=1".into(),
            "checkpoint.every=2".into(),
            "checkpoint.async=false".into(),
            "launch.restart_backoff_s=0".into(),
            format!("parallel.expert={n}"),
            format!("train.micro_batch_size={}", 16 / n),
            format!("output.dir={}", out.display()),
        ]
        .into()
    };
    let mut rows = Vec::new();
    for &n in ranks {
        // Twice each, alternating; the faster of the two counts (the first run of a rank
        // count pays for cold caches).
        let mut pair = [f64::INFINITY; 2];
        for (i, supervised, round) in [(0, true, 0), (1, false, 0), (0, true, 1), (1, false, 1)] {
            let out = dir.join(format!(
                "{}-{n}-{round}",
                if supervised { "launch" } else { "mpirun" }
            ));
            let mut cmd = if supervised {
                let mut c = std::process::Command::new(&exe);
                c.args(["launch", "--nproc", &n.to_string()]).arg(recipe);
                c
            } else {
                let mut c = std::process::Command::new("mpirun");
                if root {
                    c.arg("--allow-run-as-root");
                }
                c.args(["--oversubscribe", "-np", &n.to_string()])
                    .arg(&exe)
                    .arg("train")
                    .arg(recipe);
                c
            };
            for s in sets(n, &out, 3) {
                cmd.args(["--set", &s]);
            }
            let p = spinner(&format!(
                "{n} rank(s), {}: to the first step",
                if supervised {
                    "catapult launch"
                } else {
                    "mpirun"
                }
            ));
            let begun = unix_s();
            let mut child = cmd
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?;
            let first = wait_for_step(&out.join("metrics.jsonl"), 1, &mut child);
            let status = child.wait()?;
            p.finish_and_clear();
            match first {
                Some(t) if status.success() => pair[i] = pair[i].min(t - begun),
                _ => {
                    return Err(anyhow::anyhow!(
                        "the {n}-rank run in {} failed; its logs say why",
                        out.display()
                    )
                    .into())
                }
            }
        }
        rows.push((n, pair));
    }
    // A rank killed at the start of step 6 (checkpoints every 2 steps).
    let p = spinner("2 ranks: rank 1 killed at step 6, to training again");
    let out = dir.join("recover");
    let mut cmd = std::process::Command::new(&exe);
    cmd.args(["launch", "--nproc", "2"])
        .arg(recipe)
        .env("CATAPULT_FAULT", "kill:1:6");
    for s in sets(2, &out, 10) {
        cmd.args(["--set", &s]);
    }
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let metrics = out.join("metrics.jsonl");
    let killed = wait_for_step(&metrics, 5, &mut child).context("the run stopped early")?;
    // The restarted attempt rewrites the metrics from its checkpoint (step 4) on.
    let mut resumed = None;
    while resumed.is_none() {
        let state: Option<serde_json::Value> = std::fs::read(out.join("supervisor.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        if state.is_some_and(|s| s["attempts"].as_array().is_some_and(|a| a.len() == 2)) {
            resumed = wait_for_step(&metrics, 6, &mut child);
            if resumed.is_none() {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let status = child.wait()?;
    p.finish_and_clear();
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("supervisor.json"))?)?;
    let detected = state["attempts"][0]["ended_unix_s"]
        .as_f64()
        .unwrap_or(f64::NAN)
        - killed;
    let resumed = resumed.context("the restarted run did not train")? - killed;
    if !status.success() {
        return Err(anyhow::anyhow!("the recovery run failed; see {}", out.display()).into());
    }
    let results = serde_json::json!({
        "recipe": recipe.display().to_string(),
        "first_step_s": rows.iter().map(|(n, p)| serde_json::json!({
            "ranks": n, "launch": p[0], "mpirun": p[1], "overhead_s": p[0] - p[1], "ratio": p[0] / p[1],
        })).collect::<Vec<_>>(),
        "dead_rank": {"detected_s": detected, "training_again_s": resumed, "backoff_s": 0.0},
    });
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&results).expect("JSON"),
    )?;
    println!(
        "time to the first training step, {} (same run, same binary)",
        recipe.display()
    );
    for (n, p) in &rows {
        println!(
            "  {n} rank(s): catapult launch {:6.2} s   mpirun {:6.2} s   launch/mpirun {:.3}",
            p[0],
            p[1],
            p[0] / p[1]
        );
    }
    println!(
        "dead rank (2 ranks, SIGKILL at step 6, checkpoint at step 4, backoff 0): detected \
         {detected:.2} s after its last step, training again (step 6 done) {resumed:.2} s after"
    );
    println!("results: {}", dir.join("results.json").display());
    Ok(())
}
