//! `catapult ckpt list|verify|show`: what sharded checkpoints a root holds, whether their
//! files match their manifests, and what is inside one.

use crate::UsageError;
use catapult_checkpoints::{step_dir, Checkpoints, Dtype};
use catapult_data::StorageOptions;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum CkptCommand {
    /// Checkpoints under a root (a run's `checkpoints/` directory or an object-store prefix).
    List {
        /// The checkpoint root.
        root: String,
        /// S3-compatible endpoint for s3:// roots.
        #[arg(long)]
        endpoint: Option<String>,
    },
    /// Check every file of a checkpoint (a step directory) or of every checkpoint under a
    /// root against its manifest's sizes and BLAKE3 hashes; exit 1 on a mismatch.
    Verify {
        /// A step directory or a root.
        path: String,
        /// S3-compatible endpoint for s3:// paths.
        #[arg(long)]
        endpoint: Option<String>,
    },
    /// Manifest summary, parameter counts and sizes of one checkpoint.
    Show {
        /// A step directory, or a root (its newest checkpoint).
        path: String,
        /// S3-compatible endpoint for s3:// paths.
        #[arg(long)]
        endpoint: Option<String>,
    },
}

/// What a local `path` that holds no checkpoint is, for the error (None: it holds one,
/// or it is not local).
fn not_a_checkpoint(path: &str) -> Option<String> {
    if path.contains("://") {
        return None;
    }
    let p = std::path::Path::new(path);
    if !p.exists() {
        return Some("no such file or directory".into());
    }
    if p.is_file() {
        return Some("a file, not a checkpoint root or step directory".into());
    }
    let entries: Vec<String> = std::fs::read_dir(p)
        .ok()?
        .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
        .collect();
    if entries.iter().any(|e| e.starts_with("step-")) || p.join("manifest.json").exists() {
        return None;
    }
    if entries.iter().any(|e| e == "checkpoints") {
        return Some(format!(
            "a run directory, not a checkpoint root: its checkpoints are in {}",
            p.join("checkpoints").display()
        ));
    }
    Some("a directory without checkpoints (no step-NNNNNNNN directory with a manifest.json)".into())
}

/// The checkpoints at `path`; a local path that holds none is bad input (exit 2),
/// named with what it is.
fn open(
    path: &str,
    endpoint: &Option<String>,
) -> Result<(Checkpoints, Option<u64>), crate::Failure> {
    if let Some(found) = not_a_checkpoint(path) {
        return Err(UsageError::new(format!(
            "{path}: {found}; give a checkpoint root (a run's checkpoints/ directory or an \
             object-store prefix) or one step directory (.../step-NNNNNNNN)"
        ))
        .into());
    }
    let options = StorageOptions {
        endpoint: endpoint.clone(),
        ..StorageOptions::default()
    };
    Ok(Checkpoints::open_path(path, &options)?)
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{:.1} KiB", b as f64 / 1024.0),
    }
}

pub fn run(command: CkptCommand) -> Result<(), crate::Failure> {
    match command {
        CkptCommand::List { root, endpoint } => list(&root, &endpoint),
        CkptCommand::Verify { path, endpoint } => verify(&path, &endpoint),
        CkptCommand::Show { path, endpoint } => show(&path, &endpoint),
    }
}

/// `catapult ckpt list`: one line per checkpoint, the newest valid one starred.
fn list(root: &str, endpoint: &Option<String>) -> Result<(), crate::Failure> {
    let (store, _) = open(root, endpoint)?;
    let latest = store.latest()?;
    let steps = store.steps()?;
    if steps.is_empty() {
        return Err(UsageError::new(format!(
            "{}: no checkpoints there; give a checkpoint root that holds some",
            store.root()
        ))
        .into());
    }
    println!(
        "{:<15} {:>12} {:>6} {:>11}  latest",
        "checkpoint", "tokens", "files", "size"
    );
    for step in steps {
        match store.manifest(step) {
            Ok(m) => println!(
                "{:<15} {:>12} {:>6} {:>11}  {}",
                step_dir(step),
                m.tokens,
                m.files.len(),
                human(m.files.iter().map(|f| f.bytes).sum()),
                if latest == Some(step) { "*" } else { "" }
            ),
            Err(e) => println!("{:<15} unreadable: {e}", step_dir(step)),
        }
    }
    let quarantined = store.quarantined()?;
    if !quarantined.is_empty() {
        println!(
            "quarantined (broken, not counted; reason.txt says why): {}",
            quarantined.join(", ")
        );
    }
    Ok(())
}

