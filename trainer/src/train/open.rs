//! Opening a run: checks that the recipe fits the world and the dataset, opens the data
//! pipeline and the checkpoint store, loads the checkpoint a resumed run names, claims
//! the run directory, builds the model, optimizer and controller, and restores them or
//! writes the step-0 validation loss. Every rank opens; rank 0 writes.

use super::agree::agree;
use super::eval::ValidationSets;
use super::options::RunOptions;
use super::trainer::{Stop, Trainer};
use crate::bias_control::ExpertBiasController;
use crate::checkpoint::{check_model, open_resume, quarantine_passed_over};
use crate::error::TrainError;
use crate::groups::Group;
use crate::init::{build_model_with_experts, BuiltModel};
use crate::metrics::{Metrics, Progress};
use crate::optim::AdamW;
use crate::parallel::{GradReducer, Parallel, ParamGather, ShardPlan};
use crate::recipe::Recipe;
use crate::supervision::{install_preemption_handlers, Heartbeat};
use catapult_checkpoints::{Checkpoints, Loaded};
use catapult_data::Pipeline;
use std::path::Path;
use std::time::Instant;
use tch::Device;

/// Refuses a global batch that does not split evenly over the ranks' micro-batches.
fn check_batch(recipe: &Recipe, world: usize) -> Result<(), TrainError> {
    let t = &recipe.train;
    if t.global_batch_size
        .is_multiple_of(world * t.micro_batch_size)
    {
        return Ok(());
    }
    Err(TrainError::Recipe(format!(
        "train.global_batch_size = {} is not a multiple of {world} ranks x train.micro_batch_size = {}",
        t.global_batch_size, t.micro_batch_size
    )))
}

/// The pipeline of this rank and the held-out sequences of every dataset.
fn open_data(
    recipe: &Recipe,
    rank: usize,
    world: usize,
) -> Result<(Pipeline, ValidationSets), TrainError> {
    let pipeline = Pipeline::open(recipe.pipeline_config(), rank, world)?;
    let valid = pipeline.validation(recipe.train.eval_sequences, recipe.data.seq_len)?;
    if let Some((name, _)) = valid.iter().find(|(_, v)| v.is_empty()) {
        return Err(TrainError::Recipe(format!(
            "dataset `{name}`: its held-out documents (data.valid_fraction = {}) do not fill one \
             sequence of data.seq_len = {}; use more text, a larger valid_fraction or a shorter seq_len",
            recipe.data.valid_fraction, recipe.data.seq_len
        )));
    }
    Ok((pipeline, valid))
}

/// Refuses a run directory that holds a run unless overwriting or resuming (read-only:
/// nothing is removed or written before the model is allocated).
fn check_run_dir(dir: &Path, opts: &RunOptions) -> Result<(), TrainError> {
    if dir.join("metrics.jsonl").exists() && !opts.overwrite && opts.resume.is_none() {
        return Err(TrainError::Occupied(format!(
            "{} already holds a run; pass --overwrite to replace it, or set output.dir to a new directory",
            dir.display()
        )));
    }
    Ok(())
}

/// A fresh run refuses a checkpoint root that already holds checkpoints, unless
/// `--overwrite` may clear it (the default root only). Read-only; returns whether the
/// root must be cleared when the run claims its directory.
fn check_checkpoint_root(
    recipe: &Recipe,
    store: &Checkpoints,
    opts: &RunOptions,
) -> Result<bool, TrainError> {
    let Some(newest) = store.steps()?.last().copied() else {
        return Ok(false);
    };
    if opts.overwrite && recipe.checkpoint.dir.is_none() {
        return Ok(true);
    }
    Err(TrainError::Occupied(format!(
        "{} already holds checkpoints (newest {}); pass --resume to continue from them, \
         or set checkpoint.dir to an empty location{}",
        store.root(),
        catapult_checkpoints::step_dir(newest),
        if opts.overwrite {
            " (--overwrite does not delete a checkpoint.dir set in the recipe)"
        } else {
            ""
        }
    )))
}

