//! Saving during and after the loop: the sharded checkpoint every `checkpoint.every`
//! steps, at the end and on a stop (asynchronous or not, with retention), and the final
//! weights as one `model.safetensors` with `meta.json` under `checkpoint/`. Every rank
//! writes its own pieces of a checkpoint (in the background with `checkpoint.async`);
//! once every rank's files are written (polled after each step, one small collective
//! while a save is in flight), they report the files' sizes and hashes to rank 0,
//! which writes the manifest: rank 0 never receives tensor data.

use super::options::RunSummary;
use super::trainer::Trainer;
use crate::checkpoint::{
    full_tensors, gather_data_state, manifest_head, rank_state, whole_named, TrainerState,
};
use crate::error::TrainError;
use catapult_checkpoints::{FileEntry, ManifestHead};
use std::path::PathBuf;
use std::time::Instant;

/// The largest model whose final weights are gathered into one `checkpoint/` file on
/// rank 0 (fp32 bytes); larger ones end as their last sharded checkpoint.
const FINAL_WEIGHTS_LIMIT: u64 = 16 << 30;

/// What a rank reports when its files are written: their entries, or why not.
#[derive(serde::Serialize, serde::Deserialize)]
enum Report {
    Written(Vec<FileEntry>),
    Failed(String),
}

