//! `catapult bench ...`: benchmarks that print ratios against a baseline measured in the
//! same run. This module owns the subcommand's arguments and the dispatch to one module
//! per benchmark; what several share (spinners, the Python baselines under scripts/bench,
//! training runs in this process or as a `catapult train` child) is in [`common`].
//!
//! - `data`: the data pipeline against pyarrow + tokenizers ([`data`]);
//! - `ckpt`: checkpoint save/load against torch.save/torch.load ([`ckpt`]);
//! - `ep`: expert-parallel steps with Single Batch Overlap on and off ([`ep`]);
//! - `launch`: `catapult launch` against plain mpirun ([`launch`]);
//! - `faults`: random SIGKILLs of random ranks under `catapult launch` ([`faults`]);
//! - `growth`: model growth against random init ([`growth`]);
//! - `init`: drawing a rank's own experts against drawing them whole ([`init`]);
//! - `transfer`: width transfer of the learning rate ([`transfer`]);
//! - `controller`: the expert-bias controller's modes on three recipes ([`controller`]);
//! - `reduction`: the canonical reduction tree against rank order, and how far apart
//!   expert-parallel sizes end ([`reduction`]);
//! - `train`: the training step against PyTorch eager and `torch.compile` ([`train`]).

mod ckpt;
mod common;
mod controller;
mod data;
mod ep;
mod faults;
mod growth;
mod init;
mod launch;
mod reduction;
mod scale;
mod train;
mod transfer;

