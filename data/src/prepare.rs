//! `catapult data prepare`: text files in; parquet shards (a `text` column and, with a
//! tokenizer, a `tokens` column) and a `dataset.json` index out, to a local directory or
//! an object-store prefix. Shards are encoded and written in parallel; each appears
//! whole (local writes are renamed into place, object puts are atomic), and the index is
//! written last, so a dataset with an index is complete.

use crate::dataset::{DatasetIndex, IndexShard, INDEX_FILE};
use crate::store::{Location, StorageOptions};
use crate::{DataError, Tokenizer};
use arrow_array::builder::{ListBuilder, UInt32Builder};
use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

/// How a text file is cut into documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DocumentSplit {
    /// The whole file is one document.
    File,
    /// Blocks separated by one or more blank lines.
    Paragraph,
    /// Every non-empty line.
    Line,
}

/// A size limit: a number of documents, or bytes of text (`64MB`, `512KiB`, `1G`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardSize {
    /// At most this many documents.
    Documents(usize),
    /// At most this many bytes of text (at least one document).
    Bytes(u64),
}

/// Why a string is not a `ShardSize`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardSizeError {
    /// No number in front.
    #[error("`{input}` is not a size: use a document count (10000) or bytes (64MB)")]
    NotANumber {
        /// What was given.
        input: String,
    },
    /// A unit that is not B, KB, MB or GB.
    #[error("`{input}`: unknown unit `{unit}` (use KB, MB or GB)")]
    Unit {
        /// What was given.
        input: String,
        /// The unit part.
        unit: String,
    },
    /// More than fits in 64 bits.
    #[error("`{input}` is too large: use a size below 16 EiB (e.g. 64MB or 1GB)")]
    TooLarge {
        /// What was given.
        input: String,
    },
}

impl FromStr for ShardSize {
    type Err = ShardSizeError;
    fn from_str(s: &str) -> Result<Self, ShardSizeError> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let input = || s.to_string();
        let n: u64 = num.parse().map_err(|e: std::num::ParseIntError| {
            if *e.kind() == std::num::IntErrorKind::PosOverflow {
                ShardSizeError::TooLarge { input: input() }
            } else {
                ShardSizeError::NotANumber { input: input() }
            }
        })?;
        let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
            "" => {
                return usize::try_from(n)
                    .map(ShardSize::Documents)
                    .map_err(|_| ShardSizeError::TooLarge { input: input() })
            }
            "B" => 1,
            "K" | "KB" | "KIB" => 1 << 10,
            "M" | "MB" | "MIB" => 1 << 20,
            "G" | "GB" | "GIB" => 1 << 30,
            _ => {
                return Err(ShardSizeError::Unit {
                    input: input(),
                    unit: unit.to_string(),
                })
            }
        };
        n.checked_mul(mult)
            .map(ShardSize::Bytes)
            .ok_or_else(|| ShardSizeError::TooLarge { input: input() })
    }
}

/// Options of `prepare`.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// How files are cut into documents.
    pub split: DocumentSplit,
    /// Documents shorter than this many bytes (after trimming) are dropped.
    pub min_chars: usize,
    /// Size of each shard.
    pub shard_size: ShardSize,
    /// Size of each row group (the unit the pipeline reads and shuffles).
    pub row_group_size: ShardSize,
    /// Pre-tokenize with this tokenizer (`bytes` or a tokenizer.json) into a `tokens` column.
    pub tokenizer: Option<String>,
    /// Keep the `text` column when pre-tokenizing.
    pub keep_text: bool,
    /// Threads encoding and writing shards.
    pub workers: usize,
    /// How to reach an object-store destination.
    pub storage: StorageOptions,
    /// Replace a dataset (or anything else) already at the output: stale files go once
    /// the new index is written.
    pub overwrite: bool,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self {
            split: DocumentSplit::Paragraph,
            min_chars: 0,
            shard_size: ShardSize::Bytes(256 << 20),
            row_group_size: ShardSize::Bytes(4 << 20),
            tokenizer: None,
            keep_text: true,
            workers: 2,
            storage: StorageOptions::default(),
            overwrite: false,
        }
    }
}

