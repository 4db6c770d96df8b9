//! The parallel mesh: how the world of ranks is laid out (data x expert parallel), the
//! segmented forward/backward schedule that moves a MoE layer's rows between the ranks
//! (`schedule`), the gradient reductions over the mesh's groups (`reduce`) and the
//! sharding of optimizer state over the ranks that replicate a tensor (`shard`).
//!
//! The model knows nothing of ranks: the schedule drives the model's one layer
//! definition through an injected `MoeExchange`. This module owns the one predicate
//! that says which parameters are sharded over the expert group (`is_expert_param`).

pub mod mesh;
pub mod reduce;
pub mod schedule;
pub mod shard;

pub use mesh::{is_expert_param, Group, LayoutError, Parallel};
pub use reduce::{GradReducer, Segment};
pub use schedule::{forward, BackwardHooks, Forward, LayerRouting, NoHooks, Training};
pub use shard::ShardPlan;
