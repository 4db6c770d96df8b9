//! The trainer's side of checkpoints: what a rank saves and how it comes back. It owns
//! `TrainerState` (the typed, non-tensor part: optimizer update counts, controller
//! state, data position, schedule position, the RNG rule, a growth record), the host
//! copies of tensors, assembling a save request over the mesh, finding the checkpoint a
//! resumed run names, and restoring a loaded checkpoint into the model, optimizer,
//! controller and pipeline. The storage format itself is the checkpoints crate's.

use crate::bias_control::{BiasControlState, ExpertBiasController};
use crate::error::TrainError;
use crate::init::BuiltModel;
use crate::optim::{learning_rate, AdamW};
use crate::parallel::{is_expert_param, Parallel, ParamGather, ShardPlan};
use crate::recipe::Recipe;
use catapult_checkpoints::{
    Checkpoints, Dtype, HostTensor, Loaded, ManifestHead, Piece, RankLayout, RankState, Reader,
    SaveRequest, World,
};
use catapult_data::{DataState, Pipeline};
use catapult_kernels::comm::Comm;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::Range;
use tch::{Device, Kind, Tensor};

/// Where a resumed run comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The newest valid checkpoint under the recipe's checkpoint root (start fresh if none).
    Auto,
    /// A checkpoint root, or one step directory (`.../step-00000100`).
    Path(String),
}

impl std::str::FromStr for Resume {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(if s == "auto" {
            Resume::Auto
        } else {
            Resume::Path(s.to_string())
        })
    }
}

/// How checkpoints are read: BLAKE3-verified or not, falling back to an older one when
/// the newest is broken or not.
#[derive(Debug, Clone, Copy)]
pub struct LoadPolicy {
    /// Check every file's hash.
    pub verify: bool,
    /// Try older checkpoints when the newest does not load.
    pub fallback: bool,
}

/// The schedule's position when the checkpoint was written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulePosition {
    /// Optimizer steps taken.
    pub step: usize,
    /// The learning rate of the next step.
    pub next_lr: f64,
}

/// How random numbers are drawn, so a resumed run draws the same ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngRule {
    /// The torch generator's rule.
    pub torch: String,
    /// The data pipeline's.
    pub data: String,
}

impl RngRule {
    /// The rule this trainer follows.
    pub fn current() -> Self {
        Self {
            torch: "manual_seed(seed ^ (step << 20)) before every step".into(),
            data: "counter-based, in data_state".into(),
        }
    }
}

/// What a growth step did (also in the manifest's `growth` field).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrowthRecord {
    /// The checkpoint grown from.
    pub from: String,
    /// Its layers.
    pub from_layers: usize,
    /// The stacking factor.
    pub factor: usize,
    /// Layers after growth.
    pub layers: usize,
    /// What happened to the optimizer's moments.
    pub optimizer: crate::recipe::OptimizerInit,
    /// The step grown at.
    pub step: u64,
    /// Tokens seen at growth.
    pub tokens: u64,
}

/// The non-tensor state of a run, saved by rank 0 beside the tensors (`states[0]` of a
/// checkpoint, as JSON). Every field is typed: save, restore and growth go through it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Every rank's data streams, merged.
    pub data_state: DataState,
    /// The expert-bias controller.
    pub expert_bias_controller: BiasControlState,
    /// AdamW updates applied to each parameter, by name.
    pub optimizer_steps: BTreeMap<String, i32>,
    /// The learning-rate schedule's position.
    pub scheduler: SchedulePosition,
    /// How random numbers are drawn.
    pub rng: RngRule,
    /// Set when this checkpoint was made by growing another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub growth: Option<GrowthRecord>,
}

impl TrainerState {
    /// The state of a run at `step`.
    pub fn capture(
        recipe: &Recipe,
        optimizer: &AdamW,
        controller: &ExpertBiasController,
        data_state: DataState,
        step: usize,
    ) -> Self {
        let last = recipe.train.steps.saturating_sub(1);
        Self {
            data_state,
            expert_bias_controller: controller.state().clone(),
            optimizer_steps: optimizer.update_counts(),
            scheduler: SchedulePosition {
                step,
                next_lr: learning_rate(&recipe.train, step.min(last)),
            },
            rng: RngRule::current(),
            growth: None,
        }
    }

