//! The layout planner (`catapult plan`): for a recipe on a stated cluster, every layout
//! catapult can run (expert-parallel size, shard mode, recomputation, micro-batch size;
//! the data-parallel size follows from the world), its memory per rank and step time
//! from `sizing::Plan` (the step time as the trainer overlaps its collectives), the
//! ones that fit the memory with the stated headroom ranked fastest first, and, where
//! none reaches a target, by how much and what a missing dimension (tensor or pipeline
//! parallelism) would change, with numbers from the same arithmetic.

use crate::recipe::{Recipe, Recompute, ShardMode};
use crate::sizing::{Cluster, Plan};
use serde::Serialize;

/// What a layout must fit and reach.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Goal {
    /// Memory per GPU, bytes.
    pub memory_bytes: f64,
    /// Fraction of it kept free.
    pub headroom: f64,
    /// Tokens to train on, with the days they should take.
    pub target: Option<(f64, f64)>,
}

impl Goal {
    /// Bytes a layout may use.
    pub fn budget(&self) -> f64 {
        self.memory_bytes * (1.0 - self.headroom)
    }
}

/// One layout and its estimate.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    /// `parallel.expert`.
    pub expert: usize,
    /// `parallel.shard`.
    pub shard: ShardMode,
    /// `train.recompute`.
    pub recompute: Recompute,
    /// `train.micro_batch_size`.
    pub micro: usize,
    /// Memory per rank, bytes.
    pub memory_bytes: f64,
    /// Step time as the trainer overlaps, seconds.
    pub step_s: f64,
    /// Days for the target's tokens.
    pub days: Option<f64>,
    /// The estimate.
    #[serde(skip)]
    pub plan: Plan,
}

impl Candidate {
    /// The layout as recipe overrides (`--set KEY=VALUE`).
    pub fn overrides(&self, world: usize) -> Vec<String> {
        vec![
            format!("parallel.expert={}", self.expert),
            format!("parallel.data={}", world / self.expert),
            format!("parallel.shard={}", spelled(&self.shard)),
            format!("train.recompute={}", spelled(&self.recompute)),
            format!("train.micro_batch_size={}", self.micro),
        ]
    }
}

/// The recipe spelling of an enum value (its serde name).
fn spelled<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// What the search found.
#[derive(Debug, Clone, Serialize)]
pub struct Search {
    /// Layouts that fit, fastest first (ties: least memory first).
    pub fits: Vec<Candidate>,
    /// Valid layouts that do not fit, least memory first.
    pub too_big: Vec<Candidate>,
    /// Layouts the recipe and world rule out, with why (one line per reason).
    pub ruled_out: Vec<String>,
    /// The days compute alone would take (no communication, no recomputation): no
    /// layout of this world at this MFU is faster.
    pub compute_floor_days: Option<f64>,
}

/// The recipe with a layout applied.
pub fn with_layout(r: &Recipe, world: usize, l: (usize, ShardMode, Recompute, usize)) -> Recipe {
    let mut r = r.clone();
    r.parallel.expert = l.0;
    r.parallel.data = world / l.0;
    r.parallel.shard = l.1;
    r.train.recompute = l.2;
    r.train.micro_batch_size = l.3;
    r
}

/// Searches every layout of `r` on `cluster` against `goal`.
pub fn search(r: &Recipe, cluster: &Cluster, goal: &Goal) -> Search {
    let world = cluster.gpus;
    let n = r.model.n_routed_experts.max(1);
    let global = r.train.global_batch_size;
    let mut ruled_out = Vec::new();
    let per_rank = global / world.max(1);
    if per_rank == 0 || !global.is_multiple_of(world) {
        ruled_out.push(format!(
            "train.global_batch_size = {global} sequences do not split over {world} ranks: \
             every rank trains on whole sequences of its own (catapult has no tensor, context \
             or pipeline parallelism to share one), so the batch must be a multiple of {world}"
        ));
    }
    let experts: Vec<usize> = (1..=world.min(n))
        .filter(|&ep| world.is_multiple_of(ep) && n.is_multiple_of(ep))
        .collect();
    let micros: Vec<usize> = (0..12)
        .map(|k| 1usize << k)
        .filter(|&m| per_rank > 0 && per_rank.is_multiple_of(m))
        .collect();
    let (mut fits, mut too_big) = (Vec::new(), Vec::new());
    for &ep in &experts {
        for shard in [
            ShardMode::None,
            ShardMode::Optimizer,
            ShardMode::Gradients,
            ShardMode::Parameters,
        ] {
            for recompute in [Recompute::None, Recompute::Layer] {
                for &micro in &micros {
                    let layout = with_layout(r, world, (ep, shard, recompute, micro));
                    let plan = Plan::of(&layout, cluster);
                    let c = Candidate {
                        expert: ep,
                        shard,
                        recompute,
                        micro,
                        memory_bytes: plan.memory.total,
                        step_s: plan.time.trainer_s,
                        days: goal
                            .target
                            .map(|(t, _)| plan.days_at(t, plan.time.trainer_s)),
                        plan,
                    };
                    match c.memory_bytes <= goal.budget() {
                        true => fits.push(c),
                        false => too_big.push(c),
                    }
                }
            }
        }
    }
    fits.sort_by(|a, b| {
        (a.step_s, a.memory_bytes)
            .partial_cmp(&(b.step_s, b.memory_bytes))
            .expect("estimates are finite")
    });
    too_big.sort_by(|a, b| a.memory_bytes.total_cmp(&b.memory_bytes));
    let compute_floor_days = goal.target.and_then(|(tokens, _)| {
        (fits.iter().chain(&too_big))
            .filter(|c| c.recompute == Recompute::None)
            .map(|c| c.plan.days_at(tokens, c.plan.time.compute_s))
            .min_by(f64::total_cmp)
    });
    Search {
        fits,
        too_big,
        ruled_out,
        compute_floor_days,
    }
}

