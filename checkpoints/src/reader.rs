//! Reading a sharded checkpoint without holding it. `Loaded` knows, from each rank's
//! state file and its tensor file's header, which bytes of which file hold each run of
//! each tensor's elements, and reads only the ranges a caller asks for (vectored ranged
//! reads on object stores), whatever world, expert-parallel size or shard mode wrote
//! them. This module also owns verification (every file's size from one listing, the
//! BLAKE3 of the state files always and of the tensor files with `verify`, split over
//! the ranks that load together) and finding the newest checkpoint that loads, with
//! every loading rank agreeing on it.

use crate::safetensors::{header_len, parse_header, Dtype, HostTensor};
use crate::sharded::{rank_file, step_dir, Checkpoints, Manifest, Piece, ShardError};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Who loads: one process that checks everything, or one rank of a world that loads
/// the same checkpoint together.
pub struct Reader<'a> {
    /// Check the tensor files' BLAKE3 hashes (the small state files' always are).
    pub verify: bool,
    /// This loader's rank: it hashes the tensor files listed at positions `i` of the
    /// manifest with `i % world == rank`, so the world reads each file once.
    pub rank: usize,
    /// How many ranks load together.
    pub world: usize,
    /// Given this rank's problem (None: it loaded), every rank's first problem with
    /// that rank, the same answer on every rank (a collective for a world).
    pub agree: &'a dyn Fn(Option<String>) -> Option<(usize, String)>,
}

fn alone_agree(problem: Option<String>) -> Option<(usize, String)> {
    problem.map(|p| (0, p))
}

impl Reader<'static> {
    /// A process loading on its own.
    pub fn alone(verify: bool) -> Self {
        Reader {
            verify,
            rank: 0,
            world: 1,
            agree: &alone_agree,
        }
    }
}

/// A run of a tensor's elements stored in one rank's file.
#[derive(Debug, Clone)]
struct Run {
    file: String,
    rank: usize,
    /// First element of the full tensor.
    start: usize,
    /// Elements.
    len: usize,
    /// Where its bytes start in the file.
    offset: u64,
}

/// The byte ranges of one file a read needs (of rank `rank`'s file), and where each
/// lands in the result.
struct FileReads {
    rank: usize,
    ranges: Vec<Range<u64>>,
    dests: Vec<usize>,
}

/// A tensor of a checkpoint: its type, full shape, and where its elements are stored.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Element type.
    pub dtype: Dtype,
    /// The full tensor's shape.
    pub shape: Vec<usize>,
    runs: Vec<Run>,
}

impl TensorInfo {
    /// Elements of the full tensor.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A checkpoint opened for reading: its manifest, each rank's state, and an index of
/// where every tensor's elements are; tensors are read on request.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The manifest.
    pub manifest: Manifest,
    /// Where it was loaded from.
    pub location: String,
    /// The state of each rank that wrote files, in rank order.
    pub states: Vec<serde_json::Value>,
    /// Newer steps `load_newest` passed over because they did not load, with why: the
    /// run that resumes from this one quarantines them before its first save.
    pub passed_over: Vec<(u64, String)>,
    tensors: BTreeMap<String, TensorInfo>,
    store: Checkpoints,
    read: Arc<AtomicU64>,
}

/// A rank's state file: its pieces (version 2) or dim-0 slices (version 1) and state.
#[derive(Deserialize)]
struct StateFile {
    #[serde(default)]
    pieces: BTreeMap<String, Piece>,
    #[serde(default)]
    slices: BTreeMap<String, LegacySlice>,
    #[serde(default)]
    state: serde_json::Value,
}

/// Version 1's record of a dim-0 slice: its first row and the full tensor's rows.
#[derive(Deserialize)]
struct LegacySlice {
    start: usize,
    full: usize,
}

impl Loaded {
    /// The tensors' names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The type and full shape of `name`.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// Bytes of tensor data read so far (by every clone of this checkpoint).
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    fn invalid(&self, problem: String) -> ShardError {
        ShardError::Invalid {
            location: self.location.clone(),
            problem,
        }
    }

