//! Parameter groups: every trainable tensor belongs to exactly one, by name. The groups
//! carry their own learning rates (logged as `lr_<group>`) and, with width transfer
//! (longcat-methods section 7), their own initialization and learning-rate rules.
//!
//! The `Group` enum, its names and `Group::ALL` are recipe vocabulary
//! (`crate::recipe::Group`, re-exported here); this module says which tensor is in which.

pub use crate::recipe::Group;

impl Group {
    /// The group of a parameter name (as the model's VarStore names them).
    pub fn of(name: &str) -> Group {
        if name.contains("norm") {
            Group::Norms
        } else if name.contains("embed_tokens") {
            Group::Embedding
        } else if name.starts_with("lm_head") {
            Group::Head
        } else if name.contains(".router.") {
            Group::Router
        } else if crate::parallel::is_expert_param(name) {
            Group::Experts
        } else if name.contains("self_attn") {
            Group::Attention
        } else {
            Group::DenseFfn
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn::VarStore, Device, Kind};

    #[test]
    fn every_parameter_has_the_group_its_name_says() {
        let c = crate::recipe::ModelConfig {
            mtp_layers: 1,
            ..crate::recipe::tests_support::model_config(4, 2, 3, 2, 2)
        };
        let vs = VarStore::new(Device::Cpu);
        let _m = crate::model::LongcatModel::new(&vs.root(), &c, 8, Kind::Float, Device::Cpu);
        let mut seen = std::collections::BTreeSet::new();
        for (name, t) in vs.variables() {
            if !t.requires_grad() {
                continue;
            }
            let g = Group::of(&name);
            seen.insert(g);
            let expected = if name.ends_with("norm.weight")
                || name.contains("layernorm")
                || name.contains("enorm")
                || name.contains("hnorm")
            {
                Group::Norms
            } else if name == "model.embed_tokens.weight" {
                Group::Embedding
            } else if name == "lm_head.weight" {
                Group::Head
            } else if name.ends_with("mlp.router.classifier.weight") {
                Group::Router
            } else if name.contains("mlp.experts.") {
                Group::Experts
            } else if name.contains("self_attn.") {
                Group::Attention
            } else {
                assert!(
                    name.contains("mlps.")
                        || name.contains("transformer_layer.mlp.")
                        || name.contains("eh_proj"),
                    "{name} is in no known place"
                );
                Group::DenseFfn
            };
            assert_eq!(g, expected, "{name}");
        }
        assert_eq!(
            seen.len(),
            Group::ALL.len(),
            "every group has members: {seen:?}"
        );
    }
}
