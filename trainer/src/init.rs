//! Building the model a rank trains from its recipe: the seed, the routed experts the
//! rank holds, the precision, and each parameter group's initial scale (width
//! transfer). It owns the rule that initial weights depend on nothing but the seed:
//! element i of tensor NAME is a counter-based draw keyed by (seed, NAME, i) of the
//! whole tensor's flat index, so a rank draws only the elements it holds (its experts'
//! rows, or its slice under `parallel.shard: parameters`) and every layout, shard mode
//! and world size starts from the same values without any rank materializing a tensor
//! it does not own.
//!
//! The draw: SplitMix64 over (key, pair index) gives two 53-bit uniforms; Box-Muller
//! turns them into two independent standard normals (cosine for even elements, sine
//! for odd ones), computed in f64 and scaled by the group's std. Matrices (and the
//! embedding and experts) are normal(0, std); vectors (norm weights) are ones.

use crate::groups::Group;
use crate::model::LongcatModel;
use crate::parallel::is_expert_param;
use crate::recipe::{Precision, Recipe};
use std::collections::BTreeMap;
use std::ops::Range;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// The model and its parameters.
pub struct BuiltModel {
    /// Owner of every tensor (parameters and buffers).
    pub vars: VarStore,
    /// The forward pass.
    pub model: LongcatModel,
    /// Where the initial values come from.
    pub init: InitPlan,
}

impl BuiltModel {
    /// Every variable, sorted by name.
    pub fn named(&self) -> Vec<(String, Tensor)> {
        named_tensors(&self.vars)
    }

    /// The trainable parameters, sorted by name (the optimizer's update order).
    pub fn parameters(&self) -> Vec<(String, Tensor)> {
        self.named()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect()
    }

    /// Writes per-layer expert biases into the model's expert-bias buffers.
    pub fn set_expert_bias(&self, bias: &[Vec<f64>]) {
        tch::no_grad(|| {
            for (layer, b) in self.model.layers.iter().zip(bias) {
                let values: Vec<f32> = b.iter().map(|&x| x as f32).collect();
                let mut buffer = layer.moe.expert_bias.shallow_clone();
                buffer.copy_(&Tensor::from_slice(&values));
            }
        });
    }
}

/// How initial values are drawn: the seed, each parameter group's std, and which
/// experts this rank holds (their rows' place in the whole expert tensor).
#[derive(Debug, Clone)]
pub struct InitPlan {
    seed: u64,
    stds: BTreeMap<Group, f64>,
    /// The first routed expert this rank holds.
    first_expert: usize,
    /// Routed experts it holds.
    local_experts: usize,
}

impl InitPlan {
    /// The plan of `recipe` (its seed and, with width transfer, each group's init std)
    /// for a rank holding routed experts `local`.
    pub fn of(recipe: &Recipe, local: Range<usize>) -> Self {
        Self {
            seed: recipe.seed,
            stds: crate::transfer::init_stds(recipe),
            first_expert: local.start,
            local_experts: local.len(),
        }
    }

    /// Every matrix normal(0, `std`), from `seed`, for a rank holding routed experts
    /// `local` (tests and tools that build a bare model).
    pub fn plain(seed: u64, std: f64, local: Range<usize>) -> Self {
        let stds = Group::ALL.into_iter().map(|g| (g, std)).collect();
        Self {
            seed,
            stds,
            first_expert: local.start,
            local_experts: local.len(),
        }
    }

    /// Where element 0 of this rank's `t` (named `name`) sits in the whole tensor.
    fn offset(&self, name: &str, t: &Tensor) -> u64 {
        match is_expert_param(name) && self.local_experts > 0 {
            true => (self.first_expert * (t.numel() / self.local_experts)) as u64,
            false => 0,
        }
    }

    /// Elements `range` (flat, of the tensor as this rank holds it) of parameter
    /// `name`'s initial value, fp32 on the CPU, drawing nothing else.
    pub fn values(&self, name: &str, t: &Tensor, range: Range<usize>) -> Tensor {
        if t.dim() < 2 {
            return Tensor::ones([range.len() as i64], (Kind::Float, Device::Cpu));
        }
        let std = self.stds[&Group::of(name)];
        let at = self.offset(name, t) + range.start as u64;
        let out = Tensor::empty([range.len() as i64], (Kind::Float, Device::Cpu));
        // SAFETY: `out` is a fresh contiguous f32 CPU tensor of `range.len()` elements,
        // owned here and not aliased while the slice lives.
        let values =
            unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut f32, range.len()) };
        fill_normals(self.seed, name, at, std, values);
        out
    }

    /// Gives parameter `t` (named `name`) its whole initial value, on its device.
    pub fn fill(&self, name: &str, t: &Tensor) {
        let whole = self.values(name, t, 0..t.numel());
        let whole = whole.view(t.size().as_slice()).to_device(t.device());
        tch::no_grad(|| t.shallow_clone().set_data(&whole));
    }

    /// Gives every parameter of `vars` its whole initial value.
    pub fn fill_all(&self, vars: &VarStore) {
        for (name, t) in named_tensors(vars) {
            if t.requires_grad() {
                self.fill(&name, &t);
            }
        }
    }
}

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// FNV-1a of a tensor's name: its part of the key.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
    })
}