    /// Elements `range` of `name` (row-major), flat: only the bytes that hold them are
    /// read.
    pub fn read(&self, name: &str, range: Range<usize>) -> Result<HostTensor, ShardError> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| self.invalid(format!("no tensor {name}")))?;
        if range.start > range.end || range.end > t.numel() {
            return Err(self.invalid(format!(
                "elements {range:?} of {name} asked for, it has {}",
                t.numel()
            )));
        }
        let size = t.dtype.size();
        // Per file: the byte ranges to read and where each goes in the result.
        let mut by_file: BTreeMap<&str, FileReads> = BTreeMap::new();
        for run in &t.runs {
            let (a, b) = (
                run.start.max(range.start),
                (run.start + run.len).min(range.end),
            );
            if a >= b {
                continue;
            }
            let at = run.offset + ((a - run.start) * size) as u64;
            let entry = by_file.entry(run.file.as_str()).or_insert(FileReads {
                rank: run.rank,
                ranges: Vec::new(),
                dests: Vec::new(),
            });
            entry.ranges.push(at..at + ((b - a) * size) as u64);
            entry.dests.push((a - range.start) * size);
        }
        let dir = step_dir(self.manifest.step);
        let mut data = Vec::new();
        let mut single = None;
        for (
            file,
            FileReads {
                rank,
                ranges,
                dests,
            },
        ) in by_file
        {
            let (key, display) = self.store.path(&format!("{dir}/{file}"));
            let got = self.store.location.get_ranges(&key, &display, &ranges)?;
            for ((r, &dest), bytes) in ranges.iter().zip(&dests).zip(got) {
                let n = (r.end - r.start) as usize;
                if bytes.len() != n {
                    return Err(ShardError::Corrupt {
                        location: self.location.clone(),
                        file: file.to_string(),
                        rank,
                        problem: format!("bytes {r:?} read back as {} bytes", bytes.len()),
                    });
                }
                if n == range.len() * size {
                    // One piece holds it all: no copy.
                    single = Some(bytes);
                    continue;
                }
                if data.is_empty() {
                    data = vec![0u8; range.len() * size];
                }
                data[dest..dest + n].copy_from_slice(&bytes);
            }
        }
        let data = match single {
            Some(b) => b,
            None => data.into(),
        };
        self.read.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(HostTensor {
            name: name.to_string(),
            dtype: t.dtype,
            shape: vec![range.len()],
            data,
        })
    }

    /// All of `name`, in its shape.
    pub fn whole(&self, name: &str) -> Result<HostTensor, ShardError> {
        let numel = self.info(name).map_or(0, TensorInfo::numel);
        let mut h = self.read(name, 0..numel)?;
        h.shape = self.tensors[name].shape.clone();
        Ok(h)
    }

    /// The rows of `name` that part `part` of `parts` owns under an even dim-0 split
    /// (an expert-parallel rank's experts), in their shape. None when `name` has no
    /// rows or they do not split so.
    pub fn rows(
        &self,
        name: &str,
        part: usize,
        parts: usize,
    ) -> Result<Option<HostTensor>, ShardError> {
        let Some(t) = self.tensors.get(name) else {
            return Err(self.invalid(format!("no tensor {name}")));
        };
        let rows = t.shape.first().copied().unwrap_or(0);
        if parts == 0 || part >= parts || rows == 0 || rows % parts != 0 {
            return Ok(None);
        }
        let per = rows / parts;
        let row = t.numel() / rows;
        let mut h = self.read(name, part * per * row..(part + 1) * per * row)?;
        h.shape = t.shape.clone();
        h.shape[0] = per;
        Ok(Some(h))
    }
}

impl Checkpoints {
    /// Opens `step` for a process loading on its own, checking every file's size and
    /// (with `verify`) every hash.
    pub fn load(&self, step: u64, verify: bool) -> Result<Loaded, ShardError> {
        self.load_as(step, &Reader::alone(verify))
    }

    /// Checks every file of `step` against the manifest (hashes streamed, never whole
    /// in memory).
    pub fn verify(&self, step: u64) -> Result<Manifest, ShardError> {
        Ok(self.load(step, true)?.manifest)
    }