/// What a missing dimension of size `degree` would make of a layout (an estimate from
/// the same arithmetic, for dimensions catapult does not have).
#[derive(Debug, Clone, Serialize)]
pub struct Missing {
    /// `tensor` or `pipeline`.
    pub dimension: &'static str,
    /// Its size.
    pub degree: usize,
    /// Memory per rank, bytes.
    pub memory_bytes: f64,
    /// Step time, seconds.
    pub step_s: f64,
    /// Days for the target's tokens.
    pub days: Option<f64>,
    /// What the estimate assumes.
    pub assumes: String,
}

/// `batch` is the recipe's own global batch (the layout's may be larger, when the
/// recipe's does not cover the world).
///
/// Tensor parallelism of `t` (Megatron-style, with sequence parallelism, inside a node
/// over NVLink at `nvlink_gbps`) and pipeline parallelism of `p` stages applied to `c`:
/// tensor parallelism splits the dense weights, their gradients and moments, the
/// activations and the dense compute by `t`, cuts the data-parallel degree (and so the
/// dense reductions' ring) by `t`, and adds four activation all-gathers or
/// reduce-scatters per block; pipeline parallelism splits every layer's state by `p`
/// and adds the bubble (p - 1) / micro-batches.
pub fn missing_dimensions(
    c: &Candidate,
    (r, batch): (&Recipe, usize),
    nvlink_gbps: f64,
    target: Option<(f64, f64)>,
) -> Vec<Missing> {
    let m = &c.plan.memory;
    let t_ = &c.plan.time;
    let dense_state = m.weights + m.gradients + m.optimizer;
    let mut out = Vec::new();
    let hidden = r.model.hidden_size as f64;
    let tokens_per_rank = t_.tokens_per_step / c.plan.world as f64;
    for t in [2usize, 4, 8] {
        let tf = t as f64;
        // Activations of a block go around the tensor-parallel group four times a
        // step (two collectives forward, two backward), per MLA block and dense FFN.
        let blocks = 4.0 * r.model.num_layers as f64;
        let tp_bytes = 4.0 * blocks * tokens_per_rank * tf * hidden * 2.0 * (tf - 1.0) / tf;
        let tp_s = tp_bytes / (nvlink_gbps * 1e9);
        let step_s = t_.trainer_s + tp_s;
        out.push(Missing {
            dimension: "tensor",
            degree: t,
            memory_bytes: dense_state / tf + m.activations / tf,
            step_s,
            days: target.map(|(tokens, _)| c.plan.days_at(tokens, step_s)),
            assumes: format!(
                "{t} GPUs of a node share each sequence, so a batch of {} sequences covers \
                 the world (the recipe's has {batch}{}); state and compute split {t} ways, \
                 {:.0} GB/s NVLink",
                c.plan.world / t,
                match batch * t >= c.plan.world && batch.is_multiple_of(c.plan.world / t) {
                    true => ": it would run as written",
                    false => "",
                },
                nvlink_gbps
            ),
        });
    }
    for p in [2usize, 4, 8] {
        let pf = p as f64;
        let micro_batches =
            (r.train.global_batch_size * p / c.plan.world / c.micro.max(1)).max(1) as f64;
        let bubble = (pf - 1.0) / micro_batches;
        let step_s = t_.trainer_s * (1.0 + bubble);
        out.push(Missing {
            dimension: "pipeline",
            degree: p,
            memory_bytes: dense_state / pf + m.activations,
            step_s,
            days: target.map(|(tokens, _)| c.plan.days_at(tokens, step_s)),
            assumes: format!(
                "{p} stages of {} layers, {micro_batches:.0} micro-batches per step, a 1F1B \
                 bubble of {:.0}%",
                r.model.num_layers.div_ceil(p),
                100.0 * bubble
            ),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_spell_the_recipe_values() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/tiny.yaml");
        let recipe = crate::recipe::load(&path, &[]).unwrap();
        let cluster = Cluster {
            gpu: crate::sizing::GPUS[1],
            gpus: 4,
            link_gbps: 50.0,
            mfu: 0.4,
        };
        let goal = Goal {
            memory_bytes: 80.0 * (1u64 << 30) as f64,
            headroom: 0.1,
            target: Some((1e9, 1.0)),
        };
        let found = search(&recipe, &cluster, &goal);
        let best = &found.fits[0];
        let sets = best.overrides(4);
        assert!(sets.iter().any(|s| s.starts_with("parallel.shard=")
            && ["none", "optimizer", "gradients", "parameters"]
                .contains(&s.split('=').nth(1).unwrap())));
        assert!(sets
            .iter()
            .any(|s| s == "train.recompute=none" || s == "train.recompute=layer"));
        // Fastest first; every fit within the budget.
        for w in found.fits.windows(2) {
            assert!(w[0].step_s <= w[1].step_s);
        }
        assert!(found.fits.iter().all(|c| c.memory_bytes <= goal.budget()));
    }
}
