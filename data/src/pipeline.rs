//! The streaming pipeline: a deterministic, world-size-invariant, resumable stream of
//! packed training sequences drawn from a weighted mixture of datasets.
//!
//! Order. The data is split into `streams` canonical streams. For each dataset, the row
//! groups ("units") of every epoch are shuffled from (seed, dataset, epoch) and the
//! concatenation of those epochs is dealt round-robin to the streams. Each stream keeps,
//! per dataset, a packer (documents joined with end-of-document ids, cut into sequences
//! of `seq_len + 1` ids that overlap by one) and a block shuffle buffer (blocks of
//! `shuffle_buffer` sequences emitted in a seeded permutation). A stream's k-th sequence
//! comes from the dataset its mixture window assigns to position k: every window of
//! `mixture_window` sequences holds each dataset's share exactly (largest remainder), in
//! a seeded order. Global batch b holds, for each stream s in order, that stream's next
//! `global_batch / streams` sequences. A rank of a world of P (P dividing `streams`)
//! owns a contiguous block of streams, so its slice of the global batch is exactly the
//! sequences it reads: the concatenation over ranks is the world-of-one batch.
//!
//! Randomness is counter-based (SplitMix64 keyed by seed and indices), so the whole state
//! is a few counters per stream plus the packer's position and pending ids: `DataState`.

use crate::dataset::{Dataset, DatasetSpec, Documents, Split};
use crate::store::StorageOptions;
use crate::{DataError, SplitMix64, Tokenizer};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// One phase of training data: from `start_tokens` on, these weights and this length.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    /// Global tokens seen when the phase begins (0 for the first phase).
    pub start_tokens: u64,
    /// Mixture weight of each dataset (same order as the datasets; need not sum to 1).
    pub weights: Vec<f64>,
    /// Tokens per sequence.
    pub seq_len: usize,
}

/// Everything the pipeline needs to know.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineConfig {
    /// The datasets.
    pub datasets: Vec<DatasetSpec>,
    /// Phases, the first starting at token 0.
    pub phases: Vec<Phase>,
    /// Sequences per global batch (all ranks together).
    pub global_batch: usize,
    /// Canonical streams; a world size must divide it and it must divide the batch.
    pub streams: usize,
    /// Sequences per shuffle block.
    pub shuffle_buffer: usize,
    /// Sequences per mixture window (per stream).
    pub mixture_window: usize,
    /// Background threads that read and tokenize.
    pub workers: usize,
    /// Bytes of read-ahead (decoded and tokenized row groups waiting to be used).
    pub read_ahead_bytes: u64,
    /// Fraction of documents held out for validation.
    pub valid_fraction: f64,
    /// Seed of every shuffle.
    pub seed: u64,
    /// `bytes` or a tokenizer.json path.
    pub tokenizer: String,
    /// The end-of-document token's name (tokenizer.json only).
    pub eod_token: Option<String>,
    /// How to reach object stores.
    pub storage: StorageOptions,
}

/// A dataset's name and its held-out sequences (each `seq_len + 1` ids).
pub type ValidationSet = (String, Vec<Vec<u32>>);

/// A batch: this rank's slice of one global batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Global batch index.
    pub index: u64,
    /// Phase the batch belongs to.
    pub phase: usize,
    /// Tokens per sequence (each sequence holds `seq_len + 1` ids: inputs and targets).
    pub seq_len: usize,
    /// The sequences.
    pub sequences: Vec<Vec<u32>>,
    /// Index of the dataset each sequence came from.
    pub datasets: Vec<u16>,
    /// The end-of-document id.
    pub eod: u32,
}

impl Batch {
    /// Document boundaries of the inputs, as a segment id per input position
    /// (sequences x seq_len, row-major): a new segment starts after every
    /// end-of-document id. Attention within a segment only is document masking.
    pub fn segment_ids(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.sequences.len() * self.seq_len);
        for seq in &self.sequences {
            let mut segment = 0;
            for p in 0..self.seq_len {
                if p > 0 && seq[p - 1] == self.eod {
                    segment += 1;
                }
                out.push(segment);
            }
        }
        out
    }
}

/// Where a packer stands: which unit of its sequence, which document, which token, and
/// the ids read but not yet cut into a sequence.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Position {
    /// Index of the unit in this stream's unit sequence (counting across epochs).
    pub unit: u64,
    /// The unit's shard (informational; checked on restore).
    pub shard: String,
    /// The unit's row group.
    pub row_group: u32,
    /// Index of the document among the unit's kept documents.
    pub doc: u32,
    /// Global row of that document (checked on restore), if inside the unit.
    pub row: Option<u64>,
    /// Token offset within the document.
    pub offset: u32,
    /// Ids read but not yet emitted.
    pub pending: Vec<u32>,
}