    /// Opens `step` as `reader`: every loading rank gets the same answer (one rank's
    /// failure fails them all, naming it).
    pub fn load_as(&self, step: u64, reader: &Reader) -> Result<Loaded, ShardError> {
        let mine = self.open_step(step, reader);
        let verdict = (reader.agree)(mine.as_ref().err().map(|e| e.to_string()));
        match (mine, verdict) {
            (Err(e), _) => Err(e),
            (Ok(_), Some((rank, problem))) => Err(ShardError::Peer { rank, problem }),
            (Ok(l), None) => Ok(l),
        }
    }

    /// The newest checkpoint that loads (and verifies, with `verify`). A broken one is
    /// skipped with a warning on stderr naming the file and rank, unless `fallback` is
    /// false, in which case its error is returned. None when there is no checkpoint.
    pub fn load_newest(&self, verify: bool, fallback: bool) -> Result<Option<Loaded>, ShardError> {
        self.load_newest_as(&Reader::alone(verify), fallback)
    }

    /// `load_newest` for ranks loading together: they skip the same steps.
    pub fn load_newest_as(
        &self,
        reader: &Reader,
        fallback: bool,
    ) -> Result<Option<Loaded>, ShardError> {
        let steps = self.steps()?;
        let mut passed_over = Vec::new();
        for &step in steps.iter().rev() {
            match self.load_as(step, reader) {
                Ok(mut l) => {
                    l.passed_over = passed_over;
                    return Ok(Some(l));
                }
                Err(e) if fallback => {
                    if reader.rank == 0 {
                        catapult_data::log_line!(
                            "warning: skipping checkpoint {}: {e}; falling back to an earlier one",
                            step_dir(step)
                        );
                    }
                    passed_over.push((step, e.to_string()));
                }
                Err(e) => return Err(e),
            }
        }
        if steps.is_empty() {
            Ok(None)
        } else {
            Err(ShardError::Invalid {
                location: self.root().to_string(),
                problem: format!(
                    "none of its {} checkpoint(s) can be loaded (see the warnings above); repair or \
                     remove them, or start a new run with another checkpoint.dir",
                    steps.len()
                ),
            })
        }
    }

    /// This rank's part of opening `step`: sizes, its share of the hashes, every
    /// rank's state and header, and the index of where each tensor's elements are.
    fn open_step(&self, step: u64, reader: &Reader) -> Result<Loaded, ShardError> {
        let manifest = self.manifest(step)?;
        let dir = step_dir(step);
        let location = self.location.display_child(&dir);
        let invalid = |problem: String| ShardError::Invalid {
            location: location.clone(),
            problem,
        };
        let ranks: std::collections::BTreeSet<usize> =
            manifest.files.iter().map(|f| f.rank).collect();
        if ranks.is_empty() {
            return Err(invalid(
                "the manifest lists no files; the checkpoint holds nothing to load: resume from \
                 an earlier one or start a new run"
                    .into(),
            ));
        }
        self.check_files(&manifest, reader)?;
        let mut states = Vec::with_capacity(ranks.len());
        let mut tensors: BTreeMap<String, TensorInfo> = BTreeMap::new();
        for rank in ranks {
            let file: StateFile = {
                let name = rank_file(rank, "json");
                let bytes = self.get(&format!("{dir}/{name}"))?;
                // Small, and read anyway: always checked against the manifest.
                if let Some(f) = manifest.files.iter().find(|f| f.name == name) {
                    let found = blake3::hash(&bytes).to_hex().to_string();
                    if found != f.blake3 {
                        return Err(ShardError::Corrupt {
                            location: location.clone(),
                            file: name,
                            rank,
                            problem: format!("BLAKE3 {found}, the manifest says {}", f.blake3),
                        });
                    }
                }
                serde_json::from_slice(&bytes)
                    .map_err(|e| invalid(format!("rank {rank}'s state {name}: {e}")))?
            };
            states.push(file.state.clone());
            self.index_rank(&manifest, rank, &file, &mut tensors)?;
        }
        for (name, t) in &mut tensors {
            t.runs.sort_by_key(|r| r.start);
            let mut next = 0;
            for r in &t.runs {
                if r.start != next {
                    return Err(invalid(format!(
                        "the pieces of {name} do not tile its {} elements: rank {}'s piece \
                         starts at element {} where {next} was expected",
                        t.numel(),
                        r.rank,
                        r.start
                    )));
                }
                next += r.len;
            }
            if next != t.numel() {
                return Err(invalid(format!(
                    "the pieces of {name} cover {next} of its {} elements",
                    t.numel()
                )));
            }
        }
        Ok(Loaded {
            manifest,
            location,
            states,
            passed_over: Vec::new(),
            tensors,
            store: self.clone(),
            read: Arc::default(),
        })
    }

