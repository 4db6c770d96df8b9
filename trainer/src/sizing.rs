//! Sizing arithmetic from a recipe alone (nothing is allocated): parameter counts, model
//! FLOPs per token, memory per rank, communication per step, and a step-time estimate.
//! `catapult train RECIPE --dry-run` prints it; the trainer's MFU metric uses
//! `flops_per_token` with the measured FFN experts per token.
//!
//! Conventions (stated once, used everywhere):
//! - Parameters are the trainable tensors of `LongcatModel` (the expert bias is a buffer).
//! - "Activated per token" counts every parameter a token's forward touches except the
//!   input embedding (a lookup), with `n` FFN experts per layer; the MTP layer is reported
//!   apart (LongCat-Flash's 18.6B-31.3B excludes it).
//! - Training FLOPs per token = 3 x forward (backward = 2 x forward). Forward = 2 x the
//!   matrix elements a token multiplies (activated matrices, router and head included;
//!   norms, softmax and activations ignored) + attention 2 x heads x seq x (qk + v) per
//!   MLA block (PaLM's convention: no causal discount).

use crate::recipe::{ModelConfig, Precision, Recipe, Recompute, Reduction, ShardMode};
use serde::Serialize;

/// Parameter counts of one model configuration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ParamCounts {
    /// Every trainable parameter.
    pub total: u64,
    /// The input embedding (vocab x hidden).
    pub embedding: u64,
    /// The output head (vocab x hidden) and the final norm.
    pub head: u64,
    /// One MLA block (projections and its two latent norms).
    pub mla_block: u64,
    /// One dense SwiGLU FFN.
    pub dense_ffn: u64,
    /// One routed expert (gate, up, down).
    pub expert: u64,
    /// One router (classifier over N + Z experts).
    pub router: u64,
    /// Everything of one layer except its routed experts.
    pub layer_dense: u64,
    /// All routed experts of all layers.
    pub experts_all: u64,
    /// The multi-token-prediction layer (0 without one).
    pub mtp: u64,
}

/// One MLA block's parameters, in f64: exact below 2^53, and no overflow for a recipe
/// whose sizes are absurd (the memory check must see them to refuse them).
fn mla_block(c: &ModelConfig) -> f64 {
    let f = |x: usize| x as f64;
    let (h, heads) = (f(c.hidden_size), f(c.num_attention_heads));
    let (ql, kvl) = (f(c.q_lora_rank), f(c.kv_lora_rank));
    let (nope, rope, v) = (
        f(c.qk_nope_head_dim),
        f(c.qk_rope_head_dim),
        f(c.v_head_dim),
    );
    ql * h
        + ql
        + heads * (nope + rope) * ql
        + (kvl + rope) * h
        + kvl
        + heads * (nope + v) * kvl
        + h * heads * v
}

impl ParamCounts {
    /// The exact counts of `LongcatModel::new` for `c` (computed in f64, exact below
    /// 2^53 parameters; absurd sizes saturate at u64::MAX instead of wrapping).
    pub fn of(c: &ModelConfig) -> Self {
        let f = |x: usize| x as f64;
        let h = f(c.hidden_size);
        let layers = f(c.num_layers);
        let embedding = f(c.vocab_size) * h;
        let head = f(c.vocab_size) * h + h;
        let mla = mla_block(c);
        let dense_ffn = 3.0 * h * f(c.ffn_hidden_size);
        let expert = 3.0 * h * f(c.expert_ffn_hidden_size);
        let router = f(c.total_experts()) * h;
        let layer_dense = 4.0 * h + 2.0 * mla + 2.0 * dense_ffn + router;
        let experts_all = layers * f(c.n_routed_experts) * expert;
        let mtp = if c.mtp_layers > 0 {
            2.0 * h * h + 5.0 * h + mla + dense_ffn
        } else {
            0.0
        };
        Self {
            total: (embedding + head + layers * layer_dense + experts_all + mtp) as u64,
            embedding: embedding as u64,
            head: head as u64,
            mla_block: mla as u64,
            dense_ffn: dense_ffn as u64,
            expert: expert as u64,
            router: router as u64,
            layer_dense: layer_dense as u64,
            experts_all: experts_all as u64,
            mtp: mtp as u64,
        }
    }

    /// Parameters a token's forward touches with `ffn_experts` FFN experts in every layer
    /// (the input embedding and the MTP layer excluded).
    pub fn activated(&self, c: &ModelConfig, ffn_experts: f64) -> f64 {
        let layers = c.num_layers as f64;
        self.head as f64
            + layers * self.layer_dense as f64
            + layers * ffn_experts * self.expert as f64
    }

