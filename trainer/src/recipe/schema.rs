//! The recipe schema: every section's serde struct and enum, their defaults, and the
//! small accessors that read them (`ModelConfig::qk_head_dim`,
//! `DataConfig::resolved_phases`, ...). This is the vocabulary the rest of the trainer
//! (and the launcher) configures itself with, so it includes the config enums other
//! modules act on: parameter `Group`s and the growth `OptimizerInit`.
//!
//! It must not know about parsing text, `--set` overrides, error messages or the
//! semantic checks (the other files of `recipe`), nor about any other trainer module:
//! modules depend on the schema, never the reverse.

use super::error::UnknownOptimizerInit;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// Number of ids the byte-level tokenizer uses (256 bytes plus the end-of-document id).
pub const BYTE_VOCAB: usize = catapult_data::ByteTokenizer::VOCAB_SIZE;

/// A whole training run: model shape, data, optimization, system and outputs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Run name; the default output directory is `runs/<name>`.
    pub name: String,
    /// Seed for initialization and data order.
    #[serde(default = "defaults::seed")]
    pub seed: u64,
    /// Where and in what precision the run computes.
    #[serde(default)]
    pub system: SystemConfig,
    /// Model shape (LongCat-Flash layer, MLA, router and experts).
    pub model: ModelConfig,
    /// MoE training methods: expert-bias control, auxiliary losses, router metrics.
    #[serde(default)]
    pub moe: MoeConfig,
    /// Training corpus and sequence layout.
    pub data: DataConfig,
    /// Optimization: steps, batch, learning-rate schedule, AdamW.
    pub train: TrainConfig,
    /// Where checkpoints and metrics go.
    #[serde(default)]
    pub output: OutputConfig,
    /// Sharded, resumable checkpoints: how often, where, how many kept.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// How the ranks split the work: data x expert parallelism, overlap, reductions.
    #[serde(default)]
    pub parallel: ParallelConfig,
    /// How `catapult launch` supervises the ranks: restarts, hang timeout.
    #[serde(default)]
    pub launch: LaunchConfig,
    /// Width transfer: the proxy the hyperparameters were tuned on (longcat-methods
    /// section 7). Absent: one learning rate and init std for every group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<TransferConfig>,
    /// Growth schedule: train a shallower model first, stack it, continue (section 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub growth: Option<GrowthConfig>,
}

/// Width-scaled hyperparameter transfer from a narrow proxy.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TransferConfig {
    /// The proxy and what was tuned on it.
    pub proxy: ProxyConfig,
}

/// The proxy model: its width and the hyperparameters tuned at that width.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// n_proxy: the proxy's hidden size (s = model.hidden_size / this).
    pub hidden_size: usize,
    /// The learning rate tuned on the proxy (default: train.lr).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// The init std tuned on the proxy (default: model.initializer_range).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_std: Option<f64>,
    /// Per-group values tuned on the proxy (embedding, attention, dense_ffn, experts,
    /// router, norms, head), transferred by the group's rule.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<Group, GroupOverride>,
}

/// A named group of parameters: the keys of `transfer.proxy.groups`, and the suffix of
/// the `lr_<group>` metrics. Which tensors belong to which group is the trainer's
/// business (`Group::of`, in the trainer's groups module).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    /// The input embedding `model.embed_tokens.weight`.
    Embedding,
    /// MLA projections (`self_attn.*_proj`), in the layers and the MTP layer.
    Attention,
    /// Dense SwiGLU FFNs (`mlps.*`, the MTP layer's FFN) and the MTP input projection.
    DenseFfn,
    /// Routed experts (`mlp.experts.*`).
    Experts,
    /// Router classifiers (`mlp.router.classifier`).
    Router,
    /// RMSNorm gains (every `*norm*` weight).
    Norms,
    /// The output head `lm_head.weight` (the unembedding).
    Head,
}