/// A shuffle block in progress.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BlockState {
    /// Block index (keys the block's permutation).
    pub index: u64,
    /// Sequences of the block already emitted.
    pub emitted: usize,
    /// Length the block's sequences were cut at.
    pub seq_len: usize,
    /// Packer position where the block began.
    pub start: Position,
}

/// One dataset within one stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SubState {
    /// Dataset name.
    pub dataset: String,
    /// The current block, None before the first.
    pub block: Option<BlockState>,
}

/// One canonical stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StreamState {
    /// Stream index.
    pub stream: usize,
    /// Sequences emitted.
    pub sequences: u64,
    /// Per dataset.
    pub datasets: Vec<SubState>,
}

/// Everything needed to continue the exact same sequence stream; small and JSON-able.
/// Randomness is counter-based, so the RNG state is the seed plus the block and window
/// indices these counters imply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DataState {
    /// Format version.
    pub version: u32,
    /// Seed of every shuffle.
    pub seed: u64,
    /// Hash of the data configuration the state belongs to.
    pub fingerprint: String,
    /// Global batches delivered.
    pub batches: u64,
    /// The streams this state covers (one rank's, or all of them after `merge`).
    pub streams: Vec<StreamState>,
}

impl DataState {
    /// Joins the states of several ranks into one covering all their streams.
    pub fn merge(states: &[DataState]) -> Result<DataState, DataError> {
        let first = states.first().ok_or_else(|| DataError::State {
            problem: "no data state to merge".into(),
        })?;
        let mut merged = first.clone();
        merged.streams.clear();
        for s in states {
            if s.fingerprint != first.fingerprint || s.batches != first.batches {
                return Err(DataError::State {
                    problem: "the ranks' data states disagree on configuration or batch count"
                        .into(),
                });
            }
            merged.streams.extend(s.streams.iter().cloned());
        }
        merged.streams.sort_by_key(|s| s.stream);
        Ok(merged)
    }
}

// ---------------------------------------------------------------------------------------
// Background readers and the read-ahead budget.

struct Budget {
    limit: u64,
    used: Mutex<u64>,
}

/// Bytes of the read-ahead budget held by a loaded or loading unit.
struct Lease {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        *self.budget.used.lock().expect("budget") -= self.bytes;
    }
}

impl Budget {
    fn try_acquire(self: &Arc<Self>, bytes: u64) -> Option<Lease> {
        let mut used = self.used.lock().expect("budget");
        (*used + bytes <= self.limit).then(|| {
            *used += bytes;
            Lease {
                budget: self.clone(),
                bytes,
            }
        })
    }

    /// Always succeeds: the unit is needed now.
    fn acquire(self: &Arc<Self>, bytes: u64) -> Lease {
        *self.used.lock().expect("budget") += bytes;
        Lease {
            budget: self.clone(),
            bytes,
        }
    }
}

/// A submitted read: its id (to promote it) and where its result arrives.
struct Reply {
    id: u64,
    rx: mpsc::Receiver<Result<Documents, DataError>>,
}

struct Job {
    id: u64,
    dataset: Arc<Dataset>,
    shard: u32,
    row_group: u32,
    split: Split,
    reply: mpsc::Sender<Result<Documents, DataError>>,
}

/// Jobs waiting for a worker: reads needed now go first, read-ahead after.
#[derive(Default)]
struct Queues {
    urgent: VecDeque<Job>,
    ahead: VecDeque<Job>,
    closed: bool,
    next_id: u64,
}