    /// Parameters held by one rank of an expert-parallel group of `ep` ranks.
    pub fn per_rank(&self, ep: usize) -> u64 {
        self.total
            .saturating_sub(self.experts_all)
            .saturating_add(self.experts_all / ep.max(1) as u64)
    }
}

/// Forward matrix elements one token multiplies, without experts: per layer two MLA
/// blocks, two dense FFNs and the router, plus the head (and the MTP layer's matrices).
fn dense_matrix_elements(c: &ModelConfig, p: &ParamCounts) -> f64 {
    let h = c.hidden_size as f64;
    let layers = c.num_layers as f64;
    // Norm weights are not matrices: 4 per layer, 2 latent norms per MLA block.
    let mla_matrices = p.mla_block as f64 - (c.q_lora_rank + c.kv_lora_rank) as f64;
    let layer = 2.0 * mla_matrices + 2.0 * p.dense_ffn as f64 + p.router as f64;
    let head = c.vocab_size as f64 * h;
    let mtp = if c.mtp_layers > 0 {
        2.0 * h * h + mla_matrices + p.dense_ffn as f64 + head
    } else {
        0.0
    };
    layers * layer + head + mtp
}

/// Training FLOPs (forward + backward) per token at sequence length `seq_len`, with
/// `ffn_experts_per_layer[i]` FFN experts per token in layer i (the measured averages, or
/// K_e / K for a plan).
pub fn flops_per_token(c: &ModelConfig, seq_len: usize, ffn_experts_per_layer: &[f64]) -> f64 {
    let p = ParamCounts::of(c);
    let experts: f64 = ffn_experts_per_layer.iter().sum::<f64>() * p.expert as f64;
    let matmul = 2.0 * (dense_matrix_elements(c, &p) + experts);
    let blocks = 2 * c.num_layers + c.mtp_layers;
    let attention = blocks as f64
        * 2.0
        * c.num_attention_heads as f64
        * seq_len as f64
        * (c.qk_head_dim() + c.v_head_dim) as f64;
    3.0 * (matmul + attention)
}

/// `flops_per_token` with the same FFN experts per token in every layer.
pub fn flops_per_token_uniform(c: &ModelConfig, seq_len: usize, ffn_experts: f64) -> f64 {
    flops_per_token(c, seq_len, &vec![ffn_experts; c.num_layers])
}

/// Achieved TFLOP/s per rank and model FLOPs utilization (None without a peak).
pub fn mfu(
    flops_per_token: f64,
    tokens_per_s: f64,
    ranks: usize,
    peak_tflops: Option<f64>,
) -> (f64, Option<f64>) {
    let achieved = flops_per_token * tokens_per_s / ranks as f64 / 1e12;
    (achieved, peak_tflops.map(|p| achieved / p))
}

/// An accelerator of the device table: dense bf16 peak and memory.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Gpu {
    /// Short name (`h100`, ...).
    pub name: &'static str,
    /// Dense bf16 tensor-core peak, TFLOP/s.
    pub peak_tflops: f64,
    /// Device memory, GiB.
    pub memory_gib: f64,
}

/// Dense (not sparse) bf16 peaks from the vendors' data sheets (SXM parts).
pub const GPUS: [Gpu; 6] = [
    Gpu {
        name: "a100",
        peak_tflops: 312.0,
        memory_gib: 80.0,
    },
    Gpu {
        name: "h100",
        peak_tflops: 989.0,
        memory_gib: 80.0,
    },
    Gpu {
        name: "h800",
        peak_tflops: 989.0,
        memory_gib: 80.0,
    },
    Gpu {
        name: "h200",
        peak_tflops: 989.0,
        memory_gib: 141.0,
    },
    Gpu {
        name: "b200",
        peak_tflops: 2250.0,
        memory_gib: 180.0,
    },
    Gpu {
        name: "mi300x",
        peak_tflops: 1307.0,
        memory_gib: 192.0,
    },
];

/// The table entry whose name occurs in `device_name` (case-insensitive), e.g.
/// "NVIDIA H100 80GB HBM3" -> h100.
pub fn gpu_by_name(device_name: &str) -> Option<Gpu> {
    let lower = device_name.to_lowercase().replace([' ', '-'], "");
    GPUS.iter().copied().find(|g| lower.contains(g.name))
}

