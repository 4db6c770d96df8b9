//! The training loop, visibly: get batch, forward, backward, clip, step, log.
//!
//! It composes the pieces that own their state (model parameters, `AdamW`, the data
//! order) and writes the run directory: `metrics.jsonl`, `recipe.yaml` and the final
//! checkpoint under `checkpoint/`.

use crate::bias_control::ExpertBiasController;
use crate::checkpoint::{copy_into, from_host, to_host, Resume};
use crate::engine::{is_expert_param, Parallel};
use crate::groups::Group;
use crate::losses::{hidden_z_loss, load_balance_loss_global, BalanceShape};
use crate::metrics::{Metrics, Progress};
use crate::model::LongcatModel;
use crate::optim::{learning_rate, AdamW};
use crate::recipe::{Backend, DeviceKind, Precision, Recipe, SdcAction};
use crate::router_metrics::{expert_loads, load_spread, router_similarity};
use catapult_checkpoints::{kill_self_on, AsyncSaver, Checkpoints, Loaded};
use catapult_data::{Batch, Pipeline};
use catapult_kernels::comm::Comm;
use catapult_kernels::ep::ExchangeStats;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// Errors of a training run; each names what failed and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The recipe asks for something this machine or dataset cannot give.
    #[error("{0}")]
    Setup(String),
    /// Reading the dataset failed.
    #[error("{0}")]
    Data(#[from] catapult_data::DataError),
    /// Writing outputs failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Writing the checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] catapult_checkpoints::CheckpointError),
    /// Saving or loading a sharded checkpoint failed.
    #[error(transparent)]
    Shard(#[from] catapult_checkpoints::ShardError),
    /// A silent-data-corruption check found a rank computing different gradients twice.
    #[error("{0}")]
    Corruption(String),
    /// A collective failed (MPI could not start, an NCCL call or a peer failed).
    #[error(transparent)]
    Comm(#[from] catapult_kernels::CommError),
}

impl TrainError {
    /// Whether the user must change the recipe, an argument or a path (exit code 2).
    pub fn is_bad_input(&self) -> bool {
        matches!(self, TrainError::Setup(_))
    }
}

/// Rollbacks after failed silent-data-corruption checks, in a row, before giving up.
const MAX_ROLLBACKS: usize = 3;

/// Liveness for a supervisor (`catapult launch`): when `CATAPULT_HEARTBEAT_DIR` is set,
/// each rank rewrites `rank-R` there (its last completed step) whenever it gets past a
/// point every rank must reach; a rank stuck in a collective stops updating it.
struct Heartbeat {
    file: Option<PathBuf>,
}

impl Heartbeat {
    fn from_env(rank: usize) -> Self {
        let file = std::env::var_os("CATAPULT_HEARTBEAT_DIR").map(|d| {
            let dir = PathBuf::from(d);
            let _ = std::fs::create_dir_all(&dir);
            dir.join(format!("rank-{rank}"))
        });
        Self { file }
    }

    fn beat(&self, step: usize) {
        if let Some(f) = &self.file {
            // Best effort: a full disk shows up as a hang, which the supervisor handles.
            let _ = std::fs::write(f, step.to_string());
        }
    }
}

/// Test hooks for supervision (`CATAPULT_FAULT=kill:RANK:STEP` or `hang:RANK:STEP`):
/// at the start of step STEP (1-based) that rank SIGKILLs itself or blocks forever, as
/// a crashed or wedged process would. Only in a job's first attempt
/// (`CATAPULT_ATTEMPT` unset or 0), so that a restarted job runs through, unless the
/// value ends in `:always`.
fn supervision_fault(rank: usize, step: usize) {
    let Ok(fault) = std::env::var("CATAPULT_FAULT") else {
        return;
    };
    // `...:always` fires in every attempt (to exhaust the restarts).
    let (fault, always) = match fault.strip_suffix(":always") {
        Some(f) => (f.to_string(), true),
        None => (fault, false),
    };
    if !always && std::env::var("CATAPULT_ATTEMPT").is_ok_and(|a| a != "0") {
        return;
    }
    if fault == format!("kill:{rank}:{step}") {
        catapult_checkpoints::kill_self();
    }
    if fault == format!("hang:{rank}:{step}") {
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// How `train` behaves beyond the recipe.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Replace an existing run directory's outputs instead of refusing.
    pub overwrite: bool,
    /// Continue from a checkpoint.
    pub resume: Option<Resume>,
    /// Skip the BLAKE3 check of checkpoint files on load.
    pub no_verify: bool,
    /// Fail instead of falling back to an earlier checkpoint when the newest is broken.
    pub no_fallback: bool,
}

/// Where a finished run put its outputs.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The final checkpoint directory.
    pub checkpoint: PathBuf,
    /// The JSON-lines metrics file.
    pub metrics: PathBuf,
    /// Validation loss before the first step.
    pub first_val_loss: f64,
    /// Validation loss after the last step.
    pub last_val_loss: f64,
    /// This process's rank (only rank 0 writes the run directory).
    pub rank: usize,
    /// The run stopped early on a preemption request, after saving a checkpoint at this
    /// step (None: it ran to the end).
    pub preempted_at: Option<usize>,
    /// The stop was the first stage of a growth schedule reaching its token count.
    pub reached_tokens: bool,
}

/// The first preemption signal (SIGTERM or SIGUSR1) this process received, 0 if none.
static PREEMPT_SIGNAL: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn on_preempt(sig: libc::c_int) {
    if PREEMPT_SIGNAL.swap(sig, std::sync::atomic::Ordering::SeqCst) != 0 {
        // A second signal: leave now. Checkpoints are never half-visible (the manifest
        // is written last), so the last one stays loadable.
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(128 + sig) };
    }
}

/// SIGTERM and SIGUSR1 (Slurm's `--signal=B:USR1@T`, a scheduler's preemption) make the
/// run finish its step, save a checkpoint and exit 0; a second signal exits at once.
fn install_preemption_handlers() {
    for sig in [libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: the handler only touches an atomic and calls _exit.
        unsafe {
            libc::signal(sig, on_preempt as *const () as libc::sighandler_t);
        }
    }
}

/// Whether this rank was asked to stop: a signal, or the supervisor's stop file
/// (`$CATAPULT_CONTROL_DIR/stop`).
fn stop_requested() -> bool {
    PREEMPT_SIGNAL.load(std::sync::atomic::Ordering::SeqCst) != 0
        || std::env::var_os("CATAPULT_CONTROL_DIR")
            .is_some_and(|d| Path::new(&d).join("stop").exists())
}

/// Inputs and targets (rows x seq_len, i64) of `sequences` (each seq_len + 1 ids).
fn batch_tensors(sequences: &[Vec<u32>], device: Device) -> (Tensor, Tensor) {
    let ids: Vec<i64> = sequences.iter().flatten().map(|&t| t as i64).collect();
    let all = Tensor::from_slice(&ids)
        .view([sequences.len() as i64, -1])
        .to_device(device);
    let len = all.size()[1] - 1;
    (all.narrow(1, 0, len), all.narrow(1, 1, len))
}

/// Attention mask keeping each position within its document (and causal): batch x 1 x
/// seq x seq, true = attend. `segments` holds a segment id per input position.
pub fn document_mask(segments: &[u32], rows: usize, device: Device) -> Tensor {
    let seg: Vec<i64> = segments.iter().map(|&s| s as i64).collect();
    let seg = Tensor::from_slice(&seg)
        .view([rows as i64, -1])
        .to_device(device);
    let len = seg.size()[1];
    let same = seg.unsqueeze(2).eq_tensor(&seg.unsqueeze(1));
    let causal = Tensor::ones([len, len], (Kind::Bool, device)).tril(0);
    (same.logical_and(&causal)).unsqueeze(1)
}

fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Tensor {
    let vocab = logits.size()[2];
    logits
        .view([-1, vocab])
        .cross_entropy_for_logits(&targets.reshape([-1]))
}

/// This process's rank among those on its node (Open MPI, PMIx or Slurm), for picking a
/// GPU; 0 alone.
fn local_rank() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "PMIX_LOCAL_RANK",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
    .unwrap_or(0)
}

