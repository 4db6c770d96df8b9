//! The parallel mesh: how the world of ranks is laid out (data x expert parallel), the
//! segmented forward/backward schedule that moves a MoE layer's rows between the ranks
//! (`schedule`), the gradient reductions over the mesh's groups (`reduce`), the
//! sharding of state over the ranks that replicate a tensor (`shard`) and the gathers of
//! sharded parameters (`gather`), and the canonical tree
//! every step's sums follow (`tree`).
//!
//! The model knows nothing of ranks: the schedule drives the model's one layer
//! definition through an injected `MoeExchange`. This module owns the one predicate
//! that says which parameters are sharded over the expert group (`is_expert_param`).

pub mod gather;
pub mod mesh;
pub mod reduce;
pub mod schedule;
pub mod shard;
pub mod tree;

pub use gather::{Gathering, ParamGather};
pub use mesh::{is_expert_param, Group, LayoutError, Parallel, Segment};
pub use reduce::GradReducer;
pub use schedule::{forward, Forward, LayerRouting, NoHooks, SegmentHooks, Training};
pub use shard::ShardPlan;