/// The cluster a plan is estimated for.
#[derive(Debug, Clone, Serialize)]
pub struct Cluster {
    /// The accelerator.
    pub gpu: Gpu,
    /// Accelerators in the job (a multiple of the recipe's expert-parallel size).
    pub gpus: usize,
    /// Per-GPU interconnect bandwidth for collectives, GB/s.
    pub link_gbps: f64,
    /// Fraction of the peak that compute achieves.
    pub mfu: f64,
}

/// What `--dry-run` prints, for one recipe on one cluster.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Parameter counts.
    pub params: ParamCounts,
    /// Activated parameters per token at 0, K_e and K FFN experts.
    pub activated: [f64; 3],
    /// Training FLOPs per token at 0, K_e and K FFN experts.
    pub flops_per_token: [f64; 3],
    /// Ranks of the layout (data x expert).
    pub world: usize,
    /// Expert-parallel size.
    pub expert_parallel: usize,
    /// Memory of one rank, bytes.
    pub memory: Memory,
    /// Bytes one rank sends per step.
    pub comm: Comm,
    /// The step-time estimate.
    pub time: StepTime,
}

/// Memory of one rank.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Memory {
    /// Parameters this rank holds.
    pub params: u64,
    /// fp32 master weights (with `parallel.shard: parameters`, the slices and the
    /// gather buffers).
    pub weights: f64,
    /// fp32 gradients.
    pub gradients: f64,
    /// AdamW's two fp32 moments.
    pub optimizer: f64,
    /// Activations kept for backward for one micro-batch (an estimate).
    pub activations: f64,
    /// The canonical reduction tree's partial sums of micro-batch gradients
    /// (`parallel.reduction: tree`, more than one micro-batch per rank): ceil(log2 k)
    /// fp32 gradient buffers at most.
    pub partials: f64,
    /// The sum.
    pub total: f64,
}

/// Bytes one rank sends per optimizer step.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Comm {
    /// The MoE all-to-alls (dispatch and combine, forward and backward), to other ranks.
    pub all_to_all: f64,
    /// Dense-gradient sum over the world (reduce-scatter + all-gather volume).
    pub dense_gradients: f64,
    /// Expert-gradient sum over the replicas of this rank's experts.
    pub expert_gradients: f64,
    /// Parameter all-gathers (`parallel.shard: parameters`), bytes received: the ends
    /// once per step, every layer before each micro-batch's forward and all but the
    /// last two again before its backward.
    pub param_gathers: f64,
}

/// Estimated step time on a cluster.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StepTime {
    /// Tokens per optimizer step.
    pub tokens_per_step: f64,
    /// Compute: FLOPs per rank per step / (peak x mfu).
    pub compute_s: f64,
    /// The all-to-alls at the link bandwidth.
    pub all_to_all_s: f64,
    /// The gradient sums (and, with `parameters`, the parameter gathers) at the link
    /// bandwidth.
    pub reduction_s: f64,
    /// compute + all-to-all + reductions (no overlap).
    pub serial_s: f64,
    /// max(compute, all-to-all) + reductions (all-to-alls hidden behind compute).
    pub overlapped_s: f64,
    /// max(compute, all-to-all + reductions): every collective hidden behind compute,
    /// as frameworks that overlap gradient reductions with backward achieve at best.
    pub hidden_s: f64,
    /// As catapult's trainer overlaps: the forward hides its half of the all-to-alls
    /// and its parameter gathers (prefetched a layer ahead) behind its compute (a third
    /// of the step's, plus a re-run forward with recomputation in backward); the
    /// backward hides the other half, its gathers and the gradient reductions (each
    /// layer's started as its gradients complete) behind its compute; the last layer's
    /// reductions stay exposed.
    pub trainer_s: f64,
}

/// Elements per token kept for backward in one layer (an estimate of what autograd
/// saves: every matrix product's input and output, the norms' inputs, attention's
/// output and log-sum-exp, the SwiGLU intermediates, and the routed rows of `ke` experts).
fn activation_elements_per_token(c: &ModelConfig) -> f64 {
    let h = c.hidden_size as f64;
    let heads = c.num_attention_heads as f64;
    let (ql, kvl, rope) = (
        c.q_lora_rank as f64,
        c.kv_lora_rank as f64,
        c.qk_rope_head_dim as f64,
    );
    let (qk, v) = (c.qk_head_dim() as f64, c.v_head_dim as f64);
    let mla = h
        + 2.0 * ql
        + heads * qk
        + (kvl + rope)
        + kvl
        + heads * (qk - rope + v)
        + 2.0 * heads * qk
        + heads * v
        + heads;
    let f = c.ffn_hidden_size as f64;
    let ffn = h + 3.0 * f;
    let ke = c.target_ffn_experts() as f64;
    let moe = c.total_experts() as f64 + ke * (2.0 * h + 3.0 * c.expert_ffn_hidden_size as f64);
    4.0 * h + 2.0 * mla + 2.0 * ffn + moe
}