fn device_for(recipe: &Recipe) -> Result<Device, TrainError> {
    match recipe.system.device {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(
            local_rank() % tch::Cuda::device_count().max(1) as usize,
        )),
        DeviceKind::Cuda => Err(TrainError::Setup(
            "system.device is `cuda` but libtorch sees no CUDA device; run on a GPU machine \
             or set system.device=cpu"
                .into(),
        )),
    }
}

/// The model and its parameters, built deterministically from the recipe's seed.
pub struct BuiltModel {
    /// Owner of every tensor (parameters and buffers).
    pub vars: VarStore,
    /// The forward pass.
    pub model: LongcatModel,
}

/// Builds the model on the CPU from `recipe.seed` (so the initial weights do not depend
/// on the device) and moves it to `device`.
pub fn build_model(recipe: &Recipe, device: Device) -> BuiltModel {
    build_model_with_experts(recipe, device, 0..recipe.model.n_routed_experts)
}

/// `build_model` holding only the routed experts `local` (an expert-parallel rank).
pub fn build_model_with_experts(
    recipe: &Recipe,
    device: Device,
    local: std::ops::Range<usize>,
) -> BuiltModel {
    tch::manual_seed(recipe.seed as i64);
    let mut vars = VarStore::new(Device::Cpu);
    let kind = match recipe.system.precision {
        Precision::Fp32 => Kind::Float,
        Precision::Bf16 => Kind::BFloat16,
    };
    let model = LongcatModel::with_experts(
        &vars.root(),
        &recipe.model,
        recipe.data.max_seq_len(),
        kind,
        device,
        local,
    );
    // Width transfer: each group's init std (a rescaling of the same draws).
    crate::transfer::apply_init(&vars, recipe);
    // set_data in place: the model's handles see the moved tensors.
    vars.set_device(device);
    BuiltModel { vars, model }
}