impl Group {
    /// Every group, in display order.
    pub const ALL: [Group; 7] = [
        Group::Embedding,
        Group::Attention,
        Group::DenseFfn,
        Group::Experts,
        Group::Router,
        Group::Norms,
        Group::Head,
    ];

    /// The group's name in recipes and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Group::Embedding => "embedding",
            Group::Attention => "attention",
            Group::DenseFfn => "dense_ffn",
            Group::Experts => "experts",
            Group::Router => "router",
            Group::Norms => "norms",
            Group::Head => "head",
        }
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A group's own proxy-tuned learning rate and/or init std.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GroupOverride {
    /// Learning rate at the proxy width.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// Init std at the proxy width (norm gains always start at 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_std: Option<f64>,
}

/// Train `from_layers` layers until `until_tokens`, then stack them
/// model.num_layers / from_layers times and continue with the whole model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GrowthConfig {
    /// Layers of the first stage (model.num_layers must be a multiple, at least twice).
    pub from_layers: usize,
    /// Tokens the first stage trains on (growth happens at the first step reaching it).
    pub until_tokens: u64,
    /// AdamW state at growth: `copy` (stacked like the weights) or `fresh`.
    #[serde(default)]
    pub optimizer: OptimizerInit,
}

/// What happens to AdamW's state at growth (`growth.optimizer`, `catapult grow
/// --optimizer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerInit {
    /// Moments and update counts stacked like the weights.
    #[default]
    Copy,
    /// Moments zero, update counts zero (bias correction starts over).
    Fresh,
}

impl std::str::FromStr for OptimizerInit {
    type Err = UnknownOptimizerInit;
    fn from_str(s: &str) -> Result<Self, UnknownOptimizerInit> {
        match s {
            "copy" => Ok(Self::Copy),
            "fresh" => Ok(Self::Fresh),
            other => Err(UnknownOptimizerInit(other.to_string())),
        }
    }
}

/// Supervision by `catapult launch`: a rank that exits non-zero or stops heartbeating
/// stops the job, which restarts from the last valid checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LaunchConfig {
    /// Failures in a row without a new checkpoint before the run gives up (0: no
    /// restart); a failure after a new checkpoint starts the count again.
    pub max_restarts: usize,
    /// Failures in any hour before the run gives up, checkpoints or not (0: no limit).
    pub max_failures_per_hour: usize,
    /// A rank that has not finished a step (its heartbeat) for this many seconds is hung.
    pub heartbeat_timeout_s: f64,
    /// Wait before a restart; each further failure without a new checkpoint waits twice
    /// as long, and a new checkpoint brings it back to this.
    pub restart_backoff_s: f64,
    /// Under Slurm, a preempted run puts its job back in the queue (`scontrol requeue`).
    pub requeue: bool,
}

impl Default for LaunchConfig {
    fn default() -> Self {
        Self {
            max_restarts: 3,
            max_failures_per_hour: 0,
            heartbeat_timeout_s: 600.0,
            restart_backoff_s: 5.0,
            requeue: true,
        }
    }
}

/// The layout of the ranks: world = data x expert. Rank r is expert-parallel rank
/// r % expert of data-parallel replica r / expert.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    /// Expert-parallel size: each group of this many ranks splits the routed experts
    /// evenly (model.n_routed_experts must be a multiple).
    pub expert: usize,
    /// Data-parallel size: replicas of each expert shard (0: the world size / expert).
    /// Dense parameters are replicated on every rank either way.
    pub data: usize,
    /// Single Batch Overlap: run FFN0, MLA1 and FFN1 while the MoE's all-to-alls move.
    pub overlap: bool,
    /// Sum gradients with the backend's own reduction algorithms: faster, but the bits
    /// then depend on message timing. Off by default (deterministic reductions).
    pub fast_reductions: bool,
    /// Collectives for tensors: `auto` (NCCL on CUDA, MPI on CPU), `mpi` (host buffers,
    /// also for CUDA tensors) or `nccl` (CUDA only).
    pub backend: Backend,
    /// Sharded data parallelism, the ZeRO ladder: `none` (every rank holds every
    /// replicated tensor), `optimizer` (ZeRO-1: AdamW moments of a 1/P flat slice),
    /// `gradients` (ZeRO-2: also the reduced gradients) or `parameters` (ZeRO-3: also
    /// the parameters, gathered per layer when computed). The same bits as `none`.
    pub shard: ShardMode,
    /// The order gradients are summed in: `tree` (the default: each canonical
    /// micro-batch's gradient alone, summed in one binary tree over the canonical
    /// indices, so the same global batch gives the same bits on any number of
    /// data-parallel ranks) or `ranks` (micro-batches accumulated in place, then the
    /// ranks' sums in rank order: the same bits only on the same layout, no extra
    /// gradient buffers).
    pub reduction: Reduction,
}

