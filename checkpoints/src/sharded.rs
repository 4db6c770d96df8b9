//! The sharded checkpoint format, on local disk or an object store:
//!
//! ```text
//! ROOT/step-00000100/rank-00000.safetensors   the pieces of the model and optimizer
//!                                             tensors rank 0 owns, written by rank 0
//! ROOT/step-00000100/rank-00000.json          its non-tensor state, and where each
//!                                             piece sits in its full tensor
//! ROOT/step-00000100/manifest.json            written LAST: files, sizes, BLAKE3, recipe,
//!                                             world layout, step, tokens, version
//! ROOT/latest                                 "step-00000100", written after the manifest
//! ROOT/quarantine/step-00000090/...           a broken checkpoint moved aside, with
//!                                             reason.txt; no longer counted anywhere
//! ```
//!
//! A step directory without a readable manifest is not a checkpoint. Files are written
//! whole (local writes go to a temporary name and are renamed; object puts are atomic)
//! and the manifest is put-if-absent, so a crash at any point leaves the previous
//! checkpoint or the new one, never a loadable half. Every rank writes its own files
//! (`save_rank`) and reports their sizes and hashes; the committing rank writes the
//! manifest (`commit`) only when every rank's files are written, so no tensor data ever
//! passes through one process.

use crate::safetensors::{serialize_chunks, HostTensor, SafetensorsError};
use bytes::Bytes;
use catapult_data::{Location, StorageOptions};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Name of the manifest inside a step directory.
pub const MANIFEST: &str = "manifest.json";
/// Name of the pointer to the newest complete checkpoint.
pub const LATEST: &str = "latest";
/// Where broken checkpoints are moved (`ROOT/quarantine/step-N`), out of every count.
pub const QUARANTINE: &str = "quarantine";

/// Errors of the sharded format; each names the checkpoint, file and rank involved.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// Listing, reading or writing the store failed.
    #[error(transparent)]
    Store(#[from] catapult_data::DataError),
    /// A file's hash or size differs from the manifest's.
    #[error("{location}: rank {rank}'s file {file} is corrupt ({problem}); the checkpoint cannot be trusted")]
    Corrupt {
        /// The step directory.
        location: String,
        /// The file.
        file: String,
        /// The rank that wrote it.
        rank: usize,
        /// Expected and found.
        problem: String,
    },
    /// A rank's tensor file that is not valid safetensors (its size and hash matched the
    /// manifest, so the writer itself wrote it wrong, or verification was off).
    #[error(
        "{location}: rank {rank}'s file {file} is not valid safetensors ({problem}); the \
         checkpoint cannot be loaded: resume from an earlier one or start a new run"
    )]
    Tensors {
        /// The step directory.
        location: String,
        /// The file.
        file: String,
        /// The rank that wrote it.
        rank: usize,
        /// What is malformed.
        problem: SafetensorsError,
    },
    /// Another rank of the loading world could not load the checkpoint (its error).
    #[error("rank {rank}: {problem}")]
    Peer {
        /// The rank that failed.
        rank: usize,
        /// Its error.
        problem: String,
    },
    /// Something that is not a usable checkpoint.
    #[error("{location}: {problem}")]
    Invalid {
        /// The checkpoint or file.
        location: String,
        /// What is wrong and the fix.
        problem: String,
    },
}

/// Where a tensor a rank saved sits in the full tensor: a run of the full tensor's
/// elements (row-major), from `start`; the saved tensor's own elements give the length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// First element of the full tensor this piece holds.
    pub start: usize,
    /// Shape of the full tensor.
    pub shape: Vec<usize>,
}

/// What one rank saves.
#[derive(Debug, Clone, PartialEq)]
pub struct RankState {
    /// The rank.
    pub rank: usize,
    /// Tensors it owns: whole, or a piece recorded in `pieces` (then stored flat).
    pub tensors: Vec<HostTensor>,
    /// Tensors that are pieces of a larger tensor.
    pub pieces: BTreeMap<String, Piece>,
    /// Non-tensor state (data state, controller, RNG, scheduler position, ...).
    pub state: serde_json::Value,
}

/// One rank's place in the world.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankLayout {
    /// The rank.
    pub rank: usize,
    /// Its data-parallel index.
    pub data_parallel_rank: usize,
    /// The routed experts it owns, [start, end).
    pub experts: [usize; 2],
}

