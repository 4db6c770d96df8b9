//! Reading whole local parquet datasets into memory (a file, or a directory of
//! `*.parquet`): for small inputs such as tokenizer training. Training streams through
//! `Pipeline` instead.

use crate::DataError;
use arrow_array::cast::AsArray;
use arrow_array::Array;
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use std::path::{Path, PathBuf};

/// The parquet shards of a dataset, in name order (so the order never depends on the
/// filesystem's listing order).
pub fn shard_paths(path: &Path) -> Result<Vec<PathBuf>, DataError> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.exists() {
        return Err(DataError::Empty {
            location: path.display().to_string(),
            problem: "does not exist; create it with `catapult data prepare TEXT... -o DIR` \
                      or point data.path at a parquet file or directory"
                .into(),
        });
    }
    let mut shards: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io)?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    shards.sort();
    if shards.is_empty() {
        return Err(DataError::Empty {
            location: path.display().to_string(),
            problem: "holds no *.parquet shards; create them with `catapult data prepare`".into(),
        });
    }
    Ok(shards)
}

/// Every document of every shard, in shard then row order. Null rows are skipped.
pub fn read_documents(path: &Path, text_column: &str) -> Result<Vec<String>, DataError> {
    let mut docs = Vec::new();
    for shard in shard_paths(path)? {
        read_shard(&shard, text_column, &mut docs)?;
    }
    if docs.is_empty() {
        return Err(DataError::Empty {
            location: path.display().to_string(),
            problem: format!("the `{text_column}` column holds no documents"),
        });
    }
    Ok(docs)
}

fn read_shard(shard: &Path, column: &str, docs: &mut Vec<String>) -> Result<(), DataError> {
    let parquet_err = |e: parquet::errors::ParquetError| DataError::Parquet {
        location: shard.display().to_string(),
        reason: e.to_string(),
    };
    let file = std::fs::File::open(shard).map_err(|source| DataError::Io {
        path: shard.into(),
        source,
    })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(parquet_err)?;
    let field = builder
        .schema()
        .field_with_name(column)
        .map_err(|_| DataError::Column {
            location: shard.display().to_string(),
            problem: format!(
                "has no column `{column}` (columns: {})",
                builder
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })?;
    if !matches!(field.data_type(), DataType::Utf8 | DataType::LargeUtf8) {
        return Err(DataError::Column {
            location: shard.display().to_string(),
            problem: format!(
                "column `{column}` has type {}, not string",
                field.data_type()
            ),
        });
    }
    let mask = ProjectionMask::columns(builder.parquet_schema(), [column]);
    let reader = builder.with_projection(mask).build().map_err(parquet_err)?;
    for batch in reader {
        let batch = batch.map_err(|e| DataError::Parquet {
            location: shard.display().to_string(),
            reason: e.to_string(),
        })?;
        let col = batch.column(0);
        match col.data_type() {
            DataType::Utf8 => {
                let a = col.as_string::<i32>();
                docs.extend(
                    (0..a.len())
                        .filter(|&i| a.is_valid(i))
                        .map(|i| a.value(i).to_string()),
                );
            }
            _ => {
                let a = col.as_string::<i64>();
                docs.extend(
                    (0..a.len())
                        .filter(|&i| a.is_valid(i))
                        .map(|i| a.value(i).to_string()),
                );
            }
        }
    }
    Ok(())
}