/// The order gradients are summed in (`parallel.reduction`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Reduction {
    /// One binary tree over the canonical micro-batch indices.
    #[default]
    Tree,
    /// In place over micro-batches, then in rank order.
    Ranks,
}

/// What a training forward keeps for backward (`train.recompute`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Every activation.
    #[default]
    None,
    /// Each layer's input and received rows; the layer is re-run in backward.
    Layer,
}

/// What sharded data parallelism splits over the ranks that replicate a tensor.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ShardMode {
    /// Nothing: every replica holds everything.
    #[default]
    None,
    /// The optimizer state (AdamW moments): 1/P per rank; gradients are reduce-scattered
    /// into the owned range of each full gradient.
    Optimizer,
    /// The optimizer state and the reduced gradients: a rank keeps only its 1/P slice of
    /// each reduced gradient; a layer's full gradients are freed once its reduction has
    /// started and exist again only during the next step's backward.
    Gradients,
    /// Everything above and the parameters (ZeRO-3 / FSDP): a rank keeps only its 1/P
    /// slice of each parameter (fp32, the master weights the optimizer updates); a
    /// layer's whole parameters are all-gathered just before its forward and again
    /// before its backward, into buffers the next layers but one reuse.
    Parameters,
}

impl ShardMode {
    /// Whether the reduced gradients stay as this rank's slices (no whole gradient after
    /// the reduction).
    pub fn keeps_gradient_slices(self) -> bool {
        matches!(self, ShardMode::Gradients | ShardMode::Parameters)
    }

    /// The recipe's spelling.
    pub fn name(self) -> &'static str {
        match self {
            ShardMode::None => "none",
            ShardMode::Optimizer => "optimizer",
            ShardMode::Gradients => "gradients",
            ShardMode::Parameters => "parameters",
        }
    }
}

/// Which library moves tensors between ranks.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// NCCL when `system.device` is `cuda`, else MPI.
    #[default]
    Auto,
    /// Open MPI over host buffers.
    Mpi,
    /// NCCL, GPU to GPU (dynamically loaded).
    Nccl,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        Self {
            expert: 1,
            data: 0,
            overlap: true,
            fast_reductions: false,
            backend: Backend::Auto,
            shard: ShardMode::None,
            reduction: Reduction::Tree,
        }
    }
}

/// What a silent-data-corruption check does when a replay differs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SdcAction {
    /// Stop the run with an error naming the rank, step and tensor.
    #[default]
    Stop,
    /// Reload the last checkpoint and continue from it (at most 3 times in a row).
    Rollback,
}

/// What a step whose loss or gradient norm is not finite does (on every rank alike: both
/// are global).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum NonFiniteAction {
    /// Stop the run (exit 1) naming the step, the rank and the first non-finite tensor.
    #[default]
    Stop,
    /// Drop the step: no update, the batch is consumed, training goes on.
    Skip,
    /// Reload the last checkpoint and continue from it (at most 3 times for one step).
    Rollback,
}

/// Compute device.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// Host CPU (the default).
    #[default]
    Cpu,
    /// The first CUDA device.
    Cuda,
}

/// Floating-point format of the forward and backward compute (weights stay fp32).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats everywhere (the default, and the only choice that is fast on CPU).
    #[default]
    Fp32,
    /// bfloat16 matrix math with fp32 master weights, router and loss.
    Bf16,
}