/// What `prepare` wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct PrepareSummary {
    /// Where the shards and index are.
    pub location: String,
    /// The index written last.
    pub index: DatasetIndex,
}

/// Cuts `items` (with byte sizes) into consecutive groups no larger than `limit`.
fn groups(sizes: &[usize], limit: ShardSize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    for (i, &s) in sizes.iter().enumerate() {
        let full = match limit {
            ShardSize::Documents(n) => i - start >= n.max(1),
            ShardSize::Bytes(b) => i > start && bytes + s as u64 > b,
        };
        if full {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += s as u64;
    }
    if start < sizes.len() {
        out.push(start..sizes.len());
    }
    out
}

/// Reads `inputs` in order, cuts them into documents and writes `out/shard-NNNNN.parquet`
/// plus `out/dataset.json`. `out` is a local directory or an object-store URL.
pub fn prepare(
    inputs: &[PathBuf],
    out: &str,
    opts: &PrepareOptions,
) -> Result<PrepareSummary, DataError> {
    let mut documents = Vec::new();
    for input in inputs {
        let text = std::fs::read_to_string(input).map_err(|source| DataError::Io {
            path: input.clone(),
            source,
        })?;
        let pieces: Vec<String> = match opts.split {
            DocumentSplit::File => vec![text.trim().to_string()],
            DocumentSplit::Line => text.lines().map(|l| l.trim().to_string()).collect(),
            DocumentSplit::Paragraph => paragraphs(&text),
        };
        documents.extend(
            pieces
                .into_iter()
                .filter(|d| !d.is_empty() && d.len() >= opts.min_chars),
        );
    }
    if documents.is_empty() {
        return Err(DataError::Empty {
            location: inputs
                .first()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "inputs".into()),
            problem: format!(
                "no document of at least {} characters in the inputs",
                opts.min_chars
            ),
        });
    }
    let tokenizer = match &opts.tokenizer {
        Some(t) => Some(Tokenizer::load(t, None)?),
        None => None,
    };
    if !out.contains("://") {
        std::fs::create_dir_all(out).map_err(|source| DataError::Io {
            path: out.into(),
            source,
        })?;
    }
    let location = Location::open(out, &opts.storage)?;
    let existing = claim_output(&location, opts.overwrite)?;
    let sizes: Vec<usize> = documents.iter().map(String::len).collect();
    let shards = groups(&sizes, opts.shard_size);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<Result<IndexShard, DataError>>>> =
        shards.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..opts.workers.clamp(1, shards.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(range) = shards.get(i) else { break };
                let result = write_shard(
                    &location,
                    &format!("shard-{i:05}.parquet"),
                    &documents[range.clone()],
                    &sizes[range.clone()],
                    opts,
                    tokenizer.as_ref(),
                );
                let failed = result.is_err();
                *results[i].lock().expect("slot") = Some(result);
                if failed {
                    break;
                }
            });
        }
    });
    let shards: Vec<IndexShard> = results
        .into_iter()
        .filter_map(|slot| slot.into_inner().expect("slot"))
        .collect::<Result<_, _>>()?;
    let index = DatasetIndex {
        format: "catapult-dataset".into(),
        version: 1,
        text_column: (tokenizer.is_none() || opts.keep_text).then(|| "text".to_string()),
        tokens_column: tokenizer.as_ref().map(|_| "tokens".to_string()),
        tokenizer: tokenizer.as_ref().map(|t| t.fingerprint().to_string()),
        rows: shards.iter().map(|s| s.rows).sum(),
        text_bytes: sizes.iter().map(|&s| s as u64).sum(),
        tokens: tokenizer
            .as_ref()
            .map(|_| shards.iter().map(|s| s.tokens.unwrap_or(0)).sum()),
        shards,
    };
    let json = serde_json::to_vec_pretty(&index).expect("the index serializes");
    location.put(
        &location.child(INDEX_FILE),
        &location.display_child(INDEX_FILE),
        json,
    )?;
    let mut kept: Vec<String> = index.shards.iter().map(|s| s.name.clone()).collect();
    kept.push(INDEX_FILE.to_string());
    remove_stale(&location, existing, &kept)?;
    Ok(PrepareSummary {
        location: location.display.clone(),
        index,
    })
}

