//! Recipes: the YAML file that fully describes a training run, parsed into typed structs.
//!
//! This module owns parsing, `--set` overrides and the semantic checks that must pass
//! before any rank starts. It knows nothing about tensors or processes. Every error names
//! the file (or the `--set` argument), the field's dotted path, the problem and the fix.

use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

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
    pub groups: BTreeMap<crate::groups::Group, GroupOverride>,
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
    pub optimizer: crate::growth::OptimizerInit,
}

/// Supervision by `catapult launch`: a rank that exits non-zero or stops heartbeating
/// stops the job, which restarts from the last valid checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LaunchConfig {
    /// Restarts after failures before the run gives up (0: none).
    pub max_restarts: usize,
    /// A rank that has not finished a step (its heartbeat) for this many seconds is hung.
    pub heartbeat_timeout_s: f64,
    /// Wait before the first restart; each further restart waits twice as long.
    pub restart_backoff_s: f64,
    /// Under Slurm, a preempted run puts its job back in the queue (`scontrol requeue`).
    pub requeue: bool,
}

impl Default for LaunchConfig {
    fn default() -> Self {
        Self {
            max_restarts: 3,
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
    /// The report's rule: delta b = Ki(t) e (the PID with Kp = Kd = 0).
    #[default]
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
    /// `longcat` (default), `pid`, `sign` or `off`.
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
}

impl Default for BiasControlConfig {
    fn default() -> Self {
        Self {
            mode: BiasMode::Longcat,
            kp: 0.0,
            ki: 0.01,
            kd: 0.0,
            ki_schedule: KiSchedule::Constant,
            ki_decay_interval: 1000,
            ki_decay_ratio: 0.5,
            ki_min: 0.0,
            sign_rate: 0.001,
            adapt_zero_experts: false,
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
    /// Silent-data-corruption check: every this many steps (0: never), replay the first
    /// micro-batch's forward and backward and compare the gradients bitwise.
    #[serde(default)]
    pub sdc_check_every: usize,
    /// On a mismatch: `stop`, or `rollback` to the last checkpoint.
    #[serde(default)]
    pub sdc_action: SdcAction,
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

/// Why a recipe was rejected. The Display text is the whole message a user sees.
#[derive(Debug, Clone, PartialEq)]
pub enum RecipeError {
    /// The file could not be read.
    Read { file: PathBuf, reason: String },
    /// The YAML itself is malformed.
    Syntax {
        file: PathBuf,
        line: Option<usize>,
        reason: String,
    },
    /// A key that the recipe schema does not have.
    UnknownKey {
        origin: String,
        path: String,
        line: Option<usize>,
        suggestion: Option<String>,
        valid: Vec<String>,
    },
    /// A value of the wrong type, or a missing required key.
    BadValue {
        origin: String,
        path: String,
        line: Option<usize>,
        reason: String,
    },
    /// A malformed `--set` argument.
    BadOverride { arg: String, reason: String },
    /// Values that parse but do not make sense together.
    Inconsistent {
        file: String,
        fields: Vec<String>,
        problem: String,
        fix: String,
    },
}

fn at_line(line: &Option<usize>) -> String {
    line.map(|l| format!(" (line {l})")).unwrap_or_default()
}

impl fmt::Display for RecipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecipeError::Read { file, reason } => {
                write!(f, "cannot read recipe {}: {reason}", file.display())
            }
            RecipeError::Syntax { file, line, reason } => {
                write!(
                    f,
                    "{}{}: invalid YAML: {reason}",
                    file.display(),
                    at_line(line)
                )
            }
            RecipeError::UnknownKey {
                origin,
                path,
                line,
                suggestion,
                valid,
            } => {
                write!(f, "{origin}: unknown key `{path}`{}", at_line(line))?;
                match suggestion {
                    Some(s) => write!(f, "; did you mean `{s}`?"),
                    None => write!(f, "; valid keys here: {}", valid.join(", ")),
                }
            }
            RecipeError::BadValue {
                origin,
                path,
                line,
                reason,
            } => {
                write!(f, "{origin}: `{path}`{}: {reason}", at_line(line))
            }
            RecipeError::BadOverride { arg, reason } => {
                write!(f, "--set {arg}: {reason}")
            }
            RecipeError::Inconsistent {
                file,
                fields,
                problem,
                fix,
            } => {
                let names: Vec<String> = fields.iter().map(|x| format!("`{x}`")).collect();
                write!(f, "{file}: {}: {problem}; {fix}", names.join(" and "))
            }
        }
    }
}

impl std::error::Error for RecipeError {}

/// A `--set dotted.path=value` override.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// The argument as the user wrote it.
    pub arg: String,
    /// Path components.
    pub path: Vec<String>,
    /// The value, parsed as a YAML scalar (so `4` is a number, `cuda` a string).
    pub value: Value,
}

impl Override {
    /// Parses `a.b.c=value`.
    pub fn parse(arg: &str) -> Result<Self, RecipeError> {
        let bad = |reason: &str| RecipeError::BadOverride {
            arg: arg.into(),
            reason: reason.into(),
        };
        let (key, raw) = arg
            .split_once('=')
            .ok_or_else(|| bad("expected KEY=VALUE, e.g. model.num_layers=4"))?;
        let path: Vec<String> = key.trim().split('.').map(str::to_string).collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(bad(
                "the key has an empty component; write it like train.steps=100",
            ));
        }
        let value: Value = serde_yaml_ng::from_str(raw)
            .map_err(|e| bad(&format!("the value is not valid YAML ({e})")))?;
        Ok(Self {
            arg: arg.into(),
            path,
            value,
        })
    }