/// The world a checkpoint was written by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct World {
    /// Data-parallel size.
    pub data_parallel: usize,
    /// Expert-parallel size.
    pub expert_parallel: usize,
    /// Every rank, with the experts it owns.
    pub ranks: Vec<RankLayout>,
}

/// A file listed in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Name inside the step directory.
    pub name: String,
    /// The rank that wrote it.
    pub rank: usize,
    /// Size in bytes.
    pub bytes: u64,
    /// BLAKE3 of the contents.
    pub blake3: String,
}

/// The manifest: the checkpoint's table of contents, written last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `catapult-checkpoint`.
    pub format: String,
    /// Format version.
    pub version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// Tokens trained on.
    pub tokens: u64,
    /// Version of catapult that wrote it.
    pub catapult_version: String,
    /// Who owned what.
    pub world: World,
    /// Every file with size and hash.
    pub files: Vec<FileEntry>,
    /// The resolved recipe.
    pub recipe: serde_json::Value,
    /// How the checkpoint was made by model growth (source, factor, optimizer state);
    /// absent for checkpoints written by training.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub growth: Option<serde_json::Value>,
}

/// What the manifest says besides the files: written by rank 0 once every rank's
/// files are.
#[derive(Debug, Clone)]
pub struct ManifestHead {
    /// Optimizer steps completed.
    pub step: u64,
    /// Tokens trained on.
    pub tokens: u64,
    /// The resolved recipe.
    pub recipe: serde_json::Value,
    /// The world layout.
    pub world: World,
    /// Recorded in the manifest when the checkpoint comes from model growth.
    pub growth: Option<serde_json::Value>,
}

/// Everything `save` needs when one process writes every rank's files.
#[derive(Debug, Clone)]
pub struct SaveRequest {
    /// The manifest's head.
    pub head: ManifestHead,
    /// What each rank saves.
    pub ranks: Vec<RankState>,
}

/// `step-NNNNNNNN`.
pub fn step_dir(step: u64) -> String {
    format!("step-{step:08}")
}

/// A rank's two files (its tensors, its state and pieces as JSON), encoded: names and
/// chunks; nothing is hashed or written yet.
fn encode(r: &RankState) -> Vec<(String, Vec<Bytes>)> {
    let state = serde_json::to_vec_pretty(&serde_json::json!({
        "rank": r.rank,
        "pieces": r.pieces,
        "state": r.state,
    }))
    .expect("JSON values serialize");
    vec![
        (
            rank_file(r.rank, "safetensors"),
            serialize_chunks(&r.tensors),
        ),
        (rank_file(r.rank, "json"), vec![Bytes::from(state)]),
    ]
}

/// The manifest entry of one encoded file: its size and BLAKE3.
fn entry_of(name: &str, rank: usize, chunks: &[Bytes]) -> FileEntry {
    let mut hasher = blake3::Hasher::new();
    for c in chunks {
        hasher.update(c);
    }
    FileEntry {
        name: name.to_string(),
        rank,
        bytes: chunks.iter().map(|c| c.len() as u64).sum(),
        blake3: hasher.finalize().to_hex().to_string(),
    }
}

fn different_checkpoint(location: String) -> ShardError {
    ShardError::Invalid {
        location,
        problem: "a different checkpoint of this step already exists; delete it or write to \
                  another checkpoint.dir"
            .into(),
    }
}

pub(crate) fn rank_file(rank: usize, ext: &str) -> String {
    format!("rank-{rank:05}.{ext}")
}

/// The environment variable that arms the test crash points of every crate (this one's
/// `save:` and `step:` points, the trainer's `kill:`, `hang:` and `sdc:` ones). The
/// trainer's `supervision::env` re-exports it with the rest of the launcher contract.
pub const FAULT_ENV: &str = "CATAPULT_FAULT";

/// Crash points for tests (`CATAPULT_FAULT=save:PHASE:STEP`, or `save:PHASE:STEP:RANK`
/// for one rank): the process kills itself with SIGKILL there. Phases: `mid-shard` (half
/// a rank's tensor file written under its final name), `before-manifest` (every rank's
/// files written), `mid-manifest` (half a manifest written).
fn fault(phase: &str, step: u64, rank: usize) -> bool {
    std::env::var(FAULT_ENV).is_ok_and(|f| {
        f == format!("save:{phase}:{step}") || f == format!("save:{phase}:{step}:{rank}")
    })
}