/// Device, threads and precision.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SystemConfig {
    /// `cpu` or `cuda`.
    pub device: DeviceKind,
    /// Intra-op threads on CPU (0 = libtorch's default).
    pub threads: usize,
    /// `fp32` or `bf16`.
    pub precision: Precision,
    /// Peak TFLOP/s of one device, for the MFU metric (default: the device table's
    /// dense bf16 peak for a known GPU; none on CPU, where MFU is not reported).
    pub peak_tflops: Option<f64>,
}

impl Default for SystemConfig {
    fn default() -> Self {
        Self {
            device: DeviceKind::Cpu,
            threads: 0,
            precision: Precision::Fp32,
            peak_tflops: None,
        }
    }
}

/// Model shape; field names follow transformers' `LongcatFlashConfig` where one exists.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Vocabulary rows of the embedding and the head (at least the tokenizer's size).
    pub vocab_size: usize,
    /// Model width d_model.
    pub hidden_size: usize,
    /// Number of ScMoE layers (each has two attention blocks).
    pub num_layers: usize,
    /// Attention heads per MLA block.
    pub num_attention_heads: usize,
    /// Rank of the query compression.
    pub q_lora_rank: usize,
    /// Rank of the key/value compression.
    pub kv_lora_rank: usize,
    /// Per-head query/key dimension without RoPE.
    pub qk_nope_head_dim: usize,
    /// Per-head query/key dimension with RoPE (even).
    pub qk_rope_head_dim: usize,
    /// Per-head value dimension.
    pub v_head_dim: usize,
    /// Intermediate size of the two dense SwiGLU FFNs per layer.
    pub ffn_hidden_size: usize,
    /// Intermediate size of each routed SwiGLU expert.
    pub expert_ffn_hidden_size: usize,
    /// N: FFN experts per MoE.
    pub n_routed_experts: usize,
    /// Z: zero-computation (identity) experts per MoE.
    #[serde(default)]
    pub zero_expert_num: usize,
    /// K: experts selected per token.
    pub moe_topk: usize,
    /// K_e: target expected number of FFN experts per token (defaults to K).
    #[serde(default)]
    pub target_ffn_experts: Option<usize>,
    /// gamma: the routed scaling factor multiplying the gate weights.
    #[serde(default = "defaults::one")]
    pub routed_scaling_factor: f64,
    /// RoPE base.
    #[serde(default = "defaults::rope_theta")]
    pub rope_theta: f64,
    /// Epsilon of the block RMSNorms.
    #[serde(default = "defaults::rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// Standard deviation of the normal initialization of matrices.
    #[serde(default = "defaults::init_std")]
    pub initializer_range: f64,
    /// Multi-token-prediction layers (0 or 1): one dense MLA + SwiGLU layer predicting
    /// token t+2 (longcat-methods section 10). Named as in the released checkpoint.
    #[serde(default)]
    pub mtp_layers: usize,
}

impl ModelConfig {
    /// K_e, the target number of FFN experts per token.
    pub fn target_ffn_experts(&self) -> usize {
        self.target_ffn_experts.unwrap_or(self.moe_topk)
    }
    /// Per-head query/key dimension (nope + rope).
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
    /// All experts of a MoE, FFN and zero.
    pub fn total_experts(&self) -> usize {
        self.n_routed_experts + self.zero_expert_num
    }
}

/// How the expert bias b is updated each optimizer step (longcat-methods section 4).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum BiasMode {
    /// b stays at 0.
    Off,
    /// The default: the report's rule for the spread between experts, plus a common
    /// shift of the layer's FFN biases toward the shift that, measured on the step's
    /// own router scores, would have given K_e (bias_control.rs writes the law down).
    #[default]
    Hold,
    /// The report's rule: delta b = Ki(t) e (the PID with Kp = Kd = 0).
    Longcat,
    /// General velocity-form PID with Kp, Ki(t), Kd.
    Pid,
    /// DeepSeek-V3's rule: delta b = sign_rate * sign(e).
    Sign,
}

