//! A dataset: parquet shards under a prefix (or matching a glob), read one row group at a
//! time with only the needed column. A `dataset.json` index, when present, lists the
//! shards so opening a dataset never reads every footer.

use crate::store::{retry_with, Location, StorageOptions};
use crate::{is_validation_document, DataError, Tokenizer};
use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type, UInt16Type, UInt32Type};
use arrow_array::{Array, ArrayRef};
use arrow_schema::DataType;
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::arrow::{ParquetRecordBatchStreamBuilder, ProjectionMask};
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

/// Name of the index file `catapult data prepare` writes beside the shards.
pub const INDEX_FILE: &str = "dataset.json";

/// What a recipe says about one dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetSpec {
    /// Name used in mixtures, metrics and the data state.
    pub name: String,
    /// A local path, URL prefix, single parquet file, or glob (`s3://b/web/*.parquet`).
    pub location: String,
    /// Column holding document text.
    pub text_column: String,
    /// Column holding pre-tokenized ids (a list of integers); None reads text, unless
    /// the dataset's index says it was pre-tokenized with the recipe's tokenizer.
    pub tokens_column: Option<String>,
    /// Check each shard against the BLAKE3 its `dataset.json` lists, the first time this
    /// process reads it (one streaming pass over the shard).
    pub verify: bool,
}

/// The index `catapult data prepare` writes: shards, row counts, token counts, checksums.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DatasetIndex {
    /// Always `catapult-dataset`.
    pub format: String,
    /// Index format version.
    pub version: u32,
    /// The text column, if the shards have one.
    pub text_column: Option<String>,
    /// The pre-tokenized column, if any.
    pub tokens_column: Option<String>,
    /// Fingerprint of the tokenizer that produced `tokens_column` (`bytes`, or the
    /// BLAKE3 hash of the tokenizer.json).
    pub tokenizer: Option<String>,
    /// Documents in all shards.
    pub rows: u64,
    /// UTF-8 bytes of text in all shards.
    pub text_bytes: u64,
    /// Tokens (with end-of-document ids) in all shards, when pre-tokenized.
    pub tokens: Option<u64>,
    /// The shards, in order.
    pub shards: Vec<IndexShard>,
}

/// One shard in the index.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct IndexShard {
    /// File name relative to the dataset prefix.
    pub name: String,
    /// File size in bytes.
    pub bytes: u64,
    /// BLAKE3 hash of the file.
    pub blake3: String,
    /// Rows per row group.
    pub row_groups: Vec<u64>,
    /// Uncompressed bytes of the read column per row group.
    pub row_group_bytes: Vec<u64>,
    /// Documents.
    pub rows: u64,
    /// Tokens, when pre-tokenized.
    pub tokens: Option<u64>,
}

/// Which column is read, and how.
#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    /// A string column of document text.
    Text(String),
    /// A list-of-integers column of token ids (without end-of-document ids).
    Tokens(String),
}

impl Column {
    fn name(&self) -> &str {
        match self {
            Column::Text(n) | Column::Tokens(n) => n,
        }
    }
}

/// One shard of an open dataset.
#[derive(Debug)]
pub struct Shard {
    /// Name relative to the dataset (for messages and the data state).
    pub name: String,
    key: ObjPath,
    size: u64,
    /// Rows per row group.
    pub row_groups: Vec<u64>,
    /// Uncompressed bytes of the read column per row group.
    pub row_group_bytes: Vec<u64>,
    /// Global index of this shard's first row (rows of earlier shards).
    pub row_offset: u64,
    /// The BLAKE3 the index lists, when it is to be checked on first read.
    blake3: Option<String>,
    metadata: OnceLock<ArrowReaderMetadata>,
    /// Held while the shard is first opened (checked and its footer read), so that
    /// workers reading its row groups at once do it one time, not one time each.
    opening: std::sync::Mutex<()>,
}

/// The documents of one row group, tokenized: (global row, ids ending with end-of-document).
#[derive(Debug, Default)]
pub struct Documents {
    /// Global row index and token ids of each document kept.
    pub docs: Vec<(u64, Vec<u32>)>,
}

/// Which documents to keep when reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// Documents not held out.
    Train,
    /// Held-out documents.
    Validation,
}

