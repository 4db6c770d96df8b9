//! AdamW and the learning-rate schedule.
//!
//! AdamW is written here rather than taken from tch so that its state (moments, step) is
//! ours to checkpoint and its per-parameter learning rates are ours to set (HP transfer).

use crate::recipe::{Schedule, TrainConfig};
use std::collections::BTreeMap;
use std::ops::Range;
use tch::{Kind, Tensor};

/// A checkpoint's optimizer state that does not fit the parameters.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// A moment tensor could not be read.
    #[error("{key}: {problem}")]
    Read {
        /// Its name.
        key: String,
        /// Why not.
        problem: String,
    },
    /// A parameter's update count is missing.
    #[error("the checkpoint has no update count for {name}")]
    NoCount {
        /// The parameter.
        name: String,
    },
}

/// Decoupled-weight-decay Adam over named parameters, updated in a fixed order.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<(String, Tensor)>,
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    decay: Vec<bool>,
    /// Each parameter's learning rate relative to the schedule's (its group's factor).
    lr_scale: Vec<f64>,
    /// Updates applied to each parameter (a parameter joins late when its loss does).
    steps: Vec<i32>,
    /// The flat range of each parameter this rank updates when the optimizer is sharded
    /// (`parallel.shard`): its moments hold that range only. None: the whole parameter.
    owned: Vec<Option<Range<usize>>>,
    /// Where a parameter's update lands when its owned range is kept apart from it (the
    /// fp32 slice of `parallel.shard: parameters`; the parameter tensor then only
    /// points into a gather buffer). None: the parameter itself.
    masters: Vec<Option<Tensor>>,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

impl AdamW {
    /// An optimizer over `params` (sorted by name by the caller). Matrices get weight
    /// decay; vectors (norm weights) do not.
    pub fn new(params: Vec<(String, Tensor)>, t: &TrainConfig) -> Self {
        let whole = vec![None; params.len()];
        Self::with_owned(params, t, whole)
    }

    /// An optimizer that updates only `owned[i]` (a flat range) of each parameter i that
    /// has one, with moments for that range alone (sharded data parallelism); the caller
    /// gathers the updated ranges after each step.
    pub fn with_owned(
        params: Vec<(String, Tensor)>,
        t: &TrainConfig,
        owned: Vec<Option<Range<usize>>>,
    ) -> Self {
        let zeros = |i: usize| -> Tensor {
            let p = &params[i].1;
            match &owned[i] {
                Some(r) => Tensor::zeros([r.len() as i64], (p.kind(), p.device())),
                None => Tensor::zeros_like(p),
            }
        };
        Self {
            exp_avg: (0..params.len()).map(zeros).collect(),
            exp_avg_sq: (0..params.len()).map(zeros).collect(),
            decay: params.iter().map(|(_, p)| p.dim() >= 2).collect(),
            lr_scale: vec![1.0; params.len()],
            steps: vec![0; params.len()],
            masters: (0..params.len()).map(|_| None).collect(),
            owned,
            params,
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.adam_eps,
            weight_decay: t.weight_decay,
        }
    }

    /// Sets where each parameter's update lands (`masters[i]`: the flat owned range of
    /// parameter i, held apart from it); parameters without one are updated in place.
    pub fn set_masters(&mut self, masters: Vec<Option<Tensor>>) {
        assert_eq!(
            masters.len(),
            self.params.len(),
            "one master slot per parameter"
        );
        self.masters = masters;
    }

    /// Bytes this rank holds in parameters (those without a separate master: the
    /// owner of those counts them), gradients and moments (summed tensor storage by
    /// category).
    pub fn held_bytes(&self) -> [u64; 3] {
        let bytes = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
        let grads = self
            .params
            .iter()
            .map(|(_, p)| p.grad())
            .filter(Tensor::defined)
            .map(|g| bytes(&g))
            .sum();
        [
            self.params
                .iter()
                .zip(&self.masters)
                .filter(|(_, m)| m.is_none())
                .map(|((_, p), _)| bytes(p))
                .sum(),
            grads,
            self.exp_avg.iter().chain(&self.exp_avg_sq).map(bytes).sum(),
        ]
    }

    /// Sets each parameter's learning-rate factor (relative to the scheduled rate) from
    /// its name.
    pub fn set_lr_scales(&mut self, scale: impl Fn(&str) -> f64) {
        self.lr_scale = self.params.iter().map(|(n, _)| scale(n)).collect();
    }