    /// The state a loaded checkpoint carries, with every rank's data streams merged
    /// (each rank writes its own since version 2; version 1's rank 0 wrote them merged);
    /// the error names the checkpoint.
    pub fn of(loaded: &Loaded) -> Result<Self, TrainError> {
        let unreadable = |rank: usize, e: String| {
            TrainError::Checkpoint(format!(
                "{}: the trainer state of rank {rank} does not parse ({e}); it was written by \
                 another version of catapult: resume with that version, or start a new run",
                loaded.location
            ))
        };
        let value = loaded.states.first().cloned().unwrap_or_default();
        let mut state: Self =
            serde_json::from_value(value).map_err(|e| unreadable(0, e.to_string()))?;
        if loaded.manifest.version >= 2 {
            let mut streams = Vec::with_capacity(loaded.states.len());
            for (rank, s) in loaded.states.iter().enumerate() {
                let d: DataState = serde_json::from_value(s["data_state"].clone())
                    .map_err(|e| unreadable(rank, e.to_string()))?;
                streams.push(d);
            }
            state.data_state = DataState::merge(&streams)?;
        }
        Ok(state)
    }

    /// As JSON, for the checkpoint.
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a trainer state serializes")
    }
}

fn dtype(kind: Kind) -> Dtype {
    match kind {
        Kind::Float => Dtype::F32,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        other => unreachable!("the model holds no {other:?} tensors"),
    }
}

fn kind(dtype: Dtype) -> Kind {
    match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
    }
}

/// A host copy of `t` (the only part of an asynchronous save that blocks training).
pub fn to_host(name: &str, t: &Tensor) -> HostTensor {
    let cpu = t.detach().to_device(Device::Cpu).contiguous();
    let d = dtype(cpu.kind());
    let numel = cpu.numel();
    let mut data = vec![0u8; numel * d.size()];
    cpu.copy_data_u8(&mut data, numel);
    HostTensor {
        name: name.to_string(),
        dtype: d,
        shape: cpu.size().iter().map(|&s| s as usize).collect(),
        data: data.into(),
    }
}

/// A CPU tensor with `h`'s contents.
pub fn from_host(h: &HostTensor) -> Tensor {
    let shape: Vec<i64> = h.shape.iter().map(|&s| s as i64).collect();
    Tensor::from_data_size(&h.data, &shape, kind(h.dtype))
}

/// Whether `h` has `dst`'s shape and type; a difference is named (`what`: where).
fn check_shape(dst: &Tensor, h: &HostTensor, what: &str) -> Result<(), TrainError> {
    let want: Vec<usize> = dst.size().iter().map(|&s| s as usize).collect();
    if want != h.shape || dtype(dst.kind()) != h.dtype {
        return Err(TrainError::Checkpoint(format!(
            "{what}: the checkpoint holds {:?} {:?}, the model needs {:?} {:?}",
            h.dtype,
            h.shape,
            dtype(dst.kind()),
            want
        )));
    }
    Ok(())
}

/// Copies `h` into `dst` in place; a different shape or type is named (`what`: where).
pub fn copy_into(dst: &Tensor, h: &HostTensor, what: &str) -> Result<(), TrainError> {
    check_shape(dst, h, what)?;
    tch::no_grad(|| {
        let mut d = dst.shallow_clone();
        d.copy_(&from_host(h).to_device(dst.device()));
    });
    Ok(())
}

/// The single-process world: one rank owning every expert.
pub fn single_world(recipe: &Recipe) -> World {
    World {
        data_parallel: 1,
        expert_parallel: 1,
        ranks: vec![RankLayout {
            rank: 0,
            data_parallel_rank: 0,
            experts: [0, recipe.model.n_routed_experts],
        }],
    }
}

/// A save request for a single-rank run holding every tensor whole.
pub fn request(
    recipe: &Recipe,
    step: u64,
    tokens: u64,
    tensors: Vec<HostTensor>,
    state: &TrainerState,
) -> SaveRequest {
    SaveRequest {
        head: ManifestHead {
            step,
            tokens,
            recipe: serde_json::to_value(recipe).expect("recipes serialize"),
            world: single_world(recipe),
            growth: state
                .growth
                .as_ref()
                .map(|g| serde_json::to_value(g).expect("a growth record serializes")),
        },
        ranks: vec![RankState {
            rank: 0,
            tensors,
            pieces: BTreeMap::new(),
            state: state.to_value(),
        }],
    }
}

