//! Errors of the collectives: each names the call, the rank and the cause, and the fix
//! where there is one.

/// Errors of NCCL: loading the library, making a communicator, or a collective call.
#[derive(Debug, thiserror::Error)]
pub enum NcclError {
    /// libtorch sees no CUDA device.
    #[error("no CUDA device")]
    NoCuda,
    /// No candidate path holds a loadable NCCL library.
    #[error(
        "libnccl.so.2 not found next to libtorch or on the loader path (tried {}): install \
         torch with CUDA (its nvidia-nccl dependency), point CATAPULT_NCCL_LIB at \
         libnccl.so.2, or set parallel.backend=mpi",
        tried.join(", ")
    )]
    NotFound {
        /// The paths tried, in order.
        tried: Vec<String>,
    },
    /// The library loaded but lacks a function NCCL 2.x has.
    #[error(
        "the NCCL library lacks {symbol} ({reason}): it is not NCCL 2.x; point \
         CATAPULT_NCCL_LIB at torch's nvidia/nccl/lib/libnccl.so.2 or set parallel.backend=mpi"
    )]
    MissingSymbol {
        /// The C function.
        symbol: &'static str,
        /// What the loader said.
        reason: String,
    },
    /// A communicator was asked for on a device that is not a GPU.
    #[error(
        "NCCL needs a CUDA device, not {device}; set system.device=cuda or parallel.backend=mpi"
    )]
    NotCuda {
        /// The device given.
        device: String,
    },
    /// A tensor kind NCCL cannot move.
    #[error(
        "no NCCL datatype for {kind}: NCCL moves int8, uint8, int32, int64, float16, float32, \
         float64 and bfloat16 tensors; convert the tensor first"
    )]
    Datatype {
        /// The tensor's kind.
        kind: String,
    },
    /// Counts that do not give one entry per rank or do not cover the tensor.
    #[error("rank {rank}: {call}: {problem}")]
    Counts {
        /// The collective.
        call: &'static str,
        /// This rank.
        rank: usize,
        /// What is wrong with the counts.
        problem: String,
    },
    /// An NCCL call returned an error code.
    #[error("rank {rank} of {size}: {call}: NCCL error {code}: {message}{}", hint(.code))]
    Call {
        /// The C function (`ncclSend`, `ncclGroupEnd`, ...).
        call: &'static str,
        /// This rank.
        rank: usize,
        /// Ranks in the communicator.
        size: usize,
        /// NCCL's result code.
        code: i32,
        /// NCCL's text for the code.
        message: String,
    },
}

/// What to do about an NCCL result code, where something can be done.
fn hint(code: &i32) -> &'static str {
    match code {
        1 => {
            "; a CUDA call failed inside NCCL: check the GPU with nvidia-smi and the driver version"
        }
        2 => {
            "; a system call failed (network or shared memory): run with NCCL_DEBUG=WARN to see \
             which, or set parallel.backend=mpi"
        }
        6 => "; a peer rank failed or left: its own error message says why",
        _ => "",
    }
}

/// Errors of the collectives and the expert-parallel exchange.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// MPI could not be initialized in this process.
    #[error(
        "MPI: {problem}; make the world communicator once per process (Comm::from_env) and \
         split it for groups"
    )]
    MpiInit {
        /// What went wrong.
        problem: String,
    },
    /// An NCCL failure.
    #[error(transparent)]
    Nccl(#[from] NcclError),
    /// The routed experts do not split evenly over the expert-parallel group.
    #[error(
        "rank {rank}: {experts} routed experts do not split evenly over the {ranks} ranks of \
         the expert-parallel group; set parallel.expert to a divisor of {experts}"
    )]
    ExpertSplit {
        /// This rank in the group.
        rank: usize,
        /// Routed (FFN) experts.
        experts: usize,
        /// Ranks in the group.
        ranks: usize,
    },
    /// Rows to exchange that do not fit the plan.
    #[error("rank {rank}: expert-parallel exchange: {problem}")]
    Exchange {
        /// This rank in the group.
        rank: usize,
        /// What is wrong.
        problem: String,
    },
}