/// An open dataset.
#[derive(Debug)]
pub struct Dataset {
    /// Name from the recipe.
    pub name: String,
    location: Location,
    /// Shards in order.
    pub shards: Vec<Shard>,
    /// The column read.
    pub column: Column,
    /// The index, when the dataset has one.
    pub index: Option<DatasetIndex>,
    /// Whether shards are checked against the index's BLAKE3 on first read.
    verify: bool,
}

fn has_glob(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

/// A listed shard: name relative to the dataset, key, size in bytes.
type Listed = (String, ObjPath, u64);

/// The part of `location` before its first glob character (cut at a `/`), and the glob
/// after it; the whole location and None without a glob.
fn split_glob(location: &str) -> (&str, Option<&str>) {
    match location.find(['*', '?', '[', '{']) {
        Some(i) if has_glob(location) => {
            let cut = location[..i].rfind('/').map_or(0, |j| j + 1);
            (&location[..cut], Some(&location[cut..]))
        }
        _ => (location, None),
    }
}

/// `m`'s key relative to a prefix of `prefix_parts` parts, joined with `/`.
fn relative_name(m: &object_store::ObjectMeta, prefix_parts: usize) -> String {
    let rel: Vec<String> = m
        .location
        .parts()
        .skip(prefix_parts)
        .map(|p| p.as_ref().to_string())
        .collect();
    rel.join("/")
}

/// The shards of `spec` under `location`: those matching `pattern`, the one parquet file
/// named, those `dataset.json` lists (returned with the index), or every `*.parquet`.
fn list_shards(
    spec: &DatasetSpec,
    location: &Location,
    pattern: Option<&str>,
) -> Result<(Vec<Listed>, Option<DatasetIndex>), DataError> {
    let prefix_parts = location.key.parts().count();
    if let Some(pattern) = pattern {
        let glob = globset::GlobBuilder::new(pattern)
            .literal_separator(true)
            .build()
            .map_err(|e| DataError::Empty {
                location: spec.location.clone(),
                problem: format!("is not a valid glob ({e})"),
            })?
            .compile_matcher();
        let listed = location
            .list()?
            .into_iter()
            .filter_map(|m| {
                let rel = relative_name(&m, prefix_parts);
                glob.is_match(&rel).then_some((rel, m.location, m.size))
            })
            .collect();
        return Ok((listed, None));
    }
    if spec.location.ends_with(".parquet") {
        let meta = location.head(&location.key, &location.display)?;
        let name = location.key.filename().unwrap_or("shard").to_string();
        return Ok((vec![(name, location.key.clone(), meta.size)], None));
    }
    if let Some(raw) = location.get_optional(
        &location.child(INDEX_FILE),
        &location.display_child(INDEX_FILE),
    )? {
        let parsed: DatasetIndex = serde_json::from_slice(&raw).map_err(|e| DataError::Index {
            location: location.display_child(INDEX_FILE),
            problem: e.to_string(),
        })?;
        let files = parsed
            .shards
            .iter()
            .map(|s| (s.name.clone(), location.child(&s.name), s.bytes))
            .collect();
        return Ok((files, Some(parsed)));
    }
    let listed = location
        .list()?
        .into_iter()
        .filter(|m| m.location.extension() == Some("parquet"))
        .map(|m| (relative_name(&m, prefix_parts), m.location, m.size))
        .collect();
    Ok((listed, None))
}

/// The column to read: the recipe's tokens column, the index's pre-tokenized column
/// when it was made with `tokenizer`, else the text column.
fn choose_column(
    spec: &DatasetSpec,
    location: &Location,
    index: Option<&DatasetIndex>,
    tokenizer: &Tokenizer,
) -> Result<Column, DataError> {
    Ok(match (&spec.tokens_column, index) {
        (Some(c), _) => Column::Tokens(c.clone()),
        (None, Some(ix)) => match (&ix.tokens_column, &ix.tokenizer) {
            (Some(c), Some(fp)) if fp == tokenizer.fingerprint() => Column::Tokens(c.clone()),
            (Some(_), Some(_)) if ix.text_column.is_none() => {
                return Err(DataError::Index {
                    location: location.display_child(INDEX_FILE),
                    problem: "was pre-tokenized with a different tokenizer than data.tokenizer \
                              and has no text column; re-run `catapult data prepare` with \
                              --tokenizer set to the recipe's tokenizer"
                        .into(),
                })
            }
            _ => Column::Text(spec.text_column.clone()),
        },
        (None, None) => Column::Text(spec.text_column.clone()),
    })
}

impl Dataset {
    /// Opens the dataset: lists its shards (or reads its index) and checks the column.
    pub fn open(
        spec: &DatasetSpec,
        storage: &StorageOptions,
        tokenizer: &Tokenizer,
    ) -> Result<Self, DataError> {
        let (base, pattern) = split_glob(&spec.location);
        let base = if base.is_empty() { "." } else { base };
        if !base.contains("://") && !std::path::Path::new(base).exists() {
            return Err(DataError::Empty {
                location: spec.location.clone(),
                problem:
                    "does not exist; create a dataset with `catapult data prepare TEXT... -o DIR` \
                          or point data.path at a parquet file, directory or URL"
                        .into(),
            });
        }
        if pattern.is_none()
            && !base.contains("://")
            && !base.ends_with(".parquet")
            && std::path::Path::new(base).is_file()
        {
            return Err(DataError::Empty {
                location: spec.location.clone(),
                problem: "is a file but not a parquet shard (*.parquet); a dataset is a \
                          directory of shards, one shard or a glob: turn text into one with \
                          `catapult data prepare FILE -o DIR`"
                    .into(),
            });
        }
        let location = Location::open(base, storage)?;
        let empty = |problem: String| DataError::Empty {
            location: spec.location.clone(),
            problem,
        };
        let (listed, index) = list_shards(spec, &location, pattern)?;
        if listed.is_empty() {
            return Err(empty(
                "holds no *.parquet shards (and no dataset.json); create them with \
                 `catapult data prepare TEXT... -o DIR` or fix data.path"
                    .into(),
            ));
        }
        let column = choose_column(spec, &location, index.as_ref(), tokenizer)?;
        let mut shards: Vec<Shard> = listed
            .into_iter()
            .map(|(name, key, size)| Shard {
                name,
                key,
                size,
                row_groups: Vec::new(),
                row_group_bytes: Vec::new(),
                row_offset: 0,
                blake3: None,
                metadata: OnceLock::new(),
                opening: std::sync::Mutex::new(()),
            })
            .collect();
        let mut dataset = Self {
            name: spec.name.clone(),
            location,
            shards: Vec::new(),
            column,
            index,
            verify: spec.verify,
        };
        match &dataset.index {
            Some(ix) => dataset.layout_from_index(ix, &mut shards)?,
            None => dataset.layout_from_footers(&mut shards)?,
        }
        let mut offset = 0u64;
        for shard in &mut shards {
            shard.row_offset = offset;
            offset = shard
                .row_groups
                .iter()
                .try_fold(offset, |acc, &r| acc.checked_add(r))
                .ok_or_else(|| DataError::Index {
                    location: dataset.location.display_child(&shard.name),
                    problem: "its row counts overflow 64 bits; re-run `catapult data prepare`"
                        .into(),
                })?;
        }
        if offset == 0 {
            return Err(empty("has shards but no rows".into()));
        }
        dataset.shards = shards;
        Ok(dataset)
    }

    /// Takes the row groups of `shards` from the index `ix`, after checking that it lists
    /// them consistently and has the column to read.
    fn layout_from_index(&self, ix: &DatasetIndex, shards: &mut [Shard]) -> Result<(), DataError> {
        if let Some(ixs) = ix
            .shards
            .iter()
            .find(|s| s.row_groups.len() != s.row_group_bytes.len())
        {
            return Err(DataError::Index {
                location: self.location.display_child(INDEX_FILE),
                problem: format!("shard {} lists row groups inconsistently", ixs.name),
            });
        }
        let columns = [&ix.text_column, &ix.tokens_column];
        let wanted = self.column.name().to_string();
        if !columns
            .iter()
            .any(|c| c.as_deref() == Some(wanted.as_str()))
        {
            return Err(DataError::Column {
                location: self.location.display_child(INDEX_FILE),
                problem: format!(
                    "the dataset has no column `{wanted}` (columns: {})",
                    columns
                        .iter()
                        .filter_map(|c| c.as_deref())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
        for (shard, ixs) in shards.iter_mut().zip(&ix.shards) {
            shard.row_groups = ixs.row_groups.clone();
            shard.row_group_bytes = ixs.row_group_bytes.clone();
            shard.blake3 = self.verify.then(|| ixs.blake3.clone());
        }
        Ok(())
    }

    /// Reads every footer (8 at a time), checks the column in each and takes the row
    /// groups from them.
    fn layout_from_footers(&self, shards: &mut [Shard]) -> Result<(), DataError> {
        let loaded = load_all_metadata(&self.location, shards)?;
        for (shard, meta) in shards.iter_mut().zip(loaded) {
            let display = self.location.display_child(&shard.name);
            let root = check_column(&meta, &self.column, &display)?;
            let md = meta.metadata();
            for rg in md.row_groups() {
                shard.row_groups.push(rg.num_rows() as u64);
                let bytes: i64 = rg
                    .columns()
                    .iter()
                    // A column path always has its root's name first.
                    .filter(|c| c.column_path().parts()[0] == root)
                    .map(|c| c.uncompressed_size())
                    .sum();
                shard.row_group_bytes.push(bytes.max(0) as u64);
            }
            let _ = shard.metadata.set(meta);
        }
        Ok(())
    }

    /// Where the dataset lives, as the user wrote it.
    pub fn location(&self) -> &str {
        &self.location.display
    }

    /// Every row group as (shard, row group), in order.
    pub fn units(&self) -> Vec<(u32, u32)> {
        self.shards
            .iter()
            .enumerate()
            .flat_map(|(s, shard)| (0..shard.row_groups.len()).map(move |g| (s as u32, g as u32)))
            .collect()
    }

    /// Rows in the whole dataset.
    pub fn rows(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.row_groups.iter().sum::<u64>())
            .sum()
    }

    /// A hash of what identifies the data: shard names, sizes and row-group layout.
    pub fn fingerprint(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(self.name.as_bytes());
        for s in &self.shards {
            h.update(s.name.as_bytes());
            h.update(&s.size.to_le_bytes());
            for r in &s.row_groups {
                h.update(&r.to_le_bytes());
            }
        }
        h.update(self.column.name().as_bytes());
        h.finalize().to_hex()[..16].to_string()
    }

    /// Estimated bytes a tokenized row group occupies in memory (text decoded plus ids).
    /// `shard` and `row_group` come from `units`.
    pub fn unit_cost(&self, shard: u32, row_group: u32) -> u64 {
        let bytes = self.shards[shard as usize].row_group_bytes[row_group as usize];
        // Saturating: an index may claim any size.
        match self.column {
            // Text and up to one u32 id per byte.
            Column::Text(_) => bytes.saturating_mul(5).saturating_add(4096),
            Column::Tokens(_) => bytes.saturating_mul(2).saturating_add(4096),
        }
    }

    /// Shard `shard`, when it has row group `row_group`.
    fn shard(&self, shard: u32, row_group: u32) -> Result<&Shard, DataError> {
        self.shards
            .get(shard as usize)
            .filter(|s| (row_group as usize) < s.row_groups.len())
            .ok_or_else(|| DataError::Config {
                problem: format!(
                    "dataset `{}` has no row group {row_group} in shard {shard} ({} shards); \
                     read the units `Dataset::units` lists",
                    self.name,
                    self.shards.len()
                ),
            })
    }

    fn metadata(&self, shard: &Shard) -> Result<ArrowReaderMetadata, DataError> {
        if let Some(m) = shard.metadata.get() {
            return Ok(m.clone());
        }
        let _opening = shard
            .opening
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Another worker may have opened it while this one waited.
        if let Some(m) = shard.metadata.get() {
            return Ok(m.clone());
        }
        let display = self.location.display_child(&shard.name);
        if self.index.is_some() {
            let actual = self.location.head(&shard.key, &display)?.size;
            if actual != shard.size {
                return Err(DataError::Index {
                    location: display,
                    problem: format!(
                        "is {actual} bytes but dataset.json says {}: the shards changed after the \
                         index was written; re-run `catapult data prepare`",
                        shard.size
                    ),
                });
            }
            if let Some(expected) = &shard.blake3 {
                let found = self.location.blake3(&shard.key, &display)?;
                if found != *expected {
                    return Err(DataError::Index {
                        location: display,
                        problem: format!(
                            "has BLAKE3 {found} but dataset.json says {expected}: the shard was \
                             damaged or replaced after the index was written; re-run `catapult \
                             data prepare` (or copy the shard again)"
                        ),
                    });
                }
            }
        }
        let meta = load_metadata(
            &self.location.store,
            &shard.key,
            shard.size,
            &display,
            &self.location.options,
        )?;
        check_column(&meta, &self.column, &display)?;
        let _ = shard.metadata.set(meta);
        Ok(shard.metadata.get().expect("just set").clone())
    }

    /// The row group's batches of the read column.
    fn fetch(
        &self,
        shard: u32,
        row_group: u32,
    ) -> Result<Vec<arrow_array::RecordBatch>, DataError> {
        let sh = self.shard(shard, row_group)?;
        let display = self.location.display_child(&sh.name);
        let meta = self.metadata(sh)?;
        let in_file = meta.metadata().num_row_groups();
        if row_group as usize >= in_file {
            return Err(DataError::Index {
                location: display,
                problem: format!(
                    "has {in_file} row groups, but dataset.json lists {}: the shards changed \
                     after the index was written; re-run `catapult data prepare`",
                    sh.row_groups.len()
                ),
            });
        }
        let root = meta
            .schema()
            .index_of(self.column.name())
            .expect("column checked when the metadata was loaded");
        let mask = ProjectionMask::roots(meta.parquet_schema(), [root]);
        let store = self.location.store.clone();
        parquet_retry(
            &self.location.options,
            &display,
            &format!("reading row group {row_group}"),
            || {
                let reader = StoreReader {
                    store: store.clone(),
                    key: sh.key.clone(),
                    size: sh.size,
                };
                let builder =
                    ParquetRecordBatchStreamBuilder::new_with_metadata(reader, meta.clone())
                        .with_projection(mask.clone())
                        .with_row_groups(vec![row_group as usize])
                        .with_batch_size(4096);
                crate::store::runtime()
                    .block_on(async move { builder.build()?.try_collect::<Vec<_>>().await })
            },
        )
    }

    /// The text of every non-null row of a row group (text column only).
    pub fn read_texts(&self, shard: u32, row_group: u32) -> Result<Vec<String>, DataError> {
        if let Column::Tokens(name) = &self.column {
            return Err(DataError::Column {
                location: self.location.display.clone(),
                problem: format!(
                    "is read from its token column `{name}`, which holds ids, not text; \
                     texts need a dataset read from its text column (one not pre-tokenized \
                     with the tokenizer it was opened with)"
                ),
            });
        }
        let mut out = Vec::new();
        for batch in self.fetch(shard, row_group)? {
            let col = batch.column(0);
            for i in 0..col.len() {
                if col.is_valid(i) {
                    out.push(text_value(col, i).to_string());
                }
            }
        }
        Ok(out)
    }

    /// Reads row group `row_group` of shard `shard`, keeps the documents of `split` and
    /// tokenizes them.
    pub fn read(
        &self,
        shard: u32,
        row_group: u32,
        split: Split,
        valid_fraction: f64,
        tokenizer: &Tokenizer,
    ) -> Result<Documents, DataError> {
        let sh = self.shard(shard, row_group)?;
        let display = self.location.display_child(&sh.name);
        let batches = self.fetch(shard, row_group)?;
        let first_row = sh.row_offset + sh.row_groups[..row_group as usize].iter().sum::<u64>();
        let mut out = Documents::default();
        let mut row = first_row;
        for batch in batches {
            let col: &ArrayRef = batch.column(0);
            for i in 0..col.len() {
                let global = row;
                row += 1;
                if col.is_null(i)
                    || is_validation_document(global as usize, valid_fraction)
                        != (split == Split::Validation)
                {
                    continue;
                }
                let mut ids = Vec::new();
                match &self.column {
                    Column::Text(_) => {
                        tokenizer.encode_document(text_value(col, i), &mut ids)?;
                    }
                    Column::Tokens(_) => {
                        let values = match col.data_type() {
                            DataType::LargeList(_) => col.as_list::<i64>().value(i),
                            _ => col.as_list::<i32>().value(i),
                        };
                        push_ids(&values, &mut ids, tokenizer, &display)?;
                        ids.push(tokenizer.eod());
                    }
                }
                out.docs.push((global, ids));
            }
        }
        let expected = sh.row_groups[row_group as usize];
        if row - first_row != expected {
            return Err(DataError::Index {
                location: display,
                problem: format!(
                    "row group {row_group} has {} rows, but {} says {expected}: the shards \
                     changed after the dataset was opened or indexed; re-run `catapult data \
                     prepare`",
                    row - first_row,
                    if self.index.is_some() {
                        INDEX_FILE
                    } else {
                        "its footer"
                    }
                ),
            });
        }
        Ok(out)
    }
}

fn text_value(col: &ArrayRef, i: usize) -> &str {
    match col.data_type() {
        DataType::Utf8 => col.as_string::<i32>().value(i),
        DataType::LargeUtf8 => col.as_string::<i64>().value(i),
        _ => col.as_string_view().value(i),
    }
}

/// Parquet's view of one object: ranged reads through the object store.
struct StoreReader {
    store: std::sync::Arc<dyn object_store::ObjectStore>,
    key: ObjPath,
    size: u64,
}

fn external(e: object_store::Error) -> parquet::errors::ParquetError {
    parquet::errors::ParquetError::External(Box::new(e))
}

impl AsyncFileReader for StoreReader {
    fn get_bytes(
        &mut self,
        range: std::ops::Range<u64>,
    ) -> futures::future::BoxFuture<'_, parquet::errors::Result<bytes::Bytes>> {
        use object_store::ObjectStoreExt;
        Box::pin(async move {
            self.store
                .get_range(&self.key, range)
                .await
                .map_err(external)
        })
    }

    fn get_byte_ranges(
        &mut self,
        ranges: Vec<std::ops::Range<u64>>,
    ) -> futures::future::BoxFuture<'_, parquet::errors::Result<Vec<bytes::Bytes>>> {
        Box::pin(async move {
            self.store
                .get_ranges(&self.key, &ranges)
                .await
                .map_err(external)
        })
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> futures::future::BoxFuture<'a, parquet::errors::Result<std::sync::Arc<ParquetMetaData>>>
    {
        Box::pin(async move {
            let size = self.size;
            let reader = ParquetMetaDataReader::new()
                .with_metadata_options(options.map(|o| o.metadata_options().clone()))
                .with_prefetch_hint(Some(64 << 10));
            reader
                .load_and_finish(self, size)
                .await
                .map(std::sync::Arc::new)
        })
    }
}

/// Appends integer ids as u32; a value that does not fit becomes u32::MAX, which the
/// vocabulary check then reports.
fn widen<T: arrow_array::types::ArrowPrimitiveType>(values: &ArrayRef, ids: &mut Vec<u32>)
where
    T::Native: TryInto<u32>,
{
    ids.extend(
        values
            .as_primitive::<T>()
            .values()
            .iter()
            .map(|&v| v.try_into().unwrap_or(u32::MAX)),
    );
}

fn push_ids(
    values: &ArrayRef,
    ids: &mut Vec<u32>,
    tokenizer: &Tokenizer,
    display: &str,
) -> Result<(), DataError> {
    match values.data_type() {
        DataType::UInt32 => widen::<UInt32Type>(values, ids),
        DataType::UInt16 => widen::<UInt16Type>(values, ids),
        DataType::Int32 => widen::<Int32Type>(values, ids),
        DataType::Int64 => widen::<Int64Type>(values, ids),
        other => unreachable!("column type {other} checked at open"),
    }
    if let Some(bad) = ids
        .iter()
        .find(|&&id| id as usize >= tokenizer.vocab_size())
    {
        return Err(DataError::Column {
            location: display.to_string(),
            problem: format!(
                "holds token id {bad}, outside the tokenizer's {} ids: the data was tokenized with \
                 another tokenizer",
                tokenizer.vocab_size()
            ),
        });
    }
    Ok(())
}

/// Reads every shard's footer, 8 at a time (the results keep shard order).
fn load_all_metadata(
    location: &Location,
    shards: &[Shard],
) -> Result<Vec<ArrowReaderMetadata>, DataError> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let slots: Vec<std::sync::Mutex<Option<Result<ArrowReaderMetadata, DataError>>>> =
        shards.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..shards.len().min(8) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(shard) = shards.get(i) else { break };
                let display = location.display_child(&shard.name);
                let result = load_metadata(
                    &location.store,
                    &shard.key,
                    shard.size,
                    &display,
                    &location.options,
                );
                *slots[i].lock().expect("slot") = Some(result);
            });
        }
    });
    slots
        .into_iter()
        .map(|slot| {
            slot.into_inner()
                .expect("slot")
                .expect("every shard was loaded")
        })
        .collect()
}