/// Refuses a checkpoint whose model section differs from the recipe's, naming every
/// differing field.
pub fn check_model(recipe: &Recipe, loaded: &Loaded) -> Result<(), TrainError> {
    let ours = serde_json::to_value(&recipe.model).expect("model config serializes");
    let theirs = &loaded.manifest.recipe["model"];
    let mut diffs = Vec::new();
    if let (Some(a), Some(b)) = (ours.as_object(), theirs.as_object()) {
        for (k, v) in a {
            if b.get(k) != Some(v) {
                diffs.push(format!(
                    "model.{k} is {v} in the recipe but {} in the checkpoint",
                    b.get(k).map_or("absent".to_string(), |x| x.to_string())
                ));
            }
        }
    } else {
        diffs.push("the checkpoint's manifest has no model section".into());
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(TrainError::Checkpoint(format!(
            "{}: cannot resume: {}; resume with the recipe the checkpoint was written with \
             (its resolved copy is in the manifest), or start a new run",
            loaded.location,
            diffs.join("; ")
        )))
    }
}

/// The checkpoint `resume` names, loaded by `policy` by every rank of `comm` together
/// (they split the hashing and skip the same broken steps; None: `auto` found none).
pub fn open_resume(
    store: &Checkpoints,
    resume: &Resume,
    options: &catapult_data::StorageOptions,
    (policy, comm): (LoadPolicy, &Comm),
) -> Result<Option<Loaded>, TrainError> {
    let fallback = policy.fallback;
    let agree = |problem: Option<String>| agree_on_problem(comm, problem);
    let reader = Reader {
        verify: policy.verify,
        rank: comm.rank(),
        world: comm.size(),
        agree: &agree,
    };
    match resume {
        Resume::Auto => {
            let found = store.load_newest_as(&reader, fallback)?;
            if found.is_none() {
                catapult_data::log_line!(
                    "no checkpoint under {}: starting from step 0",
                    store.root()
                );
            }
            Ok(found)
        }
        Resume::Path(path) => match Checkpoints::open_path(path, options)? {
            (root, Some(step)) => {
                // Newer checkpoints collide only when this run saves beside them.
                let same_root = same_place(root.root(), store.root());
                let newer: Vec<String> = root
                    .steps()?
                    .into_iter()
                    .filter(|&s| same_root && s > step)
                    .map(catapult_checkpoints::step_dir)
                    .collect();
                if !newer.is_empty() {
                    return Err(TrainError::Checkpoint(format!(
                        "--resume {path}: {} also holds newer checkpoints ({}); a run rolled back \
                         to step {step} would collide with them. Move them away (or copy this \
                         step to a new checkpoint.dir) first",
                        root.root(),
                        newer.join(", ")
                    )));
                }
                Ok(Some(root.load_as(step, &reader)?))
            }
            (root, None) => root
                .load_newest_as(&reader, fallback)?
                .map(|mut l| {
                    // Broken steps of another run's root are left alone (this run never
                    // saves there, so they cannot collide with its saves).
                    if !same_place(root.root(), store.root()) {
                        l.passed_over.clear();
                    }
                    Some(l)
                })
                .ok_or_else(|| {
                    TrainError::Checkpoint(format!(
                        "--resume {path}: no checkpoint there (a step-NNNNNNNN directory with a \
                     manifest.json); check the path or use --resume auto"
                    ))
                }),
        },
    }
}

/// Every rank's problem (None: none), agreed: the lowest failing rank's, on every rank.
pub fn agree_on_problem(comm: &Comm, problem: Option<String>) -> Option<(usize, String)> {
    let mine = problem.map(String::into_bytes).unwrap_or_default();
    let (all, counts) = comm.all_gather_v(&mine);
    let mut at = 0;
    for (rank, n) in counts.into_iter().enumerate() {
        if n > 0 {
            return Some((rank, String::from_utf8_lossy(&all[at..at + n]).into_owned()));
        }
        at += n;
    }
    None
}

/// Whether two checkpoint roots are one place (local paths compared after resolving
/// them; URLs as written).
fn same_place(a: &str, b: &str) -> bool {
    let resolve = |p: &str| std::fs::canonicalize(p).unwrap_or_else(|_| p.into());
    a == b || (!a.contains("://") && !b.contains("://") && resolve(a) == resolve(b))
}

