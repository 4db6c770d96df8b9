//! The expert-bias controller (longcat-methods section 4): per optimizer step, from the
//! expert selection counts of the whole global batch, update each layer's expert bias b
//! so that the average number of FFN experts per token tracks K_e and the load spreads.
//!
//! It sees only counts (summed over micro-batches, and over ranks once there are several:
//! one reduction of a layers x experts integer tensor) and returns biases; it never
//! touches gate weights. Its whole state is `BiasControlState`, carried by checkpoints.

use crate::recipe::{BiasControlConfig, BiasMode, KiSchedule, ModelConfig};
use serde::{Deserialize, Serialize};

/// Everything the controller needs to continue exactly where it stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BiasControlState {
    /// Per layer, the bias of every expert (N FFN then Z zero).
    pub bias: Vec<Vec<f64>>,
    /// Per layer, the error e_{t-1}.
    pub prev_error: Vec<Vec<f64>>,
    /// Per layer, the error e_{t-2}.
    pub prev_error2: Vec<Vec<f64>>,
    /// Updates applied so far (the position on the Ki schedule).
    pub updates: u64,
}

/// Discrete PID in velocity form on the expert bias, per layer and expert.
#[derive(Debug, Clone)]
pub struct ExpertBiasController {
    config: BiasControlConfig,
    n_ffn: usize,
    n_zero: usize,
    top_k: usize,
    target_ffn: usize,
    total_steps: usize,
    state: BiasControlState,
}

impl ExpertBiasController {
    /// A controller for `model`'s layers with zero biases; `total_steps` sets the cosine
    /// Ki schedule's length.
    pub fn new(config: &BiasControlConfig, model: &ModelConfig, total_steps: usize) -> Self {
        let experts = model.total_experts();
        let zeros = vec![vec![0.0; experts]; model.num_layers];
        Self {
            config: config.clone(),
            n_ffn: model.n_routed_experts,
            n_zero: model.zero_expert_num,
            top_k: model.moe_topk,
            target_ffn: model.target_ffn_experts(),
            total_steps,
            state: BiasControlState {
                bias: zeros.clone(),
                prev_error: zeros.clone(),
                prev_error2: zeros,
                updates: 0,
            },
        }
    }

    /// The state to checkpoint.
    pub fn state(&self) -> &BiasControlState {
        &self.state
    }

    /// Restores a checkpointed state.
    pub fn restore(&mut self, state: BiasControlState) {
        self.state = state;
    }

    /// The current biases, per layer.
    pub fn bias(&self) -> &[Vec<f64>] {
        &self.state.bias
    }