/// The retry loop for parquet reads: transient store errors are retried, and a final
/// failure is reported as an unreadable parquet file naming `display`.
fn parquet_retry<T>(
    options: &StorageOptions,
    display: &str,
    what: &str,
    op: impl FnMut() -> Result<T, parquet::errors::ParquetError>,
) -> Result<T, DataError> {
    retry_with(
        options,
        display,
        what,
        (parquet_transient, parquet_advice),
        op,
    )
    .map_err(|e| match e {
        DataError::Store { location, reason } => DataError::Parquet { location, reason },
        other => other,
    })
}

/// A store's failure gets the store's advice; anything else is in the file itself.
fn parquet_advice(e: &parquet::errors::ParquetError) -> &'static str {
    match e {
        parquet::errors::ParquetError::External(inner)
            if inner.downcast_ref::<object_store::Error>().is_some() =>
        {
            crate::store::STORE_ADVICE
        }
        _ => {
            "the file is damaged or not valid parquet; replace it, or re-run `catapult data \
             prepare` (shards with a dataset.json are checked against its BLAKE3 unless \
             data.verify_shards is false)"
        }
    }
}

fn parquet_transient(e: &parquet::errors::ParquetError) -> bool {
    match e {
        parquet::errors::ParquetError::External(inner) => inner
            .downcast_ref::<object_store::Error>()
            .is_some_and(crate::store::is_transient),
        _ => false,
    }
}

