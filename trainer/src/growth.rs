//! Model-growth initialization (longcat-methods section 8): a trained model of L layers
//! becomes one of r x L layers by stacking the whole stack r times, [l1..lL, l1..lL, ...]
//! (layer i + kL is a copy of layer i). Embeddings, the final norm, the head, the
//! routers, the expert biases (and their controller state) come along; the step, the
//! tokens seen, the data position and the schedule continue. Optimizer moments are
//! copied the same way (`copy`) or start at zero (`fresh`); the manifest records which.

use crate::checkpoint::{GrowthRecord, TrainerState};
pub use crate::error::GrowthError;
pub use crate::recipe::OptimizerInit;
use crate::recipe::Recipe;
use catapult_checkpoints::{HostTensor, Loaded, SaveRequest};
use std::collections::BTreeMap;

/// The layer index of a tensor name and the text around it
/// (`optimizer.exp_avg.model.layers.3.mlp...` -> ("optimizer.exp_avg.model.layers.", 3,
/// ".mlp...")).
fn layer_of(name: &str) -> Option<(&str, usize, &str)> {
    const KEY: &str = "model.layers.";
    let at = name.find(KEY)? + KEY.len();
    let rest = &name[at..];
    let end = rest.find('.')?;
    let layer = rest[..end].parse().ok()?;
    Some((&name[..at], layer, &rest[end..]))
}