/// A pool of threads that read row groups and tokenize them. A read the training thread
/// waits for is served before read-ahead (a queued read-ahead job is promoted when it
/// becomes needed), so a deep read-ahead never delays the next batch.
struct Loader {
    queues: Arc<(Mutex<Queues>, std::sync::Condvar)>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Loader {
    fn new(workers: usize, tokenizer: Arc<Tokenizer>, valid_fraction: f64) -> Self {
        let queues = Arc::new((Mutex::new(Queues::default()), std::sync::Condvar::new()));
        let threads = (0..workers.max(1))
            .map(|i| {
                let queues = queues.clone();
                let tokenizer = tokenizer.clone();
                std::thread::Builder::new()
                    .name(format!("catapult-data-{i}"))
                    .spawn(move || loop {
                        let job = {
                            let (lock, ready) = &*queues;
                            let mut q = lock.lock().expect("job queues");
                            loop {
                                if let Some(job) =
                                    q.urgent.pop_front().or_else(|| q.ahead.pop_front())
                                {
                                    break job;
                                }
                                if q.closed {
                                    return;
                                }
                                q = ready.wait(q).expect("job queues");
                            }
                        };
                        let result = job.dataset.read(
                            job.shard,
                            job.row_group,
                            job.split,
                            valid_fraction,
                            &tokenizer,
                        );
                        let _ = job.reply.send(result);
                    })
                    .expect("spawn a data worker")
            })
            .collect();
        Self { queues, threads }
    }

    /// Queues a read; `urgent` when the caller is about to wait for it.
    fn submit(
        &self,
        dataset: &Arc<Dataset>,
        unit: (u32, u32),
        split: Split,
        urgent: bool,
    ) -> Reply {
        let (reply, rx) = mpsc::channel();
        let (lock, ready) = &*self.queues;
        let mut q = lock.lock().expect("job queues");
        let id = q.next_id;
        q.next_id += 1;
        let job = Job {
            id,
            dataset: dataset.clone(),
            shard: unit.0,
            row_group: unit.1,
            split,
            reply,
        };
        if urgent {
            q.urgent.push_back(job);
        } else {
            q.ahead.push_back(job);
        }
        ready.notify_one();
        Reply { id, rx }
    }

    /// Waits for a read, first promoting it ahead of read-ahead if it is still queued.
    fn receive(&self, reply: Reply) -> Result<Documents, DataError> {
        {
            let mut q = self.queues.0.lock().expect("job queues");
            if let Some(pos) = q.ahead.iter().position(|j| j.id == reply.id) {
                let job = q.ahead.remove(pos).expect("position is valid");
                q.urgent.push_back(job);
            }
        }
        reply.rx.recv().unwrap_or_else(|_| {
            Err(DataError::State {
                problem: "a data worker thread died".into(),
            })
        })
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        {
            let (lock, ready) = &*self.queues;
            let mut q = lock.lock().expect("job queues");
            q.closed = true;
            q.urgent.clear();
            q.ahead.clear();
            ready.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Counter-based randomness.

const TAG_UNITS: u64 = 0x756e_6974;
const TAG_BLOCK: u64 = 0x626c_6f63;
const TAG_MIX: u64 = 0x6d69_7874;

fn key(parts: &[u64]) -> u64 {
    let mut h = 0x243F_6A88_85A3_08D3u64;
    for &p in parts {
        h = SplitMix64::new(h ^ p).next_u64();
    }
    h
}

fn permutation(len: usize, seed: u64) -> Vec<u32> {
    let mut rng = SplitMix64::new(seed);
    let mut p: Vec<u32> = (0..len as u32).collect();
    for i in (1..len).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        p.swap(i, j);
    }
    p
}

/// Per-window dataset counts for `weights` (largest remainder; ties to the lower index).
fn window_counts(weights: &[f64], window: usize) -> Vec<usize> {
    let total: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| w / total * window as f64).collect();
    let mut counts: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut rest = window - counts.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..weights.len()).collect();
    order.sort_by(|&a, &b| {
        let fa = exact[a] - exact[a].floor();
        let fb = exact[b] - exact[b].floor();
        fb.total_cmp(&fa).then(a.cmp(&b))
    });
    for &d in order.iter().cycle() {
        if rest == 0 {
            break;
        }
        if weights[d] > 0.0 {
            counts[d] += 1;
            rest -= 1;
        }
    }
    counts
}

// ---------------------------------------------------------------------------------------
// One dataset within one stream: unit order, packer, shuffle block.

struct Loaded {
    docs: Documents,
    _lease: Lease,
}

struct Block {
    state: BlockState,
    sequences: Vec<Vec<u32>>,
    permutation: Vec<u32>,
}

struct SubStream {
    dataset: usize,
    stream: usize,
    units: Arc<Vec<(u32, u32)>>,
    epoch_cache: VecDeque<(u64, Vec<u32>)>,
    unit: u64,
    current: Option<Loaded>,
    doc: usize,
    offset: usize,
    pending: Vec<u32>,
    queue: VecDeque<(u64, Reply, Lease)>,
    block: Option<Block>,
    empty_units: u64,
}

const MAX_AHEAD: usize = 2;

struct Shared {
    cfg: PipelineConfig,
    datasets: Vec<Arc<Dataset>>,
    units: Vec<Arc<Vec<(u32, u32)>>>,
    loader: Loader,
    budget: Arc<Budget>,
}

impl SubStream {
    fn new(shared: &Shared, stream: usize, dataset: usize) -> Self {
        Self {
            dataset,
            stream,
            units: shared.units[dataset].clone(),
            epoch_cache: VecDeque::new(),
            unit: 0,
            current: None,
            doc: 0,
            offset: 0,
            pending: Vec::new(),
            queue: VecDeque::new(),
            block: None,
            empty_units: 0,
        }
    }