    fn apply(&self, root: &mut Value) -> Result<(), RecipeError> {
        let mut node = root;
        for (i, part) in self.path.iter().enumerate() {
            let Value::Mapping(map) = node else {
                return Err(RecipeError::BadOverride {
                    arg: self.arg.clone(),
                    reason: format!("`{}` is not a section", self.path[..i].join(".")),
                });
            };
            let key = Value::String(part.clone());
            if i + 1 == self.path.len() {
                map.insert(key, self.value.clone());
                return Ok(());
            }
            node = map
                .entry(key)
                .or_insert_with(|| Value::Mapping(Default::default()));
        }
        Ok(())
    }
}

/// Loads a recipe file, applies overrides and runs every semantic check.
pub fn load(file: &Path, overrides: &[Override]) -> Result<Recipe, RecipeError> {
    let text = std::fs::read_to_string(file).map_err(|e| RecipeError::Read {
        file: file.into(),
        reason: e.to_string(),
    })?;
    parse(&text, &file.display().to_string(), overrides)
}

/// Parses recipe text (`origin` names it in errors), applies overrides, validates.
pub fn parse(text: &str, origin: &str, overrides: &[Override]) -> Result<Recipe, RecipeError> {
    // First pass on the text itself, so that errors carry the file's line numbers.
    let de = serde_yaml_ng::Deserializer::from_str(text);
    let first: Result<Recipe, _> = serde_path_to_error::deserialize(de);
    let mut recipe = match first {
        Ok(r) if overrides.is_empty() => r,
        Ok(_) => {
            let mut tree: Value = serde_yaml_ng::from_str(text).map_err(|e| syntax(origin, e))?;
            for o in overrides {
                o.apply(&mut tree)?;
            }
            let result: Result<Recipe, _> = serde_path_to_error::deserialize(tree);
            result.map_err(|e| {
                let path = e.path().to_string();
                // The file alone parsed, so the error lies in an override: the last one
                // whose key is on the error's path (an unknown key's error may stop at
                // its parent section).
                let culprit = overrides
                    .iter()
                    .rev()
                    .find(|o| {
                        let key = o.path.join(".");
                        path.starts_with(&key) || key.starts_with(&path)
                    })
                    .map(|o| format!("--set {}", o.arg))
                    .unwrap_or_else(|| origin.to_string());
                classify(&culprit, &path, None, e.into_inner())
            })?
        }
        Err(e) => {
            let path = e.path().to_string();
            let line = e.inner().location().map(|l| l.line());
            if e.inner().to_string().contains("did not find expected")
                || e.inner().to_string().contains("while parsing")
                || e.inner().to_string().contains("while scanning")
            {
                return Err(RecipeError::Syntax {
                    file: origin.into(),
                    line,
                    reason: e.into_inner().to_string(),
                });
            }
            return Err(classify(origin, &path, line, e.into_inner()));
        }
    };
    // Resolved defaults that depend on other fields.
    if recipe.data.streams == 0 {
        recipe.data.streams = gcd(recipe.train.global_batch_size, 16);
    }
    validate(&recipe, origin)?;
    Ok(recipe)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn syntax(origin: &str, e: serde_yaml_ng::Error) -> RecipeError {
    RecipeError::Syntax {
        file: origin.into(),
        line: e.location().map(|l| l.line()),
        reason: e.to_string(),
    }
}

/// How alike a mistyped key and a valid key are, in 0..=1: Jaro-Winkler, or 0.9 when one
/// contains the other (`layers` for `num_layers`).
fn closeness(typed: &str, valid: &str) -> f64 {
    let contained = typed.len() >= 3 && (valid.contains(typed) || typed.contains(valid));
    strsim::jaro_winkler(typed, valid).max(if contained { 0.9 } else { 0.0 })
}

/// Turns serde's message into a RecipeError with the full dotted path.
fn classify(origin: &str, path: &str, line: Option<usize>, e: serde_yaml_ng::Error) -> RecipeError {
    let full_msg = e.to_string();
    // serde_yaml_ng: "[PATH: ]MESSAGE[ at line L column C]", where MESSAGE is serde's, e.g.
    // "unknown field `foo`, expected one of `a`, `b`" or "missing field `x`".
    let msg = match full_msg.split_once(": ") {
        Some((prefix, rest)) if !prefix.contains(' ') => rest.to_string(),
        _ => full_msg.clone(),
    };
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let key = rest.split('`').next().unwrap_or_default().to_string();
        let expected_part = rest.split_once("expected").map(|x| x.1).unwrap_or_default();
        let expected_part = expected_part.split(" at line").next().unwrap_or_default();
        let valid: Vec<String> = expected_part
            .split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, s)| s.to_string())
            .collect();
        let parent = path.trim_end_matches(&key).trim_end_matches('.');
        let parent = if parent == "." { "" } else { parent };
        let full = if parent.is_empty() {
            key.clone()
        } else {
            format!("{parent}.{key}")
        };
        let suggestion = valid
            .iter()
            .map(|v| (closeness(&key, v), v))
            .filter(|(score, _)| *score > 0.8)
            // On a tie the key listed first in the schema wins (`num_layers` before
            // `mtp_layers`): max_by would return the last.
            .reduce(|best, next| if next.0 > best.0 { next } else { best })
            .map(|(_, v)| {
                if parent.is_empty() {
                    v.clone()
                } else {
                    format!("{parent}.{v}")
                }
            });
        return RecipeError::UnknownKey {
            origin: origin.into(),
            path: full,
            line,
            suggestion,
            valid,
        };
    }
    let reason = msg.split(" at line ").next().unwrap_or(&msg).to_string();
    let (path, reason) = if let Some(field) = reason.strip_prefix("missing field `") {
        let field = field.split('`').next().unwrap_or_default();
        let full = if path.is_empty() || path == "." {
            field.to_string()
        } else {
            format!("{path}.{field}")
        };
        (
            full,
            "is required but missing; add it to the recipe".to_string(),
        )
    } else {
        (path.to_string(), reason)
    };
    RecipeError::BadValue {
        origin: origin.into(),
        path,
        line,
        reason,
    }
}

