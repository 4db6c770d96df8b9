//! The expert-bias controller (longcat-methods section 4): per optimizer step, from the
//! expert selection counts of the whole global batch, update each layer's expert bias b
//! so that the average number of FFN experts per token tracks K_e and the load spreads.
//!
//! It sees only counts (integers summed over every canonical micro-batch, so the same
//! on any number of ranks) and returns biases; it never touches gate weights. Its whole
//! state is `BiasControlState`, carried by checkpoints.
//!
//! ## The `hold` law (the default)
//! Per layer, every FFN expert's bias moves by
//!
//! ```text
//! delta b_i = Ki(t) (e_i - mean_j e_j)  +  u,     u = clamp(lambda g + v, -S, S)
//! g = clamp(c*, -S, S),   v <- clamp(v + mu g, -S, S)                (b kept in [-1, 1])
//! ```
//!
//! The first term is the report's rule without its common mode: it sums to 0 over the
//! FFN experts, so it only spreads the load between them. The common shift u moves the
//! number of FFN experts per token y, and its error signal c* is measured, not
//! guessed. For one token with FFN scores f_(1) >= f_(2) >= ... and zero-expert scores
//! z_(1) >= ... (p + b, the scores the top-K ran on), shifting every FFN score by c
//! puts at least m FFN experts in its top K exactly when c > delta_m = z_(K-m+1) -
//! f_(m) (delta_m grows with m; -inf when fewer than K-m+1 zero experts exist, so m is
//! forced). So over the step's T tokens y(c) = #{(t, m) : delta_{t,m} < c} / T, and the
//! shift that would have given y = K_e on this very batch is the (K_e T)-th smallest
//! delta over the global batch: a quantile. Every rank counts its deltas into one fixed
//! histogram per layer (`SHIFT_BINS` bins a side on [-S, S], finer near 0, plus forced,
//! below and above; integers, summed over every canonical micro-batch, so the same on
//! any number of ranks), and c* is read off it by linear interpolation within its bin.
//! S = `hold_max_shift` / (N + Z) bounds a step.
//!
//! Why it converges: the gap g moves as g_{t+1} = g_t - u_t + d_t, d the router's drift
//! (in score units per update; the router learns, and the LM loss pushes tokens away
//! from the top-K boundary, leaving few tokens near it). Measuring g makes the loop
//! independent of the plant's gain, the density of scores at the boundary, which
//! changes by orders of magnitude as the router learns and which a fixed integral gain
//! cannot match (the `longcat` rule's common mode is Ki / (K N) per unit of relative
//! error: too small, and the drift wins, with a slow recovery and a late offset; too
//! large, and it oscillates). With u = lambda g + v and v += mu g the loop is
//! [g, v]' = [[1 - lambda, -1], [mu, 1]] [g, v] + [d, 0], characteristic polynomial
//! z^2 - (2 - lambda) z + (1 - lambda + mu): stable for 0 <= mu < lambda <= 1 (the
//! recipe check), roots 0.86 and 0.64 at the defaults lambda = 0.5, mu = 0.05. The v
//! integral makes it type 2: a steady drift is followed with no lag (lambda alone would
//! trail it by d / lambda); lambda < 1 averages the batch's sampling noise in c* over
//! about 1 / lambda updates. The clamps to S keep a fast router phase from one large
//! jump, and the clamp on b (beyond [-1, 1], p + b, p a probability, only saturates)
//! keeps the bias from winding up where K_e cannot be reached. The state (b, v) is in
//! every checkpoint, so resuming is exact.

