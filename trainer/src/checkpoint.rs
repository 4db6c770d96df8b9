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
    Checkpoints, Dtype, HostTensor, Loaded, RankLayout, RankState, SaveRequest, Slice, World,
};
use catapult_data::{DataState, Pipeline};
use catapult_kernels::comm::Comm;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
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

    /// The state a loaded checkpoint carries; the error names the checkpoint.
    pub fn of(loaded: &Loaded) -> Result<Self, TrainError> {
        let value = loaded.states.first().cloned().unwrap_or_default();
        serde_json::from_value(value).map_err(|e| {
            TrainError::Checkpoint(format!(
                "{}: the trainer state of rank 0 does not parse ({e}); it was written by \
                 another version of catapult: resume with that version, or start a new run",
                loaded.location
            ))
        })
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
        step,
        tokens,
        recipe: serde_json::to_value(recipe).expect("recipes serialize"),
        world: single_world(recipe),
        ranks: vec![RankState {
            rank: 0,
            tensors,
            slices: BTreeMap::new(),
            state: state.to_value(),
        }],
        growth: state
            .growth
            .as_ref()
            .map(|g| serde_json::to_value(g).expect("a growth record serializes")),
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

/// The checkpoint `resume` names, loaded by `policy` (None: `auto` found none).
pub fn open_resume(
    store: &Checkpoints,
    resume: &Resume,
    options: &catapult_data::StorageOptions,
    policy: LoadPolicy,
) -> Result<Option<Loaded>, TrainError> {
    let (verify, fallback) = (policy.verify, policy.fallback);
    match resume {
        Resume::Auto => {
            let found = store.load_newest(verify, fallback)?;
            if found.is_none() {
                eprintln!("no checkpoint under {}: starting from step 0", store.root());
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
                Ok(Some(root.load(step, verify)?))
            }
            (root, None) => root
                .load_newest(verify, fallback)?
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
        eprintln!(
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
    /// Puts `loaded` into the model, optimizer, controller and pipeline. Experts are
    /// saved whole (assembled from the ranks' slices); each rank takes its rows,
    /// whatever layout wrote them.
    pub fn restore(&mut self, loaded: &Loaded) -> Result<(), TrainError> {
        let bad =
            |problem: String| TrainError::Checkpoint(format!("{}: {problem}", loaded.location));
        let (part, parts) = (self.par.expert.rank(), self.par.expert_size);
        let get = |name: &str| -> Option<HostTensor> {
            if is_expert_param(name) {
                loaded.slice_for(name, part, parts)
            } else {
                loaded.tensors.get(name).cloned()
            }
        };
        let index: BTreeMap<String, usize> = (self.optimizer.parameters().iter())
            .enumerate()
            .map(|(i, (n, _))| (n.clone(), i))
            .collect();
        for (name, var) in self.built.named() {
            let saved = get(&name).ok_or_else(|| bad(format!("no tensor {name}")))?;
            let what = format!("{}: {name}", loaded.location);
            match (self.sliced.as_mut(), index.get(&name)) {
                (Some((gather, plan)), Some(&i)) if gather.holds_slices_of(i) => {
                    // Sharded parameters: the slice is the value (the tensor only points
                    // into a gather buffer, perhaps as a bf16 working copy).
                    let master = &self.optimizer.parameters()[i].1;
                    check_shape(master, &saved, &what)?;
                    gather.load(plan, i, &from_host(&saved));
                }
                _ => copy_into(&var, &saved, &what)?,
            }
        }
        let state = TrainerState::of(loaded)?;
        self.optimizer
            .restore(|k| get(k).as_ref().map(from_host), &state.optimizer_steps)
            .map_err(|e| bad(e.to_string()))?;
        self.controller.restore(state.expert_bias_controller);
        self.built.set_expert_bias(self.controller.bias());
        self.pipeline.restore(&state.data_state)?;
        Ok(())
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

/// The AdamW moments whole where a checkpoint needs them: a sharded moment is
/// assembled from its slices on its group's first rank (world rank 0 for dense ones,
/// replica 0 for expert ones) and left out elsewhere. Every rank calls it.
fn whole_moments(par: &Parallel, plan: &ShardPlan, optimizer: &AdamW) -> Vec<(String, Tensor)> {
    let moments = optimizer.moments();
    let shapes: Vec<Vec<i64>> = optimizer
        .parameters()
        .iter()
        .map(|(_, p)| p.size())
        .collect();
    let kind = |first: usize| -> Vec<Tensor> {
        moments
            .iter()
            .skip(first)
            .step_by(2)
            .map(|(_, t)| t.shallow_clone())
            .collect()
    };
    let avg = plan.gather_whole(par, &kind(0), &shapes);
    let sq = plan.gather_whole(par, &kind(1), &shapes);
    let mut out = Vec::with_capacity(moments.len());
    for (pair, (a, s)) in moments.chunks(2).zip(avg.into_iter().zip(sq)) {
        out.extend(a.map(|t| (pair[0].0.clone(), t)));
        out.extend(s.map(|t| (pair[1].0.clone(), t)));
    }
    out
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

/// What rank 0 saves at `step`: host copies of the model and optimizer tensors (the
/// experts as the slices each expert-parallel rank holds, with their slice map) and
/// `state`. None on other ranks; every rank calls it.
pub fn save_request(
    recipe: &Recipe,
    par: &Parallel,
    built: &BuiltModel,
    optimizer: (&AdamW, &ShardPlan, Option<&ParamGather>),
    state: &TrainerState,
    tokens: u64,
) -> Option<SaveRequest> {
    let (optimizer, plan, gather) = optimizer;
    let mut named = whole_named(par, built, (optimizer, plan, gather));
    named.extend(whole_moments(par, plan, optimizer));
    let shards = gather_expert_shards(par, &named)?;
    let tensors: Vec<_> = named
        .iter()
        .filter(|(n, _)| !is_expert_param(n))
        .map(|(n, t)| to_host(n, t))
        .collect();
    let step = state.scheduler.step as u64;
    let mut request = request(recipe, step, tokens, tensors, state);
    let n = recipe.model.n_routed_experts;
    let per = n / par.expert_size;
    request.world = world_of(par, n);
    for (e, shard) in shards.into_iter().enumerate() {
        let slices = shard
            .iter()
            .map(|h| {
                (
                    h.name.clone(),
                    Slice {
                        start: e * per,
                        full: n,
                    },
                )
            })
            .collect();
        if e == 0 {
            request.ranks[0].tensors.extend(shard);
            request.ranks[0].slices = slices;
        } else {
            request.ranks.push(RankState {
                rank: e,
                tensors: shard,
                slices,
                state: serde_json::Value::Null,
            });
        }
    }
    Some(request)
}
