//! `catapult data ...`: prepare shards, train a tokenizer, and stream a recipe's batches
//! (to inspect them, compare world sizes or check a resumed stream).

use crate::{UsageContext, UsageError};
use catapult_data::{
    DataState, Dataset, DatasetSpec, DocumentSplit, Pipeline, PrepareOptions, ShardSize,
    StorageOptions, Tokenizer,
};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
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
        /// Replace a dataset already at the output (its stale shards are removed).
        #[arg(long)]
        overwrite: bool,
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
fn rss_anon() -> u64 {
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

/// The first error met while reading the tokenizer's inputs lazily (the trainer pulls
/// the texts, so the error waits here until it returns).
type ReadError = Arc<Mutex<Option<anyhow::Error>>>;

/// The error in `failed`, taken out (a panic elsewhere cannot leave it half-written).
fn take(failed: &ReadError) -> Option<anyhow::Error> {
    failed.lock().unwrap_or_else(PoisonError::into_inner).take()
}

fn has_failed(failed: &ReadError) -> bool {
    failed
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .is_some()
}

/// The texts of all inputs, in order, read lazily; a dataset that cannot be read ends
/// its texts and leaves the error in `failed`.
fn texts(
    inputs: &[String],
    text_column: &str,
    storage: &StorageOptions,
    failed: &ReadError,
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
                verify: true,
            };
            let dataset = Arc::new(Dataset::open(&spec, storage, &bytes)?);
            let units = dataset.units();
            let (input, failed) = (input.clone(), failed.clone());
            out.push(Box::new(
                units
                    .into_iter()
                    .map_while(move |(s, g)| match dataset.read_texts(s, g) {
                        Ok(texts) => Some(texts),
                        Err(e) => {
                            let error = anyhow::Error::new(e).context(format!(
                                "{input}: cannot read the tokenizer input (shard {s}, row \
                                 group {g}); no tokenizer was written"
                            ));
                            let mut slot = failed.lock().unwrap_or_else(PoisonError::into_inner);
                            slot.get_or_insert(error);
                            None
                        }
                    })
                    .flatten(),
            ));
        } else {
            let text = std::fs::read_to_string(input)
                .usage_context(|| format!("{input}: cannot read the tokenizer input"))?;
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

/// What `catapult data stream` was asked for.
struct StreamJob {
    recipe: PathBuf,
    overrides: crate::OverrideArgs,
    batches: u64,
    rank: usize,
    world: usize,
    resume: Option<PathBuf>,
    save_state: Option<PathBuf>,
    output: Option<PathBuf>,
    summary: Option<PathBuf>,
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
            overwrite,
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
                overwrite,
            };
            prepare(&inputs, &output, &opts)
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
        } => train_tokenizer(&inputs, &text_column, &storage, vocab_size, &output),
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
        } => stream(StreamJob {
            recipe,
            overrides,
            batches,
            rank,
            world,
            resume,
            save_state,
            output,
            summary,
        }),
    }
}

/// `catapult data prepare`: the shards and a one-line summary of them.
fn prepare(inputs: &[PathBuf], output: &str, opts: &PrepareOptions) -> Result<(), crate::Failure> {
    let summary = catapult_data::prepare(inputs, output, opts)?;
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
    Ok(())
}

/// `catapult data tokenizer train`: a byte-level BPE from the inputs' texts.
fn train_tokenizer(
    inputs: &[String],
    text_column: &str,
    storage: &StorageArgs,
    vocab_size: usize,
    output: &Path,
) -> Result<(), crate::Failure> {
    let started = Instant::now();
    let failed = ReadError::default();
    let sources = texts(inputs, text_column, &storage.options(), &failed)?;
    let all = sources
        .into_iter()
        .flatten()
        .take_while(|_| !has_failed(&failed));
    let trained = catapult_data::train_bpe(all, vocab_size, output);
    if let Some(error) = take(&failed) {
        if trained.is_ok() {
            // What was written came from part of the input only.
            let _ = std::fs::remove_file(output);
        }
        return Err(error.into());
    }
    trained?;
    let path = output.to_str().ok_or_else(|| {
        UsageError::new(format!(
            "{}: the path is not UTF-8; give a UTF-8 --output path",
            output.display()
        ))
    })?;
    let t = Tokenizer::load(path, None)?;
    check_vocab_reached(t.vocab_size(), vocab_size, inputs, output)?;
    println!(
        "trained a byte-level BPE with {} ids (end of document: id {}) in {:.1} s: {}",
        t.vocab_size(),
        t.eod(),
        started.elapsed().as_secs_f64(),
        output.display()
    );
    Ok(())
}