use crate::recipe::{BiasControlConfig, BiasMode, KiSchedule, ModelConfig};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

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
    /// Hold mode, per layer: the last measured shift c* (metrics only).
    #[serde(default)]
    pub hold_shift: Vec<f64>,
    /// Hold mode, per layer: the estimate v of the router's drift per update.
    #[serde(default)]
    pub hold_drift: Vec<f64>,
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
                hold_shift: vec![0.0; model.num_layers],
                hold_drift: vec![0.0; model.num_layers],
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
    /// `tokens` tokens and, in `hold` mode, its histograms of critical shifts (per layer,
    /// `shift_histogram`'s layout). Returns the new biases.
    pub fn update(&mut self, counts: &[Vec<i64>], tokens: i64, shifts: &[Vec<i64>]) -> &[Vec<f64>] {
        match self.config.mode {
            BiasMode::Off => return &self.state.bias,
            BiasMode::Hold => {
                self.hold(counts, tokens, shifts);
                self.state.updates += 1;
                return &self.state.bias;
            }
            _ => {}
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

/// Bins a side of the critical-shift histogram on [-S, S].
pub const SHIFT_BINS: usize = 64;

/// Slots of a layer's critical-shift histogram: forced, below -S, the bins, above S.
pub const SHIFT_SLOTS: usize = 2 * SHIFT_BINS + 3;

/// The bins' edges on [-S, S]: quadratic in the bin index, so finest near 0.
pub fn shift_edges(max_shift: f64) -> Vec<f64> {
    let h = SHIFT_BINS as f64;
    (0..=2 * SHIFT_BINS)
        .map(|k| {
            let x = (k as f64 - h) / h;
            max_shift * x * x.abs()
        })
        .collect()
}

/// The largest common shift per update, in score units, for `config` on `model`.
pub fn max_shift(config: &BiasControlConfig, model: &ModelConfig) -> f64 {
    config.hold_max_shift / model.total_experts() as f64
}

/// One micro-batch's histogram of critical shifts (module docs) from its selection
/// scores `scores` (tokens x (N + Z), p + b): `SHIFT_SLOTS` counts, i64.
pub fn shift_histogram(scores: &Tensor, n_ffn: i64, top_k: i64, edges: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let (tokens, total) = (scores.size()[0], scores.size()[1]);
        let opts = (scores.kind(), scores.device());
        let padded = |part: Tensor, have: i64| {
            let top = part.topk(have.min(top_k), 1, true, true).0;
            match have < top_k {
                true => Tensor::cat(
                    &[
                        top,
                        Tensor::full([tokens, top_k - have], f64::NEG_INFINITY, opts),
                    ],
                    1,
                ),
                false => top,
            }
        };
        let n_zero = total - n_ffn;
        let ffn = padded(scores.narrow(1, 0, n_ffn), n_ffn);
        let zero = match n_zero {
            0 => Tensor::full([tokens, top_k], f64::NEG_INFINITY, opts),
            _ => padded(scores.narrow(1, n_ffn, n_zero), n_zero),
        };
        // delta_m = z_(K-m+1) - f_(m): the zero scores reversed against the FFN ones.
        let delta = (zero.flip([1]) - ffn).reshape([-1]).to_kind(Kind::Double);
        let slot = delta.bucketize(edges, false, false) + 1;
        let slot = slot.where_self(&delta.isneginf().logical_not(), &slot.zeros_like());
        slot.bincount::<Tensor>(None, SHIFT_SLOTS as i64)
    })
}

/// The shift c* at which `q` of the histogram's deltas lie below (linear within its
/// bin); -S or S when outside the range, 0 for an empty histogram.
pub fn quantile_shift(hist: &[i64], edges: &[f64], q: i64) -> f64 {
    let max = edges[edges.len() - 1];
    if hist.iter().sum::<i64>() == 0 {
        return 0.0;
    }
    let mut below = hist[0] + hist[1];
    if below >= q {
        return -max;
    }
    for (b, &h) in hist[2..2 + 2 * SHIFT_BINS].iter().enumerate() {
        if below + h >= q && h > 0 {
            let (lo, hi) = (edges[b], edges[b + 1]);
            return lo + (hi - lo) * (q - below) as f64 / h as f64;
        }
        below += h;
    }
    max
}