/// Bytes per activation element in the recipe's precision.
fn activation_bytes(r: &Recipe) -> f64 {
    match r.system.precision {
        Precision::Fp32 => 4.0,
        Precision::Bf16 => 2.0,
    }
}

/// Bytes of parameters one rank holds with `parallel.shard: parameters`: fp32 slices,
/// its 1/world of the dense parameters and 1/replicas of its `experts` (whole when
/// there are no replicas), plus the gather buffers: the ends (embedding, head, MTP) in
/// fp32 and two layers in the working kind (`working` bytes: bf16 with bf16 compute,
/// the router excepted).
fn gathered_parameter_bytes(
    c: &ModelConfig,
    p: &ParamCounts,
    (experts, working): (f64, f64),
    (world, replicas): (f64, f64),
) -> f64 {
    let dense = p.total.saturating_sub(p.experts_all) as f64;
    let ends = (p.embedding + p.head + p.mtp) as f64;
    let buffered = c.num_layers.min(2) as f64;
    let layer = working * (p.layer_dense - p.router) as f64 + 4.0 * p.router as f64;
    let layer_experts = experts / c.num_layers.max(1) as f64;
    let experts = match replicas > 1.0 {
        true => 4.0 * experts / replicas + buffered * working * layer_experts,
        false => 4.0 * experts,
    };
    4.0 * (dense / world + ends) + buffered * layer + experts
}

/// Bytes one rank receives per step gathering sharded parameters (see `Comm`).
fn param_gather_bytes(r: &Recipe, p: &ParamCounts, (world, replicas): (usize, usize)) -> f64 {
    let c = &r.model;
    let working = activation_bytes(r);
    let half = |n: usize| (n - 1) as f64 / n as f64;
    let ep = r.parallel.expert.max(1) as u64;
    let layer_experts = (p.experts_all / ep) as f64 / c.num_layers.max(1) as f64;
    let layer = half(world) * (working * (p.layer_dense - p.router) as f64 + 4.0 * p.router as f64)
        + half(replicas) * working * layer_experts;
    let ends = half(world) * 4.0 * (p.embedding + p.head + p.mtp) as f64;
    let micro = (r.train.global_batch_size / world.max(1) / r.train.micro_batch_size.max(1)).max(1);
    let per_pass = (2 * c.num_layers).saturating_sub(2) as f64;
    ends + micro as f64 * per_pass * layer
}

impl Memory {
    /// What one rank of `r` in a world of `world` ranks holds (parameters `p`): fp32
    /// weights, gradients and AdamW's two moments for its share of the parameters (with
    /// `parallel.shard: optimizer`, the moments of 1/world of the dense parameters and
    /// 1/replicas of its experts), and one micro-batch's activations.
    pub fn of(r: &Recipe, p: &ParamCounts, world: usize) -> Memory {
        let c = &r.model;
        let seq = r.data.max_seq_len();
        let ep = r.parallel.expert.max(1);
        let local = p.per_rank(ep);
        let micro_tokens = (r.train.micro_batch_size * seq) as f64;
        let logits = micro_tokens * c.vocab_size as f64 * 4.0 * 2.0;
        let layers = c.num_layers as f64;
        let full = activation_elements_per_token(c);
        let kept = match r.train.recompute {
            Recompute::None => layers * full,
            // Each layer's input and the rows its two exchanges brought (K_e rows of
            // hidden each way), plus the one layer being re-run.
            Recompute::Layer => {
                let h = c.hidden_size as f64;
                layers * (h + 2.0 * c.target_ffn_experts() as f64 * h) + full
            }
        };
        let act = activation_bytes(r);
        let activations = micro_tokens * kept * act + logits;
        let whole = local as f64 * 4.0;
        // A rank's 1/P share of dense state (P = world) and of its experts' (P = replicas).
        let world = world.max(1) as f64;
        let replicas = (world / ep as f64).max(1.0);
        let experts = (p.experts_all / ep as u64) as f64;
        let dense = local as f64 - experts;
        let share = dense / world + experts / replicas;
        let (weights, optimizer, gradients) = match r.parallel.shard {
            ShardMode::None => (whole, 2.0 * whole, whole),
            ShardMode::Optimizer => (whole, 8.0 * share, whole),
            ShardMode::Gradients => (whole, 8.0 * share, 4.0 * share),
            ShardMode::Parameters => (
                gathered_parameter_bytes(c, p, (experts, act), (world, replicas)),
                8.0 * share,
                4.0 * share,
            ),
        };
        // With `gradients` or `parameters`, full gradients exist again during backward;
        // with more than one micro-batch per step they are all held until the last
        // one's reductions.
        let micro =
            r.train.global_batch_size / (world as usize).max(1) / r.train.micro_batch_size.max(1);
        let transient = match micro > 1 && r.parallel.shard.keeps_gradient_slices() {
            true => whole,
            false => 0.0,
        };
        let partials = match (r.parallel.reduction, micro > 1) {
            (Reduction::Tree, true) => (micro as f64).log2().ceil() * whole,
            _ => 0.0,
        };
        Memory {
            params: local,
            weights,
            gradients,
            optimizer,
            activations,
            partials,
            total: weights + gradients + optimizer + activations + transient + partials,
        }
    }
}