/// Moves the broken checkpoints `loaded` passed over into quarantine (rank 0, once
/// every rank has loaded), so the run's next save of their step does not collide with
/// them and retention never counts them.
pub fn quarantine_passed_over(store: &Checkpoints, loaded: &Loaded) -> Result<(), TrainError> {
    for (step, reason) in &loaded.passed_over {
        let to = store.quarantine(*step, reason)?;
        catapult_data::log_line!(
            "warning: moved the broken checkpoint {} to {to} (see reason.txt there)",
            catapult_checkpoints::step_dir(*step)
        );
    }
    Ok(())
}

/// The parts of a run a checkpoint restores into.
pub struct Restorable<'a> {
    /// The mesh (which expert rows this rank takes).
    pub par: &'a Parallel,
    /// The model.
    pub built: &'a BuiltModel,
    /// The optimizer.
    pub optimizer: &'a mut AdamW,
    /// The parameter slices, with `parallel.shard: parameters` (and their layout).
    pub sliced: Option<(&'a mut ParamGather, &'a ShardPlan)>,
    /// The expert-bias controller.
    pub controller: &'a mut ExpertBiasController,
    /// The data pipeline.
    pub pipeline: &'a mut Pipeline,
}

impl Restorable<'_> {
    /// Puts `loaded` into the model, optimizer, controller and pipeline, reading only
    /// what this rank holds: its experts' rows, its slices of sharded parameters and
    /// moments, the dense tensors it keeps whole; whatever layout wrote them.
    pub fn restore(&mut self, loaded: &Loaded) -> Result<(), TrainError> {
        let bad =
            |problem: String| TrainError::Checkpoint(format!("{}: {problem}", loaded.location));
        let read = LocalReader {
            loaded,
            part: self.par.expert.rank(),
            parts: self.par.expert_size,
        };
        let index: BTreeMap<String, usize> = (self.optimizer.parameters().iter())
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        for (name, var) in self.built.named() {
            let what = format!("{}: {name}", loaded.location);
            match (self.sliced.as_mut(), index.get(&name)) {
                (Some((gather, plan)), Some(&i)) if gather.holds_slices_of(i) => {
                    // Sharded parameters: the slice is the value (the tensor only points
                    // into a gather buffer, perhaps as a bf16 working copy).
                    let shape = self.optimizer.parameters()[i].1.size();
                    let own = gather.owned(plan, i);
                    let part = read.get(&name, &shape, own)?;
                    gather.load(plan, i, &from_host(&part));
                }
                _ => {
                    let whole = read.get(&name, &var.size(), None)?;
                    copy_into(&var, &whole, &what)?;
                }
            }
        }
        let state = TrainerState::of(loaded)?;
        self.optimizer
            .restore(
                |key, shape, range| {
                    read.get(key, shape, range)
                        .map(|h| from_host(&h))
                        .map_err(|e| crate::optim::OptimError::Read {
                            key: key.to_string(),
                            problem: e.to_string(),
                        })
                },
                &state.optimizer_steps,
            )
            .map_err(|e| bad(e.to_string()))?;
        self.controller.restore(state.expert_bias_controller);
        self.built.set_expert_bias(self.controller.bias());
        self.pipeline.restore(&state.data_state)?;
        Ok(())
    }
}

/// Reads a rank's local tensors from a checkpoint: an expert tensor is this rank's rows
/// (`part` of `parts`) of the stored one, anything else the stored tensor itself.
struct LocalReader<'a> {
    loaded: &'a Loaded,
    part: usize,
    parts: usize,
}

impl LocalReader<'_> {
    /// The local tensor `name` of `shape`: the flat elements `range` of it, or all of
    /// it in its shape (None). A stored shape that does not give `shape` is named.
    fn get(
        &self,
        name: &str,
        shape: &[i64],
        range: Option<Range<usize>>,
    ) -> Result<HostTensor, TrainError> {
        let bad = |problem: String| {
            TrainError::Checkpoint(format!("{}: {problem}", self.loaded.location))
        };
        let info = (self.loaded.info(name)).ok_or_else(|| bad(format!("no tensor {name}")))?;
        let mut local: Vec<usize> = info.shape.clone();
        let mut base = 0;
        if is_expert_param(name) {
            let rows = local.first().copied().unwrap_or(0);
            if rows % self.parts != 0 {
                return Err(bad(format!(
                    "{name} has {rows} experts, which do not split over {} expert-parallel \
                     ranks; resume with an expert-parallel size that divides {rows}",
                    self.parts
                )));
            }
            local[0] = rows / self.parts;
            base = self.part * local.iter().product::<usize>();
        }
        let want: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        if local != want {
            return Err(bad(format!(
                "{name}: the checkpoint holds {:?} {:?} (this rank's part {local:?}), the \
                 model needs {want:?}",
                info.dtype, info.shape
            )));
        }
        let numel: usize = local.iter().product();
        let r = range.unwrap_or(0..numel);
        let mut h = self.loaded.read(name, base + r.start..base + r.end)?;
        if r.len() == numel {
            h.shape = local;
        }
        Ok(h)
    }
}