/// The checkpoint store and the checkpoint to resume from, checked against the recipe,
/// and whether the run directory and checkpoint root are free for this run: every rank
/// agrees, and nothing has been written or removed yet.
fn open_store(recipe: &Recipe, opts: &RunOptions, par: &Parallel) -> Result<Opened, TrainError> {
    let options = recipe.checkpoint.storage.options();
    check_local_root(&recipe.checkpoint_root())?;
    let store = Checkpoints::open(&recipe.checkpoint_root(), &options)?;
    let loaded = match &opts.resume {
        None => None,
        Some(resume) => open_resume(&store, resume, &options, (opts.load_policy(), &par.world))?,
    };
    if let Some(l) = &loaded {
        check_model(recipe, l)?;
    }
    let lead = par.world.rank() == 0;
    let checked = if lead {
        check_run_dir(&recipe.run_dir(), opts).and_then(|()| match opts.resume {
            None => check_checkpoint_root(recipe, &store, opts),
            Some(_) => Ok(false),
        })
    } else {
        Ok(false)
    };
    let clear_root = agree(&par.world, checked)?;
    Ok(Opened {
        store,
        loaded,
        clear_root,
    })
}

/// What `open_store` found.
struct Opened {
    store: Checkpoints,
    loaded: Option<Loaded>,
    /// A fresh `--overwrite` run replaces the default checkpoint root's old contents.
    clear_root: bool,
}

fn unwritable_root(root: &str, problem: String) -> TrainError {
    TrainError::Recipe(format!(
        "checkpoint location {root}: cannot write there ({problem}); set checkpoint.dir to a \
         location this job can write, or fix its permissions or credentials"
    ))
}

/// A local checkpoint root that is a file, or under one, is refused before it is read
/// (read-only: the probe write comes once the model is allocated).
fn check_local_root(root: &str) -> Result<(), TrainError> {
    if root.contains("://") {
        return Ok(());
    }
    match std::fs::metadata(root) {
        Ok(m) if !m.is_dir() => Err(unwritable_root(root, "a file, not a directory".into())),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(unwritable_root(root, e.to_string()))
        }
        _ => Ok(()),
    }
}

/// Writes and removes a probe in the checkpoint root, so an unwritable location is found
/// before step 1, not at the first save (local paths fail at once with the OS error).
fn probe_checkpoint_root(recipe: &Recipe) -> Result<(), TrainError> {
    let root = recipe.checkpoint_root();
    let unwritable = |problem: String| unwritable_root(&root, problem);
    let probe = format!(".catapult-probe-{}", std::process::id());
    if root.contains("://") {
        let options = recipe.checkpoint.storage.options();
        let at = catapult_data::Location::open(&root, &options)
            .map_err(|e| unwritable(e.to_string()))?;
        let key = at.child(&probe);
        at.put(&key, &at.display_child(&probe), b"probe".to_vec())
            .and_then(|()| at.delete(&key, &at.display_child(&probe)))
            .map_err(|e| unwritable(e.to_string()))
    } else {
        let dir = Path::new(&root);
        let file = dir.join(&probe);
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&file, b"probe"))
            .and_then(|()| std::fs::remove_file(&file))
            .map_err(|e| unwritable(e.to_string()))
    }
}

/// Claims the run directory once the model is allocated, just before the first file
/// is written (rank 0; every rank agrees): an overwritten run's old checkpoints go, the
/// resolved recipe is written, and broken checkpoints a resume passed over are
/// quarantined.
fn claim_run_dir(
    recipe: &Recipe,
    par: &Parallel,
    opened: (&Checkpoints, Option<&Loaded>, bool),
) -> Result<(), TrainError> {
    let (store, loaded, clear_root) = opened;
    let claimed = if par.world.rank() == 0 {
        let dir = recipe.run_dir();
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TrainError::Io { path, source }
        };
        (|| {
            if clear_root {
                let root = dir.join("checkpoints");
                std::fs::remove_dir_all(&root).map_err(io(&root))?;
            }
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            std::fs::write(dir.join("recipe.yaml"), recipe.to_yaml()).map_err(io(&dir))?;
            probe_checkpoint_root(recipe)?;
            match loaded {
                Some(l) => quarantine_passed_over(store, l),
                None => Ok(()),
            }
        })()
    } else {
        Ok(())
    };
    agree(&par.world, claimed)
}

