//! `catapult data prepare`: text files in, parquet shards with a `text` column out.

use crate::DataError;
use arrow_array::{ArrayRef, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use std::path::{Path, PathBuf};
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

/// Options of `prepare`.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    /// How files are cut into documents.
    pub split: DocumentSplit,
    /// Documents shorter than this many bytes (after trimming) are dropped.
    pub min_chars: usize,
    /// Documents per parquet shard.
    pub shard_size: usize,
}

/// What `prepare` wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct PrepareSummary {
    /// Shard files, in order.
    pub shards: Vec<PathBuf>,
    /// Documents written.
    pub documents: usize,
    /// UTF-8 bytes of text written.
    pub bytes: usize,
}

/// Reads `inputs` in order, cuts them into documents and writes `out/shard-NNNNN.parquet`.
/// Shards are written to a temporary name and renamed, so a partial shard never appears.
pub fn prepare(
    inputs: &[PathBuf],
    out: &Path,
    opts: &PrepareOptions,
) -> Result<PrepareSummary, DataError> {
    if opts.shard_size == 0 {
        return Err(DataError::Empty {
            path: out.into(),
            problem: "--shard-size must be at least 1".into(),
        });
    }
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
            path: inputs.first().cloned().unwrap_or_default(),
            problem: format!(
                "no document of at least {} characters in the inputs",
                opts.min_chars
            ),
        });
    }
    std::fs::create_dir_all(out).map_err(|source| DataError::Io {
        path: out.into(),
        source,
    })?;
    let schema = Arc::new(Schema::new(vec![Field::new("text", DataType::Utf8, false)]));
    let mut shards = Vec::new();
    for (i, chunk) in documents.chunks(opts.shard_size).enumerate() {
        let path = out.join(format!("shard-{i:05}.parquet"));
        write_shard(&path, &schema, chunk)?;
        shards.push(path);
    }
    let bytes = documents.iter().map(String::len).sum();
    Ok(PrepareSummary {
        shards,
        documents: documents.len(),
        bytes,
    })
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

fn write_shard(path: &Path, schema: &Arc<Schema>, docs: &[String]) -> Result<(), DataError> {
    let tmp = path.with_extension("parquet.tmp");
    let parquet_err = |e: parquet::errors::ParquetError| DataError::Parquet {
        path: path.into(),
        reason: e.to_string(),
    };
    let file = std::fs::File::create(&tmp).map_err(|source| DataError::Io {
        path: tmp.clone(),
        source,
    })?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let mut writer =
        ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(parquet_err)?;
    let column: ArrayRef = Arc::new(StringArray::from_iter_values(docs.iter()));
    let batch =
        RecordBatch::try_new(schema.clone(), vec![column]).map_err(|e| DataError::Parquet {
            path: path.into(),
            reason: e.to_string(),
        })?;
    writer.write(&batch).map_err(parquet_err)?;
    writer.close().map_err(parquet_err)?;
    std::fs::rename(&tmp, path).map_err(|source| DataError::Io {
        path: path.into(),
        source,
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::read_documents;

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("catapult-data-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn prepared_shards_read_back_in_order() {
        let dir = tempdir("roundtrip");
        let input = dir.join("in.txt");
        std::fs::write(
            &input,
            "first doc\nline two\n\n\nsecond\n\nx\n\nthird one\n",
        )
        .unwrap();
        let opts = PrepareOptions {
            split: DocumentSplit::Paragraph,
            min_chars: 2,
            shard_size: 2,
        };
        let summary = prepare(&[input], &dir.join("out"), &opts).unwrap();
        assert_eq!(summary.documents, 3);
        assert_eq!(summary.shards.len(), 2);
        let docs = read_documents(&dir.join("out"), "text").unwrap();
        assert_eq!(docs, vec!["first doc\nline two", "second", "third one"]);
    }

    #[test]
    fn missing_column_is_named() {
        let dir = tempdir("column");
        let input = dir.join("in.txt");
        std::fs::write(&input, "some text here\n").unwrap();
        let opts = PrepareOptions {
            split: DocumentSplit::File,
            min_chars: 0,
            shard_size: 10,
        };
        prepare(&[input], &dir.join("out"), &opts).unwrap();
        let err = read_documents(&dir.join("out"), "content")
            .unwrap_err()
            .to_string();
        assert!(err.contains("shard-00000.parquet"), "{err}");
        assert!(err.contains("no column `content`"), "{err}");
        assert!(err.contains("columns: text"), "{err}");
    }

    #[test]
    fn corrupt_shard_is_named() {
        let dir = tempdir("corrupt");
        std::fs::write(dir.join("shard-00000.parquet"), b"this is not parquet").unwrap();
        let err = read_documents(&dir, "text").unwrap_err().to_string();
        assert!(err.contains("shard-00000.parquet"), "{err}");
        assert!(err.contains("not a readable parquet file"), "{err}");
    }

    #[test]
    fn empty_directory_is_an_error() {
        let dir = tempdir("empty");
        let err = read_documents(&dir, "text").unwrap_err().to_string();
        assert!(err.contains("no *.parquet shards"), "{err}");
    }
}