/// What the output holds now: refused unless `overwrite`; with it, the old index goes
/// first, so the location has no index (no dataset) until the new one is complete.
fn claim_output(
    location: &Location,
    overwrite: bool,
) -> Result<Vec<object_store::ObjectMeta>, DataError> {
    let existing = location.list()?;
    if let Some(first) = existing.first() {
        if !overwrite {
            return Err(DataError::Occupied {
                location: location.display.clone(),
                count: existing.len(),
                first: first.location.filename().unwrap_or_default().to_string(),
            });
        }
    }
    location.delete(
        &location.child(INDEX_FILE),
        &location.display_child(INDEX_FILE),
    )?;
    Ok(existing)
}

/// Deletes what the output held before that the new dataset does not use (old shards a
/// glob would otherwise mix in).
fn remove_stale(
    location: &Location,
    existing: Vec<object_store::ObjectMeta>,
    kept: &[String],
) -> Result<(), DataError> {
    let kept: Vec<object_store::path::Path> = kept.iter().map(|k| location.child(k)).collect();
    for meta in existing {
        if !kept.contains(&meta.location) {
            let name = meta.location.filename().unwrap_or_default().to_string();
            location.delete(&meta.location, &location.display_child(&name))?;
        }
    }
    Ok(())
}

fn paragraphs(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        if line.trim().is_empty() {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
        } else {
            if !current.is_empty() {
                current.push('\n');
            }
            current.push_str(line.trim_end());
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

fn write_shard(
    location: &Location,
    name: &str,
    docs: &[String],
    sizes: &[usize],
    opts: &PrepareOptions,
    tokenizer: Option<&Tokenizer>,
) -> Result<IndexShard, DataError> {
    let display = location.display_child(name);
    let parquet_err = |e: parquet::errors::ParquetError| DataError::Parquet {
        location: display.clone(),
        reason: e.to_string(),
    };
    let mut fields = Vec::new();
    let keep_text = tokenizer.is_none() || opts.keep_text;
    if keep_text {
        fields.push(Field::new("text", DataType::Utf8, false));
    }
    if tokenizer.is_some() {
        fields.push(Field::new(
            "tokens",
            DataType::List(Arc::new(Field::new("item", DataType::UInt32, true))),
            false,
        ));
    }
    let schema = Arc::new(Schema::new(fields));
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let mut buffer = Vec::new();
    let mut writer =
        ArrowWriter::try_new(&mut buffer, schema.clone(), Some(props)).map_err(parquet_err)?;
    let mut tokens_total = 0u64;
    for range in groups(sizes, opts.row_group_size) {
        let mut columns: Vec<ArrayRef> = Vec::new();
        if keep_text {
            columns.push(Arc::new(StringArray::from_iter_values(
                docs[range.clone()].iter(),
            )));
        }
        if let Some(t) = tokenizer {
            let mut list = ListBuilder::new(UInt32Builder::new());
            let mut ids = Vec::new();
            for doc in &docs[range.clone()] {
                ids.clear();
                t.encode_document(doc, &mut ids)?;
                ids.pop(); // the pipeline appends the end-of-document id itself
                tokens_total += ids.len() as u64 + 1;
                list.values().append_slice(&ids);
                list.append(true);
            }
            columns.push(Arc::new(list.finish()));
        }
        let batch =
            RecordBatch::try_new(schema.clone(), columns).map_err(|e| DataError::Parquet {
                location: display.clone(),
                reason: e.to_string(),
            })?;
        writer.write(&batch).map_err(parquet_err)?;
        writer.flush().map_err(parquet_err)?;
    }
    let meta = writer.close().map_err(parquet_err)?;
    // The column the pipeline reads by default: tokens when pre-tokenized, else text.
    let read_root = if tokenizer.is_some() {
        "tokens"
    } else {
        "text"
    };
    let row_groups: Vec<u64> = meta
        .row_groups()
        .iter()
        .map(|rg| rg.num_rows() as u64)
        .collect();
    let row_group_bytes: Vec<u64> = meta
        .row_groups()
        .iter()
        .map(|rg| {
            rg.columns()
                .iter()
                .filter(|c| c.column_path().parts()[0] == read_root)
                .map(|c| c.uncompressed_size().max(0) as u64)
                .sum()
        })
        .collect();
    let shard = IndexShard {
        name: name.to_string(),
        bytes: buffer.len() as u64,
        blake3: blake3::hash(&buffer).to_hex().to_string(),
        rows: docs.len() as u64,
        row_groups,
        row_group_bytes,
        tokens: tokenizer.map(|_| tokens_total),
    };
    location.put(&location.child(name), &display, buffer)?;
    Ok(shard)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Dataset, DatasetSpec, StorageOptions, Tokenizer};

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("catapult-data-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn sizes_parse_as_documents_or_bytes() {
        assert_eq!(
            "1000".parse::<ShardSize>().unwrap(),
            ShardSize::Documents(1000)
        );
        assert_eq!(
            "64MB".parse::<ShardSize>().unwrap(),
            ShardSize::Bytes(64 << 20)
        );
        assert_eq!(
            "512kib".parse::<ShardSize>().unwrap(),
            ShardSize::Bytes(512 << 10)
        );
        assert!("12 parsecs".parse::<ShardSize>().is_err());
        assert!(matches!(
            "99999999999G".parse::<ShardSize>(),
            Err(ShardSizeError::TooLarge { .. })
        ));
        assert!(matches!(
            "999999999999999999999".parse::<ShardSize>(),
            Err(ShardSizeError::TooLarge { .. })
        ));
        assert_eq!(
            groups(&[5, 5, 5, 20, 1], ShardSize::Bytes(10)),
            vec![0..2, 2..3, 3..4, 4..5]
        );
        assert_eq!(
            groups(&[1; 5], ShardSize::Documents(2)),
            vec![0..2, 2..4, 4..5]
        );
    }

    #[test]
    fn prepared_shards_read_back_in_order_with_an_index() {
        let dir = tempdir("roundtrip");
        let input = dir.join("in.txt");
        std::fs::write(
            &input,
            "first doc\nline two\n\n\nsecond\n\nx\n\nthird one\n",
        )
        .unwrap();
        let opts = PrepareOptions {
            min_chars: 2,
            shard_size: ShardSize::Documents(2),
            row_group_size: ShardSize::Documents(1),
            ..PrepareOptions::default()
        };
        let out = dir.join("out");
        let summary = prepare(&[input], out.to_str().unwrap(), &opts).unwrap();
        assert_eq!(summary.index.rows, 3);
        assert_eq!(summary.index.shards.len(), 2);
        assert_eq!(summary.index.shards[0].row_groups, vec![1, 1]);
        let on_disk = std::fs::read(out.join("shard-00001.parquet")).unwrap();
        assert_eq!(
            summary.index.shards[1].blake3,
            blake3::hash(&on_disk).to_hex().to_string()
        );
        let spec = DatasetSpec {
            name: "t".into(),
            location: out.to_str().unwrap().into(),
            text_column: "text".into(),
            tokens_column: None,
            verify: true,
        };
        let dataset =
            Dataset::open(&spec, &StorageOptions::default(), &Tokenizer::bytes()).unwrap();
        assert!(dataset.index.is_some(), "opened through dataset.json");
        let docs: Vec<String> = dataset
            .units()
            .into_iter()
            .flat_map(|(shard, rg)| dataset.read_texts(shard, rg).unwrap())
            .collect();
        assert_eq!(docs, vec!["first doc\nline two", "second", "third one"]);
    }
}
