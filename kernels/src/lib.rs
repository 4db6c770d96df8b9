//! Tensor-level primitives the trainer composes: collectives (`comm`: MPI over host
//! buffers and a single process; `nccl`: CUDA tensors), the expert-parallel token
//! exchange (`ep`), MoE token grouping and grouped expert compute (`moe`). The model
//! never calls collectives directly; the trainer's parallel schedule does.

pub mod comm;
pub mod ep;
pub mod error;
pub mod moe;
pub mod nccl;

pub use error::{CommError, NcclError};