    /// Ki at the current update: mu(t) on its decay schedule.
    pub fn ki(&self) -> f64 {
        let c = &self.config;
        let t = self.state.updates as f64;
        match c.ki_schedule {
            KiSchedule::Constant => c.ki,
            KiSchedule::Step => {
                let interval = c.ki_decay_interval.max(1) as f64;
                (c.ki * c.ki_decay_ratio.powf((t / interval).floor())).max(c.ki_min)
            }
            KiSchedule::Cosine => {
                let progress = (t / self.total_steps.max(1) as f64).min(1.0);
                c.ki_min + 0.5 * (c.ki - c.ki_min) * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }

    /// e_i = target_i - assigned_i for one layer, with assigned_i = T_i / (K T_all) and
    /// target_i = (K_e / K) / N for FFN experts, (1 - K_e / K) / Z for zero experts. Zero
    /// experts' errors are 0 unless `adapt_zero_experts`.
    pub fn errors(&self, counts: &[i64], tokens: i64) -> Vec<f64> {
        let k = self.top_k as f64;
        let ke = self.target_ffn as f64;
        let slots = k * tokens as f64;
        counts
            .iter()
            .enumerate()
            .map(|(i, &count)| {
                let assigned = count as f64 / slots;
                if i < self.n_ffn {
                    (ke / k) / self.n_ffn as f64 - assigned
                } else if self.config.adapt_zero_experts {
                    (1.0 - ke / k) / self.n_zero as f64 - assigned
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// One update from the global batch's selection counts (per layer, per expert) over
    /// `tokens` tokens. Returns the new biases.
    pub fn update(&mut self, counts: &[Vec<i64>], tokens: i64) -> &[Vec<f64>] {
        if self.config.mode == BiasMode::Off {
            return &self.state.bias;
        }
        let (kp, kd) = match self.config.mode {
            BiasMode::Pid => (self.config.kp, self.config.kd),
            _ => (0.0, 0.0),
        };
        let ki = self.ki();
        for (layer, layer_counts) in counts.iter().enumerate() {
            let e = self.errors(layer_counts, tokens);
            let s = &mut self.state;
            for (i, &error) in e.iter().enumerate() {
                let frozen = i >= self.n_ffn && !self.config.adapt_zero_experts;
                if frozen {
                    continue;
                }
                let (e1, e2) = (s.prev_error[layer][i], s.prev_error2[layer][i]);
                let delta = match self.config.mode {
                    BiasMode::Sign => self.config.sign_rate * sign(error),
                    _ => kp * (error - e1) + ki * error + kd * (error - 2.0 * e1 + e2),
                };
                s.bias[layer][i] += delta;
            }
            s.prev_error2[layer] = std::mem::replace(&mut s.prev_error[layer], e);
        }
        self.state.updates += 1;
        &self.state.bias
    }
}

fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::tests_support::model_config;
    use tch::{Device, Kind, Tensor};

    fn config(mode: BiasMode) -> BiasControlConfig {
        BiasControlConfig {
            mode,
            ki: 0.01,
            ..BiasControlConfig::default()
        }
    }

    #[test]
    fn longcat_mode_is_mu_times_error_on_ffn_experts() {
        // N = 4 FFN, Z = 2 zero, K = 3, K_e = 2, one layer.
        let m = model_config(4, 2, 3, 2, 1);
        let mut c = ExpertBiasController::new(&config(BiasMode::Longcat), &m, 100);
        let counts = vec![vec![10, 4, 0, 6, 5, 5]];
        let tokens = 10;
        c.update(&counts, tokens);
        // target FFN = (2/3)/4 = 1/6; assigned_i = T_i / 30.
        let expected: Vec<f64> = [10.0, 4.0, 0.0, 6.0]
            .iter()
            .map(|t| 0.01 * (1.0 / 6.0 - t / 30.0))
            .collect();
        for (i, want) in expected.iter().enumerate() {
            assert!((c.bias()[0][i] - want).abs() < 1e-15, "expert {i}");
        }
        assert_eq!(
            &c.bias()[0][4..],
            &[0.0, 0.0],
            "zero-expert biases stay frozen at 0"
        );
        // Integral behaviour: a second identical step doubles the bias.
        c.update(&counts, tokens);
        assert!((c.bias()[0][0] - 2.0 * expected[0]).abs() < 1e-15);
    }

    #[test]
    fn pid_mode_is_the_velocity_form() {
        let m = model_config(2, 0, 1, 1, 1);
        let cfg = BiasControlConfig {
            mode: BiasMode::Pid,
            kp: 0.5,
            ki: 0.1,
            kd: 0.25,
            ..Default::default()
        };
        let mut c = ExpertBiasController::new(&cfg, &m, 100);
        let steps = [vec![vec![8, 2]], vec![vec![6, 4]], vec![vec![3, 7]]];
        let mut b = 0.0;
        let (mut e1, mut e2) = (0.0, 0.0);
        for counts in &steps {
            c.update(counts, 10);
            let e = 0.5 - counts[0][0] as f64 / 10.0;
            b += 0.5 * (e - e1) + 0.1 * e + 0.25 * (e - 2.0 * e1 + e2);
            e2 = e1;
            e1 = e;
            assert!((c.bias()[0][0] - b).abs() < 1e-15);
        }
    }

    #[test]
    fn sign_mode_matches_deepseek_rule() {
        let m = model_config(3, 0, 1, 1, 1);
        let cfg = BiasControlConfig {
            mode: BiasMode::Sign,
            sign_rate: 0.001,
            ..Default::default()
        };
        let mut c = ExpertBiasController::new(&cfg, &m, 100);
        c.update(&[vec![5, 1, 4]], 10);
        // target 1/3 each: expert 0 overloaded, 1 underloaded, 2 over (0.4 > 1/3).
        assert_eq!(c.bias()[0], vec![-0.001, 0.001, -0.001]);
    }

    #[test]
    fn ki_schedules_decay_as_configured() {
        let m = model_config(2, 0, 1, 1, 1);
        let step = BiasControlConfig {
            mode: BiasMode::Longcat,
            ki: 0.1,
            ki_schedule: KiSchedule::Step,
            ki_decay_interval: 10,
            ki_decay_ratio: 0.5,
            ki_min: 0.02,
            ..Default::default()
        };
        let mut c = ExpertBiasController::new(&step, &m, 100);
        let mut seen = Vec::new();
        for _ in 0..40 {
            seen.push(c.ki());
            c.update(&[vec![1, 1]], 1);
        }
        assert_eq!(
            (seen[0], seen[9], seen[10], seen[20], seen[30]),
            (0.1, 0.1, 0.05, 0.025, 0.02)
        );
        let cosine = BiasControlConfig {
            ki_schedule: KiSchedule::Cosine,
            ..step
        };
        let mut c = ExpertBiasController::new(&cosine, &m, 10);
        assert_eq!(c.ki(), 0.1);
        for _ in 0..5 {
            c.update(&[vec![1, 1]], 1);
        }
        assert!((c.ki() - 0.06).abs() < 1e-12);
    }

    /// Fixed router logits plus fresh noise each step; the controller alone must bring the
    /// average FFN experts per token to K_e and keep it there.
    #[test]
    fn simulated_routing_converges_to_target_ffn_experts() {
        let (n, z, k, ke) = (16usize, 8usize, 6usize, 4usize);
        let m = model_config(n, z, k, ke, 1);
        let cfg = BiasControlConfig {
            mode: BiasMode::Longcat,
            ki: 0.05,
            ..Default::default()
        };
        let mut c = ExpertBiasController::new(&cfg, &m, 600);
        tch::manual_seed(0);
        let tokens = 2048i64;
        let opts = (Kind::Float, Device::Cpu);
        // FFN experts start strongly preferred: ~K FFN experts per token before control.
        let skew = Tensor::cat(
            &[
                Tensor::full([n as i64], 1.0, opts),
                Tensor::full([z as i64], -1.0, opts),
            ],
            0,
        );
        let base = Tensor::randn([tokens, (n + z) as i64], opts) + skew;
        let mut history = Vec::new();
        for _ in 0..600 {
            let logits = &base + Tensor::randn([tokens, (n + z) as i64], opts) * 0.3;
            let p = logits.softmax(-1, Kind::Float);
            let b: Vec<f32> = c.bias()[0].iter().map(|&x| x as f32).collect();
            let (_, choice) = (&p + Tensor::from_slice(&b)).topk(k as i64, -1, true, true);
            let counts: Vec<i64> = Vec::try_from(
                choice
                    .reshape([-1])
                    .bincount::<Tensor>(None, (n + z) as i64),
            )
            .unwrap();
            history.push(counts[..n].iter().sum::<i64>() as f64 / tokens as f64);
            c.update(&[counts], tokens);
        }
        assert!(
            history[0] > 5.0,
            "the simulation must start far from K_e: {}",
            history[0]
        );
        for (step, &avg) in history.iter().enumerate().skip(400) {
            assert!(
                (avg - ke as f64).abs() / ke as f64 <= 0.02,
                "step {step}: {avg} FFN experts per token"
            );
        }
    }
}