    /// The moments as named tensors (`optimizer.exp_avg.NAME`, `optimizer.exp_avg_sq.NAME`),
    /// for checkpoints.
    pub fn moments(&self) -> Vec<(String, Tensor)> {
        let mut tensors = Vec::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            tensors.push((
                format!("optimizer.exp_avg.{name}"),
                self.exp_avg[i].shallow_clone(),
            ));
            tensors.push((
                format!("optimizer.exp_avg_sq.{name}"),
                self.exp_avg_sq[i].shallow_clone(),
            ));
        }
        tensors
    }

    /// Each parameter's update count, by name, for checkpoints.
    pub fn update_counts(&self) -> BTreeMap<String, i32> {
        self.params
            .iter()
            .zip(&self.steps)
            .map(|((name, _), &n)| (name.clone(), n))
            .collect()
    }

    /// The flat range of each parameter whose moments this optimizer keeps (its owned
    /// part), or None where it keeps them whole.
    pub fn owned_ranges(&self) -> &[Option<Range<usize>>] {
        &self.owned
    }

    /// Restores the moments (`get(key, shape, range)` reads moment `key` of a
    /// parameter of `shape`: the flat elements `range` this optimizer keeps of it, or
    /// all of it in its shape for None) and the update counts.
    pub fn restore(
        &mut self,
        get: impl Fn(&str, &[i64], Option<Range<usize>>) -> Result<Tensor, OptimError>,
        steps: &BTreeMap<String, i32>,
    ) -> Result<(), OptimError> {
        self.restore_moments(get, steps)?;
        // A live run keeps a zeroed gradient after each update, so an updated parameter
        // missing from a later step's graph still takes a (decay-only) update; a resumed
        // run must do the same.
        for (i, (_, p)) in self.params.iter().enumerate() {
            if self.steps[i] > 0 && !p.grad().defined() {
                (p.sum(Kind::Float) * 0.0).backward();
            }
        }
        Ok(())
    }

    fn restore_moments(
        &mut self,
        get: impl Fn(&str, &[i64], Option<Range<usize>>) -> Result<Tensor, OptimError>,
        steps: &BTreeMap<String, i32>,
    ) -> Result<(), OptimError> {
        tch::no_grad(|| {
            for (i, (name, p)) in self.params.iter().enumerate() {
                for (kind, dst) in [
                    ("exp_avg", &self.exp_avg[i]),
                    ("exp_avg_sq", &self.exp_avg_sq[i]),
                ] {
                    let key = format!("optimizer.{kind}.{name}");
                    let src = get(&key, &p.size(), self.owned[i].clone())?;
                    dst.shallow_clone()
                        .copy_(&src.view(dst.size().as_slice()).to_device(dst.device()));
                }
                self.steps[i] = *steps
                    .get(name)
                    .ok_or_else(|| OptimError::NoCount { name: name.clone() })?;
            }
            Ok(())
        })
    }

    /// The parameters, by name, in update order.
    pub fn parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// The gradients, by parameter name (undefined ones left out), as copies.
    pub fn gradients(&self) -> Vec<(String, Tensor)> {
        self.params
            .iter()
            .filter(|(_, p)| p.grad().defined())
            .map(|(n, p)| (n.clone(), p.grad().copy()))
            .collect()
    }

    /// Clears every gradient.
    pub fn zero_grad(&mut self) {
        for (_, p) in self.params.iter_mut() {
            p.zero_grad();
        }
    }

    /// One AdamW update with learning rate `lr` (times each parameter's factor) from the
    /// parameters' gradients, then clears them.
    pub fn step(&mut self, base_lr: f64) {
        let params: Vec<Tensor> = self.params.iter().map(|(_, p)| p.shallow_clone()).collect();
        let owned = self.owned.clone();
        self.step_with(base_lr, |i| {
            let g = params[i].grad();
            if !g.defined() {
                return None;
            }
            Some(match &owned[i] {
                Some(r) => g.reshape([-1]).narrow(0, r.start as i64, r.len() as i64),
                None => g,
            })
        });
    }

    /// One AdamW update where `grad(i)` is parameter i's gradient: the owned range of
    /// it (flat) for a sharded parameter, the whole for another, None for one not in
    /// this step's graph (no update, moments untouched). Clears the gradients after.
    pub fn step_with(&mut self, base_lr: f64, grad: impl Fn(usize) -> Option<Tensor>) {
        tch::no_grad(|| {
            for i in 0..self.params.len() {
                let lr = base_lr * self.lr_scale[i];
                let whole = self.params[i].1.shallow_clone();
                let Some(g) = grad(i) else {
                    // Not in this step's graph (the MTP layer before it is switched on).
                    continue;
                };
                self.steps[i] += 1;
                let bias1 = 1.0 - self.beta1.powi(self.steps[i]);
                let bias2 = 1.0 - self.beta2.powi(self.steps[i]);
                // A sharded parameter: the owned range of it, flat (elementwise math, so
                // the bits are those of the whole update).
                let mut p = match (&self.owned[i], &self.masters[i]) {
                    (Some(r), _) if r.is_empty() => {
                        self.params[i].1.zero_grad();
                        continue;
                    }
                    (_, Some(master)) => master.shallow_clone(),
                    (Some(r), None) => whole.view([-1]).narrow(0, r.start as i64, r.len() as i64),
                    (None, None) => whole.shallow_clone(),
                };
                let m = &mut self.exp_avg[i];
                let v = &mut self.exp_avg_sq[i];
                *m = &*m * self.beta1 + &g * (1.0 - self.beta1);
                *v = &*v * self.beta2 + g.square() * (1.0 - self.beta2);
                let denom = (&*v / bias2).sqrt() + self.eps;
                if self.decay[i] && self.weight_decay > 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let update = &*m / denom * (lr / bias1);
                p -= update;
                self.params[i].1.zero_grad();
            }
        });
    }
}

