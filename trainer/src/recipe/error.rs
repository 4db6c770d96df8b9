//! What a user sees when a recipe is rejected: `RecipeError`, whose Display text is the
//! whole message, and the translation of serde's messages into it (full dotted paths,
//! line numbers, the closest valid key for a typo).
//!
//! It must not know which checks exist (`validate`) or how a recipe is read and
//! overridden (`mod.rs`, `overrides`); it only words what they report. Nothing outside
//! `recipe` is used here.

use std::path::PathBuf;

/// Why a recipe was rejected. The Display text is the whole message a user sees.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecipeError {
    /// The file could not be read.
    #[error("cannot read recipe {}: {reason}", .file.display())]
    Read { file: PathBuf, reason: String },
    /// The YAML itself is malformed.
    #[error("{}{}: invalid YAML: {reason}", .file.display(), at_line(.line))]
    Syntax {
        file: PathBuf,
        line: Option<usize>,
        reason: String,
    },
    /// A key that the recipe schema does not have.
    #[error(
        "{origin}: unknown key `{path}`{}{}",
        at_line(.line),
        key_hint(.suggestion, .valid)
    )]
    UnknownKey {
        origin: String,
        path: String,
        line: Option<usize>,
        suggestion: Option<String>,
        valid: Vec<String>,
    },
    /// A value of the wrong type, or a missing required key.
    #[error("{origin}: `{path}`{}: {reason}", at_line(.line))]
    BadValue {
        origin: String,
        path: String,
        line: Option<usize>,
        reason: String,
    },
    /// A malformed `--set` argument.
    #[error("--set {arg}: {reason}")]
    BadOverride { arg: String, reason: String },
    /// Values that parse but do not make sense together.
    #[error("{file}: {}: {problem}; {fix}", quoted(.fields))]
    Inconsistent {
        file: String,
        fields: Vec<String>,
        problem: String,
        fix: String,
    },
}

/// A value of `catapult grow --optimizer` that is neither `copy` nor `fresh`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}`: use copy or fresh")]
pub struct UnknownOptimizerInit(pub String);

/// ` (line L)`, or nothing when the line is unknown.
fn at_line(line: &Option<usize>) -> String {
    line.map(|l| format!(" (line {l})")).unwrap_or_default()
}

/// What follows an unknown key: the closest valid key, or all of them.
fn key_hint(suggestion: &Option<String>, valid: &[String]) -> String {
    match suggestion {
        Some(s) => format!("; did you mean `{s}`?"),
        None => format!("; valid keys here: {}", valid.join(", ")),
    }
}

/// The fields in backquotes, joined by ` and `.
fn quoted(fields: &[String]) -> String {
    let names: Vec<String> = fields.iter().map(|x| format!("`{x}`")).collect();
    names.join(" and ")
}

/// A YAML error of the recipe text itself.
pub(super) fn syntax(origin: &str, e: serde_yaml_ng::Error) -> RecipeError {
    RecipeError::Syntax {
        file: origin.into(),
        line: e.location().map(|l| l.line()),
        reason: e.to_string(),
    }
}

/// How alike a mistyped key and a valid key are, in 0..=1: Jaro-Winkler, or 0.9 when one
/// contains the other (`layers` for `num_layers`).
fn closeness(typed: &str, valid: &str) -> f64 {
    let contained = typed.len() >= 3 && (valid.contains(typed) || typed.contains(valid));
    strsim::jaro_winkler(typed, valid).max(if contained { 0.9 } else { 0.0 })
}