    /// The (shard, row group) of the n-th unit of this stream's sequence.
    fn unit_at(&mut self, shared: &Shared, n: u64) -> (u32, u32) {
        let count = self.units.len() as u64;
        let i = self.stream as u64 + n * shared.cfg.streams as u64;
        let (epoch, j) = (i / count, (i % count) as usize);
        if let Some((_, p)) = self.epoch_cache.iter().find(|(e, _)| *e == epoch) {
            return self.units[p[j] as usize];
        }
        let p = permutation(
            self.units.len(),
            key(&[shared.cfg.seed, TAG_UNITS, self.dataset as u64, epoch]),
        );
        let unit = self.units[p[j] as usize];
        if self.epoch_cache.len() == 2 {
            self.epoch_cache.pop_front();
        }
        self.epoch_cache.push_back((epoch, p));
        unit
    }

    fn load_current(&mut self, shared: &Shared) -> Result<(), DataError> {
        if self.current.is_some() {
            return Ok(());
        }
        while self.queue.front().is_some_and(|(n, _, _)| *n < self.unit) {
            self.queue.pop_front();
        }
        let dataset = &shared.datasets[self.dataset];
        let loaded = match self.queue.front() {
            Some((n, _, _)) if *n == self.unit => {
                let (_, rx, lease) = self.queue.pop_front().expect("front");
                Loaded {
                    docs: shared.loader.receive(rx)?,
                    _lease: lease,
                }
            }
            _ => {
                self.queue.clear();
                let unit = self.unit_at(shared, self.unit);
                let lease = shared.budget.acquire(dataset.unit_cost(unit.0, unit.1));
                let rx = shared.loader.submit(dataset, unit, Split::Train, true);
                Loaded {
                    docs: shared.loader.receive(rx)?,
                    _lease: lease,
                }
            }
        };
        self.current = Some(loaded);
        // Read ahead while the budget allows.
        let mut next = self.queue.back().map_or(self.unit + 1, |(n, _, _)| n + 1);
        while self.queue.len() < MAX_AHEAD {
            let unit = self.unit_at(shared, next);
            let Some(lease) = shared.budget.try_acquire(dataset.unit_cost(unit.0, unit.1)) else {
                break;
            };
            let rx = shared.loader.submit(dataset, unit, Split::Train, false);
            self.queue.push_back((next, rx, lease));
            next += 1;
        }
        Ok(())
    }

    /// Reads until `pending` holds at least `want` ids.
    fn fill(&mut self, shared: &Shared, want: usize) -> Result<(), DataError> {
        while self.pending.len() < want {
            self.load_current(shared)?;
            let docs = &self.current.as_ref().expect("loaded").docs.docs;
            if self.doc >= docs.len() {
                if docs.is_empty() {
                    self.empty_units += 1;
                    if self.empty_units > self.units.len() as u64 {
                        return Err(DataError::Empty {
                            location: shared.datasets[self.dataset].location().to_string(),
                            problem: "has no training documents (all are held out or empty); \
                                      add data or lower data.valid_fraction"
                                .into(),
                        });
                    }
                } else {
                    self.empty_units = 0;
                }
                self.unit += 1;
                self.current = None;
                self.doc = 0;
                self.offset = 0;
                continue;
            }
            let ids = &docs[self.doc].1;
            let take = (ids.len() - self.offset).min(want - self.pending.len());
            self.pending
                .extend_from_slice(&ids[self.offset..self.offset + take]);
            self.offset += take;
            if self.offset == ids.len() {
                self.doc += 1;
                self.offset = 0;
            }
        }
        Ok(())
    }

    fn cut(&mut self, shared: &Shared, seq_len: usize) -> Result<Vec<u32>, DataError> {
        self.fill(shared, seq_len + 1)?;
        let seq = self.pending[..seq_len + 1].to_vec();
        self.pending.drain(..seq_len);
        Ok(seq)
    }

    fn position(&mut self, shared: &Shared) -> Result<Position, DataError> {
        self.load_current(shared)?;
        let (shard, row_group) = self.unit_at(shared, self.unit);
        let row = self
            .current
            .as_ref()
            .and_then(|c| c.docs.docs.get(self.doc))
            .map(|d| d.0);
        Ok(Position {
            unit: self.unit,
            shard: shared.datasets[self.dataset].shards[shard as usize]
                .name
                .clone(),
            row_group,
            doc: self.doc as u32,
            row,
            offset: self.offset as u32,
            pending: self.pending.clone(),
        })
    }