/// Crash point for tests: SIGKILL this process when `CATAPULT_FAULT` equals `point`
/// (e.g. `step:7`, after step 7's checkpoint was handed to the saver).
pub fn kill_self_on(point: &str) {
    if std::env::var(FAULT_ENV).is_ok_and(|f| f == point) {
        kill_self();
    }
}

/// Ends the process at once, as a crash or an OOM killer would.
pub fn kill_self() -> ! {
    // SAFETY: kill(2) on our own pid with SIGKILL has no memory effects.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    unreachable!("SIGKILL cannot be caught")
}

/// A checkpoint root: a local directory or an object-store prefix.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    pub(crate) location: Location,
}

impl Checkpoints {
    /// Opens the root (nothing is created until a save).
    pub fn open(root: &str, storage: &StorageOptions) -> Result<Self, ShardError> {
        Ok(Self {
            location: Location::open(root, storage)?,
        })
    }

    /// Opens what a user names: a root, or one step directory (`.../step-00000100`),
    /// returning its root and step.
    pub fn open_path(
        path: &str,
        storage: &StorageOptions,
    ) -> Result<(Self, Option<u64>), ShardError> {
        let trimmed = path.trim_end_matches('/');
        let (parent, last) = trimmed.rsplit_once('/').unwrap_or((".", trimmed));
        match last
            .strip_prefix("step-")
            .and_then(|n| n.parse::<u64>().ok())
        {
            Some(step) => Ok((Self::open(parent, storage)?, Some(step))),
            None => Ok((Self::open(trimmed, storage)?, None)),
        }
    }

    /// The root, as given.
    pub fn root(&self) -> &str {
        &self.location.display
    }

    pub(crate) fn path(&self, rel: &str) -> (object_store::path::Path, String) {
        (self.location.child(rel), self.location.display_child(rel))
    }

    fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<(), ShardError> {
        let (key, display) = self.path(rel);
        Ok(self.location.put(&key, &display, bytes)?)
    }

    fn put_chunks(&self, rel: &str, chunks: Vec<Bytes>) -> Result<(), ShardError> {
        let (key, display) = self.path(rel);
        Ok(self.location.put_chunks(&key, &display, chunks)?)
    }

    pub(crate) fn get(&self, rel: &str) -> Result<Bytes, ShardError> {
        let (key, display) = self.path(rel);
        Ok(self.location.get(&key, &display)?)
    }

    /// Writes a checkpoint from one process: every rank's files, then the manifest
    /// (put-if-absent), then the `latest` pointer.
    pub fn save(&self, req: SaveRequest) -> Result<Manifest, ShardError> {
        let mut files = Vec::new();
        for r in &req.ranks {
            files.extend(self.save_rank(&req.head, r)?);
        }
        self.commit(req.head, files)
    }

    /// Writes rank `r`'s files of checkpoint `head` (its tensors and its state) and
    /// returns their manifest entries, for the rank that commits. A checkpoint of this
    /// step that already exists is never touched unless it is this one: the same head
    /// and the same files are rewritten (a resumed deterministic run; the write repairs
    /// a damaged file), anything else is refused.
    pub fn save_rank(
        &self,
        head: &ManifestHead,
        r: &RankState,
    ) -> Result<Vec<FileEntry>, ShardError> {
        let step = head.step;
        let dir = step_dir(step);
        let encoded = encode(r);
        let rel = format!("{dir}/{MANIFEST}");
        let (key, display) = self.path(&rel);
        if let Some(existing) = self.location.get_optional(&key, &display)? {
            if let Ok(m) = serde_json::from_slice::<Manifest>(&existing) {
                let same_head = (m.tokens, &m.recipe, &m.world, &m.growth)
                    == (head.tokens, &head.recipe, &head.world, &head.growth);
                let same_files = encoded
                    .iter()
                    .all(|(name, chunks)| m.files.contains(&entry_of(name, r.rank, chunks)));
                if !same_head || !same_files {
                    return Err(different_checkpoint(display));
                }
            }
        }
        let mut entries = Vec::with_capacity(encoded.len());
        for (file, chunks) in encoded {
            let name = format!("{dir}/{file}");
            if file.ends_with(".safetensors") && fault("mid-shard", step, r.rank) {
                let whole = chunks.concat();
                self.put(&name, whole[..whole.len() / 2].to_vec())?;
                kill_self();
            }
            // The hash is computed on another thread while the bytes are written (and
            // fsynced): the save takes the longer of the two, not their sum.
            let entry = std::thread::scope(|s| {
                let hashing = s.spawn(|| entry_of(&file, r.rank, &chunks));
                let written = self.put_chunks(&name, chunks.clone());
                let entry = hashing.join().expect("the hashing thread does not panic");
                written.map(|()| entry)
            })?;
            entries.push(entry);
        }
        Ok(entries)
    }