/// Turns serde's message into a RecipeError with the full dotted path.
pub(super) fn classify(
    origin: &str,
    path: &str,
    line: Option<usize>,
    e: serde_yaml_ng::Error,
) -> RecipeError {
    let full_msg = e.to_string();
    // serde_yaml_ng: "[PATH: ]MESSAGE[ at line L column C]", where MESSAGE is serde's, e.g.
    // "unknown field `foo`, expected one of `a`, `b`" or "missing field `x`".
    let msg = match full_msg.split_once(": ") {
        Some((prefix, rest)) if !prefix.contains(' ') => rest.to_string(),
        _ => full_msg.clone(),
    };
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        let key = rest.split('`').next().unwrap_or_default().to_string();
        let expected_part = rest.split_once("expected").map(|x| x.1).unwrap_or_default();
        let expected_part = expected_part.split(" at line").next().unwrap_or_default();
        let valid: Vec<String> = expected_part
            .split('`')
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, s)| s.to_string())
            .collect();
        let parent = path.trim_end_matches(&key).trim_end_matches('.');
        let parent = if parent == "." { "" } else { parent };
        let full = if parent.is_empty() {
            key.clone()
        } else {
            format!("{parent}.{key}")
        };
        let suggestion = valid
            .iter()
            .map(|v| (closeness(&key, v), v))
            .filter(|(score, _)| *score > 0.8)
            // On a tie the key listed first in the schema wins (`num_layers` before
            // `mtp_layers`): max_by would return the last.
            .reduce(|best, next| if next.0 > best.0 { next } else { best })
            .map(|(_, v)| {
                if parent.is_empty() {
                    v.clone()
                } else {
                    format!("{parent}.{v}")
                }
            });
        return RecipeError::UnknownKey {
            origin: origin.into(),
            path: full,
            line,
            suggestion,
            valid,
        };
    }
    let reason = msg.split(" at line ").next().unwrap_or(&msg).to_string();
    let (path, reason) = if let Some(field) = reason.strip_prefix("missing field `") {
        let field = field.split('`').next().unwrap_or_default();
        let full = if path.is_empty() || path == "." {
            field.to_string()
        } else {
            format!("{path}.{field}")
        };
        (
            full,
            "is required but missing; add it to the recipe".to_string(),
        )
    } else {
        (path.to_string(), reason)
    };
    RecipeError::BadValue {
        origin: origin.into(),
        path,
        line,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use crate::recipe::fixtures::*;
    use crate::recipe::parse;

    #[test]
    fn unknown_key_names_path_line_and_closest_key() {
        let text = GOOD.replace("  num_layers: 1", "  num_layer: 1");
        let m = message(parse(&text, "r.yaml", &[]));
        assert!(m.contains("r.yaml"), "{m}");
        assert!(m.contains("`model.num_layer`"), "{m}");
        assert!(m.contains("line 5"), "{m}");
        assert!(m.contains("did you mean `model.num_layers`"), "{m}");
    }

    #[test]
    fn unknown_top_level_key_is_named() {
        let text = format!("{GOOD}trian:\n  steps: 3\n");
        let m = message(parse(&text, "r.yaml", &[]));
        assert!(m.contains("unknown key `trian`"), "{m}");
        assert!(m.contains("did you mean `train`"), "{m}");
    }

    #[test]
    fn wrong_type_names_path_and_expected_type() {
        let text = GOOD.replace("hidden_size: 64", "hidden_size: wide");
        let m = message(parse(&text, "r.yaml", &[]));
        assert!(m.contains("`model.hidden_size`"), "{m}");
        assert!(m.contains("line 4"), "{m}");
        assert!(m.contains("expected usize"), "{m}");
    }

    #[test]
    fn missing_field_is_named() {
        let text = GOOD.replace("  seq_len: 16\n", "");
        let m = message(parse(&text, "r.yaml", &[]));
        assert!(m.contains("`data.seq_len`"), "{m}");
        assert!(m.contains("required"), "{m}");
    }

    #[test]
    fn unrelated_unknown_key_lists_valid_keys_instead_of_guessing() {
        let text = GOOD.replace("  num_layers: 1", "  num_layers: 1\n  zzz: 1");
        let m = message(parse(&text, "r.yaml", &[]));
        assert!(m.contains("unknown key `model.zzz`"), "{m}");
        assert!(
            m.contains("valid keys here: vocab_size, hidden_size"),
            "{m}"
        );
    }

    #[test]
    fn bad_enum_value_names_path() {
        let m = message(with("system.precision=fp8"));
        assert!(m.contains("`system.precision`"), "{m}");
        assert!(m.contains("fp32"), "{m}");
    }
}