    /// Every file of `manifest` against the listing's sizes, and this reader's share of
    /// the tensor files' hashes (with `verify`).
    fn check_files(&self, manifest: &Manifest, reader: &Reader) -> Result<(), ShardError> {
        let dir = step_dir(manifest.step);
        let listing = self.listing()?;
        for (i, f) in manifest.files.iter().enumerate() {
            let corrupt = |problem: String| ShardError::Corrupt {
                location: self.location.display_child(&dir),
                file: f.name.clone(),
                rank: f.rank,
                problem,
            };
            let rel = format!("{dir}/{}", f.name);
            match listing.get(&rel) {
                None => return Err(corrupt("missing".into())),
                Some(&n) if n != f.bytes => {
                    return Err(corrupt(format!("{n} bytes, the manifest says {}", f.bytes)))
                }
                _ => {}
            }
            // The state files are hashed where they are read (`open_step`).
            let tensors = f.name.ends_with(".safetensors");
            if tensors && reader.verify && i % reader.world.max(1) == reader.rank {
                let (key, display) = self.path(&rel);
                let found = self.location.blake3(&key, &display)?;
                if found != f.blake3 {
                    return Err(corrupt(format!(
                        "BLAKE3 {found}, the manifest says {}",
                        f.blake3
                    )));
                }
            }
        }
        Ok(())
    }

    /// Adds rank `rank`'s stored tensors to the index: from its tensor file's header
    /// (read with ranged reads) and the pieces its state file records.
    fn index_rank(
        &self,
        manifest: &Manifest,
        rank: usize,
        state: &StateFile,
        tensors: &mut BTreeMap<String, TensorInfo>,
    ) -> Result<(), ShardError> {
        let dir = step_dir(manifest.step);
        let location = self.location.display_child(&dir);
        let file = rank_file(rank, "safetensors");
        let Some(entry) = manifest.files.iter().find(|f| f.name == file) else {
            return Err(ShardError::Invalid {
                location,
                problem: format!("rank {rank} has no tensor file"),
            });
        };
        let bad = |problem| ShardError::Tensors {
            location: location.clone(),
            file: file.clone(),
            rank,
            problem,
        };
        let (key, display) = self.path(&format!("{dir}/{file}"));
        let first = (self.location).get_range(&key, &display, 0..entry.bytes.min(64 << 10))?;
        let n = header_len(&first, entry.bytes).map_err(bad)?;
        let header = if 8 + n <= first.len() as u64 {
            first.slice(8..8 + n as usize)
        } else {
            self.location.get_range(&key, &display, 8..8 + n)?
        };
        for e in parse_header(&header, entry.bytes).map_err(bad)? {
            let len: usize = e.shape.iter().product();
            let (start, shape) = match (state.pieces.get(&e.name), state.slices.get(&e.name)) {
                (Some(p), _) => (p.start, p.shape.clone()),
                (None, Some(s)) => {
                    let row: usize = e.shape.iter().skip(1).product();
                    let mut shape = e.shape.clone();
                    if let Some(rows) = shape.first_mut() {
                        *rows = s.full;
                    }
                    (s.start * row, shape)
                }
                (None, None) => (0, e.shape.clone()),
            };
            let t = tensors.entry(e.name.clone()).or_insert_with(|| TensorInfo {
                dtype: e.dtype,
                shape: shape.clone(),
                runs: Vec::new(),
            });
            if t.dtype != e.dtype || t.shape != shape {
                return Err(ShardError::Invalid {
                    location: location.clone(),
                    problem: format!(
                        "rank {rank} holds {name} as {:?} {shape:?}, another rank as {:?} {:?}",
                        e.dtype,
                        t.dtype,
                        t.shape,
                        name = e.name
                    ),
                });
            }
            t.runs.push(Run {
                file: file.clone(),
                rank,
                start,
                len,
                offset: e.bytes.start,
            });
        }
        Ok(())
    }
}