    /// Completes checkpoint `head.step` once every rank's files are written (`files`:
    /// their entries, from every rank): the manifest, put-if-absent, then `latest`.
    pub fn commit(
        &self,
        head: ManifestHead,
        files: Vec<FileEntry>,
    ) -> Result<Manifest, ShardError> {
        let dir = step_dir(head.step);
        let manifest = Manifest {
            format: "catapult-checkpoint".into(),
            version: 2,
            step: head.step,
            tokens: head.tokens,
            catapult_version: env!("CARGO_PKG_VERSION").into(),
            world: head.world,
            files,
            recipe: head.recipe,
            growth: head.growth,
        };
        let bytes = serde_json::to_vec_pretty(&manifest).expect("the manifest serializes");
        let rel = format!("{dir}/{MANIFEST}");
        let (key, display) = self.path(&rel);
        if let Some(existing) = self.location.get_optional(&key, &display)? {
            if *existing == *bytes {
                // The same state saved again (a resumed deterministic run).
                self.put(LATEST, dir.into_bytes())?;
                return Ok(manifest);
            }
            if serde_json::from_slice::<Manifest>(&existing).is_ok() {
                return Err(different_checkpoint(display));
            }
            // A torn manifest (a crash while it was written on a store without atomic
            // puts) marks an unfinished save: replace it.
            self.location.delete(&key, &display)?;
        }
        if fault("before-manifest", manifest.step, 0) {
            kill_self();
        }
        if fault("mid-manifest", manifest.step, 0) {
            self.put(&rel, bytes[..bytes.len() / 2].to_vec())?;
            kill_self();
        }
        if !self.location.put_if_absent(&key, &display, bytes.clone())? {
            // Either our own put succeeded and its reply was lost (a retry then finds the
            // object), or another writer won the race.
            if *self.get(&rel)? != *bytes {
                return Err(ShardError::Invalid {
                    location: display,
                    problem: "another process wrote this checkpoint's manifest at the same time"
                        .into(),
                });
            }
        }
        self.put(LATEST, dir.into_bytes())?;
        Ok(manifest)
    }

    /// Every object under the root by its path relative to the root, with its size.
    pub(crate) fn listing(&self) -> Result<BTreeMap<String, u64>, ShardError> {
        let prefix = self.location.key.parts().count();
        Ok(self
            .location
            .list()?
            .into_iter()
            .map(|m| {
                let rel: Vec<String> = m
                    .location
                    .parts()
                    .skip(prefix)
                    .map(|p| p.as_ref().to_string())
                    .collect();
                (rel.join("/"), m.size)
            })
            .collect())
    }

    /// Steps that have a manifest, ascending.
    pub fn steps(&self) -> Result<Vec<u64>, ShardError> {
        Ok(steps_in(&self.listing()?))
    }

    /// The `latest` pointer's step, if any.
    pub fn latest(&self) -> Result<Option<u64>, ShardError> {
        let (key, display) = self.path(LATEST);
        Ok(self
            .location
            .get_optional(&key, &display)?
            .and_then(|b| String::from_utf8(b.to_vec()).ok())
            .and_then(|s| s.trim().strip_prefix("step-")?.parse().ok()))
    }

    /// The manifest of `step`.
    pub fn manifest(&self, step: u64) -> Result<Manifest, ShardError> {
        let rel = format!("{}/{MANIFEST}", step_dir(step));
        let bytes = self.get(&rel)?;
        serde_json::from_slice(&bytes).map_err(|e| ShardError::Invalid {
            location: self.location.display_child(&rel),
            problem: format!("unreadable manifest ({e}); the save that wrote it did not finish"),
        })
    }