/// Every variable of the store, sorted by name.
pub fn named_tensors(vars: &VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vars.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// Mean loss over `sequences`, computed by all ranks together: the chunks of `micro`
/// sequences are dealt round-robin to the ranks (a rank without a chunk in a round runs
/// one with weight 0, since every rank takes part in the MoE's all-to-alls), and the
/// weighted sums are added in rank order.
fn mean_loss(
    model: &LongcatModel,
    par: &Parallel,
    sequences: &[Vec<u32>],
    micro: usize,
    device: Device,
) -> Result<f64, catapult_kernels::CommError> {
    let (rank, world) = (par.world.rank(), par.world.size());
    tch::no_grad(|| {
        let chunks: Vec<&[Vec<u32>]> = sequences.chunks(micro).collect();
        let mut sums = [0.0f64, 0.0];
        let mut stats = ExchangeStats::default();
        for round in 0..chunks.len().div_ceil(world) {
            let (chunk, weight) = match chunks.get(round * world + rank) {
                Some(c) => (*c, 1.0),
                None => (chunks[0], 0.0),
            };
            let (inputs, targets) = batch_tensors(chunk, device);
            let f = crate::engine::forward(model, par, &inputs, None, false, &mut stats)?;
            let loss = cross_entropy(&f.logits, &targets).double_value(&[]);
            sums[0] += weight * loss * chunk.len() as f64;
            sums[1] += weight * chunk.len() as f64;
        }
        par.world.all_reduce_sum(&mut sums);
        Ok(sums[0] / sums[1])
    })
}

fn prepare_run_dir(dir: &Path, recipe: &Recipe, opts: &RunOptions) -> Result<(), TrainError> {
    let io = |source| TrainError::Io {
        path: dir.into(),
        source,
    };
    if dir.join("metrics.jsonl").exists() && !opts.overwrite && opts.resume.is_none() {
        return Err(TrainError::Setup(format!(
            "{} already holds a run; pass --overwrite to replace it, or set output.dir to a new directory",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::write(dir.join("recipe.yaml"), recipe.to_yaml()).map_err(io)
}

/// Trains `recipe` to the end and writes the run directory.
pub fn train(recipe: &Recipe, opts: &RunOptions) -> Result<RunSummary, TrainError> {
    let device = device_for(recipe)?;
    if recipe.system.threads > 0 {
        tch::set_num_threads(recipe.system.threads as i32);
    }
    // The MPI world (or a world of one), split into expert-parallel groups: every rank
    // reads its own slice of each global batch and holds the dense parameters and its
    // group's share of the experts.
    let p = &recipe.parallel;
    let nccl = match (p.backend, device) {
        (Backend::Nccl, _) | (Backend::Auto, Device::Cuda(_)) => Some(device),
        _ => None,
    };
    let par = Parallel::with_nccl(
        Comm::from_env()?.fast_reductions(p.fast_reductions),
        p.expert,
        p.data,
        p.overlap,
        nccl,
    )
    .map_err(|e| TrainError::Setup(format!("{}: {e}", recipe.name)))?;
    if recipe.growth.is_some() {
        train_growing(recipe, opts, &par, device)
    } else {
        train_with(recipe, opts, &par, device, None)
    }
}

/// A recipe with a growth schedule: the first stage (`<run>/stage1`, `from_layers`
/// layers) until `until_tokens`, then the stacked model in the run's own checkpoint root
/// at that step, then the rest of the run from it. A resumed run continues in whichever
/// stage it stopped; every rank takes part, rank 0 writes the grown checkpoint.
fn train_growing(
    recipe: &Recipe,
    opts: &RunOptions,
    par: &Parallel,
    device: Device,
) -> Result<RunSummary, TrainError> {
    let g = recipe.growth.as_ref().expect("a growth schedule");
    let store = Checkpoints::open(
        &recipe.checkpoint_root(),
        &recipe.checkpoint.storage.options(),
    )?;
    let grown = store.steps()?;
    if opts.resume.is_some() && !grown.is_empty() {
        return train_with(recipe, opts, par, device, None);
    }
    if !grown.is_empty() && !opts.overwrite {
        return Err(TrainError::Setup(format!(
            "{} already holds checkpoints; pass --resume to continue the run, or --overwrite to start over",
            store.root()
        )));
    }
    let stage1 = crate::growth::stage1_recipe(recipe).expect("a growth schedule");
    let lead = par.world.rank() == 0;
    if lead && opts.overwrite {
        // Start over: the grown stage's outputs of an earlier run go too.
        let run = recipe.run_dir();
        let mut stale = vec![run.join("metrics.jsonl"), run.join("tensorboard")];
        if !grown.is_empty() && recipe.checkpoint.dir.is_none() {
            stale.push(run.join("checkpoints"));
        }
        for path in stale {
            let gone = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(source) = gone {
                if source.kind() != std::io::ErrorKind::NotFound {
                    return Err(TrainError::Io { path, source });
                }
            }
        }
    }
    let first = train_with(&stage1, opts, par, device, Some(g.until_tokens))?;
    let Some(at) = first.preempted_at else {
        return Err(TrainError::Setup(format!(
            "{}: the first stage reached its last step before growth.until_tokens = {}; \
             lower growth.until_tokens below the run's tokens (data phases may shorten \
             sequences)",
            recipe.name, g.until_tokens
        )));
    };
    if !first.reached_tokens {
        // Preempted during the first stage: its checkpoint is written; a resumed run
        // continues it.
        return Ok(first);
    }
    let made = if lead {
        (|| -> Result<(), TrainError> {
            let (s1, _) = Checkpoints::open_path(
                &first.checkpoint.display().to_string(),
                &recipe.checkpoint.storage.options(),
            )?;
            let loaded = s1.load(at as u64, true)?;
            let factor = recipe.model.num_layers / g.from_layers;
            let request = crate::growth::grow(&loaded, recipe, factor, g.optimizer)
                .map_err(TrainError::Setup)?;
            let manifest = store.save(request)?;
            eprintln!(
                "grew {} layers to {} at step {} ({} tokens; optimizer state {:?})",
                g.from_layers, recipe.model.num_layers, manifest.step, manifest.tokens, g.optimizer
            );
            Ok(())
        })()
    } else {
        Ok(())
    };
    agree(&par.world, made)?;
    let grown_at = at as u64;
    let resume = RunOptions {
        overwrite: false,
        resume: Some(crate::checkpoint::Resume::Path(format!(
            "{}/{}",
            store.root(),
            catapult_checkpoints::step_dir(grown_at)
        ))),
        ..opts.clone()
    };
    let mut summary = train_with(recipe, &resume, par, device, None)?;
    summary.first_val_loss = first.first_val_loss;
    Ok(summary)
}

/// Trains `recipe` on `par` to the end, or until `stop_at_tokens` (then like a
/// preemption: a checkpoint at that step, `reached_tokens` set).
fn train_with(
    recipe: &Recipe,
    opts: &RunOptions,
    par: &Parallel,
    device: Device,
    stop_at_tokens: Option<u64>,
) -> Result<RunSummary, TrainError> {
    let comm = &par.world;
    let (rank, world) = (comm.rank(), comm.size());
    let lead = rank == 0;
    let t = &recipe.train;
    if !t
        .global_batch_size
        .is_multiple_of(world * t.micro_batch_size)
    {
        return Err(TrainError::Setup(format!(
            "train.global_batch_size = {} is not a multiple of {world} ranks x train.micro_batch_size = {}",
            t.global_batch_size, t.micro_batch_size
        )));
    }
    let mut pipeline = Pipeline::open(recipe.pipeline_config(), rank, world)?;
    let valid = pipeline.validation(recipe.train.eval_sequences, recipe.data.seq_len)?;
    if let Some((name, _)) = valid.iter().find(|(_, v)| v.is_empty()) {
        return Err(TrainError::Setup(format!(
            "dataset `{name}`: its held-out documents (data.valid_fraction = {}) do not fill one \
             sequence of data.seq_len = {}; use more text, a larger valid_fraction or a shorter seq_len",
            recipe.data.valid_fraction, recipe.data.seq_len
        )));
    }

    let run_dir = recipe.run_dir();
    let store = Checkpoints::open(
        &recipe.checkpoint_root(),
        &recipe.checkpoint.storage.options(),
    )?;
    let loaded = match &opts.resume {
        None => None,
        Some(resume) => find_checkpoint(recipe, &store, resume, opts)?,
    };
    if let Some(l) = &loaded {
        crate::checkpoint::check_model(recipe, l).map_err(TrainError::Setup)?;
    }
    let prepared = if lead {
        prepare_run_dir(&run_dir, recipe, opts)
    } else {
        Ok(())
    };
    agree(comm, prepared)?;
    if opts.resume.is_none() && lead {
        if let Some(newest) = store.steps()?.last() {
            if opts.overwrite && recipe.checkpoint.dir.is_none() {
                let dir = run_dir.join("checkpoints");
                std::fs::remove_dir_all(&dir)
                    .map_err(|source| TrainError::Io { path: dir, source })?;
            } else {
                return Err(TrainError::Setup(format!(
                    "{} already holds checkpoints (newest {}); pass --resume to continue from them, \
                     or set checkpoint.dir to an empty location{}",
                    store.root(),
                    catapult_checkpoints::step_dir(*newest),
                    if opts.overwrite {
                        " (--overwrite does not delete a checkpoint.dir set in the recipe)"
                    } else {
                        ""
                    }
                )));
            }
        }
    }

    let built = build_model_with_experts(
        recipe,
        device,
        par.local_experts(recipe.model.n_routed_experts),
    );
    let model = &built.model;
    let params: Vec<(String, Tensor)> = named_tensors(&built.vars)
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    let param_count: i64 = params.iter().map(|(_, p)| p.numel() as i64).sum();
    let mut optimizer = AdamW::new(params, &recipe.train);
    // Each parameter group's learning rate relative to the schedule (width transfer).
    let lr_scales = crate::transfer::lr_scales(recipe);
    optimizer.set_lr_scales(|name| lr_scales[&Group::of(name)]);
    let peak_tflops = peak_tflops(recipe, device);
    let mut controller =
        ExpertBiasController::new(&recipe.moe.bias_control, &recipe.model, recipe.train.steps);

    comm.barrier();
    let micro_batches = t.global_batch_size / world / t.micro_batch_size;
    let shape = balance_shape(recipe);
    // Validation loss: the mean over datasets of each one's held-out loss (all ranks
    // compute it together; rank 0 writes it).
    let eval = |model: &LongcatModel, step: usize| {
        let losses: Vec<(String, f64)> = valid
            .iter()
            .map(|(name, seqs)| {
                Ok((
                    name.clone(),
                    mean_loss(model, par, seqs, t.micro_batch_size, device)?,
                ))
            })
            .collect::<Result<_, TrainError>>()?;
        let mean = losses.iter().map(|(_, l)| l).sum::<f64>() / losses.len() as f64;
        let mut line = serde_json::json!({"step": step, "val_loss": mean});
        if losses.len() > 1 {
            line["val_loss_by_dataset"] = losses
                .into_iter()
                .map(|(n, l)| (n, serde_json::Value::from(l)))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        Ok::<_, TrainError>((mean, line))
    };

    let mut start = 0usize;
    let mut tokens_seen = 0u64;
    let (mut metrics, first_val_loss) = match &loaded {
        Some(l) => {
            restore(
                l,
                par,
                &built,
                &mut optimizer,
                &mut controller,
                &mut pipeline,
            )?;
            start = l.manifest.step as usize;
            tokens_seen = l.manifest.tokens;
            eprintln!("resuming from {} (step {start})", l.location);
            let (m, kept) = if lead {
                Metrics::resume(run_dir.join("metrics.jsonl"), start as u64)?
            } else {
                (Metrics::disabled(), Vec::new())
            };
            let first = kept
                .iter()
                .find(|v| v["step"] == 0)
                .and_then(|v| v["val_loss"].as_f64())
                .unwrap_or(f64::NAN);
            (m, first)
        }
        None => {
            let (first, line) = eval(model, 0)?;
            if lead {
                let mut m = Metrics::create(run_dir.join("metrics.jsonl"))?;
                m.write(line)?;
                (m, first)
            } else {
                (Metrics::disabled(), first)
            }
        }
    };
    let mut last_val_loss = first_val_loss;
    let mut saver = AsyncSaver::default();

    let progress = Progress::new(lead, &recipe.name, t.steps, start, t.log_every);
    let mut data_wait = 0.0f64;
    let started = Instant::now();
    let mut step = start;
    let heartbeat = Heartbeat::from_env(rank);
    heartbeat.beat(step);
    install_preemption_handlers();
    let mut preempted_at = None;
    let mut reached_tokens = false;
    // Rollbacks after a silent-data-corruption check, in a row (reset by a clean check).
    let mut rollbacks = 0usize;
    if loaded.is_some() && stop_at_tokens.is_some_and(|n| tokens_seen >= n) {
        // Resumed from the checkpoint at which the first stage of a growth schedule ended
        // (the run died before the grown checkpoint was written): grow from it as the
        // uninterrupted run did, without another step.
        preempted_at = Some(step);
        reached_tokens = true;
    }
    while step < t.steps && preempted_at.is_none() {
        // The torch RNG is a function of (seed, step), so a resumed run draws the same
        // numbers as an uninterrupted one.
        tch::manual_seed(recipe.seed as i64 ^ ((step as i64) << 20));
        let step_start = Instant::now();
        let done = step + 1;
        supervision_fault(rank, done);
        let lr = learning_rate(t, step);
        let router_metrics_due = done.is_multiple_of(recipe.moe.metrics_every) || done == t.steps;
        let sdc_due = t.sdc_check_every > 0 && done.is_multiple_of(t.sdc_check_every);
        let mut stats = StepStats::new(recipe, device, step);
        // All-to-all costs of the forward passes and of the backward passes.
        let mut exchange = [ExchangeStats::default(), ExchangeStats::default()];
        let wait_start = Instant::now();
        let batch: Batch = pipeline.next_batch()?;
        let waited = wait_start.elapsed().as_secs_f64();
        data_wait += waited;
        let seq_len = batch.seq_len;
        let segments = recipe.data.mask_documents.then(|| batch.segment_ids());
        let mut sdc: Option<(f64, Option<String>)> = None;
        for micro in 0..micro_batches {
            let rows = micro * t.micro_batch_size..(micro + 1) * t.micro_batch_size;
            let (inputs, targets) = batch_tensors(&batch.sequences[rows.clone()], device);
            let mask = segments.as_ref().map(|seg| {
                document_mask(
                    &seg[rows.start * seq_len..rows.end * seq_len],
                    t.micro_batch_size,
                    device,
                )
            });
            let input = MicroBatch {
                inputs: &inputs,
                targets: &targets,
                mask: mask.as_ref(),
            };
            let measure_rg = router_metrics_due && micro == 0;
            micro_step(
                model,
                recipe,
                par,
                shape,
                &input,
                micro_batches,
                measure_rg,
                &mut stats,
                &mut exchange,
            )?;
            if micro == 0 && sdc_due {
                // Replay the micro-batch: its gradients must come out bit for bit the same.
                let replay_start = Instant::now();
                let first = optimizer.gradients();
                optimizer.zero_grad();
                let mut scratch = StepStats::new(recipe, device, step);
                micro_step(
                    model,
                    recipe,
                    par,
                    shape,
                    &input,
                    micro_batches,
                    false,
                    &mut scratch,
                    &mut [ExchangeStats::default(), ExchangeStats::default()],
                )?;
                sdc_fault(rank, done, &optimizer);
                let differs = first_difference(&first, &optimizer.gradients());
                sdc = Some((replay_start.elapsed().as_secs_f64(), differs));
            }
        }
        if let Some((_, differs)) = &sdc {
            let bad = corrupted_ranks(comm, differs.as_deref());
            if !bad.is_empty() {
                let message = format!(
                    "silent data corruption at step {done}: replaying the first micro-batch gave \
                     different gradients on {}; the hardware of those ranks computes \
                     unreliably: replace the node, or set train.sdc_action: rollback to retry \
                     from the last checkpoint",
                    bad.join("; ")
                );
                if t.sdc_action == SdcAction::Stop || rollbacks >= MAX_ROLLBACKS {
                    return Err(TrainError::Corruption(message));
                }
                rollbacks += 1;
                progress.println(format!("warning: {message}; rolling back"));
                saver.wait()?;
                let l = store
                    .load_newest(!opts.no_verify, !opts.no_fallback)?
                    .ok_or_else(|| {
                        TrainError::Corruption(format!(
                            "{message}; and no checkpoint under {} to roll back to",
                            store.root()
                        ))
                    })?;
                restore(
                    &l,
                    par,
                    &built,
                    &mut optimizer,
                    &mut controller,
                    &mut pipeline,
                )?;
                optimizer.zero_grad();
                step = l.manifest.step as usize;
                tokens_seen = l.manifest.tokens;
                if lead {
                    metrics.close();
                    metrics = Metrics::resume(run_dir.join("metrics.jsonl"), step as u64)?.0;
                    metrics.write(serde_json::json!({
                        "step": step,
                        "sdc_rollback": {"detected_at": done, "ranks": bad},
                    }))?;
                }
                progress.set_position(step);
                continue;
            }
            rollbacks = 0;
        }
        let dense = |n: &str| !is_expert_param(n);
        optimizer
            .reduce_gradients(comm, comm, par.nccl(0), dense, world as f64)
            .map_err(catapult_kernels::CommError::from)?;
        optimizer
            .reduce_gradients(
                &par.replicas,
                comm,
                par.nccl(2),
                is_expert_param,
                world as f64,
            )
            .map_err(catapult_kernels::CommError::from)?;
        stats.all_reduce(comm);
        let grad_norm = optimizer.clip_grad_norm_sharded(t.grad_clip, is_expert_param, |x| {
            let mut v = [x];
            par.expert.all_reduce_sum(&mut v);
            v[0]
        });
        optimizer.step(lr);
        // Global-batch counts (every rank's micro-batches): the same update on every rank.
        let counts: Vec<Vec<i64>> = Vec::try_from(&stats.counts).expect("counts are i64");
        let bias = controller.update(&counts, stats.tokens);
        set_expert_bias(model, bias);

        let step_tokens = (t.global_batch_size * seq_len) as u64;
        tokens_seen += step_tokens;
        let loss = stats.lm_loss / micro_batches as f64;
        let step_s = step_start.elapsed().as_secs_f64();
        let tokens_per_s = step_tokens as f64 / step_s;
        let per_layer = ffn_experts_per_token(&counts, recipe.model.n_routed_experts, stats.tokens);
        let overall = per_layer.iter().sum::<f64>() / per_layer.len() as f64;
        if done.is_multiple_of(t.log_every) || done == t.steps {
            // Exchange volume summed over ranks, exposed time averaged over ranks.
            let mut volume = [
                exchange[0].bytes + exchange[1].bytes,
                exchange[0].bytes_remote + exchange[1].bytes_remote,
            ];
            comm.all_reduce_sum(&mut volume);
            let mut exposed = [exchange[0].exposed_s, exchange[1].exposed_s];
            comm.all_reduce_sum(&mut exposed);
            let exposed = exposed.map(|e| e / world as f64);
            let mut line = serde_json::json!({
                "step": done,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s,
                "tokens": tokens_seen,
                "seq_len": seq_len,
                "data_phase": batch.phase,
                "data_wait_s": waited,
                "ffn_experts_per_token": overall,
                "load_balance_loss": stats.balance_loss / micro_batches as f64,
                "z_loss": stats.z_loss / micro_batches as f64,
                "mtp_loss": stats.mtp_loss / micro_batches as f64,
                "step_s": step_s,
                "all_to_all_exposed_s": exposed[0] + exposed[1],
                "all_to_all_forward_exposed_s": exposed[0],
                "all_to_all_backward_exposed_s": exposed[1],
                "all_to_all_bytes": volume[0],
                "all_to_all_remote_bytes": volume[1],
                "elapsed_s": started.elapsed().as_secs_f64(),
            });
            // Model FLOPs of the experts actually activated, per rank, against the peak.
            let flops = crate::sizing::flops_per_token(&recipe.model, seq_len, &per_layer);
            let (achieved, mfu) = crate::sizing::mfu(flops, tokens_per_s, world, peak_tflops);
            line["model_flops_per_token"] = flops.into();
            line["achieved_tflops"] = achieved.into();
            if let Some(mfu) = mfu {
                line["mfu"] = mfu.into();
            }
            if let Some((rss, peak)) = memory_bytes() {
                line["memory_rss_bytes"] = rss.into();
                line["memory_peak_rss_bytes"] = peak.into();
            }
            for (group, scale) in &lr_scales {
                line[format!("lr_{group}")] = (lr * scale).into();
            }
            if let Some((replay_s, _)) = sdc {
                line["sdc_check_s"] = replay_s.into();
                line["sdc_check_fraction"] = (replay_s / step_s).into();
            }
            metrics.write(line)?;
        }
        if router_metrics_due {
            let (load_min, load_max, load_cv) = load_spread(&counts, recipe.model.n_routed_experts);
            let similarity = model
                .layers
                .iter()
                .map(|l| router_similarity(&l.moe.router))
                .sum::<f64>()
                / model.layers.len() as f64;
            let grad_rms = grad_norm / (param_count as f64).sqrt();
            metrics.write(serde_json::json!({
                "step": done,
                "router": {
                    "ffn_experts_per_token": overall,
                    "ffn_experts_per_token_per_layer": per_layer,
                    "target_ffn_experts": recipe.model.target_ffn_experts(),
                    "expert_load_min": load_min,
                    "expert_load_max": load_max,
                    "expert_load_cv": load_cv,
                    "expert_load_per_layer": expert_loads(&counts, recipe.model.n_routed_experts),
                    "gradient_ratio_rg": stats.gradient_ratio,
                    "router_cosine_similarity": similarity,
                    "hidden_rms": stats.hidden_rms,
                    "grad_rms": grad_rms,
                    "adam_eps": t.adam_eps,
                    "bias_ki": controller.ki(),
                }
            }))?;
            if stats.gradient_ratio >= 0.1 {
                progress.println(format!(
                    "warning: step {done}: R_g = {:.3} >= 0.1: the load-balance loss dominates the \
                     router's gradient; lower moe.load_balance_coeff",
                    stats.gradient_ratio
                ));
            }
        }
        if done.is_multiple_of(t.eval_every) || done == t.steps {
            let (loss, line) = eval(model, done)?;
            last_val_loss = loss;
            metrics.write(line)?;
        }
        progress.step(
            done,
            &format!(
                "loss {loss:.4} | {tokens_per_s:.0} tok/s | val {last_val_loss:.4} | ffn/tok {overall:.2}"
            ),
        );
        // A stop request on any rank stops every rank after this step, with a checkpoint.
        let mut stop = [i32::from(stop_requested())];
        comm.all_reduce_sum(&mut stop);
        if stop[0] > 0 {
            preempted_at = Some(done);
        }
        if stop_at_tokens.is_some_and(|n| tokens_seen >= n) {
            preempted_at = Some(done);
            reached_tokens = true;
        }
        let every = recipe.checkpoint.every;
        if (every > 0 && done.is_multiple_of(every)) || done == t.steps || preempted_at.is_some() {
            // Every rank's data state and the expert shards of replica 0, gathered on rank
            // 0, which saves (dense weights and optimizer states are identical replicas).
            let data_state = gather_data_state(comm, &pipeline)?;
            let copy_start = Instant::now();
            let request = save_request(
                recipe,
                par,
                &built,
                &optimizer,
                &controller,
                data_state,
                done,
                tokens_seen,
            );
            let copied = copy_start.elapsed().as_secs_f64();
            let Some(request) = request else {
                kill_self_on(&format!("step:{done}"));
                step += 1;
                heartbeat.beat(step);
                if preempted_at.is_some() {
                    break;
                }
                continue;
            };
            let waited = if recipe.checkpoint.async_save {
                saver.submit(
                    store.clone(),
                    request,
                    recipe.checkpoint.keep_last,
                    recipe.checkpoint.keep_every,
                )
            } else {
                store.save(request)?;
                if let Err(e) = store.retain(
                    done as u64,
                    recipe.checkpoint.keep_last,
                    recipe.checkpoint.keep_every,
                ) {
                    eprintln!(
                        "warning: checkpoint retention failed: {e}; old checkpoints were kept"
                    );
                }
                0.0
            };
            metrics.write(serde_json::json!({
                "step": done,
                "checkpoint": catapult_checkpoints::step_dir(done as u64),
                "ckpt_copy_s": copied,
                "ckpt_wait_s": waited,
                "ckpt_block_s": copy_start.elapsed().as_secs_f64(),
            }))?;
        }
        kill_self_on(&format!("step:{done}"));
        step += 1;
        heartbeat.beat(step);
        if preempted_at.is_some() {
            break;
        }
    }
    progress.finish();
    // The final weights are written even when the last sharded save failed; its error
    // is returned after them.
    let last_save = saver.wait();
    if let Some(at) = preempted_at {
        // Stopped on request: the step's checkpoint is written; no final export.
        last_save?;
        return Ok(RunSummary {
            checkpoint: PathBuf::from(format!(
                "{}/{}",
                store.root(),
                catapult_checkpoints::step_dir(at as u64)
            )),
            metrics: metrics.path,
            first_val_loss,
            last_val_loss,
            rank,
            preempted_at,
            reached_tokens,
        });
    }

    let data_state = gather_data_state(comm, &pipeline)?;
    let full = full_tensors(
        par,
        &named_tensors(&built.vars),
        recipe.model.n_routed_experts,
    );
    let checkpoint = run_dir.join("checkpoint");
    let meta = serde_json::json!({
        "step": t.steps,
        "tokens": tokens_seen,
        "data_state": data_state,
        "data_wait_s": data_wait,
        "expert_bias_controller": controller.state(),
        "catapult_version": env!("CARGO_PKG_VERSION"),
        "recipe": serde_json::to_value(recipe).expect("recipes serialize"),
    });
    if let Some(full) = full {
        catapult_checkpoints::save(&checkpoint, &full, &meta)?;
    }
    last_save?;
    Ok(RunSummary {
        checkpoint,
        metrics: metrics.path,
        first_val_loss,
        last_val_loss,
        rank,
        preempted_at: None,
        reached_tokens: false,
    })
}

/// The checkpoint `resume` names, loaded (verified unless told not to).
fn find_checkpoint(
    recipe: &Recipe,
    store: &Checkpoints,
    resume: &Resume,
    opts: &RunOptions,
) -> Result<Option<Loaded>, TrainError> {
    let (verify, fallback) = (!opts.no_verify, !opts.no_fallback);
    let options = recipe.checkpoint.storage.options();
    match resume {
        Resume::Auto => {
            let found = store.load_newest(verify, fallback)?;
            if found.is_none() {
                eprintln!("no checkpoint under {}: starting from step 0", store.root());
            }
            Ok(found)
        }
        Resume::Path(path) => match Checkpoints::open_path(path, &options)? {
            (root, Some(step)) => {
                let newer: Vec<String> = root
                    .steps()?
                    .into_iter()
                    .filter(|&s| s > step)
                    .map(catapult_checkpoints::step_dir)
                    .collect();
                if !newer.is_empty() {
                    return Err(TrainError::Setup(format!(
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
                .map(Some)
                .ok_or_else(|| {
                    TrainError::Setup(format!(
                        "--resume {path}: no checkpoint there (a step-NNNNNNNN directory with a \
                     manifest.json); check the path or use --resume auto"
                    ))
                }),
        },
    }
}

/// Puts a loaded checkpoint's state into the model, optimizer, controller and pipeline.
fn restore(
    loaded: &Loaded,
    par: &Parallel,
    built: &BuiltModel,
    optimizer: &mut AdamW,
    controller: &mut ExpertBiasController,
    pipeline: &mut Pipeline,
) -> Result<(), TrainError> {
    let bad = |problem: String| TrainError::Setup(format!("{}: {problem}", loaded.location));
    // Experts are saved whole (assembled from the ranks' slices); each rank takes its
    // rows, whatever layout wrote them.
    let (part, parts) = (par.expert.rank(), par.expert_size);
    let get = |name: &str| -> Option<catapult_checkpoints::HostTensor> {
        if is_expert_param(name) {
            loaded.slice_for(name, part, parts)
        } else {
            loaded.tensors.get(name).cloned()
        }
    };
    for (name, var) in named_tensors(&built.vars) {
        let saved = get(&name).ok_or_else(|| bad(format!("no tensor {name}")))?;
        copy_into(&var, &saved, &name).map_err(bad)?;
    }
    let state = &loaded.states[0];
    let steps: std::collections::BTreeMap<String, i32> =
        serde_json::from_value(state["optimizer_steps"].clone())
            .map_err(|e| bad(format!("optimizer_steps: {e}")))?;
    optimizer
        .restore(|k| get(k).as_ref().map(from_host), &steps)
        .map_err(bad)?;
    controller.restore(
        serde_json::from_value(state["expert_bias_controller"].clone())
            .map_err(|e| bad(format!("expert_bias_controller: {e}")))?,
    );
    set_expert_bias(&built.model, controller.bias());
    let data: catapult_data::DataState = serde_json::from_value(state["data_state"].clone())
        .map_err(|e| bad(format!("data_state: {e}")))?;
    pipeline.restore(&data)?;
    Ok(())
}

/// The expert tensors (parameters and their optimizer moments) of every expert-parallel
/// rank of replica 0, as host copies, gathered on rank 0 (Some there, None elsewhere).
/// Every rank of the world calls it; only replica 0 moves data.
fn gather_expert_shards(
    par: &Parallel,
    mine: &[(String, Tensor)],
) -> Option<Vec<Vec<catapult_checkpoints::HostTensor>>> {
    let experts: Vec<catapult_checkpoints::HostTensor> = mine
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
            shard.push(catapult_checkpoints::HostTensor {
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
fn full_tensors(
    par: &Parallel,
    mine: &[(String, Tensor)],
    n_experts: usize,
) -> Option<Vec<(String, Tensor)>> {
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
        let whole = Tensor::cat(&pieces, 0);
        debug_assert_eq!(whole.size()[0] as usize, n_experts);
        out.push((name.clone(), whole));
    }
    Some(out)
}

/// What rank 0 saves: host copies of the model and optimizer tensors (the experts as the
/// slices each expert-parallel rank holds), and the state. None on other ranks.
#[allow(clippy::too_many_arguments)]
fn save_request(
    recipe: &Recipe,
    par: &Parallel,
    built: &BuiltModel,
    optimizer: &AdamW,
    controller: &ExpertBiasController,
    data_state: catapult_data::DataState,
    step: usize,
    tokens: u64,
) -> Option<catapult_checkpoints::SaveRequest> {
    let (moments, steps) = optimizer.state();
    let mut named = named_tensors(&built.vars);
    named.extend(moments);
    let shards = gather_expert_shards(par, &named)?;
    let tensors: Vec<_> = named
        .iter()
        .filter(|(n, _)| !is_expert_param(n))
        .map(|(n, t)| to_host(n, t))
        .collect();
    let state = serde_json::json!({
        "data_state": data_state,
        "expert_bias_controller": controller.state(),
        "optimizer_steps": steps,
        "scheduler": {"step": step, "next_lr": learning_rate(&recipe.train, step.min(recipe.train.steps.saturating_sub(1)))},
        "rng": {"torch": "manual_seed(seed ^ (step << 20)) before every step", "data": "counter-based, in data_state"},
    });
    let mut request = crate::checkpoint::request(recipe, step as u64, tokens, tensors, state);
    let n = recipe.model.n_routed_experts;
    let per = n / par.expert_size;
    request.world = catapult_checkpoints::World {
        data_parallel: par.data_size,
        expert_parallel: par.expert_size,
        ranks: (0..par.world.size())
            .map(|r| catapult_checkpoints::RankLayout {
                rank: r,
                data_parallel_rank: r / par.expert_size,
                experts: [(r % par.expert_size) * per, (r % par.expert_size + 1) * per],
            })
            .collect(),
    };
    for (e, shard) in shards.into_iter().enumerate() {
        let slices = shard
            .iter()
            .map(|h| {
                (
                    h.name.clone(),
                    catapult_checkpoints::Slice {
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
            request.ranks.push(catapult_checkpoints::RankState {
                rank: e,
                tensors: shard,
                slices,
                state: serde_json::Value::Null,
            });
        }
    }
    Some(request)
}

/// For the silent-data-corruption check: the first tensor whose gradient differs (in any
/// bit) between two computations, with the largest difference.
fn first_difference(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> Option<String> {
    if a.len() != b.len() {
        return Some(format!(
            "the set of gradients ({} tensors, then {})",
            a.len(),
            b.len()
        ));
    }
    for ((name, x), (_, y)) in a.iter().zip(b) {
        if !x.equal(y) {
            let diff = (x - y).abs().max().double_value(&[]);
            return Some(format!("{name} (max |difference| {diff:e})"));
        }
    }
    None
}

/// Test hook (`CATAPULT_FAULT=sdc:RANK:STEP`): on that rank and step, the replayed
/// gradients come out wrong, once per process, as a flaky unit would make them.
fn sdc_fault(rank: usize, step: usize, optimizer: &AdamW) {
    static FIRED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let want = format!("sdc:{rank}:{step}");
    if std::env::var("CATAPULT_FAULT").is_ok_and(|f| f == want)
        && !FIRED.swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        if let Some((_, p)) = optimizer
            .parameters()
            .iter()
            .find(|(n, _)| is_expert_param(n))
        {
            tch::no_grad(|| {
                let g = p.grad();
                let _ = g.reshape([-1]).get(0).g_add_scalar_(1e-3);
            });
        }
    }
}

/// Every rank's result of its check, as "rank R: TENSOR" for the ranks that differ.
fn corrupted_ranks(comm: &Comm, differs: Option<&str>) -> Vec<String> {
    let mine = differs.unwrap_or("").as_bytes().to_vec();
    let (all, counts) = comm.all_gather_v(&mine);
    let mut out = Vec::new();
    let mut at = 0;
    for (r, c) in counts.into_iter().enumerate() {
        if c > 0 {
            out.push(format!(
                "rank {r}: {}",
                String::from_utf8_lossy(&all[at..at + c])
            ));
        }
        at += c;
    }
    out
}

/// Makes every rank return an error when any rank's `result` is one (so no rank waits
/// forever in a collective for a rank that stopped).
fn agree(comm: &Comm, result: Result<(), TrainError>) -> Result<(), TrainError> {
    let (failed, _) = comm.all_gather_v(&[i32::from(result.is_err())]);
    let failed: Vec<String> = (0..failed.len())
        .filter(|&r| failed[r] != 0)
        .map(|r| r.to_string())
        .collect();
    match result {
        Err(e) => Err(e),
        Ok(()) if !failed.is_empty() => Err(TrainError::Setup(format!(
            "rank {} failed to start; its message above says why",
            failed.join(", ")
        ))),
        Ok(()) => Ok(()),
    }
}

/// The data state of every rank, merged (each rank holds its own streams).
fn gather_data_state(
    comm: &Comm,
    pipeline: &Pipeline,
) -> Result<catapult_data::DataState, TrainError> {
    let mine = serde_json::to_vec(&pipeline.state()).expect("data states serialize");
    let (all, counts) = comm.all_gather_v(&mine);
    let mut states = Vec::new();
    let mut at = 0;
    for c in counts {
        states.push(serde_json::from_slice(&all[at..at + c]).expect("a rank's data state parses"));
        at += c;
    }
    Ok(catapult_data::DataState::merge(&states)?)
}

/// The load-balance loss's view of the recipe.
fn balance_shape(recipe: &Recipe) -> BalanceShape {
    let m = &recipe.model;
    BalanceShape {
        n_ffn: m.n_routed_experts as i64,
        n_zero: m.zero_expert_num as i64,
        top_k: m.moe_topk as i64,
        target_ffn: m.target_ffn_experts() as i64,
        groups: recipe.moe.load_balance_groups as i64,
    }
}

/// What one optimizer step accumulates over its micro-batches.
struct StepStats {
    /// Selections per layer and expert (layers x (N + Z), i64).
    counts: Tensor,
    tokens: i64,
    lm_loss: f64,
    balance_loss: f64,
    z_loss: f64,
    mtp_loss: f64,
    /// The optimizer step (0-based) these micro-batches belong to.
    step: usize,
    gradient_ratio: f64,
    hidden_rms: f64,
}

impl StepStats {
    /// Averages the loss terms over ranks (the counts are global already).
    fn all_reduce(&mut self, comm: &Comm) {
        if comm.size() == 1 {
            return;
        }
        let world = comm.size() as f64;
        let mut losses = [self.lm_loss, self.balance_loss, self.z_loss, self.mtp_loss];
        comm.all_reduce_sum(&mut losses);
        [self.lm_loss, self.balance_loss, self.z_loss, self.mtp_loss] = losses.map(|l| l / world);
    }

    fn new(recipe: &Recipe, device: Device, step: usize) -> Self {
        let shape = [
            recipe.model.num_layers as i64,
            recipe.model.total_experts() as i64,
        ];
        Self {
            counts: Tensor::zeros(shape, (Kind::Int64, device)),
            tokens: 0,
            lm_loss: 0.0,
            balance_loss: 0.0,
            z_loss: 0.0,
            mtp_loss: 0.0,
            step,
            gradient_ratio: 0.0,
            hidden_rms: 0.0,
        }
    }
}

/// One micro-batch's tensors.
struct MicroBatch<'a> {
    inputs: &'a Tensor,
    targets: &'a Tensor,
    mask: Option<&'a Tensor>,
}

/// Forward and backward of one micro-batch through the engine; gradients accumulate in
/// the parameters. The load-balance loss and the statistics use the micro-batch's
/// global expert counts (every rank's), reduced once per micro-batch. With
/// `measure_rg`, also R_g = ||grad_P L_LB|| / ||grad_P L_rest|| (section 6), where the
/// gradient with respect to the batch-averaged probability vector P is the per-token
/// gradient summed over tokens, over all layers, and L_rest is the rest of the loss.
#[allow(clippy::too_many_arguments)]
fn micro_step(
    model: &LongcatModel,
    recipe: &Recipe,
    par: &Parallel,
    shape: BalanceShape,
    batch: &MicroBatch,
    micro_batches: usize,
    measure_rg: bool,
    stats: &mut StepStats,
    exchange: &mut [ExchangeStats; 2],
) -> Result<(), catapult_kernels::CommError> {
    let (inputs, targets, mask) = (batch.inputs, batch.targets, batch.mask);
    let f = crate::engine::forward(model, par, inputs, mask, true, &mut exchange[0])?;
    // This micro-batch's selections and tokens over every rank.
    let local = Tensor::stack(
        &f.routing
            .iter()
            .map(|r| r.selections.shallow_clone())
            .collect::<Vec<_>>(),
        0,
    );
    let mut flat: Vec<i64> =
        Vec::try_from(&local.reshape([-1]).to_device(Device::Cpu)).expect("i64 counts");
    flat.push(inputs.numel() as i64);
    par.world.all_reduce_sum(&mut flat);
    let global_tokens = flat.pop().expect("the token count");
    let global = Tensor::from_slice(&flat)
        .view(local.size().as_slice())
        .to_device(local.device());

    let scale = 1.0 / micro_batches as f64;
    let lm_loss = cross_entropy(&f.logits, targets);
    let alpha = recipe.moe.load_balance_coeff;
    let zero = || Tensor::zeros([], (Kind::Float, inputs.device()));
    let balance: Vec<Option<Tensor>> = f
        .routing
        .iter()
        .enumerate()
        .map(|(l, r)| {
            (alpha > 0.0).then(|| {
                load_balance_loss_global(
                    &r.probs,
                    &global.get(l as i64),
                    global_tokens as f64,
                    shape,
                    alpha,
                )
            })
        })
        .collect();
    let lb_grads: Option<Vec<Tensor>> = (measure_rg && alpha > 0.0).then(|| {
        balance
            .iter()
            .zip(&f.routing)
            .map(|(term, r)| {
                let term = term.as_ref().expect("alpha > 0");
                Tensor::run_backward(&[term], &[&r.probs], true, false)[0].sum_dim_intlist(
                    0,
                    false,
                    Kind::Float,
                )
            })
            .collect()
    });
    let z_loss = if recipe.moe.z_loss_coeff > 0.0 {
        hidden_z_loss(&f.last_hidden, recipe.moe.z_loss_coeff)
    } else {
        zero()
    };
    let mtp_on = model.mtp.is_some() && stats.step >= recipe.train.mtp_start_step;
    let mtp_loss = if mtp_on {
        let main = crate::model::ModelOutput {
            logits: f.logits.shallow_clone(),
            last_hidden: f.last_hidden.shallow_clone(),
            moe: Vec::new(),
        };
        let logits = model
            .forward_mtp_masked(inputs, &main, mask)
            .expect("the model has an MTP layer");
        let seq = targets.size()[1];
        cross_entropy(&logits, &targets.narrow(1, 1, seq - 1))
    } else {
        zero()
    };
    let head = (&lm_loss + &z_loss + &mtp_loss * recipe.train.mtp_loss_weight) * scale;
    stats.lm_loss += lm_loss.double_value(&[]);
    stats.balance_loss += balance
        .iter()
        .flatten()
        .map(|b| b.double_value(&[]))
        .sum::<f64>();
    stats.z_loss += z_loss.double_value(&[]);
    stats.mtp_loss += mtp_loss.double_value(&[]);
    if measure_rg {
        stats.hidden_rms = tch::no_grad(|| {
            f.last_hidden
                .to_kind(Kind::Float)
                .square()
                .mean(Kind::Float)
                .sqrt()
                .double_value(&[])
        });
    }
    let probs: Vec<Tensor> = f.routing.iter().map(|r| r.probs.shallow_clone()).collect();
    let layer_losses = balance.into_iter().map(|b| b.map(|b| b * scale)).collect();
    f.backward(par, &head, layer_losses, &mut exchange[1])?;
    if measure_rg {
        stats.gradient_ratio = match lb_grads {
            Some(lb) => tch::no_grad(|| {
                // The whole gradient, unscaled, minus the load-balance part.
                let rest: Vec<Tensor> = probs
                    .iter()
                    .zip(&lb)
                    .map(|(p, g)| {
                        p.grad().sum_dim_intlist(0, false, Kind::Float) * micro_batches as f64 - g
                    })
                    .collect();
                let lb = Tensor::cat(&lb, 0).norm().double_value(&[]);
                lb / Tensor::cat(&rest, 0).norm().double_value(&[]).max(1e-30)
            }),
            None => 0.0,
        };
    }
    stats.counts += global;
    stats.tokens += global_tokens;
    Ok(())
}

/// Average number of FFN experts per token, per layer.
fn ffn_experts_per_token(counts: &[Vec<i64>], n_ffn: usize, tokens: i64) -> Vec<f64> {
    counts
        .iter()
        .map(|layer| layer[..n_ffn].iter().sum::<i64>() as f64 / tokens as f64)
        .collect()
}

/// The peak TFLOP/s of one device: the recipe's, else the device table's entry for the
/// CUDA device's name; None on CPU.
fn peak_tflops(recipe: &Recipe, device: Device) -> Option<f64> {
    recipe.system.peak_tflops.or(match device {
        Device::Cuda(i) => catapult_kernels::nccl::cuda_device_name(i)
            .and_then(|name| crate::sizing::gpu_by_name(&name))
            .map(|g| g.peak_tflops),
        _ => None,
    })
}

/// This process's resident and peak resident memory (VmRSS, VmHWM), in bytes.
fn memory_bytes() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Writes the controller's biases into the model's expert-bias buffers.
fn set_expert_bias(model: &LongcatModel, bias: &[Vec<f64>]) {
    tch::no_grad(|| {
        for (layer, b) in model.layers.iter().zip(bias) {
            let values: Vec<f32> = b.iter().map(|&x| x as f32).collect();
            let mut buffer = layer.moe.expert_bias.shallow_clone();
            buffer.copy_(&Tensor::from_slice(&values));
        }
    });
}
