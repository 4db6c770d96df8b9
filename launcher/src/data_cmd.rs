//! `catapult data ...`: prepare shards, train a tokenizer, and stream a recipe's batches
//! (to inspect them, compare world sizes or check a resumed stream).

use anyhow::{bail, Context};
use catapult_data::{
    DataState, Dataset, DatasetSpec, DocumentSplit, Pipeline, PrepareOptions, ShardSize,
    StorageOptions, Tokenizer,
};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Copy, ValueEnum)]
pub enum SplitArg {
    /// One document per file.
    File,
    /// Documents separated by blank lines.
    Paragraph,
    /// One document per non-empty line.
    Line,
}

#[derive(Args)]
pub struct StorageArgs {
    /// Endpoint of an S3-compatible store (e.g. http://127.0.0.1:8333); credentials come
    /// from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    #[arg(long)]
    endpoint: Option<String>,
}

impl StorageArgs {
    fn options(&self) -> StorageOptions {
        StorageOptions {
            endpoint: self.endpoint.clone(),
            ..StorageOptions::default()
        }
    }
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Turn text files into parquet shards (a `text` column, and a `tokens` column with
    /// --tokenizer) plus a dataset.json index, locally or in an object store.
    Prepare {
        /// Input text files (UTF-8), read in the order given.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        /// Output directory or object-store prefix (s3://bucket/prefix).
        #[arg(short, long)]
        output: String,
        /// How to cut files into documents.
        #[arg(long, value_enum, default_value = "paragraph")]
        split: SplitArg,
        /// Drop documents shorter than this many bytes.
        #[arg(long, default_value_t = 1)]
        min_chars: usize,
        /// Shard size: documents (100000) or bytes of text (256MB).
        #[arg(long, default_value = "256MB")]
        shard_size: ShardSize,
        /// Row-group size, the unit the pipeline reads and shuffles: documents or bytes.
        #[arg(long, default_value = "4MB")]
        row_group_size: ShardSize,
        /// Pre-tokenize into a `tokens` column with this tokenizer (`bytes` or a
        /// tokenizer.json).
        #[arg(long)]
        tokenizer: Option<String>,
        /// With --tokenizer, drop the `text` column.
        #[arg(long)]
        drop_text: bool,
        /// Threads encoding and writing shards.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        #[command(flatten)]
        storage: StorageArgs,
    },
    /// Tokenizers.
    Tokenizer {
        #[command(subcommand)]
        command: TokenizerCommand,
    },
    /// Stream a recipe's training batches: one JSON line per sequence, plus the data
    /// state after the last batch. For inspection and for checking order and resume.
    Stream {
        /// The recipe file.
        recipe: PathBuf,
        #[command(flatten)]
        overrides: crate::OverrideArgs,
        /// Global batches to deliver.
        #[arg(long, default_value_t = 10)]
        batches: u64,
        /// This process's data-parallel rank.
        #[arg(long, default_value_t = 0)]
        rank: usize,
        /// Data-parallel ranks in the world.
        #[arg(long, default_value_t = 1)]
        world: usize,
        /// Continue from a data state saved by --save-state (or a checkpoint's meta.json).
        #[arg(long, value_name = "STATE_JSON")]
        resume: Option<PathBuf>,
        /// Write the data state after the last batch here.
        #[arg(long, value_name = "STATE_JSON")]
        save_state: Option<PathBuf>,
        /// Write sequences here (JSON lines); without it only the summary is printed.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Write a JSON summary (tokens/s, memory) here.
        #[arg(long)]
        summary: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer and write it as tokenizer.json.
    Train {
        /// Vocabulary size, including <|endoftext|>.
        #[arg(long)]
        vocab_size: usize,
        /// Text files (one training text per line) or parquet datasets (a file,
        /// directory, URL or glob; their text column).
        #[arg(required = true)]
        inputs: Vec<String>,
        /// The tokenizer.json to write.
        #[arg(short, long)]
        output: PathBuf,
        /// Text column of parquet inputs.
        #[arg(long, default_value = "text")]
        text_column: String,
        #[command(flatten)]
        storage: StorageArgs,
    },
}

/// Resident anonymous memory of this process, in bytes (Linux; 0 elsewhere).
pub fn rss_anon() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("RssAnon:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn is_dataset(input: &str) -> bool {
    input.contains("://")
        || input.ends_with(".parquet")
        || input.contains(['*', '?'])
        || std::path::Path::new(input).is_dir()
}

/// The texts of all inputs, in order, read lazily.
fn texts(
    inputs: &[String],
    text_column: &str,
    storage: &StorageOptions,
) -> anyhow::Result<Vec<Box<dyn Iterator<Item = String> + Send>>> {
    let bytes = Tokenizer::bytes();
    let mut out: Vec<Box<dyn Iterator<Item = String> + Send>> = Vec::new();
    for input in inputs {
        if is_dataset(input) {
            let spec = DatasetSpec {
                name: "input".into(),
                location: input.clone(),
                text_column: text_column.into(),
                tokens_column: None,
            };
            let dataset = std::sync::Arc::new(Dataset::open(&spec, storage, &bytes)?);
            let units = dataset.units();
            out.push(Box::new(units.into_iter().flat_map(move |(s, g)| {
                dataset
                    .read_texts(s, g)
                    .unwrap_or_else(|e| panic!("reading tokenizer input: {e}"))
            })));
        } else {
            let text = std::fs::read_to_string(input)
                .with_context(|| format!("{input}: cannot read the tokenizer input"))?;
            let lines: Vec<String> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string)
                .collect();
            out.push(Box::new(lines.into_iter()));
        }
    }
    Ok(out)
}

pub fn run(command: DataCommand) -> Result<(), crate::Failure> {
    match command {
        DataCommand::Prepare {
            inputs,
            output,
            split,
            min_chars,
            shard_size,
            row_group_size,
            tokenizer,
            drop_text,
            workers,
            storage,
        } => {
            let split = match split {
                SplitArg::File => DocumentSplit::File,
                SplitArg::Paragraph => DocumentSplit::Paragraph,
                SplitArg::Line => DocumentSplit::Line,
            };
            let opts = PrepareOptions {
                split,
                min_chars,
                shard_size,
                row_group_size,
                tokenizer,
                keep_text: !drop_text,
                workers,
                storage: storage.options(),
            };
            let summary =
                catapult_data::prepare(&inputs, &output, &opts).context("data prepare failed")?;
            let ix = &summary.index;
            let row_groups: usize = ix.shards.iter().map(|s| s.row_groups.len()).sum();
            print!("{} documents, {} bytes of text", ix.rows, ix.text_bytes);
            if let Some(tokens) = ix.tokens {
                print!(", {tokens} tokens");
            }
            println!(
                ", {} shard(s), {row_groups} row group(s) in {} (index: dataset.json)",
                ix.shards.len(),
                summary.location
            );
        }
        DataCommand::Tokenizer {
            command:
                TokenizerCommand::Train {
                    vocab_size,
                    inputs,
                    output,
                    text_column,
                    storage,
                },
        } => {
            let started = Instant::now();
            let sources = texts(&inputs, &text_column, &storage.options())?;
            catapult_data::train_bpe(sources.into_iter().flatten(), vocab_size, &output)?;
            let t = Tokenizer::load(output.to_str().context("non-UTF-8 output path")?, None)?;
            println!(
                "trained a byte-level BPE with {} ids (end of document: id {}) in {:.1} s: {}",
                t.vocab_size(),
                t.eod(),
                started.elapsed().as_secs_f64(),
                output.display()
            );
        }
        DataCommand::Stream {
            recipe,
            overrides,
            batches,
            rank,
            world,
            resume,
            save_state,
            output,
            summary,
        } => {
            let recipe = crate::load_recipe(&recipe, &overrides)?;
            let baseline = rss_anon();
            let mut pipeline = Pipeline::open(recipe.pipeline_config(), rank, world)?;
            if let Some(path) = &resume {
                let state = read_state(path)?;
                pipeline.restore(&state)?;
            }
            let names: Vec<String> = pipeline.datasets().iter().map(|d| d.name.clone()).collect();
            let mut out = match &output {
                Some(p) => Some(std::io::BufWriter::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("{}: cannot create", p.display()))?,
                )),
                None => None,
            };
            let progress = ProgressBar::new(batches);
            progress.set_style(
                ProgressStyle::with_template("stream {bar:30} {pos}/{len} batches {msg}")
                    .expect("template"),
            );
            let started = Instant::now();
            let mut tokens = 0u64;
            let mut peak = baseline;
            let mut by_dataset = vec![0u64; names.len()];
            for _ in 0..batches {
                let batch = pipeline.next_batch()?;
                for (seq, &d) in batch.sequences.iter().zip(&batch.datasets) {
                    tokens += batch.seq_len as u64;
                    by_dataset[d as usize] += batch.seq_len as u64;
                    if let Some(w) = out.as_mut() {
                        let line = serde_json::json!({
                            "batch": batch.index,
                            "rank": rank,
                            "dataset": names[d as usize],
                            "tokens": seq,
                        });
                        writeln!(w, "{line}")?;
                    }
                }
                peak = peak.max(rss_anon());
                progress.inc(1);
                progress.set_message(format!(
                    "{:.0} tok/s",
                    tokens as f64 / started.elapsed().as_secs_f64()
                ));
            }
            progress.finish_and_clear();
            if let Some(mut w) = out {
                w.flush()?;
            }
            let elapsed = started.elapsed().as_secs_f64();
            if let Some(p) = &save_state {
                let json = serde_json::to_string_pretty(&pipeline.state())?;
                catapult_checkpoints::write_atomically(p, json.as_bytes())?;
            }
            let report = serde_json::json!({
                "batches": batches,
                "tokens": tokens,
                "tokens_by_dataset": names.iter().cloned().zip(by_dataset.iter().map(|&t| serde_json::Value::from(t))).collect::<serde_json::Map<_, _>>(),
                "elapsed_s": elapsed,
                "tokens_per_s": tokens as f64 / elapsed,
                "rss_anon_baseline_bytes": baseline,
                "rss_anon_peak_bytes": peak,
                "read_ahead_bytes": recipe.data.read_ahead_mb << 20,
            });
            println!(
                "{tokens} tokens in {batches} batches, {:.0} tokens/s, peak resident growth {:.1} MiB",
                tokens as f64 / elapsed,
                (peak - baseline) as f64 / (1 << 20) as f64
            );
            if let Some(p) = &summary {
                catapult_checkpoints::write_atomically(
                    p,
                    serde_json::to_string_pretty(&report)?.as_bytes(),
                )?;
            }
        }
    }
    Ok(())
}

/// A data state from a state file or a checkpoint's meta.json (its `data_state`).
fn read_state(path: &PathBuf) -> anyhow::Result<DataState> {
    let raw = std::fs::read(path)
        .with_context(|| format!("{}: cannot read the data state", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_slice(&raw).with_context(|| format!("{}: not JSON", path.display()))?;
    let state = value.get("data_state").cloned().unwrap_or(value);
    match serde_json::from_value(state) {
        Ok(s) => Ok(s),
        Err(e) => bail!("{}: not a data state ({e})", path.display()),
    }
}
