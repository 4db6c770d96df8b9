//! Building the model a rank trains from its recipe: the seed, the routed experts the
//! rank holds, the precision, and each parameter group's initial scale (width
//! transfer). It owns the rule that initial weights do not depend on the device or the
//! layout: every value is drawn on the CPU from the seed, whole, and cut.

use crate::model::LongcatModel;
use crate::recipe::{Precision, Recipe};
use tch::{nn::VarStore, Device, Kind, Tensor};

/// The model and its parameters, built deterministically from the recipe's seed.
pub struct BuiltModel {
    /// Owner of every tensor (parameters and buffers).
    pub vars: VarStore,
    /// The forward pass.
    pub model: LongcatModel,
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

/// Builds the model on the CPU from `recipe.seed` (so the initial weights do not depend
/// on the device) and moves it to `device`.
pub fn build_model(recipe: &Recipe, device: Device) -> BuiltModel {
    build_model_with_experts(recipe, device, 0..recipe.model.n_routed_experts)
}

/// `build_model` holding only the routed experts `local` (an expert-parallel rank).
pub fn build_model_with_experts(
    recipe: &Recipe,
    device: Device,
    local: std::ops::Range<usize>,
) -> BuiltModel {
    tch::manual_seed(recipe.seed as i64);
    let mut vars = VarStore::new(Device::Cpu);
    let kind = match recipe.system.precision {
        Precision::Fp32 => Kind::Float,
        Precision::Bf16 => Kind::BFloat16,
    };
    let model = LongcatModel::with_experts(
        &vars.root(),
        &recipe.model,
        recipe.data.max_seq_len(),
        kind,
        device,
        local,
    );
    // Width transfer: each group's init std (a rescaling of the same draws).
    crate::transfer::apply_init(&vars, recipe);
    // set_data in place: the model's handles see the moved tensors.
    vars.set_device(device);
    BuiltModel { vars, model }
}

/// Every variable of the store, sorted by name.
pub fn named_tensors(vars: &VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vars.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}
