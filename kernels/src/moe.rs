//! MoE token movement: group the (token, choice) slots by expert, run SwiGLU experts on
//! contiguous per-expert segments, and combine the results back per token.
//!
//! Determinism (longcat-methods section 9): slots are ordered by a stable sort, every
//! gather uses an index without repeats (so its backward never adds two values into one
//! place), and the K choices of a token are summed by a plain reduction over a fixed
//! axis. Nothing here uses atomics or `index_add` on repeated indices.

use tch::{Kind, Tensor};

/// Where each (token, choice) slot goes: slots sorted by expert, FFN experts first.
#[derive(Debug)]
pub struct ExpertDispatch {
    /// Slot ids (token * K + choice) of the FFN-expert slots, ordered by expert.
    pub ffn_slots: Tensor,
    /// For every slot, its row in the expert-sorted order (the inverse permutation).
    pub inverse: Tensor,
    /// Rows per FFN expert, in expert order.
    pub counts: Vec<i64>,
    /// Selections per expert over all N + Z experts (FFN then zero), as i64.
    pub selections: Tensor,
    /// Tokens.
    pub tokens: i64,
    /// Choices per token (K).
    pub top_k: i64,
}

impl ExpertDispatch {
    /// Groups the slots of `topk_idx` (tokens x K, expert ids in 0..n_ffn+n_zero) by
    /// expert. Ids >= `n_ffn` are zero-computation experts and get no rows.
    pub fn new(topk_idx: &Tensor, n_ffn: i64, n_total: i64) -> Self {
        let (tokens, top_k) = topk_idx.size2().expect("topk_idx must be tokens x K");
        let flat = topk_idx.reshape([-1]);
        let order = flat.argsort_stable(true, 0, false);
        let inverse = order.argsort(0, false);
        let selections = flat.bincount::<Tensor>(None, n_total);
        let counts: Vec<i64> = Vec::<i64>::try_from(&selections.narrow(0, 0, n_ffn))
            .expect("selection counts are i64");
        let ffn_rows: i64 = counts.iter().sum();
        Self {
            ffn_slots: order.narrow(0, 0, ffn_rows),
            inverse,
            counts,
            selections,
            tokens,
            top_k,
        }
    }

    /// Rows computed by FFN experts.
    pub fn ffn_rows(&self) -> i64 {
        self.counts.iter().sum()
    }

    /// The inputs of the FFN-expert rows, in expert order: row r is the token of slot
    /// `ffn_slots[r]`. `x` is tokens x hidden.
    pub fn gather(&self, x: &Tensor) -> Tensor {
        let (t, h) = x.size2().expect("x must be tokens x hidden");
        // Replicate each token K times (backward: a sum over K) and take rows without
        // repeats (backward: a scatter to distinct rows): deterministic on every device.
        let slots = x
            .unsqueeze(1)
            .expand([t, self.top_k, h], false)
            .reshape([t * self.top_k, h]);
        slots.index_select(0, &self.ffn_slots)
    }

    /// Combines expert outputs back per token:
    /// `out_t = sum_k w_{t,k} * y_{t,k}` over FFN choices `+ (sum of zero-expert w_{t,k}) * x_t`.
    /// `y_ffn` holds the FFN rows in expert order, `weights` is tokens x K, `x` the input.
    pub fn combine(&self, y_ffn: &Tensor, weights: &Tensor, is_ffn: &Tensor, x: &Tensor) -> Tensor {
        let h = x.size()[1];
        let all_slots = self.tokens * self.top_k;
        let pad = Tensor::zeros(
            [all_slots - self.ffn_rows(), h],
            (y_ffn.kind(), y_ffn.device()),
        );
        let by_slot = Tensor::cat(&[y_ffn, &pad], 0).index_select(0, &self.inverse);
        let by_slot = by_slot.reshape([self.tokens, self.top_k, h]);
        let ffn_w = (weights * is_ffn).to_kind(y_ffn.kind());
        let zero_w = (weights * is_ffn.logical_not()).sum_dim_intlist(-1, true, weights.kind());
        let routed = (by_slot * ffn_w.unsqueeze(-1)).sum_dim_intlist(1, false, y_ffn.kind());
        routed + zero_w.to_kind(x.kind()) * x
    }
}