    fn start_block(
        &mut self,
        shared: &Shared,
        index: u64,
        seq_len: usize,
    ) -> Result<(), DataError> {
        let start = self.position(shared)?;
        let size = shared.cfg.shuffle_buffer;
        let sequences = (0..size)
            .map(|_| self.cut(shared, seq_len))
            .collect::<Result<Vec<_>, _>>()?;
        let permutation = permutation(
            size,
            key(&[
                shared.cfg.seed,
                TAG_BLOCK,
                self.stream as u64,
                self.dataset as u64,
                index,
            ]),
        );
        self.block = Some(Block {
            state: BlockState {
                index,
                emitted: 0,
                seq_len,
                start,
            },
            sequences,
            permutation,
        });
        Ok(())
    }

    fn next_sequence(&mut self, shared: &Shared, seq_len: usize) -> Result<Vec<u32>, DataError> {
        let next_index = match &self.block {
            None => Some(0),
            Some(b) if b.state.emitted == b.sequences.len() || b.state.seq_len != seq_len => {
                Some(b.state.index + 1)
            }
            Some(_) => None,
        };
        if let Some(index) = next_index {
            self.start_block(shared, index, seq_len)?;
        }
        let b = self.block.as_mut().expect("block");
        let i = b.permutation[b.state.emitted] as usize;
        b.state.emitted += 1;
        Ok(std::mem::take(&mut b.sequences[i]))
    }

    fn state(&self, shared: &Shared) -> SubState {
        SubState {
            dataset: shared.datasets[self.dataset].name.clone(),
            block: self.block.as_ref().map(|b| b.state.clone()),
        }
    }

