//! Saving during and after the loop: the sharded checkpoint every `checkpoint.every`
//! steps, at the end and on a stop (asynchronous or not, with retention), and the final
//! weights as one `model.safetensors` with `meta.json` under `checkpoint/`.

use super::options::RunSummary;
use super::trainer::Trainer;
use crate::checkpoint::{full_tensors, gather_data_state, save_request, whole_named, TrainerState};
use crate::error::TrainError;
use std::path::PathBuf;
use std::time::Instant;

impl Trainer<'_> {
    /// Saves a sharded checkpoint after step `done` when one is due (every rank calls;
    /// rank 0 writes).
    pub(super) fn checkpoint(&mut self, done: usize) -> Result<(), TrainError> {
        let recipe = self.recipe;
        let every = recipe.checkpoint.every;
        let due = (every > 0 && done.is_multiple_of(every)) || done == recipe.train.steps;
        if !due && self.stopped.is_none() {
            return Ok(());
        }
        // Every rank's data state and the expert shards of replica 0, gathered on rank
        // 0, which saves (dense weights and optimizer states are identical replicas).
        let data_state = gather_data_state(&self.par.world, &self.pipeline)?;
        let copy_start = Instant::now();
        let state =
            TrainerState::capture(recipe, &self.optimizer, &self.controller, data_state, done);
        let request = save_request(
            recipe,
            self.par,
            &self.built,
            (&self.optimizer, &self.shard, self.gather.as_ref()),
            &state,
            self.tokens_seen,
        );
        let copied = copy_start.elapsed().as_secs_f64();
        let Some(request) = request else {
            return Ok(());
        };
        let c = &recipe.checkpoint;
        let waited = if c.async_save {
            self.saver
                .submit(self.store.clone(), request, c.keep_last, c.keep_every)
        } else {
            self.store.save(request)?;
            if let Err(e) = self.store.retain(done as u64, c.keep_last, c.keep_every) {
                eprintln!("warning: checkpoint retention failed: {e}; old checkpoints were kept");
            }
            0.0
        };
        self.metrics.write(serde_json::json!({
            "step": done,
            "checkpoint": catapult_checkpoints::step_dir(done as u64),
            "ckpt_copy_s": copied,
            "ckpt_wait_s": waited,
            "ckpt_block_s": copy_start.elapsed().as_secs_f64(),
        }))
    }

    /// Ends the run: waits for the last save and, when the run reached its last step,
    /// writes the final weights (even when the last sharded save failed; its error is
    /// returned after them).
    pub(super) fn finish(mut self) -> Result<RunSummary, TrainError> {
        self.progress.finish();
        let last_save = self.saver.wait();
        if let Some(stop) = self.stopped {
            // Stopped on request: the step's checkpoint is written; no final export.
            last_save?;
            let dir = catapult_checkpoints::step_dir(stop.at as u64);
            return Ok(self.summary(PathBuf::from(format!("{}/{dir}", self.store.root()))));
        }
        let data_state = gather_data_state(&self.par.world, &self.pipeline)?;
        let sharded = (&self.optimizer, &self.shard, self.gather.as_ref());
        let full = full_tensors(self.par, &whole_named(self.par, &self.built, sharded));
        let checkpoint = self.run_dir.join("checkpoint");
        let meta = serde_json::json!({
            "step": self.recipe.train.steps,
            "tokens": self.tokens_seen,
            "data_state": data_state,
            "data_wait_s": self.data_wait_s,
            "expert_bias_controller": self.controller.state(),
            "catapult_version": env!("CARGO_PKG_VERSION"),
            "recipe": serde_json::to_value(self.recipe).expect("recipes serialize"),
        });
        if let Some(full) = full {
            catapult_checkpoints::save(&checkpoint, &full, &meta)?;
        }
        last_save?;
        Ok(self.summary(checkpoint))
    }

    fn summary(&self, checkpoint: PathBuf) -> RunSummary {
        RunSummary {
            checkpoint,
            metrics: self.metrics.path.clone(),
            first_val_loss: self.first_val_loss,
            last_val_loss: self.last_val_loss,
            rank: self.rank(),
            preempted_at: self.stopped.map(|s| s.at),
            reached_tokens: self.stopped.is_some_and(|s| s.reached_tokens),
        }
    }
}
