//! `--set dotted.path=value` overrides: parsing the argument and writing its value into
//! a recipe's YAML tree before the tree is deserialized.
//!
//! It must not know the schema (any key can be set; whether it exists is found out when
//! the tree is deserialized), nor how errors are attributed to an override (`mod.rs`).
//! Nothing outside `recipe` is used here.

use super::error::RecipeError;
use serde_yaml_ng::Value;

/// A `--set dotted.path=value` override.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// The argument as the user wrote it.
    pub arg: String,
    /// Path components.
    pub path: Vec<String>,
    /// The value, parsed as a YAML scalar (so `4` is a number, `cuda` a string).
    pub value: Value,
}

impl Override {
    /// Parses `a.b.c=value`.
    pub fn parse(arg: &str) -> Result<Self, RecipeError> {
        let bad = |reason: &str| RecipeError::BadOverride {
            arg: arg.into(),
            reason: reason.into(),
        };
        let (key, raw) = arg
            .split_once('=')
            .ok_or_else(|| bad("expected KEY=VALUE, e.g. model.num_layers=4"))?;
        let path: Vec<String> = key.trim().split('.').map(str::to_string).collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(bad(
                "the key has an empty component; write it like train.steps=100",
            ));
        }
        let value: Value = serde_yaml_ng::from_str(raw)
            .map_err(|e| bad(&format!("the value is not valid YAML ({e})")))?;
        Ok(Self {
            arg: arg.into(),
            path,
            value,
        })
    }

    /// Sets the value in a recipe's YAML tree, creating missing sections on the way.
    pub(super) fn apply(&self, root: &mut Value) -> Result<(), RecipeError> {
        let mut node = root;
        for (i, part) in self.path.iter().enumerate() {
            let Value::Mapping(map) = node else {
                return Err(RecipeError::BadOverride {
                    arg: self.arg.clone(),
                    reason: format!("`{}` is not a section", self.path[..i].join(".")),
                });
            };
            let key = Value::String(part.clone());
            if i + 1 == self.path.len() {
                map.insert(key, self.value.clone());
                return Ok(());
            }
            node = map
                .entry(key)
                .or_insert_with(|| Value::Mapping(Default::default()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::recipe::fixtures::*;
    use crate::recipe::{DeviceKind, Override};

    #[test]
    fn override_sets_any_key() {
        let r = with("model.num_layers=3").unwrap();
        assert_eq!(r.model.num_layers, 3);
        let r = with("system.device=cuda").unwrap();
        assert_eq!(r.system.device, DeviceKind::Cuda);
    }

    #[test]
    fn override_of_unknown_key_names_the_argument() {
        let m = message(with("model.layers=4"));
        assert!(m.contains("--set model.layers=4"), "{m}");
        assert!(m.contains("`model.layers`"), "{m}");
        assert!(m.contains("did you mean `model.num_layers`?"), "{m}");
    }

    #[test]
    fn override_with_wrong_type_names_path() {
        let m = message(with("train.steps=many"));
        assert!(m.contains("`train.steps`"), "{m}");
        assert!(m.contains("--set train.steps=many"), "{m}");
    }

    #[test]
    fn malformed_override_is_rejected() {
        let e = Override::parse("train.steps").unwrap_err().to_string();
        assert!(e.contains("KEY=VALUE"), "{e}");
    }
}