fn load_metadata(
    store: &std::sync::Arc<dyn object_store::ObjectStore>,
    key: &ObjPath,
    size: u64,
    display: &str,
    options: &StorageOptions,
) -> Result<ArrowReaderMetadata, DataError> {
    parquet_retry(options, display, "reading the parquet footer", || {
        let mut reader = StoreReader {
            store: store.clone(),
            key: key.clone(),
            size,
        };
        crate::store::runtime().block_on(async move {
            ArrowReaderMetadata::load_async(&mut reader, ArrowReaderOptions::new()).await
        })
    })
}

/// Checks that `column` exists with a usable type; returns its name.
fn check_column(
    meta: &ArrowReaderMetadata,
    column: &Column,
    display: &str,
) -> Result<String, DataError> {
    let schema = meta.schema();
    let name = column.name();
    let columns = || {
        schema
            .fields()
            .iter()
            .map(|f| format!("{} ({})", f.name(), f.data_type()))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let field = schema
        .field_with_name(name)
        .map_err(|_| DataError::Column {
            location: display.to_string(),
            problem: format!("has no column `{name}` (columns: {})", columns()),
        })?;
    let ok = match column {
        Column::Text(_) => matches!(
            field.data_type(),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        ),
        Column::Tokens(_) => match field.data_type() {
            DataType::List(item) | DataType::LargeList(item) => matches!(
                item.data_type(),
                DataType::UInt32 | DataType::UInt16 | DataType::Int32 | DataType::Int64
            ),
            _ => false,
        },
    };
    if !ok {
        let wanted = match column {
            Column::Text(_) => "a string column (utf8)",
            Column::Tokens(_) => "a list of integer token ids",
        };
        return Err(DataError::Column {
            location: display.to_string(),
            problem: format!(
                "column `{name}` has type {}, but the pipeline needs {wanted}",
                field.data_type()
            ),
        });
    }
    Ok(name.to_string())
}