/// Decay schedule of Ki (mu).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum KiSchedule {
    /// Ki constant.
    #[default]
    Constant,
    /// Ki * ki_decay_ratio^floor(t / ki_decay_interval), floored at ki_min.
    Step,
    /// Cosine from Ki to ki_min over train.steps.
    Cosine,
}

/// Expert-bias controller settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BiasControlConfig {
    /// `hold` (default), `longcat`, `pid`, `sign` or `off`.
    pub mode: BiasMode,
    /// Proportional gain (pid mode only).
    pub kp: f64,
    /// Integral gain mu at step 0.
    pub ki: f64,
    /// Derivative gain (pid mode only).
    pub kd: f64,
    /// Ki's decay: `constant`, `step` or `cosine`.
    pub ki_schedule: KiSchedule,
    /// Step schedule: updates between decays.
    pub ki_decay_interval: usize,
    /// Step schedule: factor per decay.
    pub ki_decay_ratio: f64,
    /// Floor of the step and cosine schedules.
    pub ki_min: f64,
    /// Sign mode: the step u.
    pub sign_rate: f64,
    /// Also adapt zero-expert biases (they stay frozen at 0 by default).
    pub adapt_zero_experts: bool,
    /// Hold mode: the fraction of the measured shift applied per update (1 is
    /// deadbeat; less averages the batch's sampling noise over updates).
    pub hold_gain: f64,
    /// Hold mode: the fraction of the measured shift added each update to the estimate
    /// of the router's drift, which is applied on top (removes the lag a steadily
    /// drifting router would leave).
    pub hold_drift_gain: f64,
    /// Hold mode: the largest common shift per update, in units of the mean router
    /// probability 1 / (N + Z) (also the range of the measured shifts).
    pub hold_max_shift: f64,
}

impl Default for BiasControlConfig {
    fn default() -> Self {
        Self {
            mode: BiasMode::Hold,
            kp: 0.0,
            ki: 0.01,
            kd: 0.0,
            ki_schedule: KiSchedule::Constant,
            ki_decay_interval: 1000,
            ki_decay_ratio: 0.5,
            ki_min: 0.0,
            sign_rate: 0.001,
            adapt_zero_experts: false,
            hold_gain: 0.5,
            hold_drift_gain: 0.05,
            hold_max_shift: 1.0,
        }
    }
}

/// MoE training methods beyond the forward pass.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MoeConfig {
    /// The expert-bias controller.
    pub bias_control: BiasControlConfig,
    /// alpha of the device-level load-balance loss (0 disables).
    pub load_balance_coeff: f64,
    /// D: groups of FFN experts for that loss (the expert-parallel size once EP exists).
    pub load_balance_groups: usize,
    /// lambda of the hidden z-loss (0 disables; the report uses 1e-7 .. 1e-6).
    pub z_loss_coeff: f64,
    /// Router health metrics every this many steps.
    pub metrics_every: usize,
}

impl Default for MoeConfig {
    fn default() -> Self {
        Self {
            bias_control: BiasControlConfig::default(),
            load_balance_coeff: 0.0,
            load_balance_groups: 1,
            z_loss_coeff: 0.0,
            metrics_every: 10,
        }
    }
}

/// Learning-rate schedule after warmup.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Cosine decay from `lr` to `min_lr` over the steps after warmup.
    #[default]
    Cosine,
    /// Warmup-stable-decay: constant `lr`, then linear decay to `min_lr` over the last
    /// `decay_fraction` of the steps.
    Wsd,
}