    /// Moves the broken checkpoint `step` aside to `ROOT/quarantine/step-N` (`.2`, `.3`,
    /// ... when that exists), with `reason.txt` saying why: it no longer counts as a
    /// checkpoint, for loading, for retention or for a new save of the same step. The
    /// manifest moves first, so an interrupted move leaves no loadable half. Returns
    /// where it went.
    pub fn quarantine(&self, step: u64, reason: &str) -> Result<String, ShardError> {
        let listing = self.listing()?;
        let dir = step_dir(step);
        let mut dest = format!("{QUARANTINE}/{dir}");
        let mut k = 1;
        while listing.keys().any(|p| p.starts_with(&format!("{dest}/"))) {
            k += 1;
            dest = format!("{QUARANTINE}/{dir}.{k}");
        }
        let mut files: Vec<&str> = listing
            .keys()
            .filter_map(|p| p.strip_prefix(&format!("{dir}/")))
            .collect();
        files.sort_by_key(|f| *f != MANIFEST);
        for f in files {
            let (from, display) = self.path(&format!("{dir}/{f}"));
            let (to, _) = self.path(&format!("{dest}/{f}"));
            self.location.rename(&from, &to, &display)?;
        }
        self.put(
            &format!("{dest}/reason.txt"),
            format!("{dir} was moved here because it cannot be loaded: {reason}\n").into_bytes(),
        )?;
        if self.latest()? == Some(step) {
            match self.steps()?.last() {
                Some(&newest) => self.put(LATEST, step_dir(newest).into_bytes())?,
                None => {
                    let (key, display) = self.path(LATEST);
                    self.location.delete(&key, &display)?;
                }
            }
        }
        Ok(self.location.display_child(&dest))
    }

    /// The quarantined checkpoints (`step-N`, `step-N.2`, ...), by name.
    pub fn quarantined(&self) -> Result<Vec<String>, ShardError> {
        let mut names: Vec<String> = self
            .listing()?
            .keys()
            .filter_map(|p| {
                let (dir, _) = p.strip_prefix(&format!("{QUARANTINE}/"))?.split_once('/')?;
                Some(dir.to_string())
            })
            .collect();
        names.dedup();
        Ok(names)
    }

    /// Why `step` is not a whole checkpoint, judged from the listing alone (a manifest
    /// that parses, and every file it lists present with its size), or None.
    fn unsound(&self, step: u64, listing: &BTreeMap<String, u64>) -> Option<String> {
        let dir = step_dir(step);
        let manifest = match self.manifest(step) {
            Ok(m) => m,
            Err(e) => return Some(e.to_string()),
        };
        manifest
            .files
            .iter()
            .find_map(|f| match listing.get(&format!("{dir}/{}", f.name)) {
                None => Some(format!("rank {}'s file {} is missing", f.rank, f.name)),
                Some(&size) if size != f.bytes => Some(format!(
                    "rank {}'s file {} has {size} bytes, the manifest says {}",
                    f.rank, f.name, f.bytes
                )),
                _ => None,
            })
    }

    /// After `saved` is complete: deletes older checkpoints except the newest
    /// `keep_last - 1` whole ones and every multiple of `keep_every` (0: none). A broken
    /// checkpoint (a missing or short file, an unreadable manifest) among the newest is
    /// quarantined and not counted, so a good one is never deleted to keep a broken one.
    /// The manifest goes first, so a half-deleted checkpoint is never loadable. Returns
    /// the deleted steps.
    pub fn retain(
        &self,
        saved: u64,
        keep_last: usize,
        keep_every: u64,
    ) -> Result<Vec<u64>, ShardError> {
        // Only checkpoints older than the one just saved are candidates: newer ones (of
        // a run that was rolled back) are never touched, and `saved` always stays.
        let listing = self.listing()?;
        let older: Vec<u64> = steps_in(&listing)
            .into_iter()
            .filter(|&s| s < saved)
            .collect();
        let mut kept = 0;
        let mut deleted = Vec::new();
        for &step in older.iter().rev() {
            if kept + 1 < keep_last.max(1) {
                match self.unsound(step, &listing) {
                    None => kept += 1,
                    Some(reason) => {
                        let to = self.quarantine(step, &reason)?;
                        catapult_data::log_line!(
                            "warning: checkpoint {} is broken ({reason}); moved to {to}",
                            step_dir(step)
                        );
                    }
                }
                continue;
            }
            if keep_every > 0 && step % keep_every == 0 {
                continue;
            }
            self.delete_step(step)?;
            deleted.push(step);
        }
        deleted.reverse();
        Ok(deleted)
    }

