"""Oracle side of the Hugging Face parity test.

Loads an exported model directory with transformers' LongcatFlashForCausalLM (fp32, eager
attention), runs it on the token ids stored beside our logits, and compares.
Usage: hf_parity.py EXPORT_DIR CASE_FILE TOLERANCE
CASE_FILE is a safetensors file with `tokens` (batch x seq, int64) and `logits` (ours).
Prints the max absolute difference; exits 1 when it exceeds TOLERANCE or when loading
reports any missing, unexpected or mismatched key.
"""
import sys

import torch
from safetensors.torch import load_file
from transformers import LongcatFlashForCausalLM


def main():
    export_dir, case_file, tolerance = sys.argv[1], sys.argv[2], float(sys.argv[3])
    model, info = LongcatFlashForCausalLM.from_pretrained(
        export_dir, output_loading_info=True, dtype=torch.float32, attn_implementation="eager"
    )
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        print(f"loading reported problems: {info}")
        return 1
    case = load_file(case_file)
    with torch.no_grad():
        logits = model(input_ids=case["tokens"]).logits
    diff = (logits - case["logits"]).abs().max().item()
    print(f"max_abs_diff {diff:.3e}")
    return 0 if diff <= tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
