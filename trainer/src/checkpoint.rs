//! The trainer's side of checkpoints: tch tensors to and from host bytes, what a rank
//! saves (model, optimizer, controller, data state, schedule position), and restoring it.

use crate::recipe::Recipe;
use catapult_checkpoints::{Dtype, HostTensor, Loaded, RankLayout, RankState, SaveRequest, World};
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

/// Where a resumed run comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The newest valid checkpoint under the recipe's checkpoint root (start fresh if none).
    Auto,
    /// A checkpoint root, or one step directory (`.../step-00000100`).
    Path(String),
}

impl std::str::FromStr for Resume {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(if s == "auto" {
            Resume::Auto
        } else {
            Resume::Path(s.to_string())
        })
    }
}

fn dtype(kind: Kind) -> Dtype {
    match kind {
        Kind::Float => Dtype::F32,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        other => panic!("no checkpoint dtype for {other:?}"),
    }
}

fn kind(dtype: Dtype) -> Kind {
    match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
    }
}

/// A host copy of `t` (the only part of an asynchronous save that blocks training).
pub fn to_host(name: &str, t: &Tensor) -> HostTensor {
    let cpu = t.detach().to_device(Device::Cpu).contiguous();
    let d = dtype(cpu.kind());
    let numel = cpu.numel();
    let mut data = vec![0u8; numel * d.size()];
    cpu.copy_data_u8(&mut data, numel);
    HostTensor {
        name: name.to_string(),
        dtype: d,
        shape: cpu.size().iter().map(|&s| s as usize).collect(),
        data: data.into(),
    }
}

/// A CPU tensor with `h`'s contents.
pub fn from_host(h: &HostTensor) -> Tensor {
    let shape: Vec<i64> = h.shape.iter().map(|&s| s as i64).collect();
    Tensor::from_data_size(&h.data, &shape, kind(h.dtype))
}

/// Copies `h` into `dst` in place (shape and type must match).
pub fn copy_into(dst: &Tensor, h: &HostTensor, what: &str) -> Result<(), String> {
    let want: Vec<usize> = dst.size().iter().map(|&s| s as usize).collect();
    if want != h.shape || dtype(dst.kind()) != h.dtype {
        return Err(format!(
            "{what}: the checkpoint holds {:?} {:?}, the model needs {:?} {:?}",
            h.dtype,
            h.shape,
            dtype(dst.kind()),
            want
        ));
    }
    tch::no_grad(|| {
        let mut d = dst.shallow_clone();
        d.copy_(&from_host(h).to_device(dst.device()));
    });
    Ok(())
}

/// The single-process world: one rank owning every expert.
pub fn single_world(recipe: &Recipe) -> World {
    World {
        data_parallel: 1,
        expert_parallel: 1,
        ranks: vec![RankLayout {
            rank: 0,
            data_parallel_rank: 0,
            experts: [0, recipe.model.n_routed_experts],
        }],
    }
}

/// A save request for a single-rank run.
pub fn request(
    recipe: &Recipe,
    step: u64,
    tokens: u64,
    tensors: Vec<HostTensor>,
    state: serde_json::Value,
) -> SaveRequest {
    SaveRequest {
        step,
        tokens,
        recipe: serde_json::to_value(recipe).expect("recipes serialize"),
        world: single_world(recipe),
        ranks: vec![RankState {
            rank: 0,
            tensors,
            slices: BTreeMap::new(),
            state,
        }],
        growth: None,
    }
}

/// Refuses a checkpoint whose model section differs from the recipe's, naming every
/// differing field.
pub fn check_model(recipe: &Recipe, loaded: &Loaded) -> Result<(), String> {
    let ours = serde_json::to_value(&recipe.model).expect("model config serializes");
    let theirs = &loaded.manifest.recipe["model"];
    let mut diffs = Vec::new();
    if let (Some(a), Some(b)) = (ours.as_object(), theirs.as_object()) {
        for (k, v) in a {
            if b.get(k) != Some(v) {
                diffs.push(format!(
                    "model.{k} is {v} in the recipe but {} in the checkpoint",
                    b.get(k).map_or("absent".to_string(), |x| x.to_string())
                ));
            }
        }
    } else {
        diffs.push("the checkpoint's manifest has no model section".into());
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}: cannot resume: {}; resume with the recipe the checkpoint was written with \
             (its resolved copy is in the manifest), or start a new run",
            loaded.location,
            diffs.join("; ")
        ))
    }
}