/// The model of this rank (its experts `local`), the shard layout, the optimizer and,
/// with `parallel.shard: parameters`, the parameter slices: each rank draws and keeps
/// its slices, never a whole tensor; the optimizer sees fp32 stand-ins for bf16
/// working copies.
fn build_sharded(
    recipe: &Recipe,
    par: &Parallel,
    device: Device,
    local: std::ops::Range<usize>,
) -> (
    BuiltModel,
    AdamW,
    ShardPlan,
    Option<ParamGather>,
    (f64, Option<u64>),
) {
    let started = Instant::now();
    let built = build_model_with_experts(recipe, device, local);
    let params = built.parameters();
    let compute = built.model.compute_kind();
    let shard = ShardPlan::new(par, &params, recipe.parallel.shard, compute);
    let owned = shard.owned_ranges(params.len());
    // Each rank draws what it holds: its slices with `parameters`, else whole tensors
    // (its experts' rows of the whole expert tensors).
    let draw = |i: usize, range| built.init.values(&params[i].0, &params[i].1, range);
    let gather = ParamGather::new(&shard, &params, &draw);
    for (i, (name, p)) in params.iter().enumerate() {
        if !gather.as_ref().is_some_and(|g| g.holds_slices_of(i)) {
            built.init.fill(name, p);
        }
    }
    // The drawing's time and the peak memory so far (the optimizer's moments follow).
    let drawn = (
        started.elapsed().as_secs_f64(),
        crate::device::memory_bytes().map(|(_, peak)| peak),
    );
    let params = match &gather {
        Some(g) => g.optimizer_params(params),
        None => params,
    };
    let mut optimizer = AdamW::with_owned(params, &recipe.train, owned);
    if let Some(g) = &gather {
        let n = optimizer.parameters().len();
        optimizer.set_masters((0..n).map(|i| g.master(&shard, i)).collect());
    }
    (built, optimizer, shard, gather, drawn)
}

impl<'a> Trainer<'a> {
    /// Opens a run of `recipe` on `par`: from step 0, or from the checkpoint `opts`
    /// names.
    pub(super) fn open(
        recipe: &'a Recipe,
        opts: &'a RunOptions,
        par: &'a Parallel,
        device: Device,
        stop_at_tokens: Option<u64>,
    ) -> Result<Self, TrainError> {
        let (rank, world) = (par.world.rank(), par.world.size());
        check_batch(recipe, world)?;
        crate::fit::check(recipe, device, par.world.size())?;
        let (pipeline, valid) = open_data(recipe, rank, world)?;
        let Opened {
            store,
            loaded,
            clear_root,
        } = open_store(recipe, opts, par)?;
        let local = par.local_experts(recipe.model.n_routed_experts);
        let (built, mut optimizer, shard, gather, init) =
            crate::fit::without_panic(&recipe.name, || build_sharded(recipe, par, device, local))?;
        let param_count: i64 = built
            .parameters()
            .iter()
            .map(|(_, p)| p.numel() as i64)
            .sum();
        claim_run_dir(recipe, par, (&store, loaded.as_ref(), clear_root))?;
        let lr_scales = crate::transfer::lr_scales(recipe);
        optimizer.set_lr_scales(|name| lr_scales[&Group::of(name)]);
        let controller =
            ExpertBiasController::new(&recipe.moe.bias_control, &recipe.model, recipe.train.steps);
        par.world.barrier();
        let mut trainer = Trainer {
            recipe,
            opts,
            par,
            device,
            run_dir: recipe.run_dir(),
            built,
            reducer: GradReducer::new(
                &shard,
                par,
                optimizer.parameters(),
                (
                    recipe.train.global_batch_size / world / recipe.train.micro_batch_size,
                    recipe.parallel.reduction,
                ),
            ),
            gather,
            optimizer,
            shard,
            controller,
            pipeline,
            valid,
            store,
            saving: Default::default(),
            metrics: Metrics::disabled(),
            progress: Progress::new(false, &recipe.name, 0, 0, 1),
            heartbeat: Heartbeat::from_env(rank),
            lr_scales,
            peak_tflops: crate::device::peak_tflops(recipe, device),
            param_count,
            step: 0,
            tokens_seen: 0,
            data_wait_s: 0.0,
            rollbacks: 0,
            nonfinite_rollbacks: (0, 0),
            first_val_loss: f64::NAN,
            last_val_loss: f64::NAN,
            stop_at_tokens,
            stopped: None,
            started: Instant::now(),
            init,
        };
        match &loaded {
            Some(l) => trainer.resume_from(l)?,
            None => trainer.start_fresh()?,
        }
        trainer.begin();
        Ok(trainer)
    }

