//! Router health metrics (longcat-methods sections 4 and 6): expert load spread, router
//! weight similarity. Pure functions of counts and weights; the loop decides when to log.

use tch::{Kind, Tensor};

/// Per-expert load over FFN experts: each layer's selections of expert i divided by that
/// layer's FFN selections (1 / N when balanced), pooled over layers: (min, max,
/// coefficient of variation).
pub fn load_spread(counts: &[Vec<i64>], n_ffn: usize) -> (f64, f64, f64) {
    let loads: Vec<f64> = expert_loads(counts, n_ffn)
        .into_iter()
        .zip(counts)
        .filter(|(_, layer)| layer[..n_ffn].iter().sum::<i64>() > 0)
        .flat_map(|(loads, _)| loads)
        .collect();
    if loads.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let mean = loads.iter().sum::<f64>() / loads.len() as f64;
    let var = loads.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / loads.len() as f64;
    let min = loads.iter().copied().fold(f64::INFINITY, f64::min);
    let max = loads.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max, var.sqrt() / mean)
}

/// Per layer, each FFN expert's share of that layer's FFN selections (all zeros for a
/// layer without any).
pub fn expert_loads(counts: &[Vec<i64>], n_ffn: usize) -> Vec<Vec<f64>> {
    counts
        .iter()
        .map(|layer| {
            let total: i64 = layer[..n_ffn].iter().sum();
            if total > 0 {
                layer[..n_ffn]
                    .iter()
                    .map(|&c| c as f64 / total as f64)
                    .collect()
            } else {
                vec![0.0; n_ffn]
            }
        })
        .collect()
}

/// Mean pairwise cosine similarity of the router's expert vectors (rows of W_r).
pub fn router_similarity(router: &Tensor) -> f64 {
    tch::no_grad(|| {
        let w = router.to_kind(Kind::Double);
        let n = w.size()[0];
        if n < 2 {
            return 0.0;
        }
        let unit = &w / w.norm_scalaropt_dim(2, [1], true).clamp_min(1e-30);
        let gram = unit.matmul(&unit.tr());
        let off_diagonal = gram.sum(Kind::Double) - gram.trace();
        off_diagonal.double_value(&[]) / (n * (n - 1)) as f64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_spread_of_balanced_and_skewed_layers() {
        let (min, max, cv) = load_spread(&[vec![5, 5, 5, 5, 9]], 4);
        assert_eq!((min, max, cv), (0.25, 0.25, 0.0));
        let (min, max, cv) = load_spread(&[vec![3, 1, 0]], 2);
        assert_eq!((min, max), (0.25, 0.75));
        assert!((cv - 0.5).abs() < 1e-12);
    }

    #[test]
    fn router_similarity_of_known_vectors() {
        // Rows e1, e1, e2: pairs (1,1)=1, (1,2)=0, (1,2)=0 -> mean 1/3.
        let w = Tensor::from_slice(&[1.0f32, 0.0, 2.0, 0.0, 0.0, 3.0]).reshape([3, 2]);
        assert!((router_similarity(&w) - 1.0 / 3.0).abs() < 1e-12);
    }
}