/// The data state of every rank, merged (each rank holds its own streams).
pub fn gather_data_state(comm: &Comm, pipeline: &Pipeline) -> Result<DataState, TrainError> {
    let mine = serde_json::to_vec(&pipeline.state()).expect("data states serialize");
    let (all, counts) = comm.all_gather_v(&mine);
    let mut states = Vec::new();
    let mut at = 0;
    for (rank, c) in counts.into_iter().enumerate() {
        let state = serde_json::from_slice(&all[at..at + c]).map_err(|e| {
            catapult_data::DataError::State {
                problem: format!("rank {rank} sent a data state that does not parse: {e}"),
            }
        })?;
        states.push(state);
        at += c;
    }
    Ok(DataState::merge(&states)?)
}

/// Every variable of the model by name, with sharded parameters (`parallel.shard:
/// parameters`) assembled whole from their slices on the rank that saves them (their
/// group's first rank); elsewhere such a tensor is left as it is, since it points into
/// a gather buffer and no one saves it from there. Every rank calls it.
pub fn whole_named(
    par: &Parallel,
    built: &BuiltModel,
    (optimizer, plan, gather): (&AdamW, &ShardPlan, Option<&ParamGather>),
) -> Vec<(String, Tensor)> {
    let named = built.named();
    let Some(gather) = gather else {
        return named;
    };
    let params = optimizer.parameters();
    let slices: Vec<Tensor> = (0..params.len())
        .map(|i| {
            gather
                .master(plan, i)
                .unwrap_or_else(|| params[i].1.shallow_clone())
        })
        .collect();
    let shapes: Vec<Vec<i64>> = params.iter().map(|(_, p)| p.size()).collect();
    let whole: BTreeMap<&str, Tensor> = params
        .iter()
        .zip(plan.gather_whole(par, &slices, &shapes))
        .filter_map(|((n, _), t)| t.map(|t| (n.as_str(), t)))
        .collect();
    named
        .into_iter()
        .map(|(n, t)| match whole.get(n.as_str()) {
            Some(w) => (n, w.shallow_clone()),
            None => (n, t),
        })
        .collect()
}

/// The expert tensors (parameters and their optimizer moments) of every expert-parallel
/// rank of replica 0, as host copies, gathered on rank 0 (Some there, None elsewhere).
/// Every rank of the world calls it; only replica 0 moves data.
fn gather_expert_shards(par: &Parallel, mine: &[(String, Tensor)]) -> Option<Vec<Vec<HostTensor>>> {
    let experts: Vec<HostTensor> = mine
        .iter()
        .filter(|(n, _)| is_expert_param(n))
        .map(|(n, t)| to_host(n, t))
        .collect();
    if par.world.rank() >= par.expert_size {
        return None;
    }
    let bytes: Vec<u8> = experts
        .iter()
        .flat_map(|h| h.data.iter().copied())
        .collect();
    let (all, counts) = par.expert.gather_v(&bytes, 0)?;
    // Every rank holds the same names and shapes (an even split).
    let mut shards = Vec::with_capacity(counts.len());
    let mut at = 0;
    for _ in &counts {
        let mut shard = Vec::with_capacity(experts.len());
        for h in &experts {
            let n = h.data.len();
            shard.push(HostTensor {
                data: all[at..at + n].to_vec().into(),
                ..h.clone()
            });
            at += n;
        }
        shards.push(shard);
    }
    Some(shards)
}

/// Every tensor of the model whole, on rank 0 (None elsewhere): expert tensors are
/// assembled from the expert-parallel ranks' shards.
pub fn full_tensors(par: &Parallel, mine: &[(String, Tensor)]) -> Option<Vec<(String, Tensor)>> {
    let shards = gather_expert_shards(par, mine)?;
    let mut out = Vec::with_capacity(mine.len());
    let mut expert_index = 0;
    for (name, t) in mine {
        if !is_expert_param(name) {
            out.push((name.clone(), t.shallow_clone()));
            continue;
        }
        let pieces: Vec<Tensor> = shards.iter().map(|s| from_host(&s[expert_index])).collect();
        expert_index += 1;
        out.push((name.clone(), Tensor::cat(&pieces, 0)));
    }
    Some(out)
}

