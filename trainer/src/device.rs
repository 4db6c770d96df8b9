//! The machine a rank runs on: which device it trains on (its GPU by local rank), the
//! device's peak FLOP/s for MFU, and the process's memory. It knows nothing of training.

use crate::error::TrainError;
use crate::recipe::{DeviceKind, Recipe};
use tch::Device;

/// This process's rank among those on its node (Open MPI, PMIx or Slurm), for picking a
/// GPU; 0 alone.
fn local_rank() -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "PMIX_LOCAL_RANK",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.parse().ok())
    .unwrap_or(0)
}

/// The device `recipe.system.device` names, for this rank.
pub fn device_for(recipe: &Recipe) -> Result<Device, TrainError> {
    match recipe.system.device {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(
            local_rank() % tch::Cuda::device_count().max(1) as usize,
        )),
        DeviceKind::Cuda => Err(TrainError::Recipe(
            "system.device is `cuda` but libtorch sees no CUDA device; run on a GPU machine \
             or set system.device=cpu"
                .into(),
        )),
    }
}

/// The peak TFLOP/s of one device: the recipe's, else the device table's entry for the
/// CUDA device's name; None on CPU.
pub fn peak_tflops(recipe: &Recipe, device: Device) -> Option<f64> {
    recipe.system.peak_tflops.or(match device {
        Device::Cuda(i) => catapult_kernels::nccl::cuda_device_name(i)
            .and_then(|name| crate::sizing::gpu_by_name(&name))
            .map(|g| g.peak_tflops),
        _ => None,
    })
}

/// This process's resident and peak resident memory (VmRSS, VmHWM), in bytes.
pub fn memory_bytes() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |key: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}