    fn restore(&mut self, shared: &Shared, state: &SubState) -> Result<(), DataError> {
        let Some(b) = &state.block else {
            return Ok(());
        };
        let s = &b.start;
        let stream = self.stream;
        let dataset = &shared.datasets[self.dataset];
        let damaged = |what: String| DataError::State {
            problem: format!(
                "dataset `{}` stream {stream}: {what}; the data state is damaged: resume from \
                 another checkpoint",
                dataset.name
            ),
        };
        let streams = shared.cfg.streams as u64;
        if s.unit
            .checked_mul(streams)
            .and_then(|i| i.checked_add(stream as u64))
            .is_none()
        {
            return Err(damaged(format!("unit {} is beyond any epoch", s.unit)));
        }
        if !shared.cfg.phases.iter().any(|p| p.seq_len == b.seq_len) {
            return Err(damaged(format!(
                "block {} was cut at length {}, which no data phase has",
                b.index, b.seq_len
            )));
        }
        self.unit = s.unit;
        self.current = None;
        self.queue.clear();
        self.doc = s.doc as usize;
        self.offset = s.offset as usize;
        self.pending = s.pending.clone();
        let (shard, row_group) = self.unit_at(shared, s.unit);
        let changed = |what: String| DataError::State {
            problem: format!(
                "dataset `{}` stream {stream}: {what}; the data changed since the state was saved",
                dataset.name
            ),
        };
        let name = &dataset.shards[shard as usize].name;
        if *name != s.shard || row_group != s.row_group {
            return Err(changed(format!(
                "unit {} is {name} row group {row_group}, the state says {} row group {}",
                s.unit, s.shard, s.row_group
            )));
        }
        if b.emitted > shared.cfg.shuffle_buffer || b.seq_len == 0 {
            return Err(changed(format!(
                "block {} says {} sequences of length {} were emitted from a buffer of {}",
                b.index, b.emitted, b.seq_len, shared.cfg.shuffle_buffer
            )));
        }
        self.load_current(shared)?;
        let docs = &self.current.as_ref().expect("loaded").docs.docs;
        let found = docs.get(self.doc).map(|d| d.0);
        let doc_len = docs.get(self.doc).map_or(0, |d| d.1.len());
        if self.doc > docs.len()
            || self.offset > doc_len
            || (self.offset > 0 && self.offset == doc_len)
        {
            return Err(changed(format!(
                "position document {} offset {} does not exist in {name} row group {row_group}",
                s.doc, s.offset
            )));
        }
        if found != s.row {
            return Err(changed(format!(
                "document {} of {name} row group {row_group} is row {found:?}, the state says {:?}",
                s.doc, s.row
            )));
        }
        self.start_block(shared, b.index, b.seq_len)?;
        self.block.as_mut().expect("block").state.emitted = b.emitted;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Streams and the pipeline.

struct Stream {
    id: usize,
    sequences: u64,
    subs: Vec<SubStream>,
    window: Option<(usize, u64, Vec<u16>)>,
}

impl Stream {
    fn next(
        &mut self,
        shared: &Shared,
        phase: usize,
        phase_start: u64,
    ) -> Result<(u16, Vec<u32>), DataError> {
        let size = shared.cfg.mixture_window as u64;
        let k = self.sequences - phase_start;
        let (window, pos) = (k / size, (k % size) as usize);
        if !matches!(&self.window, Some((p, w, _)) if *p == phase && *w == window) {
            let counts = window_counts(&shared.cfg.phases[phase].weights, size as usize);
            let mut slots: Vec<u16> = counts
                .iter()
                .enumerate()
                .flat_map(|(d, &c)| std::iter::repeat_n(d as u16, c))
                .collect();
            let p = permutation(
                slots.len(),
                key(&[
                    shared.cfg.seed,
                    TAG_MIX,
                    phase as u64,
                    self.id as u64,
                    window,
                ]),
            );
            slots = p.iter().map(|&i| slots[i as usize]).collect();
            self.window = Some((phase, window, slots));
        }
        let d = self.window.as_ref().expect("window").2[pos];
        let seq_len = shared.cfg.phases[phase].seq_len;
        let seq = self.subs[d as usize].next_sequence(shared, seq_len)?;
        self.sequences += 1;
        Ok((d, seq))
    }
}

/// The first global batch of each phase: a phase begins with the first batch at or after
/// its `start_tokens`.
fn phase_starts(cfg: &PipelineConfig) -> Result<Vec<u64>, DataError> {
    let mut starts = vec![0u64];
    let mut tokens = 0u64;
    let mut batch = 0u64;
    for (i, w) in cfg.phases.windows(2).enumerate() {
        let overflow = || DataError::Config {
            problem: format!(
                "phase {} starts at {} tokens, too far to count in batches of {} x {} tokens",
                i + 1,
                w[1].start_tokens,
                cfg.global_batch,
                w[0].seq_len
            ),
        };
        let per = cfg
            .global_batch
            .checked_mul(w[0].seq_len)
            .map(|p| p as u64)
            .ok_or_else(overflow)?;
        let count = w[1].start_tokens.saturating_sub(tokens).div_ceil(per);
        batch = batch.checked_add(count).ok_or_else(overflow)?;
        tokens = count
            .checked_mul(per)
            .and_then(|t| t.checked_add(tokens))
            .ok_or_else(overflow)?;
        starts.push(batch);
    }
    Ok(starts)
}

/// The pipeline of one data-parallel rank.
pub struct Pipeline {
    shared: Shared,
    tokenizer: Arc<Tokenizer>,
    streams: Vec<Stream>,
    phase_start_batch: Vec<u64>,
    batches: u64,
    fingerprint: String,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Pipeline(batch {}, streams {})",
            self.batches,
            self.streams.len()
        )
    }
}

impl Pipeline {
    /// Opens the datasets and the tokenizer and positions every stream of `rank` (of
    /// `world` data-parallel ranks) at the start.
    pub fn open(cfg: PipelineConfig, rank: usize, world: usize) -> Result<Self, DataError> {
        let config = |problem: String| DataError::Config { problem };
        if cfg.datasets.is_empty() {
            return Err(config("no dataset given".into()));
        }
        if world == 0 || rank >= world || !cfg.streams.is_multiple_of(world) {
            return Err(config(format!(
                "{world} data-parallel ranks cannot share data.streams = {} streams (rank {rank}); \
                 the number of streams must be a multiple of the data-parallel size",
                cfg.streams
            )));
        }
        if cfg.streams == 0
            || cfg.global_batch == 0
            || !cfg.global_batch.is_multiple_of(cfg.streams)
        {
            return Err(config(format!(
                "data.streams = {} must divide train.global_batch_size = {} (both at least 1)",
                cfg.streams, cfg.global_batch
            )));
        }
        if cfg.shuffle_buffer == 0 || cfg.mixture_window == 0 {
            return Err(config(
                "data.shuffle_buffer and data.mixture_window must be at least 1".into(),
            ));
        }
        if cfg.phases.is_empty() {
            return Err(config(
                "no data phase given; give one phase starting at token 0".into(),
            ));
        }
        for (i, p) in cfg.phases.iter().enumerate() {
            if p.weights.len() != cfg.datasets.len() || p.weights.iter().sum::<f64>() <= 0.0 {
                return Err(config(format!(
                    "phase {i} needs a positive weight for at least one dataset"
                )));
            }
            if p.weights.iter().any(|w| !w.is_finite() || *w < 0.0) {
                return Err(config(format!(
                    "phase {i} has weights {:?}; every mixture weight must be a finite number \
                     of at least 0",
                    p.weights
                )));
            }
            if p.seq_len == 0 {
                return Err(config(format!(
                    "phase {i} has sequence length 0; give it at least 1 token"
                )));
            }
        }
        let tokenizer = Arc::new(Tokenizer::load(&cfg.tokenizer, cfg.eod_token.as_deref())?);
        let datasets: Vec<Arc<Dataset>> = cfg
            .datasets
            .iter()
            .map(|spec| Dataset::open(spec, &cfg.storage, &tokenizer).map(Arc::new))
            .collect::<Result<_, _>>()?;
        let units = datasets.iter().map(|d| Arc::new(d.units())).collect();

        let starts = phase_starts(&cfg)?;

        let mut h = blake3::Hasher::new();
        h.update(&cfg.seed.to_le_bytes());
        for v in [
            cfg.streams,
            cfg.shuffle_buffer,
            cfg.mixture_window,
            cfg.global_batch,
        ] {
            h.update(&(v as u64).to_le_bytes());
        }
        h.update(&cfg.valid_fraction.to_le_bytes());
        h.update(tokenizer.fingerprint().as_bytes());
        for d in &datasets {
            h.update(d.fingerprint().as_bytes());
        }
        for p in &cfg.phases {
            h.update(&p.start_tokens.to_le_bytes());
            h.update(&(p.seq_len as u64).to_le_bytes());
            for w in &p.weights {
                h.update(&w.to_le_bytes());
            }
        }
        let fingerprint = h.finalize().to_hex()[..16].to_string();

        let shared = Shared {
            loader: Loader::new(cfg.workers, tokenizer.clone(), cfg.valid_fraction),
            budget: Arc::new(Budget {
                limit: cfg.read_ahead_bytes,
                used: Mutex::new(0),
            }),
            datasets,
            units,
            cfg,
        };
        let per_rank = shared.cfg.streams / world;
        let streams = (rank * per_rank..(rank + 1) * per_rank)
            .map(|id| Stream {
                id,
                sequences: 0,
                subs: (0..shared.datasets.len())
                    .map(|d| SubStream::new(&shared, id, d))
                    .collect(),
                window: None,
            })
            .collect();
        Ok(Self {
            shared,
            tokenizer,
            streams,
            phase_start_batch: starts,
            batches: 0,
            fingerprint,
        })
    }