/// A tokenizer that learned no merge at all (256 byte ids and the end of document) from
/// its inputs is refused (exit 2, the file removed): the inputs hold no usable text. One
/// that learned some but fewer than asked is kept with a warning naming the size reached.
fn check_vocab_reached(
    reached: usize,
    asked: usize,
    inputs: &[String],
    output: &Path,
) -> Result<(), crate::Failure> {
    if reached >= asked {
        return Ok(());
    }
    if reached <= catapult_data::ByteTokenizer::VOCAB_SIZE {
        let _ = std::fs::remove_file(output);
        return Err(UsageError::new(format!(
            "{}: no merge could be learned ({reached} ids, the bytes and the end of document, \
             of --vocab-size {asked}): the inputs hold no usable text; give inputs with text",
            inputs.join(", ")
        ))
        .into());
    }
    eprintln!(
        "warning: the tokenizer reached {reached} ids of --vocab-size {asked}: the inputs are \
         too small for that vocabulary ({} kept)",
        output.display()
    );
    Ok(())
}

/// Totals of a stream.
struct Delivered {
    tokens: u64,
    by_dataset: Vec<u64>,
    peak_rss: u64,
    elapsed_s: f64,
}

/// `catapult data stream`: the recipe's batches (optionally from a saved state), their
/// sequences as JSON lines, the state after the last batch and a summary.
fn stream(job: StreamJob) -> Result<(), crate::Failure> {
    let recipe = crate::load_recipe(&job.recipe, &job.overrides)?;
    let baseline = rss_anon();
    let mut pipeline = Pipeline::open(recipe.pipeline_config(), job.rank, job.world)?;
    if let Some(path) = &job.resume {
        let state = read_state(path)?;
        pipeline.restore(&state)?;
    }
    let names: Vec<String> = pipeline.datasets().iter().map(|d| d.name.clone()).collect();
    let out = match &job.output {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).usage_context(|| format!("{}: cannot create", p.display()))?,
        )),
        None => None,
    };
    let d = deliver(&mut pipeline, &job, &names, out, baseline)?;
    let (batches, tokens, elapsed) = (job.batches, d.tokens, d.elapsed_s);
    if let Some(p) = &job.save_state {
        let json = serde_json::to_string_pretty(&pipeline.state())?;
        catapult_checkpoints::write_atomically(p, json.as_bytes())?;
    }
    let report = serde_json::json!({
        "batches": batches,
        "tokens": tokens,
        "tokens_by_dataset": names.iter().cloned().zip(d.by_dataset.iter().map(|&t| serde_json::Value::from(t))).collect::<serde_json::Map<_, _>>(),
        "elapsed_s": elapsed,
        "tokens_per_s": tokens as f64 / elapsed,
        "rss_anon_baseline_bytes": baseline,
        "rss_anon_peak_bytes": d.peak_rss,
        "read_ahead_bytes": recipe.data.read_ahead_mb << 20,
    });
    println!(
        "{tokens} tokens in {batches} batches, {:.0} tokens/s, peak resident growth {:.1} MiB",
        tokens as f64 / elapsed,
        (d.peak_rss - baseline) as f64 / (1 << 20) as f64
    );
    if let Some(p) = &job.summary {
        catapult_checkpoints::write_atomically(
            p,
            serde_json::to_string_pretty(&report)?.as_bytes(),
        )?;
    }
    Ok(())
}

/// Pulls `job.batches` batches (writing their sequences to `out`) under a progress bar.
fn deliver(
    pipeline: &mut Pipeline,
    job: &StreamJob,
    names: &[String],
    mut out: Option<std::io::BufWriter<std::fs::File>>,
    baseline: u64,
) -> anyhow::Result<Delivered> {
    let progress = ProgressBar::new(job.batches);
    progress.set_style(
        ProgressStyle::with_template("stream {bar:30} {pos}/{len} batches {msg}")
            .expect("a static template that parses"),
    );
    let started = Instant::now();
    let mut tokens = 0u64;
    let mut peak = baseline;
    let mut by_dataset = vec![0u64; names.len()];
    for _ in 0..job.batches {
        let batch = pipeline.next_batch()?;
        for (seq, &d) in batch.sequences.iter().zip(&batch.datasets) {
            tokens += batch.seq_len as u64;
            by_dataset[d as usize] += batch.seq_len as u64;
            if let Some(w) = out.as_mut() {
                let line = serde_json::json!({
                    "batch": batch.index,
                    "rank": job.rank,
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
    Ok(Delivered {
        tokens,
        by_dataset,
        peak_rss: peak,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

/// A data state from a state file or a checkpoint's meta.json (its `data_state`).
fn read_state(path: &Path) -> Result<DataState, UsageError> {
    let raw = std::fs::read(path)
        .usage_context(|| format!("{}: cannot read the data state", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_slice(&raw).usage_context(|| format!("{}: not JSON", path.display()))?;
    let state = value.get("data_state").cloned().unwrap_or(value);
    serde_json::from_value(state).map_err(|e| {
        UsageError::new(format!(
            "{}: not a data state ({e}); give a file written by --save-state or a \
             checkpoint's meta.json",
            path.display()
        ))
    })
}
