//! Whether a recipe fits this machine, decided before anything is allocated: the sizing
//! module's bytes for one rank against the host memory each rank on this node can have
//! (MemAvailable, or the cgroup limit when lower, less a headroom) and, on a GPU, its
//! free device memory. `recipe validate`'s checks of this machine (`check_here`). And
//! allocating the model without a panic: a failure that the estimate missed is an
//! error, exit 1.

use crate::error::TrainError;
use crate::recipe::Recipe;
use crate::sizing::{Memory, ParamCounts};
use tch::Device;

/// The share of available memory a run may plan to use; the rest is for libtorch's
/// workspaces, the data pipeline, MPI buffers and estimation error.
pub const HEADROOM: f64 = 0.10;

const GIB: f64 = (1u64 << 30) as f64;

/// Bytes the kernel could give this process now: MemAvailable, or the cgroup's limit
/// less its usage when that is lower. None where neither can be read.
pub fn host_available_bytes() -> Option<f64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: f64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let mut available = kib * 1024.0;
    let read = |p: &str| -> Option<f64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    if let (Some(limit), Some(used)) = (
        read("/sys/fs/cgroup/memory.max"),
        read("/sys/fs/cgroup/memory.current"),
    ) {
        available = available.min(limit - used);
    }
    Some(available)
}

/// Ranks of this job on this node (Open MPI, Slurm), 1 alone.
pub fn ranks_on_node() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(1)
        .max(1)
}

fn gib(bytes: f64) -> String {
    format!("{:.2} GiB", bytes / GIB)
}

/// What one rank of `recipe` needs on the host: everything on CPU; on a GPU the model
/// is still drawn on the CPU first (so the initial weights do not depend on the device).
pub fn host_bytes(recipe: &Recipe, device: Device, world: usize) -> (Memory, f64) {
    let memory = Memory::of(recipe, &ParamCounts::of(&recipe.model), world);
    let host = match device {
        Device::Cpu => memory.total,
        _ => memory.weights,
    };
    (memory, host)
}

/// Free memory of CUDA device `index` in bytes, as `nvidia-smi` reports it (None where
/// it cannot be asked: libtorch exposes no memory query).
pub fn device_free_bytes(index: usize) -> Option<f64> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.free", "--format=csv,noheader,nounits"])
        .arg(format!("--id={index}"))
        .output()
        .ok()?;
    let mib: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    out.status.success().then_some(mib * (1u64 << 20) as f64)
}

/// Where one rank's bytes must fit, and how much it has there.
struct Budget {
    /// `the host` or `CUDA device N`.
    place: String,
    /// Bytes the rank needs there.
    need: f64,
    /// Bytes free there.
    available: f64,
    /// Ranks sharing it.
    ranks: usize,
}

/// Refuses `recipe` when one rank cannot fit in its share of this node's memory, or in
/// its GPU's free memory, naming the bytes and the fields that drive them.
pub fn check(recipe: &Recipe, device: Device, world: usize) -> Result<(), TrainError> {
    check_with(recipe, device, ranks_on_node(), world)
}

/// `check` for `ranks` ranks on this node of a world of `world`.
fn check_with(
    recipe: &Recipe,
    device: Device,
    ranks: usize,
    world: usize,
) -> Result<(), TrainError> {
    let (m, host) = host_bytes(recipe, device, world);
    let mut budgets = Vec::new();
    if let Some(available) = host_available_bytes() {
        budgets.push(Budget {
            place: "the host".into(),
            need: host,
            available,
            ranks,
        });
    }
    if let Device::Cuda(i) = device {
        if let Some(available) = device_free_bytes(i) {
            budgets.push(Budget {
                place: format!("CUDA device {i}"),
                need: m.total,
                available,
                ranks: 1,
            });
        }
    }
    for b in budgets {
        let share = b.available * (1.0 - HEADROOM) / b.ranks as f64;
        if b.need > share {
            return Err(refusal(recipe, &m, &b, share));
        }
    }
    Ok(())
}

fn refusal(recipe: &Recipe, m: &Memory, b: &Budget, share: f64) -> TrainError {
    let c = &recipe.model;
    TrainError::Recipe(format!(
        "{}: the model does not fit this machine: one rank needs about {} on {} \
         ({} parameters: fp32 weights {}, gradients {}, AdamW moments {}, activations {} for \
         train.micro_batch_size = {} x data.seq_len = {}), but each of the {} rank(s) there \
         has {} ({} available, less {:.0}% headroom). The size comes from \
         model.hidden_size = {}, model.num_layers = {}, model.vocab_size = {}, \
         model.ffn_hidden_size = {} and model.n_routed_experts = {} x \
         model.expert_ffn_hidden_size = {}: shrink them, raise parallel.expert to split the \
         experts over more ranks, or lower train.micro_batch_size (`catapult train RECIPE \
         --dry-run` shows the estimate)",
        recipe.name,
        gib(b.need),
        b.place,
        m.params,
        gib(m.weights),
        gib(m.gradients),
        gib(m.optimizer),
        gib(m.activations),
        recipe.train.micro_batch_size,
        recipe.data.max_seq_len(),
        b.ranks,
        gib(share),
        gib(b.available),
        HEADROOM * 100.0,
        c.hidden_size,
        c.num_layers,
        c.vocab_size,
        c.ffn_hidden_size,
        c.n_routed_experts,
        c.expert_ffn_hidden_size,
    ))
}