    /// The tokenizer in use.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The open datasets.
    pub fn datasets(&self) -> Vec<&Dataset> {
        self.shared.datasets.iter().map(|d| d.as_ref()).collect()
    }

    /// Global batches delivered so far.
    pub fn batches(&self) -> u64 {
        self.batches
    }

    /// The phase global batch `batch` belongs to.
    pub fn phase_of(&self, batch: u64) -> usize {
        self.phase_start_batch
            .iter()
            .rposition(|&s| s <= batch)
            .expect("phase 0 starts at batch 0")
    }

    /// The next batch: this rank's `global_batch / world` sequences.
    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        let phase = self.phase_of(self.batches);
        let per_stream = (self.shared.cfg.global_batch / self.shared.cfg.streams) as u64;
        let phase_start = self.phase_start_batch[phase] * per_stream;
        let mut sequences = Vec::new();
        let mut datasets = Vec::new();
        for stream in &mut self.streams {
            for _ in 0..per_stream {
                let (d, seq) = stream.next(&self.shared, phase, phase_start)?;
                datasets.push(d);
                sequences.push(seq);
            }
        }
        let batch = Batch {
            index: self.batches,
            phase,
            seq_len: self.shared.cfg.phases[phase].seq_len,
            sequences,
            datasets,
            eod: self.tokenizer.eod(),
        };
        self.batches += 1;
        Ok(batch)
    }

    /// The position after the last batch delivered.
    pub fn state(&self) -> DataState {
        let shared = &self.shared;
        DataState {
            version: 1,
            seed: shared.cfg.seed,
            fingerprint: self.fingerprint.clone(),
            batches: self.batches,
            streams: self
                .streams
                .iter()
                .map(|s| StreamState {
                    stream: s.id,
                    sequences: s.sequences,
                    datasets: s.subs.iter().map(|sub| sub.state(shared)).collect(),
                })
                .collect(),
        }
    }