/// Checks that `target` is `source` deepened `factor` times and nothing else in the
/// model; the error names every other difference.
pub fn check_target(source: &Recipe, target: &Recipe, factor: usize) -> Result<(), GrowthError> {
    let mut problems = Vec::new();
    if factor < 2 {
        problems.push(format!("--factor {factor}: grow by 2 or more"));
    }
    let want = source.model.num_layers.saturating_mul(factor);
    if target.model.num_layers != want {
        problems.push(format!(
            "model.num_layers is {} in the target recipe, but {} layers x factor {factor} = {want}",
            target.model.num_layers, source.model.num_layers
        ));
    }
    let a = serde_json::to_value(&source.model).expect("model serializes");
    let b = serde_json::to_value(&target.model).expect("model serializes");
    for (k, v) in a.as_object().expect("an object") {
        if k != "num_layers" && b.get(k) != Some(v) {
            problems.push(format!(
                "model.{k} is {} in the target recipe but {v} in the checkpoint (growth changes depth only)",
                b.get(k).map_or("absent".to_string(), |x| x.to_string())
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(GrowthError::Target(problems.join("; ")))
    }
}

fn zeros_like(t: &HostTensor) -> HostTensor {
    HostTensor {
        name: t.name.clone(),
        dtype: t.dtype,
        shape: t.shape.clone(),
        data: vec![0u8; t.data.len()].into(),
    }
}

fn stack_layers<T: Clone>(v: &[T], factor: usize) -> Vec<T> {
    (0..factor).flat_map(|_| v.iter().cloned()).collect()
}

/// A layer-indexed name `i` copied to the layers `i + k * layers`, k < factor.
fn stacked_names(name: &str, layers: usize, factor: usize) -> Vec<String> {
    match layer_of(name) {
        Some((prefix, i, suffix)) => (0..factor)
            .map(|k| format!("{prefix}{}{suffix}", i + k * layers))
            .collect(),
        None => vec![name.to_string()],
    }
}

/// Refuses a growth whose checkpoint would not fit this host's memory (with 10%
/// headroom) before anything is allocated: the grown tensors, and their encoded copy
/// while they are written.
fn check_fits(loaded: &Loaded, factor: usize) -> Result<(), GrowthError> {
    let (mut per_layer, mut other) = (0f64, 0f64);
    for name in loaded.names() {
        let t = loaded.info(name).expect("a listed tensor has an entry");
        let bytes = (t.numel() * t.dtype.size()) as f64;
        match layer_of(name) {
            Some(_) => per_layer += bytes,
            None => other += bytes,
        }
    }
    let grown = per_layer * factor as f64 + other;
    let needed = 2.0 * grown;
    let Some(available) = crate::fit::host_available_bytes() else {
        return Ok(());
    };
    let human = |b: f64| match b >= (1u64 << 30) as f64 {
        true => format!("{:.1} GiB", b / (1u64 << 30) as f64),
        false => format!("{:.1} MiB", b / (1u64 << 20) as f64),
    };
    if needed > 0.9 * available {
        return Err(GrowthError::Target(format!(
            "--factor {factor}: the grown checkpoint holds {} of tensors ({} of layers x \
             {factor} + {} of the rest) and writing it needs about {}, but this host has {} \
             available (less 10% headroom); grow by a smaller factor or on a host with more \
             memory",
            human(grown),
            human(per_layer),
            human(other),
            human(needed),
            human(0.9 * available)
        )));
    }
    Ok(())
}

/// The tensors of `loaded` stacked `factor` times (moments zeroed with `Fresh`).
fn grow_tensors(
    loaded: &Loaded,
    layers: usize,
    factor: usize,
    optimizer: OptimizerInit,
) -> Result<Vec<HostTensor>, GrowthError> {
    let mut tensors = Vec::new();
    for name in loaded.names() {
        let t = loaded
            .whole(name)
            .map_err(|e| GrowthError::Source(e.to_string()))?;
        let is_moment = name.starts_with("optimizer.");
        let t = if is_moment && optimizer == OptimizerInit::Fresh {
            zeros_like(&t)
        } else {
            t
        };
        for grown in stacked_names(name, layers, factor) {
            let mut copy = t.clone();
            copy.name = grown;
            tensors.push(copy);
        }
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(tensors)
}

/// `state` stacked like the layers: update counts (zero with `Fresh`) and the
/// controller's per-layer bias and errors.
fn grow_state(
    state: &mut TrainerState,
    location: &str,
    layers: usize,
    factor: usize,
    optimizer: OptimizerInit,
) -> Result<(), GrowthError> {
    let mut grown_steps = BTreeMap::new();
    for (name, &n) in &state.optimizer_steps {
        let n = if optimizer == OptimizerInit::Fresh {
            0
        } else {
            n
        };
        for grown in stacked_names(name, layers, factor) {
            grown_steps.insert(grown, n);
        }
    }
    state.optimizer_steps = grown_steps;
    let c = &mut state.expert_bias_controller;
    for (key, per_layer) in [
        ("bias", &mut c.bias),
        ("prev_error", &mut c.prev_error),
        ("prev_error2", &mut c.prev_error2),
    ] {
        if per_layer.len() != layers {
            return Err(GrowthError::Source(format!(
                "{location}: expert_bias_controller.{key} has {} layers, the model {layers}",
                per_layer.len()
            )));
        }
        *per_layer = stack_layers(per_layer, factor);
    }
    Ok(())
}

/// The grown checkpoint of `loaded` for `target` (a world of one holding every expert:
/// any layout resumes it), with the growth recorded in its state and manifest.
pub fn grow(
    loaded: &Loaded,
    target: &Recipe,
    factor: usize,
    optimizer: OptimizerInit,
) -> Result<SaveRequest, GrowthError> {
    let source: Recipe = serde_json::from_value(loaded.manifest.recipe.clone()).map_err(|e| {
        GrowthError::Source(format!(
            "{}: the manifest's recipe does not parse: {e}",
            loaded.location
        ))
    })?;
    check_target(&source, target, factor)?;
    let layers = source.model.num_layers;
    check_fits(loaded, factor)?;
    let tensors = grow_tensors(loaded, layers, factor, optimizer)?;
    let mut state = TrainerState::of(loaded).map_err(|e| GrowthError::Source(e.to_string()))?;
    grow_state(&mut state, &loaded.location, layers, factor, optimizer)?;
    state.growth = Some(GrowthRecord {
        from: loaded.location.clone(),
        from_layers: layers,
        factor,
        layers: layers * factor,
        optimizer,
        step: loaded.manifest.step,
        tokens: loaded.manifest.tokens,
    });
    Ok(crate::checkpoint::request(
        target,
        loaded.manifest.step,
        loaded.manifest.tokens,
        tensors,
        &state,
    ))
}

/// The first stage of a recipe's growth schedule: the same recipe at `from_layers`
/// layers, without the schedule, in `<run>/stage1`.
pub fn stage1_recipe(r: &Recipe) -> Option<Recipe> {
    let g = r.growth.as_ref()?;
    let mut s = r.clone();
    s.growth = None;
    s.name = format!("{}-stage1", r.name);
    s.model.num_layers = g.from_layers;
    s.output.dir = Some(r.run_dir().join("stage1"));
    s.checkpoint.dir = None;
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names_split_around_the_index() {
        assert_eq!(
            layer_of("optimizer.exp_avg.model.layers.12.mlp.router.classifier.weight"),
            Some((
                "optimizer.exp_avg.model.layers.",
                12,
                ".mlp.router.classifier.weight"
            ))
        );
        assert_eq!(layer_of("model.embed_tokens.weight"), None);
        assert_eq!(layer_of("model.mtp.layers.0.eh_proj.weight"), None);
    }
}