/// Learning rate at `step` (0-based): linear warmup to `lr`, then cosine or WSD to `min_lr`.
pub fn learning_rate(t: &TrainConfig, step: usize) -> f64 {
    if step < t.warmup_steps {
        return t.lr * (step + 1) as f64 / t.warmup_steps as f64;
    }
    let after = (step - t.warmup_steps) as f64;
    let span = (t.steps - t.warmup_steps).max(1) as f64;
    match t.schedule {
        Schedule::Cosine => {
            let progress = (after / span).min(1.0);
            t.min_lr + 0.5 * (t.lr - t.min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
        }
        Schedule::Wsd => {
            let decay_steps = (t.decay_fraction * t.steps as f64).round();
            let decay_start = t.steps as f64 - decay_steps;
            let s = step as f64;
            if s < decay_start || decay_steps == 0.0 {
                t.lr
            } else {
                let progress = ((s - decay_start) / decay_steps).min(1.0);
                t.lr + (t.min_lr - t.lr) * progress
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(schedule: Schedule) -> TrainConfig {
        TrainConfig {
            steps: 100,
            global_batch_size: 1,
            micro_batch_size: 1,
            lr: 1.0,
            min_lr: 0.1,
            warmup_steps: 10,
            schedule,
            decay_fraction: 0.2,
            beta1: 0.9,
            beta2: 0.95,
            adam_eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            eval_every: 1,
            eval_sequences: 1,
            log_every: 1,
            mtp_loss_weight: 0.3,
            mtp_start_step: 0,
            recompute: Default::default(),
            sdc_check_every: 0,
            sdc_action: Default::default(),
            nonfinite: Default::default(),
        }
    }

    #[test]
    fn cosine_schedule_warms_up_then_decays_to_min() {
        let t = config(Schedule::Cosine);
        assert!((learning_rate(&t, 0) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&t, 9) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&t, 55) - 0.55).abs() < 1e-12);
        assert!((learning_rate(&t, 100) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn wsd_schedule_is_flat_then_linear() {
        let t = config(Schedule::Wsd);
        assert_eq!(learning_rate(&t, 50), 1.0);
        assert_eq!(learning_rate(&t, 79), 1.0);
        assert!((learning_rate(&t, 90) - 0.55).abs() < 1e-12);
        assert!((learning_rate(&t, 100) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn adamw_matches_the_closed_form_first_steps() {
        let t = config(Schedule::Cosine);
        let p = Tensor::from_slice(&[1.0f64, -2.0]).set_requires_grad(true);
        let mut opt = AdamW::new(vec![("w".into(), p.shallow_clone())], &t);
        // Vectors get no weight decay; the first Adam step moves by lr * sign(g).
        (&p * Tensor::from_slice(&[3.0f64, -0.5]))
            .sum(Kind::Double)
            .backward();
        opt.step(0.01);
        let expected = Tensor::from_slice(&[1.0 - 0.01, -2.0 + 0.01]);
        assert!(p.allclose(&expected, 1e-7, 1e-9, false), "{p}");
        assert!(!p.grad().defined() || p.grad().abs().sum(Kind::Double).double_value(&[]) == 0.0);
    }
}