use clap::Subcommand;
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// The training step against the project's PyTorch eager model
    /// (scripts/bench/eager_longcat.py) and `torch.compile` of it, on tiny, tiny with
    /// expert parallelism on 2 ranks, width 256 and width 512 (one process, and 2 ranks
    /// with expert parallelism): tokens/s medians over interleaved rounds, ratios, and
    /// each shape's model FLOP/s as a fraction of the large-matmul rate measured in the
    /// same run (run from the project root; uses the built-in corpus).
    Train {
        /// The base recipe (the shapes override its model and batch).
        #[arg(long, default_value = "recipes/tiny.yaml")]
        recipe: PathBuf,
        /// Shapes (of tiny, tiny-ep2, h256, h512, h512-ep2; all when not given).
        #[arg(long, value_delimiter = ',')]
        shapes: Vec<String>,
        /// Steps per run (default per shape: 24, 24, 12, 8, 8; the first 3 are warm-up).
        #[arg(long)]
        steps: Option<usize>,
        /// Rounds (each runs every implementation once per shape, the order rotating).
        #[arg(long, default_value_t = 2)]
        repeats: usize,
        /// Python with torch (scripts/setup's venv).
        #[arg(long, default_value = ".venv/bin/python")]
        python: PathBuf,
        /// Working directory for the runs and results.json.
        #[arg(long, default_value = "bench-results/train")]
        dir: PathBuf,
    },
    /// The expert-bias controller: each mode on tiny, a 4-layer model with N 16, Z 8,
    /// K 4, K_e 3, and tiny with K_e 1, same seed and budget; per layer the worst
    /// overshoot and undershoot, the mean absolute error over the second half, the steps
    /// to settle within 2% of K_e and the validation loss; a PNG per recipe and mode
    /// (run from the project root; uses the built-in corpus).
    Controller {
        /// The base recipe (the other two recipes override its model).
        #[arg(long, default_value = "recipes/tiny.yaml")]
        recipe: PathBuf,
        /// Modes to compare.
        #[arg(long, value_delimiter = ',', default_value = "hold,longcat,pid,sign")]
        modes: Vec<String>,
        /// Recipes (of tiny, n16-k4-ke3, ke1; all when not given).
        #[arg(long, value_delimiter = ',')]
        recipes: Vec<String>,
        /// Steps of each run.
        #[arg(long, default_value_t = 800)]
        steps: usize,
        /// Working directory for the runs, the PNGs and results.json.
        #[arg(long, default_value = "bench-results/controller")]
        dir: PathBuf,
        /// Overrides for every run (KEY=VALUE, repeatable), e.g. data.path=...
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// The canonical reduction tree (`parallel.reduction: tree`) against micro-batches
    /// summed in place and ranks in rank order (`ranks`): tokens/s and peak RSS ratios on
    /// 1 and 4 ranks; and the weight distance between expert-parallel sizes 1, 2, 4
    /// (mpirun; run from the project root; uses the built-in corpus).
    Reduction {
        /// Recipe to train (global batch 16).
        #[arg(long, default_value = "recipes/tiny.yaml")]
        recipe: PathBuf,
        /// Steps per run (the first 3 are warm-up and not counted).
        #[arg(long, default_value_t = 12)]
        steps: usize,
        /// Runs per setting, alternating the orders.
        #[arg(long, default_value_t = 2)]
        repeats: usize,
        /// Working directory for the runs and results.json.
        #[arg(long, default_value = "bench-results/reduction")]
        dir: PathBuf,
    },
    /// Model growth: the deep recipe from random init against its half-depth model
    /// trained for half the tokens, stacked and trained on (same total tokens);
    /// validation curves to growth.png (run from the project root).
    Growth {
        /// A recipe with a growth section.
        #[arg(long, default_value = "recipes/tiny-grown.yaml")]
        recipe: PathBuf,
        /// Steps of each run (growth at half).
        #[arg(long, default_value_t = 400)]
        steps: usize,
        /// Validation every this many steps.
        #[arg(long, default_value_t = 25)]
        eval_every: usize,
        /// Working directory for the runs, results.json and growth.png.
        #[arg(long, default_value = "bench-results/growth")]
        dir: PathBuf,
    },
    /// Width transfer: a learning-rate grid on the proxy, and the same grid at wider
    /// widths with transfer.proxy set; is the proxy's best within one grid step of each
    /// width's best? (run from the project root).
    Transfer {
        /// The proxy recipe.
        #[arg(long, default_value = "recipes/tiny-proxy.yaml")]
        proxy: PathBuf,
        /// Target widths as multiples of the proxy's.
        #[arg(long, value_delimiter = ',', default_value = "2,4")]
        widths: Vec<usize>,
        /// Learning-rate grid (ascending).
        #[arg(long, value_delimiter = ',', default_values_t = transfer::default_lrs())]
        lrs: Vec<f64>,
        /// Steps of each run.
        #[arg(long, default_value_t = 150)]
        steps: usize,
        /// Working directory for the runs, results.json and transfer.png.
        #[arg(long, default_value = "bench-results/transfer")]
        dir: PathBuf,
    },
    /// `catapult launch` against mpirun starting the same binary: time to the first
    /// training step for each rank count, and the time to detect a killed rank and train
    /// again (run from the project root; uses the built-in corpus).
    Launch {
        /// Recipe to train (its experts must split over every rank count).
        #[arg(long, default_value = "recipes/tiny.yaml")]
        recipe: PathBuf,
        /// Rank counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        ranks: Vec<usize>,
        /// Working directory for the runs and results.json.
        #[arg(long, default_value = "bench-results/launch")]
        dir: PathBuf,
    },
    /// Expert-parallel training with Single Batch Overlap on and off (ranks started with
    /// mpirun): step time, the share of all-to-all time hidden behind compute, and the
    /// exchanged volume against the analytic one (run from the project root).
    Ep {
        /// Recipe to train (it must divide its experts over `ranks`).
        #[arg(long, default_value = "recipes/tiny.yaml")]
        recipe: PathBuf,
        /// Ranks (expert-parallel size = ranks).
        #[arg(long, default_value_t = 2)]
        ranks: usize,
        /// Steps per run (the first 3 are warm-up and not counted).
        #[arg(long, default_value_t = 30)]
        steps: usize,
        /// Runs per setting, alternating on and off.
        #[arg(long, default_value_t = 2)]
        repeats: usize,
        /// Working directory for the runs and results.json.
        #[arg(long, default_value = "bench-results/ep")]
        dir: PathBuf,
    },
    /// Sharded data parallelism on `ranks` ranks (mpirun), DP and DP x EP 2, in every
    /// `parallel.shard` mode: bytes per rank by category, peak RSS, step time and
    /// parameter-gather time as ratios against `shard: none` (run from the project root).
    Scale {
        /// Recipe to train (global batch 16).
        #[arg(long, default_value = "recipes/tiny.yaml")]
        recipe: PathBuf,
        /// Ranks (even, at least 4).
        #[arg(long, default_value_t = 4)]
        ranks: usize,
        /// Steps per run (the first 3 are warm-up and not counted).
        #[arg(long, default_value_t = 8)]
        steps: usize,
        /// Working directory for the runs and results.json.
        #[arg(long, default_value = "bench-results/scale")]
        dir: PathBuf,
        /// Overrides for every run (KEY=VALUE, repeatable), e.g. model.num_layers=8 so
        /// that a layer is a small part of the model.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// SIGKILLs of random ranks at random moments (seeded) of a 2-rank run under
    /// `catapult launch`, against the same run undisturbed: survival, restarts, steps
    /// lost, time to train again, backoffs, final weights (run from the project root).
    Faults {
        /// Recipe to train (2 ranks).
        #[arg(long, default_value = "recipes/tiny.yaml")]
        recipe: PathBuf,
        /// Kills.
        #[arg(long, default_value_t = 20)]
        kills: usize,
        /// Steps of the run (long enough for the kills).
        #[arg(long, default_value_t = 300)]
        steps: usize,
        /// Seed of the kills' ranks and moments.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Working directory for the runs and results.json.
        #[arg(long, default_value = "bench-results/faults")]
        dir: PathBuf,
        /// Overrides for both runs (KEY=VALUE, repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Initialization of one rank's model: drawing only its experts' rows against
    /// drawing every expert whole and keeping its rows (as before sharded init).
    Init {
        /// Recipe to draw (e.g. with --set model.expert_ffn_hidden_size=8192).
        #[arg(long, default_value = "recipes/tiny.yaml")]
        recipe: PathBuf,
        /// Expert-parallel size whose rank 0 is drawn.
        #[arg(long, default_value_t = 4)]
        ranks: usize,
        /// Times each way is measured (the best counts).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Overrides (KEY=VALUE, repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Checkpoint save/load throughput against torch.save/torch.load, and the training
    /// loop's blocking time per asynchronous save (run from the project root).
    Ckpt {
        /// GiB of tensor state to save and load.
        #[arg(long, default_value_t = 1.0)]
        gib: f64,
        /// Recipe whose async-save blocking time is measured.
        #[arg(long, default_value = "recipes/tiny.yaml")]
        recipe: PathBuf,
        /// Python with torch and safetensors (scripts/setup's venv).
        #[arg(long, default_value = ".venv/bin/python")]
        python: PathBuf,
        /// Working directory (on the disk to measure).
        #[arg(long, default_value = "bench-results/ckpt")]
        dir: PathBuf,
    },
    /// Data pipeline throughput against pyarrow + tokenizers (run from the project root).
    Data {
        /// Text corpus (default: the built-in KJV text from scripts/prepare-corpus).
        #[arg(long, default_value = "data-cache/kjv.txt")]
        text: PathBuf,
        /// Copies of the text in the benchmark corpus.
        #[arg(long, default_value_t = 4)]
        repeat: usize,
        /// BPE vocabulary trained for the benchmark.
        #[arg(long, default_value_t = 8192)]
        vocab_size: usize,
        /// Recipe whose training rate is measured (20 steps).
        #[arg(long, default_value = "recipes/tiny.yaml")]
        recipe: PathBuf,
        /// Python with pyarrow and tokenizers (scripts/setup's venv).
        #[arg(long, default_value = ".venv/bin/python")]
        python: PathBuf,
        /// Working directory for the corpus, shards and results.
        #[arg(long, default_value = "bench-results/data")]
        dir: PathBuf,
    },
}

pub fn run(command: BenchCommand) -> Result<(), crate::Failure> {
    match command {
        BenchCommand::Train {
            recipe,
            shapes,
            steps,
            repeats,
            python,
            dir,
        } => train::run(&train::Args {
            recipe: &recipe,
            shapes: &shapes,
            steps,
            repeats,
            python: &python,
            dir: &dir,
        }),
        BenchCommand::Growth {
            recipe,
            steps,
            eval_every,
            dir,
        } => growth::run(&recipe, steps, eval_every, &dir),
        BenchCommand::Transfer {
            proxy,
            widths,
            lrs,
            steps,
            dir,
        } => transfer::run(&proxy, &widths, &lrs, steps, &dir),
        BenchCommand::Controller {
            recipe,
            modes,
            recipes,
            steps,
            dir,
            sets,
        } => controller::run(&recipe, (&modes, &recipes, &sets), steps, &dir),
        BenchCommand::Reduction {
            recipe,
            steps,
            repeats,
            dir,
        } => reduction::run(&recipe, (steps, repeats), &dir),
        BenchCommand::Scale {
            recipe,
            ranks,
            steps,
            dir,
            sets,
        } => scale::run(&recipe, (ranks, steps), &sets, &dir),
        BenchCommand::Data {
            text,
            repeat,
            vocab_size,
            recipe,
            python,
            dir,
        } => data::run(&text, repeat, vocab_size, &recipe, &python, &dir),
        BenchCommand::Faults {
            recipe,
            kills,
            steps,
            seed,
            dir,
            sets,
        } => faults::run(&faults::Faults {
            recipe: &recipe,
            kills,
            steps,
            seed,
            dir: &dir,
            sets: &sets,
        }),
        BenchCommand::Init {
            recipe,
            ranks,
            repeats,
            sets,
        } => {
            let parsed: Vec<catapult_trainer::recipe::Override> = sets
                .iter()
                .map(|s| catapult_trainer::recipe::Override::parse(s))
                .collect::<Result<_, _>>()?;
            let recipe = catapult_trainer::recipe::load(&recipe, &parsed)?;
            init::run(&recipe, ranks, repeats.max(1))
        }
        BenchCommand::Ckpt {
            gib,
            recipe,
            python,
            dir,
        } => ckpt::run(gib, &recipe, &python, &dir),
        BenchCommand::Ep {
            recipe,
            ranks,
            steps,
            repeats,
            dir,
        } => ep::run(&recipe, ranks, steps, repeats, &dir),
        BenchCommand::Launch { recipe, ranks, dir } => launch::run(&recipe, &ranks, &dir),
    }
}