/// Training corpus, tokenizer and sequence layout; the streaming pipeline's settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// One dataset (shorthand for a single entry in `datasets`): a local directory or
    /// parquet file, a `file://`, `s3://`, `gs://` or `az://` prefix, or a glob of shards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Name of the text column.
    #[serde(default = "defaults::text_column")]
    pub text_column: String,
    /// Name of a pre-tokenized column (a list of ids); unset reads text unless the
    /// dataset's index says it was pre-tokenized with this recipe's tokenizer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_column: Option<String>,
    /// A weighted mixture of datasets (instead of `path`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub datasets: Vec<DatasetConfig>,
    /// Later phases: new weights and/or sequence length from a global token count on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseConfig>,
    /// Tokenizer: `bytes` (byte-level, 256 ids plus end-of-document) or the path of a
    /// tokenizer.json (see `catapult data tokenizer train`).
    #[serde(default = "defaults::tokenizer")]
    pub tokenizer: String,
    /// The tokenizer.json's end-of-document token (default: the first of
    /// `<|endoftext|>`, `</s>`, `<|end_of_text|>`, `<eos>` it has).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eod_token: Option<String>,
    /// Tokens per training sequence (of the first phase).
    pub seq_len: usize,
    /// Fraction of documents held out for validation (chosen by a hash of the document's
    /// global row, so the split does not depend on the seed).
    #[serde(default = "defaults::valid_fraction")]
    pub valid_fraction: f64,
    /// Canonical streams the data is dealt into; the data-parallel size must divide it
    /// and it must divide the global batch. The order does not depend on the world size.
    /// Default (0): the largest power of two up to 16 that divides the global batch.
    #[serde(default)]
    pub streams: usize,
    /// Sequences per shuffle block of each stream.
    #[serde(default = "defaults::shuffle_buffer")]
    pub shuffle_buffer: usize,
    /// Sequences per mixture window of each stream: every window holds each dataset's
    /// share exactly.
    #[serde(default = "defaults::mixture_window")]
    pub mixture_window: usize,
    /// Background threads that read and tokenize.
    #[serde(default = "defaults::data_workers")]
    pub workers: usize,
    /// Read-ahead budget in MiB (decoded, tokenized row groups waiting to be used).
    #[serde(default = "defaults::read_ahead_mb")]
    pub read_ahead_mb: u64,
    /// Mask attention across document boundaries inside a packed sequence.
    #[serde(default)]
    pub mask_documents: bool,
    /// Check each shard against the BLAKE3 its `dataset.json` lists the first time a
    /// rank reads it (one streaming pass over the shard; `bench data` measures the
    /// cost). Datasets without an index have nothing to check against.
    #[serde(default = "defaults::yes")]
    pub verify_shards: bool,
    /// Object-store access.
    #[serde(default)]
    pub storage: StorageConfig,
}

/// One dataset of a mixture.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// Name used in phases, metrics and the data state.
    pub name: String,
    /// Where the shards are (as `data.path`).
    pub path: String,
    /// Mixture weight in the first phase (weights need not sum to 1).
    #[serde(default = "defaults::weight")]
    pub weight: f64,
    /// Text column (default: `data.text_column`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_column: Option<String>,
    /// Pre-tokenized column (default: `data.tokens_column`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_column: Option<String>,
}

/// A later data phase.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PhaseConfig {
    /// Global tokens seen when the phase begins (it starts at the first batch boundary
    /// at or after this count).
    pub start_tokens: u64,
    /// New weights by dataset name; datasets not named keep their weight.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub weights: BTreeMap<String, f64>,
    /// New sequence length; unset keeps the previous one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq_len: Option<usize>,
}

/// How object stores are reached; credentials come from the standard environment
/// variables, never from the recipe.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Endpoint of an S3-compatible store, e.g. `http://127.0.0.1:8333`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Region (default `AWS_REGION`, else us-east-1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Retries of a failed list or read, with exponential backoff.
    #[serde(default = "defaults::retries")]
    pub retries: u32,
    /// Wait before the first retry, in milliseconds (doubles each time).
    #[serde(default = "defaults::backoff_ms")]
    pub backoff_ms: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: None,
            retries: defaults::retries(),
            backoff_ms: defaults::backoff_ms(),
        }
    }
}