impl Plan {
    /// The plan of `r` on `cluster`: one rank per GPU, `parallel.expert` of them per
    /// expert group.
    pub fn of(r: &Recipe, cluster: &Cluster) -> Plan {
        let world = cluster.gpus;
        let c = &r.model;
        let p = ParamCounts::of(c);
        let ke = c.target_ffn_experts() as f64;
        let k = c.moe_topk as f64;
        let seq = r.data.max_seq_len();
        let activated = [0.0, ke, k].map(|n| p.activated(c, n));
        let flops = [0.0, ke, k].map(|n| flops_per_token_uniform(c, seq, n));
        let ep = r.parallel.expert.max(1);
        let replicas = (world / ep).max(1);
        let act_bytes = activation_bytes(r);
        let memory = Memory::of(r, &p, world);
        let tokens_per_step = (r.train.global_batch_size * seq) as f64;
        let rank_tokens = tokens_per_step / world as f64;
        let remote = (ep - 1) as f64 / ep as f64;
        let all_to_all = rank_tokens
            * ke
            * c.hidden_size as f64
            * act_bytes
            * 4.0
            * c.num_layers as f64
            * remote;
        // A reduce-scatter moves (n - 1) / n of the tensor; an all-reduce (or a
        // reduce-scatter and the all-gather of what it updates) twice that. With
        // `parameters` nothing is gathered after the update: the layers are, per pass.
        let half = |n: usize| (n - 1) as f64 / n as f64;
        let sums = match r.parallel.shard {
            ShardMode::Parameters => 1.0,
            _ => 2.0,
        };
        let dense = (p.total - p.experts_all) as f64 * 4.0 * sums * half(world);
        let expert = (p.experts_all / ep as u64) as f64 * 4.0 * sums * half(replicas);
        let gathers = match r.parallel.shard {
            ShardMode::Parameters => param_gather_bytes(r, &p, (world, replicas)),
            _ => 0.0,
        };
        let comm = Comm {
            all_to_all,
            dense_gradients: dense,
            expert_gradients: expert,
            param_gathers: gathers,
        };
        // Recomputation runs each layer's forward once more: training FLOPs are 3 x the
        // forward, so 4 / 3 of them.
        let recompute = match r.train.recompute {
            Recompute::None => 1.0,
            Recompute::Layer => 4.0 / 3.0,
        };
        let compute_s =
            recompute * flops[1] * rank_tokens / (cluster.gpu.peak_tflops * 1e12 * cluster.mfu);
        let bw = cluster.link_gbps * 1e9;
        let all_to_all_s = all_to_all / bw;
        let reduction_s = (dense + expert + gathers) / bw;
        let base = compute_s / recompute;
        let forward = base / 3.0;
        let backward = compute_s - forward;
        let (gathers_s, sums_s) = (gathers / bw, (dense + expert) / bw);
        let layers = c.num_layers.max(1) as f64;
        let trainer_s = forward.max((all_to_all_s + gathers_s) / 2.0)
            + backward.max((all_to_all_s + gathers_s) / 2.0 + sums_s)
            + sums_s / layers;
        let time = StepTime {
            tokens_per_step,
            compute_s,
            all_to_all_s,
            reduction_s,
            serial_s: compute_s + all_to_all_s + reduction_s,
            overlapped_s: compute_s.max(all_to_all_s) + reduction_s,
            hidden_s: compute_s.max(all_to_all_s + reduction_s),
            trainer_s,
        };
        Plan {
            params: p,
            activated,
            flops_per_token: flops,
            world,
            expert_parallel: ep,
            memory,
            comm,
            time,
        }
    }