/// SwiGLU experts over expert-sorted rows: rows `[o_e, o_e + counts[e])` go through expert
/// e, `down_e(silu(gate_e x) * up_e x)`. Weights are stacked: gate and up are
/// experts x intermediate x hidden, down is experts x hidden x intermediate.
pub fn grouped_swiglu(
    x_sorted: &Tensor,
    counts: &[i64],
    gate: &Tensor,
    up: &Tensor,
    down: &Tensor,
) -> Tensor {
    let gates = gate.unbind(0);
    let ups = up.unbind(0);
    let downs = down.unbind(0);
    let mut outputs = Vec::with_capacity(counts.len());
    let mut offset = 0;
    for (e, &count) in counts.iter().enumerate() {
        if count == 0 {
            continue;
        }
        let xs = x_sorted.narrow(0, offset, count);
        let hidden = xs.matmul(&gates[e].tr()).silu() * xs.matmul(&ups[e].tr());
        outputs.push(hidden.matmul(&downs[e].tr()));
        offset += count;
    }
    if outputs.is_empty() {
        return Tensor::zeros([0, down.size()[1]], (x_sorted.kind(), x_sorted.device()));
    }
    Tensor::cat(&outputs, 0)
}

/// Mask (tokens x K, same kind as `weights`) of the choices that are FFN experts.
pub fn ffn_choice_mask(topk_idx: &Tensor, n_ffn: i64, kind: Kind) -> Tensor {
    topk_idx.lt(n_ffn).to_kind(kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn reference_moe(
        x: &Tensor,
        idx: &Tensor,
        w: &Tensor,
        gate: &Tensor,
        up: &Tensor,
        down: &Tensor,
        n_ffn: i64,
    ) -> Tensor {
        // Token-by-token loop: the plain definition the grouped path must equal.
        let (t, k) = idx.size2().unwrap();
        let mut rows = Vec::new();
        for i in 0..t {
            let xi = x.get(i);
            let mut acc = Tensor::zeros_like(&xi);
            for j in 0..k {
                let e = idx.int64_value(&[i, j]);
                let wij = w.double_value(&[i, j]);
                let y = if e < n_ffn {
                    let h = gate.get(e).matmul(&xi).silu() * up.get(e).matmul(&xi);
                    down.get(e).matmul(&h)
                } else {
                    xi.shallow_clone()
                };
                acc += y * wij;
            }
            rows.push(acc);
        }
        Tensor::stack(&rows, 0)
    }

    #[test]
    fn grouped_moe_equals_token_loop() {
        tch::manual_seed(3);
        let (t, h, i, n_ffn, n_zero, k) = (13, 8, 5, 4, 2, 3);
        let opts = (Kind::Double, Device::Cpu);
        let x = Tensor::randn([t, h], opts);
        let gate = Tensor::randn([n_ffn, i, h], opts);
        let up = Tensor::randn([n_ffn, i, h], opts);
        let down = Tensor::randn([n_ffn, h, i], opts);
        let scores = Tensor::rand([t, n_ffn + n_zero], opts);
        let (w, idx) = scores.topk(k, -1, true, true);
        let d = ExpertDispatch::new(&idx, n_ffn, n_ffn + n_zero);
        let y = grouped_swiglu(&d.gather(&x), &d.counts, &gate, &up, &down);
        let mask = ffn_choice_mask(&idx, n_ffn, Kind::Double);
        let out = d.combine(&y, &w, &mask, &x);
        let expected = reference_moe(&x, &idx, &w, &gate, &up, &down, n_ffn);
        let diff = (out - expected).abs().max().double_value(&[]);
        assert!(diff < 1e-12, "max difference {diff}");
        assert_eq!(d.selections.sum(Kind::Int64).int64_value(&[]), t * k);
    }

    #[test]
    fn identity_experts_return_input_times_gate_sum() {
        let x = Tensor::arange(12, (Kind::Float, Device::Cpu)).reshape([4, 3]);
        // Every choice is a zero expert (ids 2 and 3 with n_ffn = 2).
        let idx = Tensor::from_slice(&[2i64, 3, 3, 2, 2, 3, 3, 2]).reshape([4, 2]);
        let w = Tensor::from_slice(&[0.5f32, 0.25, 0.1, 0.2, 1.0, 0.0, 0.3, 0.3]).reshape([4, 2]);
        let d = ExpertDispatch::new(&idx, 2, 4);
        assert_eq!(d.ffn_rows(), 0);
        let gate = Tensor::zeros([2, 1, 3], (Kind::Float, Device::Cpu));
        let down = Tensor::zeros([2, 3, 1], (Kind::Float, Device::Cpu));
        let y = grouped_swiglu(&d.gather(&x), &d.counts, &gate, &gate, &down);
        let out = d.combine(&y, &w, &ffn_choice_mask(&idx, 2, Kind::Float), &x);
        let expected = &x * w.sum_dim_intlist(-1, true, Kind::Float);
        assert_eq!(out, expected);
    }
}