impl StorageConfig {
    /// The data crate's view.
    pub fn options(&self) -> catapult_data::StorageOptions {
        catapult_data::StorageOptions {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            retries: self.retries,
            backoff: std::time::Duration::from_millis(self.backoff_ms),
        }
    }
}

impl DataConfig {
    /// The datasets as a list (the `path` shorthand becomes one dataset named `data`).
    pub fn dataset_list(&self) -> Vec<DatasetConfig> {
        match &self.path {
            Some(path) if self.datasets.is_empty() => vec![DatasetConfig {
                name: "data".into(),
                path: path.clone(),
                weight: 1.0,
                text_column: None,
                tokens_column: None,
            }],
            _ => self.datasets.clone(),
        }
    }

    /// The phases with every field resolved; the first starts at token 0.
    pub fn resolved_phases(&self) -> Vec<catapult_data::Phase> {
        let list = self.dataset_list();
        let mut current = catapult_data::Phase {
            start_tokens: 0,
            weights: list.iter().map(|d| d.weight).collect(),
            seq_len: self.seq_len,
        };
        let mut out = vec![current.clone()];
        for p in &self.phases {
            current.start_tokens = p.start_tokens;
            for (name, w) in &p.weights {
                if let Some(i) = list.iter().position(|d| &d.name == name) {
                    current.weights[i] = *w;
                }
            }
            if let Some(len) = p.seq_len {
                current.seq_len = len;
            }
            out.push(current.clone());
        }
        out
    }

    /// The longest sequence of any phase.
    pub fn max_seq_len(&self) -> usize {
        self.resolved_phases()
            .iter()
            .map(|p| p.seq_len)
            .max()
            .unwrap_or(self.seq_len)
    }
}

/// Sharded checkpoints (see `catapult ckpt`); a run always saves one at its last step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Save every this many optimizer steps (0: only at the end).
    #[serde(default)]
    pub every: usize,
    /// Root directory or object-store prefix (default: `<run dir>/checkpoints`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// Keep the newest this many checkpoints...
    #[serde(default = "defaults::keep_last")]
    pub keep_last: usize,
    /// ...plus every step that is a multiple of this (0: none).
    #[serde(default)]
    pub keep_every: u64,
    /// Serialize, hash and write in a background thread; training blocks only for the
    /// copy to host memory (and for a previous save still in flight).
    #[serde(default = "defaults::yes", rename = "async")]
    pub async_save: bool,
    /// Object-store access for `dir`.
    #[serde(default)]
    pub storage: StorageConfig,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            every: 0,
            dir: None,
            keep_last: defaults::keep_last(),
            keep_every: 0,
            async_save: true,
            storage: StorageConfig::default(),
        }
    }
}