    /// Days to train on `tokens` tokens at `step_s` seconds per step.
    pub fn days_at(&self, tokens: f64, step_s: f64) -> f64 {
        tokens / self.time.tokens_per_step * step_s / 86_400.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::tests_support::model_config;
    use tch::{nn::VarStore, Device, Kind};

    fn instantiated(c: &ModelConfig) -> u64 {
        let vs = VarStore::new(Device::Cpu);
        let _m = crate::model::LongcatModel::new(&vs.root(), c, 8, Kind::Float, Device::Cpu);
        vs.variables()
            .values()
            .filter(|t| t.requires_grad())
            .map(|t| t.numel() as u64)
            .sum()
    }

    #[test]
    fn parameter_counts_equal_the_instantiated_models() {
        let a = model_config(4, 2, 3, 2, 2);
        let b = ModelConfig {
            mtp_layers: 1,
            zero_expert_num: 0,
            ..model_config(8, 0, 2, 2, 3)
        };
        let c = ModelConfig {
            hidden_size: 48,
            num_attention_heads: 3,
            q_lora_rank: 24,
            kv_lora_rank: 12,
            qk_nope_head_dim: 8,
            qk_rope_head_dim: 4,
            v_head_dim: 6,
            ffn_hidden_size: 40,
            expert_ffn_hidden_size: 20,
            vocab_size: 301,
            ..model_config(6, 3, 4, 2, 1)
        };
        for cfg in [a, b, c] {
            assert_eq!(ParamCounts::of(&cfg).total, instantiated(&cfg), "{cfg:?}");
        }
    }

    #[test]
    fn flops_and_mfu_match_a_hand_computation() {
        // hidden 32, 1 layer, 2 heads, q rank 8, kv rank 4, nope 8, rope 4, v 8, dense FFN
        // 16, expert FFN 8, N = 4, Z = 2, vocab 100, seq 10.
        let c = ModelConfig {
            vocab_size: 100,
            hidden_size: 32,
            num_layers: 1,
            num_attention_heads: 2,
            q_lora_rank: 8,
            kv_lora_rank: 4,
            qk_nope_head_dim: 8,
            qk_rope_head_dim: 4,
            v_head_dim: 8,
            ffn_hidden_size: 16,
            expert_ffn_hidden_size: 8,
            ..model_config(4, 2, 3, 2, 1)
        };
        // One MLA's matrices: q_a 8*32 + q_b 2*12*8 + kv_a (4+4)*32 + kv_b 2*(8+8)*4
        // + o 32*2*8 = 256 + 192 + 256 + 128 + 512 = 1344.
        // Layer: 2*1344 + 2 dense FFNs 2*3*32*16 = 3072 + router 6*32 = 192 -> 5952;
        // head 100*32 = 3200; with 1.5 experts of 3*32*8 = 768 each: 1152.
        let matrices = 5952.0 + 3200.0 + 1152.0;
        // Attention: 2 blocks x 2 x 2 heads x 10 positions x (12 + 8) = 1600.
        let expected = 3.0 * (2.0 * matrices + 1600.0);
        let got = flops_per_token(&c, 10, &[1.5]);
        assert_eq!(got, expected);
        // 1000 tokens/s over 2 ranks at a 1 TFLOP/s peak.
        let (achieved, mfu) = mfu(got, 1000.0, 2, Some(1.0));
        assert!((achieved - expected * 500.0 / 1e12).abs() < 1e-18);
        assert!((mfu.unwrap() - expected * 500.0 / 1e12).abs() < 1e-18);
        assert_eq!(super::mfu(got, 1000.0, 2, None).1, None);
    }

    #[test]
    fn gpu_names_resolve_from_device_strings() {
        assert_eq!(gpu_by_name("NVIDIA H100 80GB HBM3").unwrap().name, "h100");
        assert_eq!(gpu_by_name("NVIDIA H200").unwrap().memory_gib, 141.0);
        assert!(gpu_by_name("cpu").is_none());
    }
}
