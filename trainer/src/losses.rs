//! Training losses: next-token cross-entropy, the device-level load-balance loss
//! (longcat-methods section 5) and the hidden z-loss (section 6).

use tch::{Kind, Tensor};

/// Shape facts the load-balance loss needs.
#[derive(Debug, Clone, Copy)]
pub struct BalanceShape {
    /// N, FFN experts.
    pub n_ffn: i64,
    /// Z, zero experts.
    pub n_zero: i64,
    /// K, experts per token.
    pub top_k: i64,
    /// K_e, target FFN experts per token.
    pub target_ffn: i64,
    /// D, groups of FFN experts.
    pub groups: i64,
}

/// `alpha * sum_{j=1}^{D+1} f_j P_j` for one layer's micro-batch, where `probs` is
/// tokens x (N + Z) router probabilities and `selections` the i64 count of selections
/// per expert. P_j sums the batch-averaged probabilities of group j; f_j = D / (K_e T)
/// times the group's selections for FFN groups and 1 / ((K - K_e) T) times the zero
/// experts' selections for group D + 1 (absent when K = K_e or Z = 0), so f_j = 1 at
/// the target balance.
pub fn load_balance_loss(
    probs: &Tensor,
    selections: &Tensor,
    s: BalanceShape,
    alpha: f64,
) -> Tensor {
    let tokens = probs.size()[0] as f64;
    let kind = probs.kind();
    let mean_p = probs.mean_dim(0, false, kind);
    let group_p = mean_p
        .narrow(0, 0, s.n_ffn)
        .reshape([s.groups, -1])
        .sum_dim_intlist(1, false, kind);
    let group_sel = selections
        .narrow(0, 0, s.n_ffn)
        .reshape([s.groups, -1])
        .sum_dim_intlist(1, false, Kind::Int64);
    let f = group_sel.to_kind(kind) * (s.groups as f64 / (s.target_ffn as f64 * tokens));
    let mut loss = (f * group_p).sum(kind);
    if s.n_zero > 0 && s.top_k > s.target_ffn {
        let zero_p = mean_p.narrow(0, s.n_ffn, s.n_zero).sum(kind);
        let zero_sel = selections
            .narrow(0, s.n_ffn, s.n_zero)
            .sum(Kind::Int64)
            .to_kind(kind);
        let f_zero = zero_sel / ((s.top_k - s.target_ffn) as f64 * tokens);
        loss += f_zero * zero_p;
    }
    loss * alpha
}

/// `lambda / T * sum_t (log sum_i exp|z_{t,i}|)^2` over the tokens of `hidden`
/// (... x hidden), computed in fp32 (or fp64 for fp64 input).
pub fn hidden_z_loss(hidden: &Tensor, lambda: f64) -> Tensor {
    let kind = if hidden.kind() == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    };
    let z = hidden.to_kind(kind);
    let width = z.size()[z.dim() - 1];
    let lse = z.reshape([-1, width]).abs().logsumexp([-1], false);
    lse.square().mean(kind) * lambda
}

/// Mean next-token cross-entropy of `logits` (batch x seq x vocab) against `targets`
/// (batch x seq).
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Tensor {
    let vocab = logits.size()[2];
    logits
        .view([-1, vocab])
        .cross_entropy_for_logits(&targets.reshape([-1]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    const SHAPE: BalanceShape = BalanceShape {
        n_ffn: 4,
        n_zero: 2,
        top_k: 3,
        target_ffn: 2,
        groups: 2,
    };

    fn example() -> (Tensor, Tensor) {
        let probs = Tensor::from_slice(&[
            0.1f64, 0.2, 0.3, 0.1, 0.2, 0.1, //
            0.3, 0.1, 0.1, 0.2, 0.1, 0.2,
        ])
        .reshape([2, 6]);
        let selections = Tensor::from_slice(&[2i64, 1, 0, 1, 1, 1]);
        (probs, selections)
    }

    #[test]
    fn load_balance_loss_equals_hand_computation() {
        let (probs, selections) = example();
        // T = 2. Mean p = [.2 .15 .2 .15 .15 .15]. Groups {0,1}, {2,3}: P = [.35, .35].
        // f_1 = 2/(2*2) * 3 = 1.5, f_2 = 0.5 * 1 = 0.5; zero group: P = .3,
        // f = 2 / ((3 - 2) * 2) = 1. Loss = 1.5*.35 + .5*.35 + 1*.3 = 1.0, times alpha.
        let loss = load_balance_loss(&probs, &selections, SHAPE, 0.01).double_value(&[]);
        assert!((loss - 0.01).abs() < 1e-15, "{loss}");
    }

    #[test]
    fn load_balance_is_one_at_target_balance() {
        // Uniform probabilities and selections exactly at target: sum_j f_j P_j = sum_j P_j = 1.
        let probs = Tensor::full([4, 6], 1.0 / 6.0, (Kind::Double, Device::Cpu));
        // 4 tokens: 8 FFN selections (K_e = 2 each), 4 zero selections.
        let selections = Tensor::from_slice(&[2i64, 2, 2, 2, 2, 2]);
        let loss = load_balance_loss(&probs, &selections, SHAPE, 1.0).double_value(&[]);
        assert!((loss - 1.0).abs() < 1e-12, "{loss}");
    }

    fn finite_difference_check(f: impl Fn(&Tensor) -> Tensor, x: &Tensor) {
        let x = x.detach().set_requires_grad(true);
        f(&x).backward();
        let analytic = x.grad();
        let flat = x.detach().reshape([-1]);
        let h = 1e-6;
        for i in 0..flat.size()[0] {
            let plus = flat.copy();
            let minus = flat.copy();
            let _ = plus.get(i).g_add_scalar_(h);
            let _ = minus.get(i).g_add_scalar_(-h);
            let numeric = (f(&plus.view(x.size().as_slice())).double_value(&[])
                - f(&minus.view(x.size().as_slice())).double_value(&[]))
                / (2.0 * h);
            let a = analytic.reshape([-1]).double_value(&[i]);
            assert!(
                (a - numeric).abs() < 1e-7 * (1.0 + numeric.abs()),
                "element {i}: {a} vs {numeric}"
            );
        }
    }

    #[test]
    fn load_balance_gradient_matches_finite_differences() {
        let (probs, selections) = example();
        finite_difference_check(|p| load_balance_loss(p, &selections, SHAPE, 0.3), &probs);
    }

    #[test]
    fn z_loss_equals_hand_computation_and_its_gradient_matches() {
        let z = Tensor::from_slice(&[1.0f64, -2.0, 0.5, 0.0]).reshape([2, 2]);
        let expected = ((1f64.exp() + 2f64.exp()).ln().powi(2) + (0.5f64.exp() + 1.0).ln().powi(2))
            / 2.0
            * 1e-3;
        let got = hidden_z_loss(&z, 1e-3).double_value(&[]);
        assert!((got - expected).abs() < 1e-9, "{got} vs {expected}");
        let x = Tensor::from_slice(&[0.3f64, -1.2, 2.0, 0.7, -0.4, 1.1]).reshape([3, 2]);
        finite_difference_check(|x| hidden_z_loss(x, 1e-3), &x);
    }
}