/// What `catapult recipe validate` (one rank) and `catapult launch` (`ranks` on this
/// node, before any starts) check on this machine beyond the recipe itself: the memory
/// check `train` makes before allocating (on a CUDA recipe, only where this host
/// has the device), and that local data paths exist (the recipe's own checks read the
/// tokenizer). Returns
/// notes on what could not be checked here.
pub fn check_here(recipe: &Recipe, ranks: usize) -> Result<Vec<String>, TrainError> {
    let mut notes = Vec::new();
    match crate::device::device_for(recipe) {
        Ok(device) => {
            // The world the recipe states (or, with data parallelism left to the launch,
            // these ranks).
            let p = &recipe.parallel;
            let world = match p.data {
                0 => ranks.max(p.expert),
                d => d * p.expert,
            };
            check_with(recipe, device, ranks, world)?
        }
        Err(_) => notes.push(
            "memory not checked: this host has no CUDA device (`catapult train RECIPE \
             --dry-run --gpu NAME` estimates it)"
                .to_string(),
        ),
    }
    let d = &recipe.data;
    for ds in d.dataset_list() {
        let field = match d.datasets.is_empty() {
            true => "data.path".to_string(),
            false => format!("data.datasets[{}].path", ds.name),
        };
        if ds.path.contains("://") {
            notes.push(format!("{field} {}: a URL, not checked here", ds.path));
            continue;
        }
        let base = match ds.path.find(['*', '?', '[', '{']) {
            Some(at) => ds.path[..at].rsplit_once('/').map_or(".", |(b, _)| b),
            None => ds.path.as_str(),
        };
        let path = std::path::Path::new(base);
        if path.is_file() && !base.ends_with(".parquet") {
            return Err(TrainError::Recipe(format!(
                "{}: {field} {}: a file but not a parquet shard; point it at a directory of \
                 shards (`catapult data prepare FILE -o DIR` makes one), a shard or a glob",
                recipe.name, ds.path
            )));
        }
        if !path.exists() {
            return Err(TrainError::Recipe(format!(
                "{}: {field} {}: does not exist (relative paths are from the directory \
                 catapult runs in); create it with `catapult data prepare TEXT... -o DIR` or \
                 fix the path",
                recipe.name, ds.path
            )));
        }
    }
    Ok(notes)
}

/// Runs `allocate` (building tensors through libtorch, which panics when an allocation
/// fails) and turns a panic of this thread into an error naming `what`, with the panic
/// hook silenced for this thread so no Rust backtrace or C++ frames reach the user.
pub fn without_panic<T>(what: &str, allocate: impl FnOnce() -> T) -> Result<T, TrainError> {
    // Silent for this thread only: a panic in another thread (the data pipeline's
    // workers) still reports through the hook that was there before.
    let previous: std::sync::Arc<dyn Fn(&std::panic::PanicHookInfo<'_>) + Send + Sync> =
        std::panic::take_hook().into();
    let here = std::thread::current().id();
    let others = previous.clone();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().id() != here {
            others(info);
        }
    }));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(allocate));
    let _ = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| previous(info)));
    result.map_err(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("libtorch failed");
        // libtorch's message is one line of cause and dozens of C++ frames.
        let cause = message
            .split("\\n")
            .next()
            .and_then(|m| m.lines().next())
            .unwrap_or(message);
        let cause = cause.split_once("Torch(\"").map_or(cause, |(_, c)| c);
        // Under an address-space limit the error path itself may fail to allocate, and
        // libtorch then cannot even word its message.
        if cause.contains("alloc") || cause.contains("Error computing Error::what()") {
            TrainError::Allocation(format!(
                "{what}: {cause}; the machine ran out of memory (the estimate of \
                 `catapult train RECIPE --dry-run` did not foresee it): shrink the model, \
                 lower train.micro_batch_size or raise parallel.expert"
            ))
        } else {
            TrainError::Allocation(format!(
                "{what}: libtorch failed: {cause}; this is a bug in catapult or libtorch: \
                 report it with the recipe"
            ))
        }
    })
}