/// The data section's checks: datasets, phases, streams and the tokenizer (loaded here,
/// so a missing tokenizer.json fails before any rank starts).
fn validate_data(r: &Recipe, origin: &str) -> Result<(), RecipeError> {
    let err = |fields: &[&str], problem: String, fix: &str| {
        Err(RecipeError::Inconsistent {
            file: origin.into(),
            fields: fields.iter().map(|s| s.to_string()).collect(),
            problem,
            fix: fix.into(),
        })
    };
    let d = &r.data;
    match (&d.path, d.datasets.is_empty()) {
        (None, true) => {
            return err(
                &["data.path", "data.datasets"],
                "no training data is named".into(),
                "set data.path to a prepared dataset, or list data.datasets",
            )
        }
        (Some(_), false) => {
            return err(
                &["data.path", "data.datasets"],
                "both are set".into(),
                "use data.path for one dataset or data.datasets for a mixture, not both",
            )
        }
        _ => {}
    }
    let list = d.dataset_list();
    for (i, ds) in list.iter().enumerate() {
        if list[..i].iter().any(|o| o.name == ds.name) {
            return err(
                &[&format!("data.datasets[{i}].name")],
                format!("`{}` is used twice", ds.name),
                "give every dataset its own name",
            );
        }
        if !(ds.weight >= 0.0 && ds.weight.is_finite()) {
            return err(
                &[&format!("data.datasets[{i}].weight")],
                format!("is {}", ds.weight),
                "use a finite weight >= 0",
            );
        }
    }
    let mut previous = 0;
    for (i, p) in d.phases.iter().enumerate() {
        let field = format!("data.phases[{i}]");
        if p.start_tokens <= previous {
            return err(
                &[&format!("{field}.start_tokens")],
                format!(
                    "{} does not come after the previous phase's start ({previous})",
                    p.start_tokens
                ),
                "list phases in increasing start_tokens, all above 0",
            );
        }
        previous = p.start_tokens;
        for (name, w) in &p.weights {
            if !list.iter().any(|ds| &ds.name == name) {
                return err(
                    &[&format!("{field}.weights.{name}")],
                    format!("no dataset is named `{name}`"),
                    &format!(
                        "use one of: {}",
                        list.iter()
                            .map(|ds| ds.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
            if !(*w >= 0.0 && w.is_finite()) {
                return err(
                    &[&format!("{field}.weights.{name}")],
                    format!("is {w}"),
                    "use a finite weight >= 0",
                );
            }
        }
        if p.seq_len == Some(0) {
            return err(
                &[&format!("{field}.seq_len")],
                "must be at least 1".into(),
                "set a positive length",
            );
        }
    }
    for (i, phase) in d.resolved_phases().iter().enumerate() {
        if phase.weights.iter().sum::<f64>() <= 0.0 {
            let field = if i == 0 {
                "data.datasets".to_string()
            } else {
                format!("data.phases[{}].weights", i - 1)
            };
            return err(
                &[&field],
                "every weight is 0".into(),
                "give at least one dataset a positive weight",
            );
        }
    }
    let g = r.train.global_batch_size;
    if !g.is_multiple_of(d.streams) {
        let divisors: Vec<String> = (1..=g.min(64))
            .filter(|k| g.is_multiple_of(*k))
            .map(|k| k.to_string())
            .collect();
        return err(
            &["data.streams", "train.global_batch_size"],
            format!(
                "{} streams cannot split a global batch of {g} sequences evenly",
                d.streams
            ),
            &format!(
                "set data.streams to a divisor of the global batch ({})",
                divisors.join(", ")
            ),
        );
    }
    for (name, v) in [
        ("data.shuffle_buffer", d.shuffle_buffer as u64),
        ("data.mixture_window", d.mixture_window as u64),
        ("data.workers", d.workers as u64),
        ("data.read_ahead_mb", d.read_ahead_mb),
    ] {
        if v == 0 {
            return err(&[name], "must be at least 1".into(), "set a positive value");
        }
    }
    let tokenizer = match catapult_data::Tokenizer::load(&d.tokenizer, d.eod_token.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            return err(
                &["data.tokenizer"],
                e.to_string(),
                "fix data.tokenizer (or data.eod_token)",
            )
        }
    };
    if r.model.vocab_size < tokenizer.vocab_size() {
        return err(
            &["model.vocab_size", "data.tokenizer"],
            format!(
                "{} rows cannot hold the tokenizer's {} ids",
                r.model.vocab_size,
                tokenizer.vocab_size()
            ),
            &format!(
                "raise model.vocab_size to at least {}",
                tokenizer.vocab_size()
            ),
        );
    }
    Ok(())
}

/// True for a number above zero (false for NaN).
fn positive(x: f64) -> bool {
    x > 0.0
}

/// Semantic checks that the types cannot express. Each names the fields involved.
pub fn validate(r: &Recipe, origin: &str) -> Result<(), RecipeError> {
    let err = |fields: &[&str], problem: String, fix: &str| {
        Err(RecipeError::Inconsistent {
            file: origin.into(),
            fields: fields.iter().map(|s| s.to_string()).collect(),
            problem,
            fix: fix.into(),
        })
    };
    let m = &r.model;
    let counts = [
        ("model.hidden_size", m.hidden_size),
        ("model.num_layers", m.num_layers),
        ("model.num_attention_heads", m.num_attention_heads),
        ("model.q_lora_rank", m.q_lora_rank),
        ("model.kv_lora_rank", m.kv_lora_rank),
        ("model.v_head_dim", m.v_head_dim),
        ("model.ffn_hidden_size", m.ffn_hidden_size),
        ("model.expert_ffn_hidden_size", m.expert_ffn_hidden_size),
        ("model.moe_topk", m.moe_topk),
        ("data.seq_len", r.data.seq_len),
        ("train.steps", r.train.steps),
        ("train.global_batch_size", r.train.global_batch_size),
        ("train.micro_batch_size", r.train.micro_batch_size),
        ("train.eval_every", r.train.eval_every),
        ("train.eval_sequences", r.train.eval_sequences),
        ("train.log_every", r.train.log_every),
    ];
    for (name, v) in counts {
        if v == 0 {
            return err(&[name], "must be at least 1".into(), "set a positive value");
        }
    }
    if let Some(peak) = r.system.peak_tflops {
        if !positive(peak) {
            return err(
                &["system.peak_tflops"],
                format!("is {peak}"),
                "give the device's peak TFLOP/s as a positive number, or leave it out",
            );
        }
    }
    if m.qk_rope_head_dim == 0 || !m.qk_rope_head_dim.is_multiple_of(2) {
        return err(
            &["model.qk_rope_head_dim"],
            format!(
                "is {}, but RoPE rotates pairs of dimensions",
                m.qk_rope_head_dim
            ),
            "use a positive even number",
        );
    }
    if m.q_lora_rank > m.hidden_size || m.kv_lora_rank > m.hidden_size {
        return err(
            &[
                "model.q_lora_rank",
                "model.kv_lora_rank",
                "model.hidden_size",
            ],
            format!(
                "the compression ranks ({}, {}) exceed the width {}",
                m.q_lora_rank, m.kv_lora_rank, m.hidden_size
            ),
            "use ranks no larger than hidden_size",
        );
    }
    if m.n_routed_experts == 0 {
        return err(
            &["model.n_routed_experts"],
            "must be at least 1".into(),
            "add FFN experts",
        );
    }
    if m.moe_topk > m.total_experts() {
        return err(
            &[
                "model.moe_topk",
                "model.n_routed_experts",
                "model.zero_expert_num",
            ],
            format!(
                "top-K = {} exceeds the {} experts (N = {} FFN + Z = {} zero)",
                m.moe_topk,
                m.total_experts(),
                m.n_routed_experts,
                m.zero_expert_num
            ),
            "lower moe_topk or add experts",
        );
    }
    let ke = m.target_ffn_experts();
    if ke > m.moe_topk || ke > m.n_routed_experts {
        return err(
            &["model.target_ffn_experts", "model.moe_topk"],
            format!(
                "K_e = {ke} exceeds top-K = {} or the {} FFN experts",
                m.moe_topk, m.n_routed_experts
            ),
            "K_e must satisfy K_e <= K and K_e <= n_routed_experts",
        );
    }
    if ke < m.moe_topk && m.zero_expert_num == 0 {
        return err(
            &["model.target_ffn_experts", "model.zero_expert_num"],
            format!(
                "K_e = {ke} < K = {} needs zero experts, but Z = 0",
                m.moe_topk
            ),
            "add zero experts or set target_ffn_experts equal to moe_topk",
        );
    }
    if !positive(m.routed_scaling_factor) {
        return err(
            &["model.routed_scaling_factor"],
            format!("is {}", m.routed_scaling_factor),
            "gamma must be positive (LongCat-Flash uses 6.0)",
        );
    }
    if m.mtp_layers > 1 {
        return err(
            &["model.mtp_layers"],
            format!("is {}, but one MTP layer is supported", m.mtp_layers),
            "use 0 or 1",
        );
    }
    if m.mtp_layers == 1 && r.data.seq_len < 2 {
        return err(
            &["model.mtp_layers", "data.seq_len"],
            "predicting token t+2 needs sequences of at least 2 tokens".into(),
            "raise seq_len",
        );
    }
    let moe = &r.moe;
    if moe.load_balance_groups == 0 || !m.n_routed_experts.is_multiple_of(moe.load_balance_groups) {
        return err(
            &["moe.load_balance_groups", "model.n_routed_experts"],
            format!(
                "D = {} groups do not divide the {} FFN experts",
                moe.load_balance_groups, m.n_routed_experts
            ),
            "choose D dividing n_routed_experts",
        );
    }
    if moe.load_balance_coeff < 0.0 || moe.z_loss_coeff < 0.0 {
        return err(
            &["moe.load_balance_coeff", "moe.z_loss_coeff"],
            "must not be negative".into(),
            "use 0 to disable a loss",
        );
    }
    if moe.metrics_every == 0 {
        return err(
            &["moe.metrics_every"],
            "must be at least 1".into(),
            "set a positive value",
        );
    }
    let bc = &moe.bias_control;
    if bc.mode == BiasMode::Longcat && (bc.kp != 0.0 || bc.kd != 0.0) {
        return err(
            &[
                "moe.bias_control.mode",
                "moe.bias_control.kp",
                "moe.bias_control.kd",
            ],
            "mode `longcat` is the PID with Kp = Kd = 0, but Kp or Kd is set".into(),
            "use mode `pid` for proportional or derivative terms",
        );
    }
    if bc.ki < 0.0 || bc.ki_min < 0.0 || bc.ki_min > bc.ki {
        return err(
            &["moe.bias_control.ki", "moe.bias_control.ki_min"],
            format!("ki = {}, ki_min = {}", bc.ki, bc.ki_min),
            "need 0 <= ki_min <= ki",
        );
    }
    if bc.ki_schedule == KiSchedule::Step
        && (bc.ki_decay_interval == 0 || !(0.0..=1.0).contains(&bc.ki_decay_ratio))
    {
        return err(
            &[
                "moe.bias_control.ki_decay_interval",
                "moe.bias_control.ki_decay_ratio",
            ],
            format!(
                "interval {}, ratio {}",
                bc.ki_decay_interval, bc.ki_decay_ratio
            ),
            "use a positive interval and a ratio in [0, 1]",
        );
    }
    if bc.adapt_zero_experts && m.zero_expert_num == 0 {
        return err(
            &[
                "moe.bias_control.adapt_zero_experts",
                "model.zero_expert_num",
            ],
            "there are no zero experts to adapt".into(),
            "add zero experts or set adapt_zero_experts: false",
        );
    }
    validate_data(r, origin)?;
    if !(0.0..1.0).contains(&r.data.valid_fraction) || r.data.valid_fraction <= 0.0 {
        return err(
            &["data.valid_fraction"],
            format!("is {}", r.data.valid_fraction),
            "use a fraction in (0, 1), e.g. 0.02",
        );
    }
    let t = &r.train;
    if !t.global_batch_size.is_multiple_of(t.micro_batch_size) {
        return err(
            &["train.global_batch_size", "train.micro_batch_size"],
            format!(
                "the global batch {} is not divisible by the micro-batch {}",
                t.global_batch_size, t.micro_batch_size
            ),
            "make global_batch_size a multiple of micro_batch_size",
        );
    }
    if !positive(t.lr) || t.min_lr < 0.0 || t.min_lr > t.lr {
        return err(
            &["train.lr", "train.min_lr"],
            format!("lr = {}, min_lr = {}", t.lr, t.min_lr),
            "need 0 <= min_lr <= lr and lr > 0",
        );
    }
    if t.warmup_steps > t.steps {
        return err(
            &["train.warmup_steps", "train.steps"],
            format!("{} warmup steps exceed {} steps", t.warmup_steps, t.steps),
            "shorten the warmup",
        );
    }
    if !(0.0..=1.0).contains(&t.decay_fraction) {
        return err(
            &["train.decay_fraction"],
            format!("is {}", t.decay_fraction),
            "use 0..1",
        );
    }
    for (name, b) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
        if !(0.0..1.0).contains(&b) {
            return err(&[name], format!("is {b}"), "use a value in [0, 1)");
        }
    }
    if t.sdc_action == SdcAction::Rollback && t.sdc_check_every > 0 && r.checkpoint.every == 0 {
        return err(
            &["train.sdc_action", "checkpoint.every"],
            "rollback needs checkpoints to roll back to, but checkpoint.every is 0".into(),
            "set checkpoint.every (e.g. 100) or use sdc_action: stop",
        );
    }
    let l = &r.launch;
    if !positive(l.heartbeat_timeout_s) || l.restart_backoff_s < 0.0 {
        return err(
            &["launch.heartbeat_timeout_s", "launch.restart_backoff_s"],
            format!(
                "timeout {} s, backoff {} s",
                l.heartbeat_timeout_s, l.restart_backoff_s
            ),
            "use a positive timeout (longer than the slowest step, evaluation or checkpoint) \
             and a backoff >= 0",
        );
    }
    let par = &r.parallel;
    if par.backend == Backend::Nccl && r.system.device != DeviceKind::Cuda {
        return err(
            &["parallel.backend", "system.device"],
            "NCCL moves CUDA tensors, but the device is the CPU".into(),
            "set system.device: cuda, or parallel.backend: mpi (or auto)",
        );
    }
    if par.expert == 0 {
        return err(
            &["parallel.expert"],
            "must be at least 1".into(),
            "use 1 for no expert parallelism",
        );
    }
    if !m.n_routed_experts.is_multiple_of(par.expert) {
        return err(
            &["parallel.expert", "model.n_routed_experts"],
            format!(
                "{} FFN experts do not split evenly over {} expert-parallel ranks",
                m.n_routed_experts, par.expert
            ),
            "use an expert-parallel size that divides n_routed_experts",
        );
    }
    if !positive(t.adam_eps) {
        return err(
            &["train.adam_eps"],
            format!("is {}", t.adam_eps),
            "use e.g. 1e-16",
        );
    }
    if let Some(tr) = &r.transfer {
        let p = &tr.proxy;
        if p.hidden_size == 0 {
            return err(
                &["transfer.proxy.hidden_size"],
                "is 0".into(),
                "give the width the hyperparameters were tuned at",
            );
        }
        let mut values = vec![
            ("transfer.proxy.lr".to_string(), p.lr),
            ("transfer.proxy.init_std".to_string(), p.init_std),
        ];
        for (g, o) in &p.groups {
            values.push((format!("transfer.proxy.groups.{g}.lr"), o.lr));
            values.push((format!("transfer.proxy.groups.{g}.init_std"), o.init_std));
        }
        if p.groups
            .get(&crate::groups::Group::Norms)
            .is_some_and(|o| o.init_std.is_some())
        {
            return err(
                &["transfer.proxy.groups.norms.init_std"],
                "is set, but norm gains always start at 1".into(),
                "remove it (norms take only an lr override)",
            );
        }
        for (field, v) in values {
            if let Some(v) = v {
                if !positive(v) || !v.is_finite() {
                    return err(&[&field], format!("is {v}"), "use a positive number");
                }
            }
        }
    }
    if let Some(g) = &r.growth {
        if g.from_layers == 0
            || m.num_layers < 2 * g.from_layers
            || !m.num_layers.is_multiple_of(g.from_layers)
        {
            return err(
                &["growth.from_layers", "model.num_layers"],
                format!(
                    "{} layers cannot be stacked from {} (the stack is repeated whole)",
                    m.num_layers, g.from_layers
                ),
                "use a from_layers that divides model.num_layers and is at most half of it",
            );
        }
        let per_step = (t.global_batch_size * r.data.seq_len) as u64;
        if g.until_tokens == 0 || g.until_tokens >= per_step * t.steps as u64 {
            return err(
                &["growth.until_tokens", "train.steps"],
                format!(
                    "growth at {} tokens is not inside the run ({} steps x {per_step} tokens)",
                    g.until_tokens, t.steps
                ),
                "grow after at least one step and before the last",
            );
        }
    }
    Ok(())
}

impl Recipe {
    /// The data pipeline's configuration.
    pub fn pipeline_config(&self) -> catapult_data::PipelineConfig {
        let d = &self.data;
        catapult_data::PipelineConfig {
            datasets: d
                .dataset_list()
                .into_iter()
                .map(|ds| catapult_data::DatasetSpec {
                    name: ds.name,
                    location: ds.path,
                    text_column: ds.text_column.unwrap_or_else(|| d.text_column.clone()),
                    tokens_column: ds.tokens_column.or_else(|| d.tokens_column.clone()),
                })
                .collect(),
            phases: d.resolved_phases(),
            global_batch: self.train.global_batch_size,
            streams: d.streams,
            shuffle_buffer: d.shuffle_buffer,
            mixture_window: d.mixture_window,
            workers: d.workers,
            read_ahead_bytes: d.read_ahead_mb << 20,
            valid_fraction: d.valid_fraction,
            seed: self.seed,
            tokenizer: d.tokenizer.clone(),
            eod_token: d.eod_token.clone(),
            storage: d.storage.options(),
        }
    }

    /// The checkpoint root: `checkpoint.dir`, or `<run dir>/checkpoints`.
    pub fn checkpoint_root(&self) -> String {
        self.checkpoint
            .dir
            .clone()
            .unwrap_or_else(|| self.run_dir().join("checkpoints").display().to_string())
    }

    /// The run directory: `output.dir`, or `runs/<name>`.
    pub fn run_dir(&self) -> PathBuf {
        self.output
            .dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs").join(&self.name))
    }

    /// The recipe as YAML with every default filled in.
    pub fn to_yaml(&self) -> String {
        serde_yaml_ng::to_string(self).expect("a recipe always serializes")
    }
}

/// Small configurations for unit tests across the crate.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::ModelConfig;

    /// A small model with `n` FFN experts, `z` zero experts, top-`k`, K_e = `ke`.
    pub fn model_config(n: usize, z: usize, k: usize, ke: usize, layers: usize) -> ModelConfig {
        ModelConfig {
            vocab_size: 300,
            hidden_size: 32,
            num_layers: layers,
            num_attention_heads: 2,
            q_lora_rank: 8,
            kv_lora_rank: 2,
            qk_nope_head_dim: 8,
            qk_rope_head_dim: 4,
            v_head_dim: 6,
            ffn_hidden_size: 48,
            expert_ffn_hidden_size: 12,
            n_routed_experts: n,
            zero_expert_num: z,
            moe_topk: k,
            target_ffn_experts: Some(ke),
            routed_scaling_factor: 1.5,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            initializer_range: 0.2,
            mtp_layers: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "name: t
model:
  vocab_size: 272
  hidden_size: 64
  num_layers: 1
  num_attention_heads: 2
  q_lora_rank: 32
  kv_lora_rank: 16
  qk_nope_head_dim: 8
  qk_rope_head_dim: 8
  v_head_dim: 8
  ffn_hidden_size: 64
  expert_ffn_hidden_size: 16
  n_routed_experts: 4
  zero_expert_num: 2
  moe_topk: 2
  target_ffn_experts: 1
data:
  path: x
  seq_len: 16
train:
  steps: 10
  global_batch_size: 4
  micro_batch_size: 2
  lr: 0.001
";

    fn with(key: &str) -> Result<Recipe, RecipeError> {
        parse(GOOD, "r.yaml", &[Override::parse(key).unwrap()])
    }

    fn message(r: Result<Recipe, RecipeError>) -> String {
        r.expect_err("the recipe should be rejected").to_string()
    }

    fn data_section(data: &str) -> Result<Recipe, RecipeError> {
        let text = GOOD.replace("data:\n  path: x\n  seq_len: 16\n", data);
        assert_ne!(text, GOOD);
        parse(&text, "r.yaml", &[])
    }

    #[test]
    fn streams_default_to_a_divisor_of_the_batch_and_are_checked() {
        assert_eq!(with("train.global_batch_size=4").unwrap().data.streams, 4);
        assert_eq!(with("train.global_batch_size=48").unwrap().data.streams, 16);
        assert_eq!(with("train.global_batch_size=6").unwrap().data.streams, 2);
        let m = message(with("data.streams=3"));
        assert!(
            m.contains("`data.streams`") && m.contains("`train.global_batch_size`"),
            "{m}"
        );
        assert!(m.contains("(1, 2, 4)"), "{m}");
    }

    #[test]
    fn mixtures_and_phases_resolve_and_are_checked() {
        let mix = "data:\n  seq_len: 16\n  datasets:\n    - {name: web, path: a, weight: 0.7}\n    - {name: code, path: b, weight: 0.3}\n  phases:\n    - {start_tokens: 1000, weights: {code: 0.6}}\n    - {start_tokens: 5000, seq_len: 32}\n";
        let r = data_section(mix).unwrap();
        let phases = r.data.resolved_phases();
        assert_eq!(phases.len(), 3);
        assert_eq!(phases[1].weights, vec![0.7, 0.6]);
        assert_eq!((phases[2].seq_len, phases[2].start_tokens), (32, 5000));
        assert_eq!(phases[2].weights, vec![0.7, 0.6]);
        assert_eq!(r.data.max_seq_len(), 32);
        let cfg = r.pipeline_config();
        assert_eq!(cfg.datasets[1].location, "b");

        let m = message(data_section(
            &mix.replace("weights: {code: 0.6}", "weights: {cod: 0.6}"),
        ));
        assert!(
            m.contains("`data.phases[0].weights.cod`") && m.contains("web, code"),
            "{m}"
        );
        let m = message(data_section(
            &mix.replace("start_tokens: 5000", "start_tokens: 1000"),
        ));
        assert!(m.contains("`data.phases[1].start_tokens`"), "{m}");
        let m = message(data_section(&mix.replace("name: code", "name: web")));
        assert!(m.contains("used twice"), "{m}");
        let m = message(data_section(&format!("{mix}  path: c\n")));
        assert!(m.contains("both are set"), "{m}");
        let m = message(data_section("data:\n  seq_len: 16\n"));
        assert!(m.contains("no training data is named"), "{m}");
    }

    #[test]
    fn a_missing_tokenizer_fails_at_validation() {
        let m = message(with("data.tokenizer=/no/such/tokenizer.json"));
        assert!(
            m.contains("`data.tokenizer`") && m.contains("/no/such/tokenizer.json"),
            "{m}"
        );
        assert!(m.contains("catapult data tokenizer train"), "{m}");
    }

    #[test]
    fn good_recipe_parses_with_defaults() {
        let r = parse(GOOD, "r.yaml", &[]).unwrap();
        assert_eq!(r.train.adam_eps, 1e-16);
        assert_eq!(r.model.target_ffn_experts(), 1);
        assert_eq!(r.run_dir(), PathBuf::from("runs/t"));
    }

    #[test]
    fn resolved_recipe_round_trips() {
        let r = parse(GOOD, "r.yaml", &[]).unwrap();
        let again = parse(&r.to_yaml(), "shown.yaml", &[]).unwrap();
        assert_eq!(r, again);
    }

    #[test]
    fn unknown_key_names_path_line_and_closest_key() {
        let text = GOOD.replace("  num_layers: 1", "  num_layer: 1");
        let m = message(parse(&text, "r.yaml", &[]));
        assert!(m.contains("r.yaml"), "{m}");
        assert!(m.contains("`model.num_layer`"), "{m}");
        assert!(m.contains("line 5"), "{m}");
        assert!(m.contains("did you mean `model.num_layers`"), "{m}");
    }

    #[test]
    fn unknown_top_level_key_is_named() {
        let text = format!("{GOOD}trian:\n  steps: 3\n");
        let m = message(parse(&text, "r.yaml", &[]));
        assert!(m.contains("unknown key `trian`"), "{m}");
        assert!(m.contains("did you mean `train`"), "{m}");
    }

    #[test]
    fn wrong_type_names_path_and_expected_type() {
        let text = GOOD.replace("hidden_size: 64", "hidden_size: wide");
        let m = message(parse(&text, "r.yaml", &[]));
        assert!(m.contains("`model.hidden_size`"), "{m}");
        assert!(m.contains("line 4"), "{m}");
        assert!(m.contains("expected usize"), "{m}");
    }

    #[test]
    fn missing_field_is_named() {
        let text = GOOD.replace("  seq_len: 16\n", "");
        let m = message(parse(&text, "r.yaml", &[]));
        assert!(m.contains("`data.seq_len`"), "{m}");
        assert!(m.contains("required"), "{m}");
    }

    #[test]
    fn override_sets_any_key() {
        let r = with("model.num_layers=3").unwrap();
        assert_eq!(r.model.num_layers, 3);
        let r = with("system.device=cuda").unwrap();
        assert_eq!(r.system.device, DeviceKind::Cuda);
    }

    #[test]
    fn override_of_unknown_key_names_the_argument() {
        let m = message(with("model.layers=4"));
        assert!(m.contains("--set model.layers=4"), "{m}");
        assert!(m.contains("`model.layers`"), "{m}");
        assert!(m.contains("did you mean `model.num_layers`?"), "{m}");
    }

    #[test]
    fn override_with_wrong_type_names_path() {
        let m = message(with("train.steps=many"));
        assert!(m.contains("`train.steps`"), "{m}");
        assert!(m.contains("--set train.steps=many"), "{m}");
    }

    #[test]
    fn unrelated_unknown_key_lists_valid_keys_instead_of_guessing() {
        let text = GOOD.replace("  num_layers: 1", "  num_layers: 1\n  zzz: 1");
        let m = message(parse(&text, "r.yaml", &[]));
        assert!(m.contains("unknown key `model.zzz`"), "{m}");
        assert!(
            m.contains("valid keys here: vocab_size, hidden_size"),
            "{m}"
        );
    }

    #[test]
    fn malformed_override_is_rejected() {
        let e = Override::parse("train.steps").unwrap_err().to_string();
        assert!(e.contains("KEY=VALUE"), "{e}");
    }

    #[test]
    fn topk_larger_than_experts_is_rejected() {
        let m = message(with("model.moe_topk=7"));
        assert!(m.contains("`model.moe_topk`"), "{m}");
        assert!(m.contains("exceeds the 6 experts"), "{m}");
    }

    #[test]
    fn target_ffn_experts_above_topk_is_rejected() {
        let m = message(with("model.target_ffn_experts=3"));
        assert!(m.contains("`model.target_ffn_experts`"), "{m}");
        assert!(m.contains("K_e = 3"), "{m}");
    }

    #[test]
    fn ke_below_k_without_zero_experts_is_rejected() {
        let m = message(parse(
            GOOD,
            "r.yaml",
            &[Override::parse("model.zero_expert_num=0").unwrap()],
        ));
        assert!(m.contains("`model.zero_expert_num`"), "{m}");
    }

    #[test]
    fn odd_rope_dim_is_rejected() {
        let m = message(with("model.qk_rope_head_dim=7"));
        assert!(m.contains("`model.qk_rope_head_dim`"), "{m}");
        assert!(m.contains("even"), "{m}");
    }

    #[test]
    fn batch_not_divisible_by_micro_batch_is_rejected() {
        let m = message(with("train.micro_batch_size=3"));
        assert!(
            m.contains("`train.global_batch_size` and `train.micro_batch_size`"),
            "{m}"
        );
    }

    #[test]
    fn small_vocab_is_rejected() {
        let m = message(with("model.vocab_size=100"));
        assert!(m.contains("`model.vocab_size`"), "{m}");
    }

    #[test]
    fn rank_above_width_is_rejected() {
        let m = message(with("model.q_lora_rank=128"));
        assert!(m.contains("`model.q_lora_rank`"), "{m}");
    }

    #[test]
    fn warmup_longer_than_run_is_rejected() {
        let m = message(with("train.warmup_steps=11"));
        assert!(m.contains("`train.warmup_steps`"), "{m}");
    }

    #[test]
    fn groups_not_dividing_experts_are_rejected() {
        let m = message(with("moe.load_balance_groups=3"));
        assert!(
            m.contains("`moe.load_balance_groups` and `model.n_routed_experts`"),
            "{m}"
        );
    }

    #[test]
    fn longcat_mode_with_proportional_gain_is_rejected() {
        let m = message(with("moe.bias_control.kp=0.1"));
        assert!(m.contains("`moe.bias_control.mode`"), "{m}");
        assert!(with("moe.bias_control.mode=pid").is_ok());
    }

    fn with_all(keys: &[&str]) -> Result<Recipe, RecipeError> {
        let overrides: Vec<Override> = keys.iter().map(|k| Override::parse(k).unwrap()).collect();
        parse(GOOD, "r.yaml", &overrides)
    }

    #[test]
    fn growth_schedules_must_stack_whole_and_fall_inside_the_run() {
        // 10 steps x 4 sequences x 16 tokens = 640 tokens in the run.
        let grow = |extra: &[&str]| {
            let mut keys = vec!["model.num_layers=4", "growth.from_layers=2"];
            keys.extend(extra);
            with_all(&keys)
        };
        assert!(grow(&["growth.until_tokens=320"]).is_ok());
        let m = message(grow(&["growth.until_tokens=320", "growth.from_layers=3"]));
        assert!(
            m.contains("`growth.from_layers` and `model.num_layers`"),
            "{m}"
        );
        let m = message(grow(&["growth.until_tokens=640"]));
        assert!(m.contains("`growth.until_tokens`"), "{m}");
        let m = message(grow(&["growth.until_tokens=320", "growth.optimizer=keep"]));
        assert!(m.contains("growth.optimizer"), "{m}");
    }

    #[test]
    fn transfer_values_and_group_names_are_checked() {
        let proxy = "transfer.proxy.hidden_size=16";
        assert!(with_all(&[proxy, "transfer.proxy.groups.router.lr=0.01"]).is_ok());
        let m = message(with_all(&[proxy, "transfer.proxy.groups.router.lr=-1"]));
        assert!(m.contains("`transfer.proxy.groups.router.lr`"), "{m}");
        let m = message(with_all(&[proxy, "transfer.proxy.groups.routers.lr=0.01"]));
        assert!(m.contains("routers"), "{m}");
        let m = message(with_all(&[
            proxy,
            "transfer.proxy.groups.norms.init_std=0.5",
        ]));
        assert!(m.contains("`transfer.proxy.groups.norms.init_std`"), "{m}");
        let m = message(with_all(&["transfer.proxy.hidden_size=0"]));
        assert!(m.contains("`transfer.proxy.hidden_size`"), "{m}");
    }

    #[test]
    fn bad_enum_value_names_path() {
        let m = message(with("system.precision=fp8"));
        assert!(m.contains("`system.precision`"), "{m}");
        assert!(m.contains("fp32"), "{m}");
    }
}