impl ExpertBiasController {
    /// One update of the `hold` law (module docs).
    fn hold(&mut self, counts: &[Vec<i64>], tokens: i64, shifts: &[Vec<i64>]) {
        let c = &self.config;
        let (n, ki) = (self.n_ffn, self.ki());
        let max = c.hold_max_shift / (self.n_ffn + self.n_zero) as f64;
        let edges = shift_edges(max);
        let layers = self.state.bias.len();
        self.state.hold_shift.resize(layers, 0.0);
        self.state.hold_drift.resize(layers, 0.0);
        for (layer, layer_counts) in counts.iter().enumerate() {
            let e = self.errors(layer_counts, tokens);
            let q = self.target_ffn as i64 * tokens;
            let measured = shifts
                .get(layer)
                .map_or(0.0, |h| quantile_shift(h, &edges, q));
            let gap = measured.clamp(-max, max);
            let mean = e[..n].iter().sum::<f64>() / n as f64;
            let s = &mut self.state;
            s.hold_shift[layer] = measured;
            let drift = (s.hold_drift[layer] + c.hold_drift_gain * gap).clamp(-max, max);
            s.hold_drift[layer] = drift;
            let shift = (c.hold_gain * gap + drift).clamp(-max, max);
            for (i, &error) in e.iter().enumerate() {
                let delta = match i < n {
                    true => ki * (error - mean) + shift,
                    false if c.adapt_zero_experts => ki * error,
                    false => continue,
                };
                s.bias[layer][i] = (s.bias[layer][i] + delta).clamp(-1.0, 1.0);
            }
            s.prev_error2[layer] = std::mem::replace(&mut s.prev_error[layer], e);
        }
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
    use tch::Device;

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
        c.update(&counts, tokens, &[]);
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
        c.update(&counts, tokens, &[]);
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
            c.update(counts, 10, &[]);
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
        c.update(&[vec![5, 1, 4]], 10, &[]);
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
            c.update(&[vec![1, 1]], 1, &[]);
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
            c.update(&[vec![1, 1]], 1, &[]);
        }
        assert!((c.ki() - 0.06).abs() < 1e-12);
    }

    /// The histogram's count of deltas below c is the number of FFN experts the top-K
    /// picks after shifting every FFN score by c, for shifts across the range; and the
    /// quantile read off it is the shift that gives K_e.
    #[test]
    fn critical_shifts_count_the_ffn_experts_a_shift_would_select() {
        for (n, z, k) in [(8i64, 4i64, 3i64), (6, 2, 4), (4, 6, 2)] {
            tch::manual_seed(n * 10 + z);
            let opts = (Kind::Float, Device::Cpu);
            let scores = Tensor::rand([500, n + z], opts).softmax(-1, Kind::Float);
            let max = 0.05;
            let edges = shift_edges(max);
            let hist: Vec<i64> =
                Vec::try_from(shift_histogram(&scores, n, k, &Tensor::from_slice(&edges))).unwrap();
            assert_eq!(hist.iter().sum::<i64>(), 500 * k);
            let ffn_at = |c: f64| {
                let shift = Tensor::cat(&[Tensor::full([n], c, opts), Tensor::zeros([z], opts)], 0);
                let (_, choice) = (&scores + shift).topk(k, -1, true, true);
                choice.lt(n).sum(Kind::Int64).int64_value(&[])
            };
            for (b, &edge) in edges.iter().enumerate() {
                // Just above an edge: the deltas below it are those of the slots before.
                let below: i64 = hist[..2 + b].iter().sum();
                assert_eq!(ffn_at(edge + 1e-9), below, "N {n} Z {z} K {k}, edge {edge}");
            }
            let q = 500 * ((k - z).max(0) + 1);
            let c = quantile_shift(&hist, &edges, q);
            let got = ffn_at(c);
            assert!(
                (got - q).abs() <= 500 / 20,
                "c* = {c} gives {got}, wanted {q}"
            );
        }
    }

    /// A router whose FFN scores drift up every step (as a learning router's do), fresh
    /// noise each step: `hold`, with no tuning, holds K_e within 2% over the second
    /// half; `longcat` at its default Ki trails the drift.
    #[test]
    fn hold_follows_a_drifting_router_where_longcat_trails_it() {
        let (n, z, k, ke) = (16usize, 8usize, 4usize, 3usize);
        let m = model_config(n, z, k, ke, 1);
        let mae = |mode: BiasMode| {
            let cfg = BiasControlConfig {
                mode,
                ..Default::default()
            };
            let mut c = ExpertBiasController::new(&cfg, &m, 400);
            let edges = Tensor::from_slice(&shift_edges(max_shift(&cfg, &m)));
            tch::manual_seed(3);
            let opts = (Kind::Float, Device::Cpu);
            let tokens = 2048i64;
            let base = Tensor::randn([tokens, (n + z) as i64], opts);
            let ffn = Tensor::cat(
                &[
                    Tensor::ones([n as i64], opts),
                    Tensor::zeros([z as i64], opts),
                ],
                0,
            );
            let mut errors = Vec::new();
            for step in 0..400 {
                let logits = &base
                    + &ffn * (0.004 * step as f64)
                    + Tensor::randn([tokens, (n + z) as i64], opts) * 0.3;
                let b: Vec<f32> = c.bias()[0].iter().map(|&x| x as f32).collect();
                let scores = logits.softmax(-1, Kind::Float) + Tensor::from_slice(&b);
                let (_, choice) = scores.topk(k as i64, -1, true, true);
                let counts: Vec<i64> = Vec::try_from(
                    choice
                        .reshape([-1])
                        .bincount::<Tensor>(None, (n + z) as i64),
                )
                .unwrap();
                let y = counts[..n].iter().sum::<i64>() as f64 / tokens as f64;
                errors.push((y - ke as f64).abs() / ke as f64);
                let hist: Vec<i64> =
                    Vec::try_from(shift_histogram(&scores, n as i64, k as i64, &edges)).unwrap();
                c.update(&[counts], tokens, &[hist]);
            }
            errors[200..].iter().sum::<f64>() / 200.0
        };
        let (hold, longcat) = (mae(BiasMode::Hold), mae(BiasMode::Longcat));
        assert!(
            hold <= 0.02,
            "hold: mean |error| {hold} over the second half"
        );
        assert!(longcat > 2.0 * hold, "longcat {longcat} vs hold {hold}");
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
            c.update(&[counts], tokens, &[]);
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