/// Optimization and its schedule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Sequences per optimizer step.
    pub global_batch_size: usize,
    /// Sequences per forward/backward; gradients accumulate over
    /// global_batch_size / micro_batch_size micro-batches.
    pub micro_batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate.
    #[serde(default)]
    pub min_lr: f64,
    /// Linear warmup steps.
    #[serde(default)]
    pub warmup_steps: usize,
    /// `cosine` or `wsd`.
    #[serde(default)]
    pub schedule: Schedule,
    /// WSD only: fraction of the steps spent decaying.
    #[serde(default = "defaults::decay_fraction")]
    pub decay_fraction: f64,
    /// AdamW beta1.
    #[serde(default = "defaults::beta1")]
    pub beta1: f64,
    /// AdamW beta2.
    #[serde(default = "defaults::beta2")]
    pub beta2: f64,
    /// AdamW epsilon (LongCat-Flash: 1e-16, see longcat-methods section 6).
    #[serde(default = "defaults::adam_eps")]
    pub adam_eps: f64,
    /// Decoupled weight decay on matrices (norm weights and biases get none).
    #[serde(default = "defaults::weight_decay")]
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 disables).
    #[serde(default = "defaults::one")]
    pub grad_clip: f64,
    /// Validation every this many steps (and at step 0 and the end).
    #[serde(default = "defaults::eval_every")]
    pub eval_every: usize,
    /// Validation sequences per evaluation.
    #[serde(default = "defaults::eval_sequences")]
    pub eval_sequences: usize,
    /// Metrics line every this many steps.
    #[serde(default = "defaults::one_usize")]
    pub log_every: usize,
    /// Weight of the multi-token-prediction loss (needs model.mtp_layers = 1).
    #[serde(default = "defaults::mtp_loss_weight")]
    pub mtp_loss_weight: f64,
    /// Step from which the MTP loss is added (its parameters get no gradient before).
    #[serde(default)]
    pub mtp_start_step: usize,
    /// Activation recomputation: `none` keeps every layer's activations for backward;
    /// `layer` keeps each layer's input and the rows its exchanges received, and re-runs
    /// the layer's forward during backward (the same gradients, bit for bit).
    #[serde(default)]
    pub recompute: Recompute,
    /// Silent-data-corruption check: every this many steps (0: never), replay the first
    /// micro-batch's forward and backward and compare the gradients bitwise.
    #[serde(default)]
    pub sdc_check_every: usize,
    /// On a mismatch: `stop`, or `rollback` to the last checkpoint.
    #[serde(default)]
    pub sdc_action: SdcAction,
    /// A non-finite loss or gradient norm: `stop`, `skip` the step, or `rollback`.
    #[serde(default)]
    pub nonfinite: NonFiniteAction,
}

/// Where a run writes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// Run directory (default `runs/<name>`).
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

mod defaults {
    pub fn seed() -> u64 {
        1234
    }
    pub fn one() -> f64 {
        1.0
    }
    pub fn one_usize() -> usize {
        1
    }
    pub fn rope_theta() -> f64 {
        10000.0
    }
    pub fn rms_norm_eps() -> f64 {
        1e-5
    }
    pub fn init_std() -> f64 {
        0.02
    }
    pub fn text_column() -> String {
        "text".into()
    }
    pub fn tokenizer() -> String {
        "bytes".into()
    }
    pub fn valid_fraction() -> f64 {
        0.02
    }
    pub fn shuffle_buffer() -> usize {
        64
    }
    pub fn mixture_window() -> usize {
        100
    }
    pub fn data_workers() -> usize {
        2
    }
    pub fn read_ahead_mb() -> u64 {
        256
    }
    pub fn weight() -> f64 {
        1.0
    }
    pub fn keep_last() -> usize {
        3
    }
    pub fn yes() -> bool {
        true
    }
    pub fn retries() -> u32 {
        8
    }
    pub fn backoff_ms() -> u64 {
        200
    }
    pub fn decay_fraction() -> f64 {
        0.2
    }
    pub fn beta1() -> f64 {
        0.9
    }
    pub fn beta2() -> f64 {
        0.95
    }
    pub fn adam_eps() -> f64 {
        1e-16
    }
    pub fn weight_decay() -> f64 {
        0.1
    }
    pub fn mtp_loss_weight() -> f64 {
        0.3
    }
    pub fn eval_every() -> usize {
        50
    }
    pub fn eval_sequences() -> usize {
        32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optimizer_init_parses_copy_and_fresh_and_names_anything_else() {
        assert_eq!("copy".parse::<OptimizerInit>(), Ok(OptimizerInit::Copy));
        assert_eq!("fresh".parse::<OptimizerInit>(), Ok(OptimizerInit::Fresh));
        let e = "keep".parse::<OptimizerInit>().unwrap_err();
        assert_eq!(e.to_string(), "`keep`: use copy or fresh");
        // What clap's value_parser needs of `catapult grow --optimizer`.
        let _: Box<dyn std::error::Error + Send + Sync + 'static> = e.into();
    }

    #[test]
    fn group_names_are_their_recipe_keys() {
        for g in Group::ALL {
            let key = serde_yaml_ng::to_string(&g).unwrap();
            assert_eq!(key.trim_end(), g.name());
            assert_eq!(g.to_string(), g.name());
        }
    }
}
