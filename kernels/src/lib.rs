//! Tensor-level primitives the trainer composes: MoE token grouping and grouped expert
//! compute. Collectives (the `Comm` interface over MPI, NCCL and a single process) will
//! live here too; the model never calls them directly.

pub mod comm;
pub mod ep;
pub mod moe;