/// The mesh's layout as the manifest records it.
fn world_of(par: &Parallel, n_experts: usize) -> World {
    let per = n_experts / par.expert_size;
    World {
        data_parallel: par.data_size,
        expert_parallel: par.expert_size,
        ranks: (0..par.world.size())
            .map(|r| RankLayout {
                rank: r,
                data_parallel_rank: r / par.expert_size,
                experts: [(r % par.expert_size) * per, (r % par.expert_size + 1) * per],
            })
            .collect(),
    }
}

/// The manifest's head of a checkpoint of this run at `state`'s step.
pub fn manifest_head(
    recipe: &Recipe,
    par: &Parallel,
    state: &TrainerState,
    tokens: u64,
) -> ManifestHead {
    ManifestHead {
        step: state.scheduler.step as u64,
        tokens,
        recipe: serde_json::to_value(recipe).expect("recipes serialize"),
        world: world_of(par, recipe.model.n_routed_experts),
        growth: None,
    }
}

/// What this rank writes at a save: host copies of its pieces of every model and
/// optimizer tensor (its part of each parameter and moment under its shard group's
/// layout, at the parameter's place in the full tensor: its experts' rows for expert
/// tensors) and `state` with its own data streams. Nothing is gathered: every rank
/// writes its own pieces, and together they tile every tensor once.
pub fn rank_state(
    par: &Parallel,
    built: &BuiltModel,
    (optimizer, plan, gather): (&AdamW, &ShardPlan, Option<&ParamGather>),
    state: &TrainerState,
) -> RankState {
    let params = optimizer.parameters();
    let ranges = plan.saved_ranges(params.len());
    let index: BTreeMap<&str, usize> = params
        .iter()
        .enumerate()
        .map(|(i, (n, _))| (n.as_str(), i))
        .collect();
    let held = optimizer.owned_ranges();
    let moments = optimizer.moments();
    let mut out = RankState {
        rank: par.world.rank(),
        tensors: Vec::new(),
        pieces: BTreeMap::new(),
        state: state.to_value(),
    };
    for (name, var) in built.named() {
        let Some(&i) = index.get(name.as_str()) else {
            // Buffers (the expert biases): replicated and small, written by rank 0.
            if par.world.rank() == 0 {
                out.tensors.push(to_host(&name, &var));
            }
            continue;
        };
        let Some(r) = ranges[i].clone() else {
            // A world of one: every tensor whole.
            out.tensors.push(to_host(&name, &var));
            for m in &moments[2 * i..2 * i + 2] {
                out.tensors.push(to_host(&m.0, &m.1));
            }
            continue;
        };
        let value = match gather.and_then(|g| g.master(plan, i)) {
            Some(slice) => slice,
            None => var
                .detach()
                .reshape([-1])
                .narrow(0, r.start as i64, r.len() as i64),
        };
        let moment = |t: &Tensor| match &held[i] {
            Some(_) => t.shallow_clone(),
            None => t.reshape([-1]).narrow(0, r.start as i64, r.len() as i64),
        };
        let pieces = [
            (name.clone(), value),
            (moments[2 * i].0.clone(), moment(&moments[2 * i].1)),
            (moments[2 * i + 1].0.clone(), moment(&moments[2 * i + 1].1)),
        ];
        for (n, t) in pieces {
            if r.is_empty() {
                continue;
            }
            let (start, shape) = place_in_full(par, &n, &var.size(), r.start);
            out.tensors.push(to_host(&n, &t));
            out.pieces.insert(n, Piece { start, shape });
        }
    }
    out
}

/// Where element `at` of this rank's local tensor `name` (of `local` shape) sits in the
/// full tensor, and the full tensor's shape: expert tensors hold this rank's rows of
/// the stacked experts, anything else is the full tensor.
fn place_in_full(par: &Parallel, name: &str, local: &[i64], at: usize) -> (usize, Vec<usize>) {
    let mut shape: Vec<usize> = local.iter().map(|&d| d as usize).collect();
    if !is_expert_param(name) {
        return (at, shape);
    }
    let numel: usize = shape.iter().product();
    shape[0] *= par.expert_size;
    (par.expert.rank() * numel + at, shape)
}