    /// Deletes every checkpoint under the root (each manifest first) and the `latest`
    /// pointer; quarantined ones stay. Returns the deleted steps.
    pub fn clear(&self) -> Result<Vec<u64>, ShardError> {
        let steps = self.steps()?;
        for &step in &steps {
            self.delete_step(step)?;
        }
        let (key, display) = self.path(LATEST);
        self.location.delete(&key, &display)?;
        Ok(steps)
    }

    fn delete_step(&self, step: u64) -> Result<(), ShardError> {
        let dir = step_dir(step);
        let manifest = self.manifest(step).ok();
        let (key, display) = self.path(&format!("{dir}/{MANIFEST}"));
        self.location.delete(&key, &display)?;
        if let Some(m) = manifest {
            for f in m.files {
                let (key, display) = self.path(&format!("{dir}/{}", f.name));
                self.location.delete(&key, &display)?;
            }
        }
        Ok(())
    }
}

/// The steps in a listing that have a manifest, ascending.
fn steps_in(listing: &BTreeMap<String, u64>) -> Vec<u64> {
    let mut steps: Vec<u64> = listing
        .keys()
        .filter_map(|p| match p.split('/').collect::<Vec<_>>().as_slice() {
            [dir, file] if *file == MANIFEST => dir.strip_prefix("step-")?.parse().ok(),
            _ => None,
        })
        .collect();
    steps.sort_unstable();
    steps.dedup();
    steps
}

/// Writes a rank's files in a background thread, at most one checkpoint at a time;
/// dropping it waits for the write in flight, so the process never exits in the middle
/// of one. The files' entries (or the error) come back through `wait`, for the rank
/// that commits the checkpoint.
#[derive(Debug, Default)]
pub struct AsyncSaver {
    in_flight: Option<std::thread::JoinHandle<Result<Vec<FileEntry>, ShardError>>>,
}

impl AsyncSaver {
    /// Starts writing rank `state`'s files of checkpoint `head` in the background. The
    /// previous write must have been collected with `wait`.
    pub fn submit(&mut self, store: Checkpoints, head: ManifestHead, state: RankState) {
        debug_assert!(
            self.in_flight.is_none(),
            "the previous write was not collected"
        );
        self.in_flight = Some(
            std::thread::Builder::new()
                .name("catapult-ckpt".into())
                .spawn(move || store.save_rank(&head, &state))
                .expect("spawn the checkpoint thread"),
        );
    }

