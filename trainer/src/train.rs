//! The training loop, visibly: get batch, forward, backward, clip, step, log.
//!
//! It composes the pieces that own their state (model parameters, `AdamW`, the data
//! order) and writes the run directory: `metrics.jsonl`, `recipe.yaml` and the final
//! checkpoint under `checkpoint/`.

use crate::bias_control::ExpertBiasController;
use crate::checkpoint::{copy_into, from_host, to_host, Resume};
use crate::losses::{hidden_z_loss, load_balance_loss, BalanceShape};
use crate::model::LongcatModel;
use crate::optim::{learning_rate, AdamW};
use crate::recipe::{DeviceKind, Precision, Recipe};
use crate::router_metrics::{load_spread, router_similarity};
use catapult_checkpoints::{kill_self_on, AsyncSaver, Checkpoints, Loaded};
use catapult_data::{Batch, Pipeline};
use catapult_kernels::comm::Comm;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
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

fn device_for(recipe: &Recipe) -> Result<Device, TrainError> {
    match recipe.system.device {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
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
    tch::manual_seed(recipe.seed as i64);
    let mut vars = VarStore::new(Device::Cpu);
    let kind = match recipe.system.precision {
        Precision::Fp32 => Kind::Float,
        Precision::Bf16 => Kind::BFloat16,
    };
    let model = LongcatModel::new(
        &vars.root(),
        &recipe.model,
        recipe.data.max_seq_len(),
        kind,
        device,
    );
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

fn mean_loss(model: &LongcatModel, sequences: &[Vec<u32>], micro: usize, device: Device) -> f64 {
    tch::no_grad(|| {
        let mut total = 0.0;
        for chunk in sequences.chunks(micro) {
            let (inputs, targets) = batch_tensors(chunk, device);
            let loss = cross_entropy(&model.forward(&inputs).logits, &targets).double_value(&[]);
            total += loss * chunk.len() as f64;
        }
        total / sequences.len() as f64
    })
}

struct Metrics {
    file: Option<std::fs::File>,
    path: PathBuf,
}

impl Metrics {
    /// Reopens a run's metrics for a resumed run: lines of steps after `step` (written
    /// before a crash, after the checkpoint) are dropped, later lines are appended.
    fn resume(path: PathBuf, step: u64) -> Result<(Self, Vec<serde_json::Value>), TrainError> {
        let io = |source| TrainError::Io {
            path: path.clone(),
            source,
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(e)),
        };
        let kept: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["step"].as_u64().is_some_and(|s| s <= step))
            .collect();
        let mut body = String::new();
        for v in &kept {
            body.push_str(&v.to_string());
            body.push('\n');
        }
        let tmp = path.with_extension("jsonl.tmp");
        std::fs::write(&tmp, body).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io)?;
        Ok((
            Self {
                file: Some(file),
                path,
            },
            kept,
        ))
    }

    fn create(path: PathBuf) -> Result<Self, TrainError> {
        let file = std::fs::File::create(&path).map_err(|source| TrainError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            file: Some(file),
            path,
        })
    }

    /// Metrics of a rank other than 0: nothing is written.
    fn disabled() -> Self {
        Self {
            file: None,
            path: PathBuf::new(),
        }
    }

    fn write(&mut self, value: serde_json::Value) -> Result<(), TrainError> {
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        writeln!(file, "{value}").map_err(|source| TrainError::Io {
            path: self.path.clone(),
            source,
        })
    }
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
    // Data parallelism over the MPI world (or a world of one); every rank holds the whole
    // model and reads its own slice of each global batch.
    let comm = Comm::from_env();
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
    agree(&comm, prepared)?;
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

    let built = build_model(recipe, device);
    let model = &built.model;
    let params: Vec<(String, Tensor)> = named_tensors(&built.vars)
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    let param_count: i64 = params.iter().map(|(_, p)| p.numel() as i64).sum();
    let mut optimizer = AdamW::new(params, &recipe.train);
    let mut controller =
        ExpertBiasController::new(&recipe.moe.bias_control, &recipe.model, recipe.train.steps);

    comm.barrier();
    let micro_batches = t.global_batch_size / world / t.micro_batch_size;
    let shape = balance_shape(recipe);
    // Validation loss: the mean over datasets of each one's held-out loss.
    let eval = |model: &LongcatModel, step: usize| {
        let losses: Vec<(String, f64)> = valid
            .iter()
            .map(|(name, seqs)| {
                (
                    name.clone(),
                    mean_loss(model, seqs, t.micro_batch_size, device),
                )
            })
            .collect();
        let mean = losses.iter().map(|(_, l)| l).sum::<f64>() / losses.len() as f64;
        let mut line = serde_json::json!({"step": step, "val_loss": mean});
        if losses.len() > 1 {
            line["val_loss_by_dataset"] = losses
                .into_iter()
                .map(|(n, l)| (n, serde_json::Value::from(l)))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        (mean, line)
    };

    let mut start = 0usize;
    let mut tokens_seen = 0u64;
    let (mut metrics, first_val_loss) = match &loaded {
        Some(l) => {
            restore(l, &built, &mut optimizer, &mut controller, &mut pipeline)?;
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
            if lead {
                let mut m = Metrics::create(run_dir.join("metrics.jsonl"))?;
                let (first, line) = eval(model, 0);
                m.write(line)?;
                (m, first)
            } else {
                (Metrics::disabled(), f64::NAN)
            }
        }
    };
    let mut last_val_loss = first_val_loss;
    let mut saver = AsyncSaver::default();

    let progress = if lead {
        ProgressBar::new(t.steps as u64)
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template(
            "{prefix} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("static template"),
    );
    progress.set_prefix(recipe.name.clone());
    progress.set_position(start as u64);
    let mut data_wait = 0.0f64;
    let started = Instant::now();
    for step in start..t.steps {
        // The torch RNG is a function of (seed, step), so a resumed run draws the same
        // numbers as an uninterrupted one.
        tch::manual_seed(recipe.seed as i64 ^ ((step as i64) << 20));
        let step_start = Instant::now();
        let done = step + 1;
        let lr = learning_rate(t, step);
        let router_metrics_due = done % recipe.moe.metrics_every == 0 || done == t.steps;
        let mut stats = StepStats::new(recipe, device, step);
        let wait_start = Instant::now();
        let batch: Batch = pipeline.next_batch()?;
        let waited = wait_start.elapsed().as_secs_f64();
        data_wait += waited;
        let seq_len = batch.seq_len;
        let segments = recipe.data.mask_documents.then(|| batch.segment_ids());
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
            let measure_rg = router_metrics_due && micro == 0;
            micro_step(
                model,
                recipe,
                shape,
                &inputs,
                &targets,
                mask.as_ref(),
                micro_batches,
                measure_rg,
                &mut stats,
            );
        }
        if world > 1 {
            optimizer.all_reduce_gradients(&comm);
            stats.all_reduce(&comm);
        }
        let grad_norm = optimizer.clip_grad_norm(t.grad_clip);
        optimizer.step(lr);
        // Global-batch counts: summed over micro-batches here, and over ranks by one
        // reduction of this tensor once there are several.
        let counts: Vec<Vec<i64>> = Vec::try_from(&stats.counts).expect("counts are i64");
        let bias = controller.update(&counts, stats.tokens);
        set_expert_bias(model, bias);

        let step_tokens = (t.global_batch_size * seq_len) as u64;
        tokens_seen += step_tokens;
        let loss = stats.lm_loss / micro_batches as f64;
        let tokens_per_s = step_tokens as f64 / step_start.elapsed().as_secs_f64();
        let per_layer = ffn_experts_per_token(&counts, recipe.model.n_routed_experts, stats.tokens);
        let overall = per_layer.iter().sum::<f64>() / per_layer.len() as f64;
        if done % t.log_every == 0 || done == t.steps {
            metrics.write(serde_json::json!({
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
                "elapsed_s": started.elapsed().as_secs_f64(),
            }))?;
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
        if lead && (done % t.eval_every == 0 || done == t.steps) {
            let (loss, line) = eval(model, done);
            last_val_loss = loss;
            metrics.write(line)?;
        }
        progress.set_message(format!(
            "loss {loss:.4} | {tokens_per_s:.0} tok/s | val {last_val_loss:.4} | ffn/tok {overall:.2}"
        ));
        let every = recipe.checkpoint.every;
        if (every > 0 && done % every == 0) || done == t.steps {
            // Every rank's data state, merged on rank 0, which saves (the ranks' weights
            // and optimizer states are identical replicas).
            let data_state = gather_data_state(&comm, &pipeline)?;
            if !lead {
                kill_self_on(&format!("step:{done}"));
                progress.inc(1);
                continue;
            }
            let copy_start = Instant::now();
            let request = save_request(
                recipe,
                &built,
                &optimizer,
                &controller,
                data_state,
                done,
                tokens_seen,
            );
            let copied = copy_start.elapsed().as_secs_f64();
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
        progress.inc(1);
    }
    progress.finish();
    // The final weights are written even when the last sharded save failed; its error
    // is returned after them.
    let last_save = saver.wait();

    let data_state = gather_data_state(&comm, &pipeline)?;
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
    if lead {
        catapult_checkpoints::save(&checkpoint, &named_tensors(&built.vars), &meta)?;
    }
    last_save?;
    Ok(RunSummary {
        checkpoint,
        metrics: metrics.path,
        first_val_loss,
        last_val_loss,
        rank,
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
    built: &BuiltModel,
    optimizer: &mut AdamW,
    controller: &mut ExpertBiasController,
    pipeline: &mut Pipeline,
) -> Result<(), TrainError> {
    let bad = |problem: String| TrainError::Setup(format!("{}: {problem}", loaded.location));
    for (name, var) in named_tensors(&built.vars) {
        let saved = loaded
            .tensors
            .get(&name)
            .ok_or_else(|| bad(format!("no tensor {name}")))?;
        copy_into(&var, saved, &name).map_err(bad)?;
    }
    let state = &loaded.states[0];
    let steps: std::collections::BTreeMap<String, i32> =
        serde_json::from_value(state["optimizer_steps"].clone())
            .map_err(|e| bad(format!("optimizer_steps: {e}")))?;
    optimizer
        .restore(|k| loaded.tensors.get(k).map(from_host), &steps)
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

/// What rank 0 saves: host copies of the model and optimizer tensors, and the state.
fn save_request(
    recipe: &Recipe,
    built: &BuiltModel,
    optimizer: &AdamW,
    controller: &ExpertBiasController,
    data_state: catapult_data::DataState,
    step: usize,
    tokens: u64,
) -> catapult_checkpoints::SaveRequest {
    let mut tensors: Vec<_> = named_tensors(&built.vars)
        .iter()
        .map(|(n, t)| to_host(n, t))
        .collect();
    let (moments, steps) = optimizer.state();
    tensors.extend(moments.iter().map(|(n, t)| to_host(n, t)));
    let state = serde_json::json!({
        "data_state": data_state,
        "expert_bias_controller": controller.state(),
        "optimizer_steps": steps,
        "scheduler": {"step": step, "next_lr": learning_rate(&recipe.train, step.min(recipe.train.steps.saturating_sub(1)))},
        "rng": {"torch": "manual_seed(seed ^ (step << 20)) before every step", "data": "counter-based, in data_state"},
    });
    crate::checkpoint::request(recipe, step as u64, tokens, tensors, state)
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
    /// Sums the counts and the loss terms over ranks; losses become means over ranks.
    fn all_reduce(&mut self, comm: &Comm) {
        let world = comm.size() as f64;
        let shape = self.counts.size();
        let mut counts: Vec<i64> = Vec::try_from(&self.counts.reshape([-1])).expect("i64 counts");
        comm.all_reduce_sum(&mut counts);
        self.counts = Tensor::from_slice(&counts)
            .view(shape.as_slice())
            .to_device(self.counts.device());
        let mut tokens = [self.tokens];
        comm.all_reduce_sum(&mut tokens);
        self.tokens = tokens[0];
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

/// Forward and backward of one micro-batch; gradients accumulate in the parameters.
/// With `measure_rg`, also R_g = ||grad_P L_LB|| / ||grad_P L_LM|| (section 6), where the
/// gradient with respect to the batch-averaged probability vector P is the per-token
/// gradient summed over tokens, over all layers.
#[allow(clippy::too_many_arguments)]
fn micro_step(
    model: &LongcatModel,
    recipe: &Recipe,
    shape: BalanceShape,
    inputs: &Tensor,
    targets: &Tensor,
    mask: Option<&Tensor>,
    micro_batches: usize,
    measure_rg: bool,
    stats: &mut StepStats,
) {
    let out = model.forward_masked(inputs, mask);
    let lm_loss = cross_entropy(&out.logits, targets);
    let alpha = recipe.moe.load_balance_coeff;
    let zero = || Tensor::zeros([], (Kind::Float, inputs.device()));
    let balance = if alpha > 0.0 {
        let terms: Vec<Tensor> = out
            .moe
            .iter()
            .map(|m| load_balance_loss(&m.probs, &m.selections, shape, alpha))
            .collect();
        Tensor::stack(&terms, 0).sum(Kind::Float)
    } else {
        zero()
    };
    let z_loss = if recipe.moe.z_loss_coeff > 0.0 {
        hidden_z_loss(&out.last_hidden, recipe.moe.z_loss_coeff)
    } else {
        zero()
    };
    if measure_rg {
        let probs: Vec<&Tensor> = out.moe.iter().map(|m| &m.probs).collect();
        let grad_norm = |loss: &Tensor| {
            let grads = Tensor::run_backward(&[loss], &probs, true, false);
            let summed: Vec<Tensor> = grads
                .iter()
                .map(|g| g.sum_dim_intlist(0, false, Kind::Float))
                .collect();
            Tensor::cat(&summed, 0).norm().double_value(&[])
        };
        let lm = grad_norm(&lm_loss);
        stats.gradient_ratio = if alpha > 0.0 {
            grad_norm(&balance) / lm.max(1e-30)
        } else {
            0.0
        };
        stats.hidden_rms = tch::no_grad(|| {
            out.last_hidden
                .to_kind(Kind::Float)
                .square()
                .mean(Kind::Float)
                .sqrt()
                .double_value(&[])
        });
    }
    let mtp_on = model.mtp.is_some() && stats.step >= recipe.train.mtp_start_step;
    let mtp_logits = if mtp_on {
        model.forward_mtp_masked(inputs, &out, mask)
    } else {
        None
    };
    let mtp_loss = match mtp_logits {
        Some(logits) => {
            let seq = targets.size()[1];
            cross_entropy(&logits, &targets.narrow(1, 1, seq - 1))
        }
        None => zero(),
    };
    let total = &lm_loss + &balance + &z_loss + &mtp_loss * recipe.train.mtp_loss_weight;
    (total / micro_batches as f64).backward();
    stats.lm_loss += lm_loss.double_value(&[]);
    stats.balance_loss += balance.double_value(&[]);
    stats.z_loss += z_loss.double_value(&[]);
    stats.mtp_loss += mtp_loss.double_value(&[]);
    let layer_counts: Vec<Tensor> = out
        .moe
        .iter()
        .map(|m| m.selections.shallow_clone())
        .collect();
    stats.counts += Tensor::stack(&layer_counts, 0);
    stats.tokens += inputs.numel() as i64;
}

/// Average number of FFN experts per token, per layer.
fn ffn_experts_per_token(counts: &[Vec<i64>], n_ffn: usize, tokens: i64) -> Vec<f64> {
    counts
        .iter()
        .map(|layer| layer[..n_ffn].iter().sum::<i64>() as f64 / tokens as f64)
        .collect()
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
