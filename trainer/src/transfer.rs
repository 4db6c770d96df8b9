//! Per-group hyperparameters: each parameter group's learning rate relative to the
//! scheduled one.

use crate::groups::Group;
use crate::recipe::Recipe;
use std::collections::BTreeMap;

/// Every group's learning-rate factor (1 for all groups: one learning rate).
pub fn lr_scales(_recipe: &Recipe) -> BTreeMap<Group, f64> {
    Group::ALL.iter().map(|&g| (g, 1.0)).collect()
}
