//! `catapult bench init`: the time and memory to build and draw one rank's model when
//! it draws only what it holds (its experts' rows, from the counter-based generator)
//! against drawing every expert whole and keeping its rows, as each rank did before
//! sharded initialization; both in this process, one after the other.

use super::common::spinner;
use catapult_trainer::init::build_model_with_experts;
use catapult_trainer::Recipe;
use std::time::Instant;
use tch::Device;

/// Seconds and bytes of the drawn tensors for one way of drawing rank 0's model.
struct Drawn {
    seconds: f64,
    bytes: f64,
}

/// Builds rank 0's model of an expert-parallel layout of `ranks` holding the experts
/// `local`, draws it, and keeps rank 0's rows: what it cost.
fn draw(recipe: &Recipe, local: std::ops::Range<usize>, ranks: usize) -> Drawn {
    let started = Instant::now();
    let built = build_model_with_experts(recipe, Device::Cpu, local.clone());
    built.init.fill_all(&built.vars);
    let bytes: f64 = built
        .named()
        .iter()
        .map(|(_, t)| (t.numel() * t.kind().elt_size_in_bytes()) as f64)
        .sum();
    // Drawn whole: cut rank 0's rows, as a rank did before.
    let per = recipe.model.n_routed_experts / ranks;
    let mut kept = 0.0;
    for (name, t) in built.named() {
        if name.contains(".mlp.experts.") && local.len() > per {
            kept += t.narrow(0, 0, per as i64).copy().numel() as f64;
        }
    }
    std::hint::black_box(kept);
    Drawn {
        seconds: started.elapsed().as_secs_f64(),
        bytes,
    }
}

pub(super) fn run(recipe: &Recipe, ranks: usize, repeats: usize) -> Result<(), crate::Failure> {
    let n = recipe.model.n_routed_experts;
    if ranks == 0 || !n.is_multiple_of(ranks) {
        return Err(crate::UsageError::new(format!(
            "--ranks {ranks}: the recipe's {n} routed experts must split evenly; use a divisor of {n}"
        ))
        .into());
    }
    let p = spinner(&format!(
        "drawing rank 0's model of EP {ranks}, {repeats} times each way"
    ));
    let mut whole = Vec::new();
    let mut sharded = Vec::new();
    for _ in 0..repeats {
        whole.push(draw(recipe, 0..n, ranks));
        sharded.push(draw(recipe, 0..n / ranks, ranks));
    }
    p.finish_and_clear();
    let best = |v: &[Drawn]| v.iter().map(|d| d.seconds).fold(f64::INFINITY, f64::min);
    let (w, s) = (best(&whole), best(&sharded));
    let (wb, sb) = (whole[0].bytes, sharded[0].bytes);
    println!(
        "{}: rank 0 of expert-parallel {ranks} ({n} experts), best of {repeats}",
        recipe.name
    );
    println!("{:<28} {:>10} {:>12}", "", "seconds", "MiB drawn");
    let mib = |b: f64| b / (1u64 << 20) as f64;
    println!(
        "{:<28} {:>10.3} {:>12.1}",
        "every expert whole (before)",
        w,
        mib(wb)
    );
    println!(
        "{:<28} {:>10.3} {:>12.1}",
        "its own rows (sharded)",
        s,
        mib(sb)
    );
    println!(
        "ratio: sharded init takes {:.2}x the time and {:.2}x the memory",
        s / w,
        sb / wb
    );
    Ok(())
}
