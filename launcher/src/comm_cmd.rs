//! `catapult comm check`: the collectives' conformance checks, run in whatever world this
//! process is in (`mpirun -np P catapult comm check`, or alone). Each rank prints one JSON
//! line; the exit code is 1 if any check failed.

use catapult_kernels::comm::Comm;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum CommCommand {
    /// Check every collective against values each rank can compute itself.
    Check {
        /// Sleep up to this many milliseconds at random points (seeded by rank) to perturb
        /// message timing; reductions must give the same bits anyway.
        #[arg(long, default_value_t = 0)]
        jitter_ms: u64,
    },
}

fn value(rank: usize, i: usize) -> f32 {
    // Mixed magnitudes, so that the summation order shows in the low bits.
    let sign = if (rank + i).is_multiple_of(3) {
        -1.0
    } else {
        1.0
    };
    sign * (1.0 + i as f32 * 0.37) * 10f32.powi(((rank * 7 + i) % 9) as i32 - 4)
}

pub fn run(command: CommCommand) -> Result<(), crate::Failure> {
    let CommCommand::Check { jitter_ms } = command;
    let comm = Comm::from_env();
    let (r, p) = (comm.rank(), comm.size());
    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (r as u64 + 1);
    let mut jitter = || {
        if jitter_ms > 0 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            std::thread::sleep(std::time::Duration::from_micros(rng % (jitter_ms * 1000)));
        }
    };
    let mut failures: Vec<String> = Vec::new();
    let mut check = |name: &str, ok: bool| {
        if !ok {
            failures.push(name.to_string());
        }
    };

    // all-to-all with variable counts: rank s sends (d + s) % 3 + 1 values to rank d.
    jitter();
    let counts: Vec<usize> = (0..p).map(|d| (d + r) % 3 + 1).collect();
    let send: Vec<i64> = (0..p)
        .flat_map(|d| (0..counts[d]).map(move |i| (r * 1000 + d * 10 + i) as i64))
        .collect();
    let (recv, got) = comm.all_to_all_v(&send, &counts);
    let expected: Vec<i64> = (0..p)
        .flat_map(|s| (0..(r + s) % 3 + 1).map(move |i| (s * 1000 + r * 10 + i) as i64))
        .collect();
    check(
        "all_to_all_v",
        recv == expected && got == (0..p).map(|s| (r + s) % 3 + 1).collect::<Vec<_>>(),
    );

    // all-gather with variable counts: rank s contributes s + 1 copies of s.
    jitter();
    let (all, sizes) = comm.all_gather_v(&vec![r as i32; r + 1]);
    let expected: Vec<i32> = (0..p).flat_map(|s| vec![s as i32; s + 1]).collect();
    check(
        "all_gather_v",
        all == expected && sizes == (1..=p).collect::<Vec<_>>(),
    );

    // broadcast from the last rank.
    jitter();
    let mut b = if r == p - 1 {
        vec![7.5f64, -1.25]
    } else {
        vec![0.0; 2]
    };
    comm.broadcast(&mut b, p - 1);
    check("broadcast", b == vec![7.5, -1.25]);

    // Deterministic sums: the expected value adds ranks 0..P-1 in order, bit for bit.
    let len = 1003;
    let local: Vec<f32> = (0..len).map(|i| value(r, i)).collect();
    let in_order: Vec<f32> = (0..len)
        .map(|i| (1..p).fold(value(0, i), |acc, s| acc + value(s, i)))
        .collect();
    jitter();
    let chunk = comm.reduce_scatter_sum(&local);
    let mine = len * r / p..len * (r + 1) / p;
    check("reduce_scatter_sum", chunk == in_order[mine]);
    let mut digest = blake3::Hasher::new();
    for round in 0..10 {
        jitter();
        let mut x = local.clone();
        comm.all_reduce_sum(&mut x);
        check(&format!("all_reduce_sum round {round}"), x == in_order);
        for v in &x {
            digest.update(&v.to_le_bytes());
        }
    }
    // Expert-parallel dispatch and combine with identity experts give back every routed
    // slot's token row exactly, and each rank receives only its own experts.
    let (h, k, n_experts) = (5, 3, 8);
    let tokens = 7 + 3 * r;
    let hidden: Vec<f32> = (0..tokens * h).map(|i| value(r, i)).collect();
    let experts: Vec<usize> = (0..tokens * k)
        .map(|s| (s * 7 + r * 3 + s / k) % (n_experts + 2))
        .collect();
    jitter();
    let (d, rows) = catapult_kernels::ep::dispatch(&comm, &hidden, h, &experts, k, n_experts);
    let own = |e: &i64| catapult_kernels::ep::owner(*e as usize, n_experts, p) == r;
    check("ep_dispatch_ownership", d.recv_experts.iter().all(own));
    let out = catapult_kernels::ep::combine(&comm, &d, &rows, h, tokens);
    let identity = experts.iter().enumerate().all(|(slot, &e)| {
        let got = &out[slot * h..(slot + 1) * h];
        if e < n_experts {
            got == &hidden[slot / k * h..(slot / k + 1) * h]
        } else {
            got.iter().all(|&v| v == 0.0)
        }
    });
    check("ep_dispatch_combine_identity", identity);

    jitter();
    comm.barrier();

    println!(
        "{}",
        serde_json::json!({
            "rank": r,
            "size": p,
            "backend": comm.backend(),
            "failures": failures,
            "digest": digest.finalize().to_hex().to_string(),
        })
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(anyhow::anyhow!("rank {r}: collectives failed: {}", failures.join(", ")).into())
    }
}