    /// Whether no write is running (none was submitted, or it finished).
    pub fn is_idle(&self) -> bool {
        self.in_flight.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Waits for the write in flight: its files' entries, or why it failed; None when
    /// none was submitted.
    pub fn wait(&mut self) -> Option<Result<Vec<FileEntry>, ShardError>> {
        let h = self.in_flight.take()?;
        Some(h.join().unwrap_or_else(|_| {
            Err(ShardError::Invalid {
                location: "checkpoint thread".into(),
                problem: "panicked".into(),
            })
        }))
    }
}

impl Drop for AsyncSaver {
    fn drop(&mut self) {
        if let Some(Err(e)) = self.wait() {
            catapult_data::log_line!("error: a checkpoint write failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::Dtype;

    fn tensor(name: &str, rows: usize, cols: usize, seed: u8) -> HostTensor {
        HostTensor {
            name: name.into(),
            dtype: Dtype::F32,
            shape: vec![rows, cols],
            data: (0..rows * cols * 4)
                .map(|i| (i as u8).wrapping_mul(seed))
                .collect(),
        }
    }

    fn rows(t: &HostTensor, start: usize, end: usize) -> HostTensor {
        let row = t.data.len() / t.shape[0];
        HostTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: vec![end - start, t.shape[1]],
            data: t.data.slice(start * row..end * row),
        }
    }

    fn root(name: &str) -> String {
        let dir =
            std::env::temp_dir().join(format!("catapult-shards-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.display().to_string()
    }

    /// A store at `dir` holding two-rank checkpoints of `steps`, with their tensors.
    fn saved(
        dir: &str,
        steps: impl IntoIterator<Item = u64>,
    ) -> (Checkpoints, HostTensor, HostTensor) {
        let store = Checkpoints::open(dir, &StorageOptions::default()).unwrap();
        let dense = tensor("model.embed", 3, 2, 3);
        let experts = tensor("model.layers.0.mlp.experts.up_proj", 4, 3, 7);
        for step in steps {
            store
                .save(two_rank_request(step, &dense, &experts))
                .unwrap();
        }
        (store, dense, experts)
    }

    /// A 2-rank expert-parallel checkpoint: the dense tensor on rank 0, the 4 experts'
    /// stacked weights split 2 + 2.
    fn two_rank_request(step: u64, dense: &HostTensor, experts: &HostTensor) -> SaveRequest {
        let rank = |r: usize| RankState {
            rank: r,
            tensors: if r == 0 {
                vec![dense.clone(), rows(experts, 0, 2)]
            } else {
                vec![rows(experts, 2, 4)]
            },
            pieces: [(
                experts.name.clone(),
                Piece {
                    start: 2 * r * 3,
                    shape: vec![4, 3],
                },
            )]
            .into(),
            state: serde_json::json!({"rank": r}),
        };
        let head = ManifestHead {
            step,
            tokens: step * 100,
            recipe: serde_json::json!({"name": "t"}),
            world: World {
                data_parallel: 1,
                expert_parallel: 2,
                ranks: (0..2)
                    .map(|r| RankLayout {
                        rank: r,
                        data_parallel_rank: 0,
                        experts: [2 * r, 2 * r + 2],
                    })
                    .collect(),
            },
            growth: None,
        };
        SaveRequest {
            head,
            ranks: vec![rank(0), rank(1)],
        }
    }

    #[test]
    fn expert_slices_reassemble_and_reshard_to_other_layouts() {
        let store = Checkpoints::open(&root("reshard"), &StorageOptions::default()).unwrap();
        let dense = tensor("model.embed", 3, 2, 3);
        let experts = tensor("model.layers.0.mlp.experts.up_proj", 4, 3, 7);
        store.save(two_rank_request(5, &dense, &experts)).unwrap();
        let loaded = store.load(5, true).unwrap();
        // EP 2 -> EP 1: the full tensor, bit for bit.
        assert_eq!(loaded.whole(&experts.name).unwrap(), experts);
        assert_eq!(loaded.whole(&dense.name).unwrap(), dense);
        assert_eq!(loaded.states[1]["rank"], 1);
        // EP 2 -> EP 4: each new rank's single expert, read from one rank's file.
        for part in 0..4 {
            assert_eq!(
                loaded.rows(&experts.name, part, 4).unwrap().unwrap(),
                rows(&experts, part, part + 1)
            );
        }
        assert!(
            loaded.rows(&experts.name, 0, 3).unwrap().is_none(),
            "4 experts do not split 3 ways"
        );
        // A range across both ranks' pieces, and only its bytes read.
        let before = loaded.bytes_read();
        let across = loaded.read(&experts.name, 4..9).unwrap();
        assert_eq!(&across.data[..], &experts.data[16..36]);
        assert_eq!(loaded.bytes_read() - before, 20);
        assert_eq!(store.latest().unwrap(), Some(5));
        assert_eq!(loaded.manifest.world.expert_parallel, 2);
    }

    #[test]
    fn a_passed_over_step_is_quarantined_and_a_new_save_of_it_does_not_collide() {
        let dir = root("quarantine");
        let (store, dense, experts) = saved(&dir, [2, 4]);
        // Step 4 broken differently from the run that resumes: its manifest differs.
        let manifest = format!("{dir}/step-00000004/manifest.json");
        let text = std::fs::read_to_string(&manifest).unwrap();
        std::fs::write(
            &manifest,
            text.replace("\"tokens\": 400", "\"tokens\": 401"),
        )
        .unwrap();
        let rank1 = format!("{dir}/step-00000004/rank-00001.safetensors");
        std::fs::write(&rank1, b"torn").unwrap();
        let loaded = store.load_newest(true, true).unwrap().unwrap();
        assert_eq!(loaded.manifest.step, 2);
        assert_eq!(loaded.passed_over.len(), 1);
        assert_eq!(loaded.passed_over[0].0, 4);
        // Without quarantine, saving step 4 again collides with the broken copy.
        let collided = store
            .save(two_rank_request(4, &dense, &experts))
            .unwrap_err();
        assert!(
            collided.to_string().contains("already exists"),
            "{collided}"
        );
        let to = store.quarantine(4, &loaded.passed_over[0].1).unwrap();
        assert!(to.ends_with("quarantine/step-00000004"), "{to}");
        let reason = std::fs::read_to_string(format!("{to}/reason.txt")).unwrap();
        assert!(reason.contains("rank-00001.safetensors"), "{reason}");
        assert_eq!(
            std::fs::read(format!("{to}/rank-00001.safetensors")).unwrap(),
            b"torn"
        );
        assert!(!std::path::Path::new(&rank1).exists());
        assert_eq!(store.steps().unwrap(), vec![2]);
        assert_eq!(
            store.latest().unwrap(),
            Some(2),
            "latest no longer names it"
        );
        store.save(two_rank_request(4, &dense, &experts)).unwrap();
        store.verify(4).unwrap();
        // A second quarantine of the same step goes beside the first.
        std::fs::write(&rank1, b"torn again").unwrap();
        let again = store.quarantine(4, "second").unwrap();
        assert!(again.ends_with("quarantine/step-00000004.2"), "{again}");
        assert_eq!(store.steps().unwrap(), vec![2]);
    }

    #[test]
    fn retention_never_keeps_a_broken_checkpoint_in_place_of_a_good_one() {
        let dir = root("retain-broken");
        let (store, dense, experts) = saved(&dir, [1, 2, 3]);
        // Step 3 loses half a file; with keep_last 3, saving 4 keeps 2 whole older ones.
        std::fs::write(
            format!("{dir}/step-00000003/rank-00000.safetensors"),
            b"half",
        )
        .unwrap();
        store.save(two_rank_request(4, &dense, &experts)).unwrap();
        let deleted = store.retain(4, 3, 0).unwrap();
        assert_eq!(deleted, Vec::<u64>::new(), "1 and 2 are the two kept");
        assert_eq!(store.steps().unwrap(), vec![1, 2, 4]);
        assert!(
            std::path::Path::new(&format!("{dir}/quarantine/step-00000003/reason.txt")).exists()
        );
        store.save(two_rank_request(5, &dense, &experts)).unwrap();
        assert_eq!(store.retain(5, 3, 0).unwrap(), vec![1]);
        assert_eq!(store.steps().unwrap(), vec![2, 4, 5]);
        for step in [2, 4, 5] {
            store.verify(step).unwrap();
        }
    }

    #[test]
    fn corruption_is_named_and_the_newest_valid_checkpoint_wins() {
        let dir = root("corrupt");
        let (store, _, _) = saved(&dir, [2, 4]);
        let path = format!("{dir}/step-00000004/rank-00001.safetensors");
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x80;
        std::fs::write(&path, bytes).unwrap();
        let err = store.verify(4).unwrap_err().to_string();
        assert!(
            err.contains("rank 1")
                && err.contains("rank-00001.safetensors")
                && err.contains("BLAKE3"),
            "{err}"
        );
        assert!(
            store.load(4, false).is_ok(),
            "without verification the bytes are not checked"
        );
        assert_eq!(
            store
                .load_newest(true, true)
                .unwrap()
                .unwrap()
                .manifest
                .step,
            2
        );
        assert!(store.load_newest(true, false).is_err());
        // When nothing loads, resuming is an error, not a silent fresh start.
        let path2 = format!("{dir}/step-00000002/rank-00000.json");
        std::fs::write(&path2, b"{}").unwrap();
        let err = store.load_newest(true, true).unwrap_err().to_string();
        assert!(
            err.contains("none of its 2 checkpoint(s) can be loaded"),
            "{err}"
        );
        // A step directory without a manifest does not exist.
        std::fs::create_dir_all(format!("{dir}/step-00000009")).unwrap();
        std::fs::write(
            format!("{dir}/step-00000009/rank-00000.safetensors"),
            b"half",
        )
        .unwrap();
        assert_eq!(store.steps().unwrap(), vec![2, 4]);
    }

    #[test]
    fn retention_keeps_the_last_k_and_every_m_th_manifest_first() {
        let dir = root("retain");
        let (store, dense, experts) = saved(&dir, 1..=7);
        let deleted = store.retain(7, 2, 3).unwrap();
        assert_eq!(deleted, vec![1, 2, 4, 5]);
        assert_eq!(store.steps().unwrap(), vec![3, 6, 7]);
        assert!(
            !std::path::Path::new(&format!("{dir}/step-00000002/rank-00000.safetensors")).exists()
        );
        // Saving the same state again is idempotent; a different one is refused.
        store.save(two_rank_request(7, &dense, &experts)).unwrap();
        let other = tensor("model.embed", 3, 2, 5);
        let err = store
            .save(two_rank_request(7, &other, &experts))
            .unwrap_err()
            .to_string();
        assert!(err.contains("already exists"), "{err}");
    }
}