impl Trainer<'_> {
    /// Saves a sharded checkpoint after step `done` when one is due, and completes the
    /// one in flight once every rank has written it (every rank calls).
    pub(super) fn checkpoint(&mut self, done: usize) -> Result<(), TrainError> {
        let recipe = self.recipe;
        let every = recipe.checkpoint.every;
        let due = (every > 0 && done.is_multiple_of(every)) || done == recipe.train.steps;
        if !due && self.stopped.is_none() {
            return self.settle(false, done);
        }
        // The previous checkpoint is completed before this one starts.
        let wait_start = Instant::now();
        self.settle(true, done)?;
        let waited = wait_start.elapsed().as_secs_f64();
        let copy_start = Instant::now();
        let state = TrainerState::capture(
            recipe,
            &self.optimizer,
            &self.controller,
            self.pipeline.state(),
            done,
        );
        let sharded = (&self.optimizer, &self.shard, self.gather.as_ref());
        let mine = rank_state(self.par, &self.built, sharded, &state);
        // Never a checkpoint of non-finite weights (every rank agrees before any writes).
        let finite = match super::guard::check_pieces(&mine) {
            Some(name) => Err(TrainError::NonFinite(format!(
                "refusing to write checkpoint {}: rank {}'s {name} is not finite; the last \
                 checkpoint stays the newest",
                catapult_checkpoints::step_dir(done as u64),
                self.rank()
            ))),
            None => Ok(()),
        };
        super::agree::agree(&self.par.world, finite)?;
        let bytes: usize = mine.tensors.iter().map(|t| t.data.len()).sum();
        let copied = copy_start.elapsed().as_secs_f64();
        let head = manifest_head(recipe, self.par, &state, self.tokens_seen);
        self.saving.pending = Some(head.clone());
        self.saving.saver.submit(self.store.clone(), head, mine);
        if !recipe.checkpoint.async_save {
            self.settle(true, done)?;
        }
        self.metrics.write(serde_json::json!({
            "step": done,
            "checkpoint": catapult_checkpoints::step_dir(done as u64),
            "ckpt_copy_s": copied,
            "ckpt_wait_s": waited,
            "ckpt_block_s": wait_start.elapsed().as_secs_f64(),
            "ckpt_rank_bytes": bytes,
        }))
    }

    /// Completes the checkpoint in flight once every rank's files are written (`block`:
    /// waits for them; else returns at once unless every rank is done): every rank
    /// reports its files to rank 0, which writes the manifest and applies retention.
    /// A failed save is reported and training goes on (the next save retries; the run
    /// ends with the error); with `checkpoint.async: false` it stops every rank.
    pub(super) fn settle(&mut self, block: bool, done: usize) -> Result<(), TrainError> {
        if self.saving.pending.is_none() {
            return Ok(());
        }
        if !block {
            let (idle, _) = (self.par.world).all_gather_v(&[u8::from(self.saving.saver.is_idle())]);
            if idle.contains(&0) {
                return Ok(());
            }
        }
        let report = match self.saving.saver.wait() {
            Some(Ok(files)) => Report::Written(files),
            Some(Err(e)) => Report::Failed(e.to_string()),
            None => Report::Written(Vec::new()),
        };
        let head = self.saving.pending.take().expect("a save is pending");
        let bytes = serde_json::to_vec(&report).expect("reports serialize");
        let committed = match self.par.world.gather_v(&bytes, 0) {
            Some((all, counts)) => self.commit(head, &all, &counts, done),
            None => Ok(()),
        };
        let agreed = super::agree::agree(&self.par.world, committed);
        match agreed {
            Err(e) if self.recipe.checkpoint.async_save => {
                if self.rank() == 0 {
                    catapult_data::log_line!(
                        "error: a checkpoint save failed: {e}; training continues and the next \
                         save retries"
                    );
                }
                self.saving.failed = Some(e.to_string());
                Ok(())
            }
            other => other,
        }
    }

    /// Rank 0: writes the manifest of `head` from every rank's report (`all`, `counts`
    /// bytes each), then applies retention, and logs what each rank wrote and what
    /// rank 0 received.
    fn commit(
        &mut self,
        head: ManifestHead,
        all: &[u8],
        counts: &[usize],
        done: usize,
    ) -> Result<(), TrainError> {
        let mut files = Vec::new();
        let mut rank_bytes = Vec::with_capacity(counts.len());
        let mut at = 0;
        for (rank, &n) in counts.iter().enumerate() {
            let report: Report = serde_json::from_slice(&all[at..at + n])
                .unwrap_or_else(|e| Report::Failed(format!("an unreadable report ({e})")));
            at += n;
            let entries = match report {
                Report::Written(entries) => entries,
                Report::Failed(e) => {
                    return Err(TrainError::Checkpoint(format!(
                        "checkpoint {}: rank {rank} could not write its files: {e}",
                        catapult_checkpoints::step_dir(head.step)
                    )))
                }
            };
            rank_bytes.push(entries.iter().map(|f| f.bytes).sum::<u64>());
            files.extend(entries);
        }
        let step = head.step;
        let manifest = self.store.commit(head, files)?;
        let c = &self.recipe.checkpoint;
        if let Err(e) = self.store.retain(step, c.keep_last, c.keep_every) {
            catapult_data::log_line!(
                "warning: checkpoint retention failed: {e}; old checkpoints were kept"
            );
        }
        self.metrics.write(serde_json::json!({
            "step": done,
            "checkpoint_complete": catapult_checkpoints::step_dir(manifest.step),
            "ckpt_files_bytes": rank_bytes,
            "ckpt_received_bytes": all.len(),
        }))
    }

    /// Ends the run: waits for the last save and, when the run reached its last step,
    /// writes the final weights (even when the last sharded save failed; its error is
    /// returned after them).
    pub(super) fn finish(mut self) -> Result<RunSummary, TrainError> {
        self.progress.finish();
        let done = self.step;
        self.settle(true, done)?;
        let last_save = match self.saving.failed.take() {
            Some(e) => Err(TrainError::Checkpoint(e)),
            None => Ok(()),
        };
        if let Some(stop) = self.stopped {
            // Stopped on request: the step's checkpoint is written; no final export.
            last_save?;
            let dir = catapult_checkpoints::step_dir(stop.at as u64);
            return Ok(self.summary(PathBuf::from(format!("{}/{dir}", self.store.root()))));
        }
        let step_dir = catapult_checkpoints::step_dir(self.recipe.train.steps as u64);
        let model_bytes = 4 * self.param_count.max(0) as u64;
        if model_bytes > FINAL_WEIGHTS_LIMIT {
            // Gathering the whole model on rank 0 would not fit there: the last sharded
            // checkpoint is the result, exported without gathering anything.
            last_save?;
            let at = format!("{}/{step_dir}", self.store.root());
            if self.lead() {
                catapult_data::log_line!(
                    "the final weights ({:.0} GiB) are not gathered into one file on rank 0; \
                     they are the sharded checkpoint {at}: `catapult export {at} --hf OUT` \
                     writes the Hugging Face files",
                    model_bytes as f64 / (1u64 << 30) as f64
                );
            }
            return Ok(self.summary(PathBuf::from(at)));
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
