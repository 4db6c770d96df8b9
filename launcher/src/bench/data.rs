//! `catapult bench data`: tokens/s the data pipeline delivers from raw-text and
//! pre-tokenized parquet on 1 and 2 worker threads, against a baseline measured in the
//! same run on the same files (pyarrow plus the Python `tokenizers` package), and beside
//! the rate at which the trainer consumes tokens.

use super::common::{create_dir, python_json, spinner, train_here, utf8};
use crate::UsageContext;
use anyhow::Context;
use catapult_data::{
    DatasetSpec, DocumentSplit, Phase, Pipeline, PipelineConfig, PrepareOptions, ShardSize,
    StorageOptions,
};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How one pipeline measurement reads.
#[derive(Clone, Copy)]
struct Reading {
    workers: usize,
    /// Passes over the corpus (three make read-ahead past the end a small share).
    passes: u64,
    /// Shards checked against dataset.json's BLAKE3 on first read.
    verify: bool,
}

/// Streams `how.passes` passes over `dataset`; returns (tokens, seconds).
fn pipeline_rate(
    dataset: &Path,
    tokenizer: &str,
    how: Reading,
    tokens: u64,
) -> anyhow::Result<(u64, f64)> {
    let cfg = PipelineConfig {
        datasets: vec![DatasetSpec {
            name: "bench".into(),
            location: dataset.to_str().context("UTF-8 path")?.into(),
            text_column: "text".into(),
            tokens_column: None,
            verify: how.verify,
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
        workers: how.workers,
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
    while delivered < tokens * how.passes {
        let batch = pipeline.next_batch()?;
        delivered += (batch.sequences.len() * batch.seq_len) as u64;
    }
    Ok((delivered, started.elapsed().as_secs_f64()))
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

/// The benchmark corpus: `--repeat` copies of the text, and its shards both ways.
struct Corpus {
    /// The text, once.
    source: String,
    repeat: usize,
    /// The BPE trained on it, as a path and as the pipeline's tokenizer location.
    tokenizer: PathBuf,
    tok: String,
    text_dir: PathBuf,
    tokens_dir: PathBuf,
    /// Tokens in the whole corpus.
    tokens: u64,
}

/// (format, workers, catapult tokens/s, baseline tokens/s).
type Row = (&'static str, usize, f64, f64);

pub(super) fn run(
    text: &Path,
    repeat: usize,
    vocab_size: usize,
    recipe: &Path,
    python: &Path,
    dir: &Path,
) -> Result<(), crate::Failure> {
    let corpus = build_corpus(text, repeat, vocab_size, dir)?;
    let measured = Measured {
        rows: pipeline_rows(&corpus, python)?,
        checksums: checksum_cost(&corpus)?,
        growth: memory_growth(&corpus, vocab_size, recipe, dir)?,
        trainer_rate: trainer_rate(recipe, dir)?,
    };
    report(&corpus, vocab_size, &measured, recipe, dir)
}

/// What the benchmark measured.
struct Measured {
    rows: Vec<Row>,
    /// (verified, unverified) tokens/s of one pass.
    checksums: (f64, f64),
    /// Resident-memory growth over one pass at a 1 MiB read-ahead budget.
    growth: u64,
    /// The trainer's tokens/s.
    trainer_rate: f64,
}

/// Writes the corpus, trains the BPE on the text and writes raw-text and pre-tokenized
/// shards of the corpus.
fn build_corpus(
    text: &Path,
    repeat: usize,
    vocab_size: usize,
    dir: &Path,
) -> anyhow::Result<Corpus> {
    let source = std::fs::read_to_string(text).usage_context(|| {
        format!(
            "{}: cannot read (run scripts/prepare-corpus)",
            text.display()
        )
    })?;
    create_dir(dir)?;
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
    let tok = utf8(&tokenizer)?.to_string();

    let p = spinner("writing raw-text and pre-tokenized shards");
    let text_dir = dir.join("text");
    let tokens_dir = dir.join("tokens");
    prepare(&corpus, &text_dir, None)?;
    let index = prepare(&corpus, &tokens_dir, Some(tok.clone()))?.index;
    p.finish_and_clear();
    Ok(Corpus {
        source,
        repeat,
        tokenizer,
        tok,
        text_dir,
        tokens_dir,
        tokens: index.tokens.unwrap_or(0),
    })
}

/// Shards of `corpus` in `out` (replaced): raw text, or ids with `tokenizer`.
fn prepare(
    corpus: &Path,
    out: &Path,
    tokenizer: Option<String>,
) -> anyhow::Result<catapult_data::PrepareSummary> {
    let _ = std::fs::remove_dir_all(out);
    Ok(catapult_data::prepare(
        &[corpus.to_path_buf()],
        utf8(out)?,
        &PrepareOptions {
            split: DocumentSplit::Paragraph,
            min_chars: 200,
            shard_size: ShardSize::Bytes(8 << 20),
            row_group_size: ShardSize::Bytes(1 << 20),
            keep_text: tokenizer.is_none(),
            tokenizer,
            workers: 2,
            storage: StorageOptions::default(),
            overwrite: false,
        },
    )?)
}

/// Both formats on 1 and 2 workers: catapult, then the baseline.
fn pipeline_rows(corpus: &Corpus, python: &Path) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (format, dataset) in [("text", &corpus.text_dir), ("tokens", &corpus.tokens_dir)] {
        for workers in [1usize, 2] {
            let p = spinner(&format!(
                "{format}, {workers} worker(s): catapult, then the baseline"
            ));
            let how = Reading {
                workers,
                passes: 3,
                verify: true,
            };
            let (t, s) = pipeline_rate(dataset, &corpus.tok, how, corpus.tokens)?;
            let (bt, bs) = baseline_rate(python, dataset, format, &corpus.tokenizer, workers)?;
            p.finish_and_clear();
            rows.push((format, workers, t as f64 / s, bt as f64 / bs));
        }
    }
    Ok(rows)
}

/// One pass over the pre-tokenized shards on 2 workers with and without checking each
/// shard's BLAKE3 on first read: (verified tok/s, unverified tok/s).
fn checksum_cost(corpus: &Corpus) -> anyhow::Result<(f64, f64)> {
    let p = spinner("one pass with and without shard checksums");
    let mut rates = [0.0; 2];
    for (i, verify) in [true, false].into_iter().enumerate() {
        let how = Reading {
            workers: 2,
            passes: 1,
            verify,
        };
        let (t, s) = pipeline_rate(&corpus.tokens_dir, &corpus.tok, how, corpus.tokens)?;
        rates[i] = t as f64 / s;
    }
    p.finish_and_clear();
    Ok((rates[0], rates[1]))
}

/// Resident-memory growth over one pass with a 1 MiB read-ahead budget, measured in a
/// fresh process (this one's heap already holds earlier runs' pages).
fn memory_growth(
    corpus: &Corpus,
    vocab_size: usize,
    recipe: &Path,
    dir: &Path,
) -> anyhow::Result<u64> {
    let p = spinner("memory: one pass with a 1 MiB read-ahead budget, in a new process");
    let summary = dir.join("memory.json");
    let status = std::process::Command::new(std::env::current_exe()?)
        .args(["data", "stream"])
        .arg(recipe)
        .args(["--set", &format!("data.path={}", corpus.text_dir.display())])
        .args(["--set", &format!("data.tokenizer={}", corpus.tok)])
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
        .args(["--batches", &(corpus.tokens / 65536).to_string()])
        .arg("--summary")
        .arg(&summary)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()?;
    if !status.success() {
        anyhow::bail!("the memory run failed ({status})");
    }
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary)?)?;
    let growth = m["rss_anon_peak_bytes"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(m["rss_anon_baseline_bytes"].as_u64().unwrap_or(0));
    p.finish_and_clear();
    Ok(growth)
}

/// The trainer's mean tokens/s over 20 steps of `recipe` on one rank.
fn trainer_rate(recipe: &Path, dir: &Path) -> anyhow::Result<f64> {
    let p = spinner(&format!("training {} for 20 steps", recipe.display()));
    let sets = [
        "train.steps=20".to_string(),
        "train.warmup_steps=0".to_string(),
        "train.eval_sequences=8".to_string(),
        "parallel.expert=1".to_string(),
        format!("output.dir={}", dir.join("train-run").display()),
    ];
    let (_, lines) = train_here(recipe, &sets)?;
    let rates: Vec<f64> = lines
        .iter()
        .filter_map(|v| v["tokens_per_s"].as_f64())
        .collect();
    let trainer_rate = rates.iter().sum::<f64>() / rates.len().max(1) as f64;
    p.finish_and_clear();
    Ok(trainer_rate)
}

/// Prints the table and writes results.json.
fn report(
    corpus: &Corpus,
    vocab_size: usize,
    measured: &Measured,
    recipe: &Path,
    dir: &Path,
) -> Result<(), crate::Failure> {
    let Measured {
        rows,
        checksums,
        growth,
        trainer_rate,
    } = measured;
    let (checksums, growth, trainer_rate) = (*checksums, *growth, *trainer_rate);
    let (source, repeat, corpus_tokens) = (&corpus.source, corpus.repeat, corpus.tokens);
    println!(
        "data pipeline: {} MB of text, {corpus_tokens} BPE tokens ({vocab_size} ids); catapult streams 3 passes, the baseline reads 1",
        source.len() * repeat / 1_000_000
    );
    println!(
        "{:<8} {:>7} {:>16} {:>22} {:>7}",
        "format", "workers", "catapult tok/s", "pyarrow+tokenizers tok/s", "ratio"
    );
    let mut results = Vec::new();
    for (format, workers, ours, base) in rows {
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
        "shard checksums: one pass over the pre-tokenized shards (2 workers) with BLAKE3 checks on \
         first read delivers {:.0} tok/s, without {:.0} tok/s (ratio {:.2})",
        checksums.0,
        checksums.1,
        checksums.0 / checksums.1
    );
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
        "checksum_verified_tokens_per_s": checksums.0,
        "checksum_unverified_tokens_per_s": checksums.1,
        "memory_growth_bytes_at_1mib_budget": growth,
    });
    let out = dir.join("results.json");
    std::fs::write(&out, serde_json::to_string_pretty(&report)?)?;
    println!("results: {}", out.display());
    Ok(())
}