    /// Continues from `state` (saved by a world of any size that divides the streams,
    /// merged with `DataState::merge` when several ranks saved it).
    pub fn restore(&mut self, state: &DataState) -> Result<(), DataError> {
        if state.version != 1 {
            return Err(DataError::State {
                problem: format!(
                    "data state version {} is not supported (expected 1)",
                    state.version
                ),
            });
        }
        if state.fingerprint != self.fingerprint || state.seed != self.shared.cfg.seed {
            return Err(DataError::State {
                problem: "the data state was saved with a different data configuration (seed, \
                          datasets, tokenizer, streams, shuffle buffer, mixture window, batch size \
                          or phases); resume with the recipe it was saved with"
                    .into(),
            });
        }
        let shared = &self.shared;
        let per_stream = (shared.cfg.global_batch / shared.cfg.streams) as u64;
        let vocab = self.tokenizer.vocab_size();
        for stream in &mut self.streams {
            let saved = state
                .streams
                .iter()
                .find(|s| s.stream == stream.id)
                .ok_or_else(|| DataError::State {
                    problem: format!(
                        "the data state has no entry for stream {}; merge the states of every rank",
                        stream.id
                    ),
                })?;
            if state.batches.checked_mul(per_stream) != Some(saved.sequences) {
                return Err(DataError::State {
                    problem: format!(
                        "stream {} emitted {} sequences, but {} batches of {per_stream} per \
                         stream make {}; the data state is damaged: resume from another \
                         checkpoint",
                        stream.id,
                        saved.sequences,
                        state.batches,
                        state.batches.saturating_mul(per_stream)
                    ),
                });
            }
            stream.sequences = saved.sequences;
            stream.window = None;
            for sub in &mut stream.subs {
                let name = &shared.datasets[sub.dataset].name;
                let sub_state = saved
                    .datasets
                    .iter()
                    .find(|d| &d.dataset == name)
                    .ok_or_else(|| DataError::State {
                        problem: format!("the data state has no entry for dataset `{name}`"),
                    })?;
                let pending = sub_state.block.iter().flat_map(|b| &b.start.pending);
                if let Some(bad) = pending.into_iter().find(|&&id| id as usize >= vocab) {
                    return Err(DataError::State {
                        problem: format!(
                            "dataset `{name}` stream {}: pending token id {bad} is outside the \
                             tokenizer's {vocab} ids; resume with the tokenizer the state was \
                             saved with",
                            stream.id
                        ),
                    });
                }
                sub.restore(shared, sub_state)?;
            }
        }
        self.batches = state.batches;
        Ok(())
    }

    /// Up to `count` held-out sequences of `seq_len + 1` ids per dataset, packed in the
    /// datasets' natural order (the same for every seed and world size).
    pub fn validation(
        &self,
        count: usize,
        seq_len: usize,
    ) -> Result<Vec<ValidationSet>, DataError> {
        let shared = &self.shared;
        let mut out = Vec::new();
        for dataset in &shared.datasets {
            let mut sequences = Vec::new();
            let mut pending: Vec<u32> = Vec::new();
            let units = dataset.units();
            let ahead = shared.cfg.workers.max(1) * 2;
            let mut queue: VecDeque<Reply> = VecDeque::new();
            let mut next = 0;
            while sequences.len() < count {
                while queue.len() < ahead && next < units.len() {
                    queue.push_back(shared.loader.submit(
                        dataset,
                        units[next],
                        Split::Validation,
                        false,
                    ));
                    next += 1;
                }
                let Some(rx) = queue.pop_front() else { break };
                for (_, ids) in shared.loader.receive(rx)?.docs {
                    pending.extend_from_slice(&ids);
                    while pending.len() > seq_len && sequences.len() < count {
                        sequences.push(pending[..seq_len + 1].to_vec());
                        pending.drain(..seq_len);
                    }
                }
            }
            out.push((dataset.name.clone(), sequences));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_counts_are_exact_and_sum_to_the_window() {
        assert_eq!(window_counts(&[0.7, 0.3], 10), vec![7, 3]);
        assert_eq!(window_counts(&[1.0, 1.0, 1.0], 10), vec![4, 3, 3]);
        assert_eq!(window_counts(&[0.0, 2.0], 5), vec![0, 5]);
        assert_eq!(
            window_counts(&[0.5, 0.25, 0.25], 7).iter().sum::<usize>(),
            7
        );
    }

    #[test]
    fn segment_ids_start_after_each_end_of_document() {
        let b = Batch {
            index: 0,
            phase: 0,
            seq_len: 5,
            sequences: vec![vec![1, 9, 2, 3, 9, 4]],
            datasets: vec![0],
            eod: 9,
        };
        assert_eq!(b.segment_ids(), vec![0, 0, 1, 1, 1]);
    }

    #[test]
    fn permutations_are_keyed_and_complete() {
        let a = permutation(100, key(&[1, 2, 3]));
        let b = permutation(100, key(&[1, 2, 4]));
        assert_ne!(a, b);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
    }
}