/// Normal(0, `std`) values of elements `range` of tensor `name` under `seed`, as f32.
pub fn normals(seed: u64, name: &str, range: Range<u64>, std: f64) -> Vec<f32> {
    let mut out = vec![0f32; (range.end - range.start) as usize];
    fill_normals(seed, name, range.start, std, &mut out);
    out
}

/// Writes normal(0, `std`) values of elements `first ..` of tensor `name` under `seed`
/// into `out` (threads split it; the values do not depend on how). Element i is the
/// cosine (even i) or sine (odd i) of the Box-Muller pair i / 2.
fn fill_normals(seed: u64, name: &str, first: u64, std: f64, out: &mut [f32]) {
    let key = mix(seed.wrapping_mul(GOLDEN) ^ name_hash(name));
    let pair = |k: u64| -> (f64, f64) {
        let a = mix(key.wrapping_add((2 * k + 1).wrapping_mul(GOLDEN)));
        let b = mix(key.wrapping_add((2 * k + 2).wrapping_mul(GOLDEN)));
        let u1 = ((a >> 11) as f64 + 1.0) * (1.0 / (1u64 << 53) as f64);
        let u2 = (b >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        (r * c, r * s)
    };
    let n = out.len();
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let chunk = n.div_ceil(threads.max(1)).max(1 << 16);
    std::thread::scope(|s| {
        for (c, part) in out.chunks_mut(chunk).enumerate() {
            let start = first + (c * chunk) as u64;
            s.spawn(move || {
                for (j, v) in part.iter_mut().enumerate() {
                    let i = start + j as u64;
                    let (z0, z1) = pair(i / 2);
                    *v = (std * if i.is_multiple_of(2) { z0 } else { z1 }) as f32;
                }
            });
        }
    });
}

/// The whole model with every routed expert, its initial values drawn (tests, tools,
/// and a world of one).
pub fn build_model(recipe: &Recipe, device: Device) -> BuiltModel {
    let local = 0..recipe.model.n_routed_experts;
    let built = build_model_with_experts(recipe, device, local);
    built.init.fill_all(&built.vars);
    built
}

/// The model of a rank holding the routed experts `local`, its parameters declared but
/// not drawn (each holds one broadcast element): the caller draws what the rank owns
/// through `built.init` (whole tensors with `fill`, or slices with `values`).
pub fn build_model_with_experts(
    recipe: &Recipe,
    device: Device,
    local: Range<usize>,
) -> BuiltModel {
    let vars = VarStore::new(device);
    let kind = match recipe.system.precision {
        Precision::Fp32 => Kind::Float,
        Precision::Bf16 => Kind::BFloat16,
    };
    let init = InitPlan::of(recipe, local.clone());
    let model = LongcatModel::with_experts(
        &vars.root(),
        &recipe.model,
        recipe.data.max_seq_len(),
        kind,
        device,
        local,
    );
    BuiltModel { vars, model, init }
}

/// Every variable of the store, sorted by name.
pub fn named_tensors(vars: &VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vars.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_depend_on_the_index_alone_and_are_standard_normal() {
        let whole = normals(7, "w", 0..200_000, 1.0);
        // Any range is the same slice of the whole, whatever the split.
        for (a, b) in [(0, 1), (1, 2), (3, 70_001), (131_071, 200_000)] {
            assert_eq!(normals(7, "w", a..b, 1.0), whole[a as usize..b as usize]);
        }
        assert_ne!(normals(7, "v", 0..8, 1.0), whole[..8]);
        assert_ne!(normals(8, "w", 0..8, 1.0), whole[..8]);
        let n = whole.len() as f64;
        let mean = whole.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = whole
            .iter()
            .map(|&x| (x as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        let within = whole.iter().filter(|x| x.abs() < 1.0).count() as f64 / n;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "variance {var}");
        // P(|z| < 1) = 0.6827 for a standard normal.
        assert!((within - 0.6827).abs() < 0.005, "{within}");
        // Neighbours (a Box-Muller pair, and across pairs) are uncorrelated.
        let lag = |d: usize| -> f64 {
            whole
                .iter()
                .zip(&whole[d..])
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>()
                / n
        };
        assert!(
            lag(1).abs() < 0.01 && lag(2).abs() < 0.01,
            "{} {}",
            lag(1),
            lag(2)
        );
    }
}