/// `catapult ckpt verify`: every checkpoint at `path` against its manifest; an error
/// (exit 1) when any fails.
fn verify(path: &str, endpoint: &Option<String>) -> Result<(), crate::Failure> {
    let (store, step) = open(path, endpoint)?;
    let steps = match step {
        Some(s) => vec![s],
        None => store.steps()?,
    };
    let mut bad = 0;
    for s in &steps {
        match store.verify(*s) {
            Ok(m) => println!("{}: ok ({} files)", step_dir(*s), m.files.len()),
            Err(e) => {
                bad += 1;
                println!("{}: FAILED: {e}", step_dir(*s));
            }
        }
    }
    if bad > 0 {
        return Err(
            anyhow::anyhow!("{bad} of {} checkpoint(s) failed verification", steps.len()).into(),
        );
    }
    Ok(())
}

/// `catapult ckpt show`: the manifest, then tensor counts and sizes by group, dtypes and
/// files of one checkpoint (the newest at a root).
fn show(path: &str, endpoint: &Option<String>) -> Result<(), crate::Failure> {
    let (store, step) = open(path, endpoint)?;
    let step = match step {
        Some(s) => s,
        None => *store.steps()?.last().ok_or_else(|| {
            UsageError::new(format!(
                "{path}: no checkpoints; name a checkpoint root that holds one, or a step \
                 directory"
            ))
        })?,
    };
    let loaded = store.load(step, false)?;
    let m = &loaded.manifest;
    println!(
        "checkpoint {} (catapult {})",
        loaded.location, m.catapult_version
    );
    println!("step {}, tokens {}", m.step, m.tokens);
    println!(
        "world: data-parallel {}, expert-parallel {}; experts per rank: {}",
        m.world.data_parallel,
        m.world.expert_parallel,
        m.world
            .ranks
            .iter()
            .map(|r| format!("rank {} [{}, {})", r.rank, r.experts[0], r.experts[1]))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(name) = m.recipe["name"].as_str() {
        println!("recipe: {name}");
    }
    show_tensors(&loaded);
    for f in &m.files {
        println!(
            "  {:<24} rank {:<3} {:>11}  blake3 {}",
            f.name,
            f.rank,
            human(f.bytes),
            f.blake3.get(..16).unwrap_or(&f.blake3)
        );
    }
    Ok(())
}

/// Tensors, values and bytes of the model and of the optimizer; the dtypes present.
fn show_tensors(loaded: &catapult_checkpoints::Loaded) {
    let mut groups: std::collections::BTreeMap<&str, (usize, u64, u64)> = Default::default();
    for name in loaded.names() {
        let t = loaded.info(name).expect("a listed tensor has an entry");
        let group = if name.starts_with("optimizer.") {
            "optimizer"
        } else {
            "model"
        };
        let e = groups.entry(group).or_default();
        e.0 += 1;
        e.1 += t.numel() as u64;
        e.2 += (t.numel() * t.dtype.size()) as u64;
    }
    for (group, (count, numel, bytes)) in groups {
        println!(
            "{group:<10} {count:>5} tensors {numel:>14} values {:>11}",
            human(bytes)
        );
    }
    let dtypes: std::collections::BTreeSet<String> = loaded
        .names()
        .filter_map(|n| loaded.info(n))
        .map(|t| format!("{:?}", t.dtype as Dtype))
        .collect();
    println!(
        "dtypes: {}",
        dtypes.into_iter().collect::<Vec<_>>().join(", ")
    );
}