    /// Restores a checkpoint and reopens the metrics at its step.
    fn resume_from(&mut self, l: &Loaded) -> Result<(), TrainError> {
        self.restore(l)?;
        self.step = l.manifest.step as usize;
        self.tokens_seen = l.manifest.tokens;
        catapult_data::log_line!("resuming from {} (step {})", l.location, self.step);
        // What each rank read of the checkpoint's tensor files: its own part only.
        let (read, _) = self.par.world.all_gather_v(&[l.bytes_read()]);
        if self.lead() {
            let (m, kept) = Metrics::resume(self.run_dir.join("metrics.jsonl"), self.step as u64)?;
            self.metrics = m;
            let stored: u64 = (l.manifest.files.iter())
                .filter(|f| f.name.ends_with(".safetensors"))
                .map(|f| f.bytes)
                .sum();
            self.metrics.write(serde_json::json!({
                "step": self.step,
                "resumed_from": l.location,
                "ckpt_read_bytes": read,
                "ckpt_stored_bytes": stored,
            }))?;
            self.first_val_loss = kept
                .iter()
                .find(|v| v["step"] == 0)
                .and_then(|v| v["val_loss"].as_f64())
                .unwrap_or(f64::NAN);
        }
        if self.stop_at_tokens.is_some_and(|n| self.tokens_seen >= n) {
            // Resumed from the checkpoint at which the first stage of a growth schedule
            // ended (the run died before the grown checkpoint was written): grow from it
            // as the uninterrupted run did, without another step.
            self.stopped = Some(Stop {
                at: self.step,
                reached_tokens: true,
            });
        }
        Ok(())
    }

    /// The validation loss before the first step, in a new metrics file.
    fn start_fresh(&mut self) -> Result<(), TrainError> {
        let (loss, mut line) = self.validation(0)?;
        self.first_val_loss = loss;
        // How long building and drawing the model took, and the peak memory then (each
        // rank draws only what it holds).
        line["init_s"] = self.init.0.into();
        if let Some(peak) = self.init.1 {
            line["init_peak_rss_bytes"] = peak.into();
        }
        if self.lead() {
            self.metrics = Metrics::create(self.run_dir.join("metrics.jsonl"))?;
            self.metrics.write(line)?;
        }
        Ok(())
    }

    /// Shows progress and tells a supervisor the run is alive.
    fn begin(&mut self) {
        let t = &self.recipe.train;
        self.last_val_loss = self.first_val_loss;
        self.progress = Progress::new(
            self.lead(),
            &self.recipe.name,
            t.steps,
            self.step,
            t.log_every,
        );
        self.started = Instant::now();
        self.heartbeat.beat(self.step);
        install_preemption_handlers();
    }
}
