//! Our forward pass against transformers' LongcatFlashForCausalLM on the same weights:
//! export randomly initialized models with non-zero expert biases, run both on the same
//! tokens, compare logits (fp32, max abs difference <= 1e-4).

use catapult_trainer::export::export_hf;
use catapult_trainer::init::{build_model, named_tensors};
use catapult_trainer::recipe::{self, Override};
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn check_case(name: &str, sets: &[&str]) {
    let root = workspace();
    let dir = root.join("target").join("parity").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut overrides: Vec<Override> = sets.iter().map(|s| Override::parse(s).unwrap()).collect();
    overrides.push(Override::parse("data.seq_len=24").unwrap());
    let recipe = recipe::load(&root.join("recipes").join("tiny.yaml"), &overrides).unwrap();
    let built = build_model(&recipe, Device::Cpu);
    // Non-zero biases, of the size of the router probabilities, so that the expert
    // selection (top-K of p + b) differs from the top-K of p and the gate weights (from
    // the unbiased p) are checked to ignore b.
    tch::manual_seed(99);
    let experts = recipe.model.total_experts() as i64;
    tch::no_grad(|| {
        for layer in &built.model.layers {
            let mut b = layer.moe.expert_bias.shallow_clone();
            let values =
                Tensor::randn([experts], (Kind::Float, Device::Cpu)) * (0.5 / experts as f64);
            b.copy_(&values);
        }
    });
    let checkpoint = dir.join("checkpoint");
    let meta = serde_json::json!({"recipe": serde_json::to_value(&recipe).unwrap()});
    catapult_checkpoints::save(&checkpoint, &named_tensors(&built.vars), &meta).unwrap();
    export_hf(
        checkpoint.to_str().unwrap(),
        &dir.join("hf"),
        u64::MAX,
        &Default::default(),
    )
    .unwrap();

    let tokens = Tensor::randint(257, [2, 24], (Kind::Int64, Device::Cpu));
    let logits = tch::no_grad(|| built.model.forward(&tokens).logits);
    let case = dir.join("case.safetensors");
    catapult_checkpoints::write_tensors(
        &case,
        &[("tokens".into(), tokens), ("logits".into(), logits)],
    )
    .unwrap();

    let python = root.join(".venv").join("bin").join("python3");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup",
        python.display()
    );
    let out = Command::new(&python)
        .arg(root.join("tests").join("python").join("hf_parity.py"))
        .arg(dir.join("hf"))
        .arg(&case)
        .arg("1e-4")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{name}: parity failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{name}: {stdout}");
}

#[test]
fn logits_match_transformers_with_zero_experts_and_ke_below_k() {
    check_case(
        "zero-experts",
        &[
            "model.hidden_size=32",
            "model.q_lora_rank=16",
            "model.kv_lora_rank=8",
            "model.n_routed_experts=4",
            "model.zero_expert_num=2",
            "model.moe_topk=3",
            "model.target_ffn_experts=2",
            "model.initializer_range=0.2",
        ],
    );
}

#[test]
fn logits_match_transformers_without_zero_experts() {
    check_case(
        "no-zero-experts",
        &[
            "model.hidden_size=48",
            "model.num_attention_heads=3",
            "model.q_lora_rank=24",
            "model.kv_lora_rank=4",
            "model.n_routed_experts=6",
            "model.zero_expert_num=0",
            "model.moe_topk=2",
            "model.target_ffn_experts=2",
            "model.routed_scaling_factor=3.0",
            "model.initializer_range=0.15",
        ],
    );
}

#[test]
fn logits_match_transformers_with_many_zero_experts_and_three_layers() {
    check_case(
        "three-layers",
        &[
            "model.num_layers=3",
            "model.hidden_size=64",
            "model.q_lora_rank=8",
            "model.kv_lora_rank=16",
            "model.qk_nope_head_dim=8",
            "model.qk_rope_head_dim=8",
            "model.v_head_dim=12",
            "model.n_routed_experts=8",
            "model.zero_expert_num=4",
            "model.moe_topk=4",
            "model.target_ffn_experts=1",
            "model.rope_theta=500.0",
            "model.initializer_range=0.1",
            // MTP weights travel under the released names, which transformers skips.
            "model.mtp_layers=1",
        ],
    );
}
