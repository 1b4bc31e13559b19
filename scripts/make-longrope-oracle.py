"""A LongRoPE variant of the phi3 oracle (Phi-3.5 / Phi-4-mini's `rope_type: longrope`): the
same weights with `rope_parameters` {longrope, short/long factors, partial rotary 0.75} and
`original_max_position_embeddings` 32, so that the longest chat case (87 tokens) runs on the long
factors and the short ones on the short factors; writes `config.json` and transformers 5.24's
float32 `expected_logits.safetensors` (`logits_<i>` per `chat_tokens.json` case) to OUT.

Usage: python scripts/make-longrope-oracle.py tests/fixtures/models/phi3 tests/fixtures/chat_tokens.json OUT
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

src, tokens, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
cfg = json.loads((src / "config.json").read_text())
rotary_half = int(cfg["hidden_size"] // cfg["num_attention_heads"] * 0.75) // 2
cfg["rope_parameters"] = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.75,
    "short_factor": [1.0 + 0.1 * i for i in range(rotary_half)],
    "long_factor": [1.0 + 1.5 * i for i in range(rotary_half)],
}
cfg["original_max_position_embeddings"] = 32
out.mkdir(parents=True, exist_ok=True)
(out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
with tempfile.TemporaryDirectory() as tmp:
    for f in src.iterdir():
        shutil.copy(f, tmp)
    shutil.copy(out / "config.json", tmp)
    model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    logits = {}
    with torch.no_grad():
        for i, case in enumerate(json.loads(Path(tokens).read_text())):
            logits[f"logits_{i}"] = model(torch.tensor([case["input_ids"]])).logits[0].contiguous()
            print(i, len(case["input_ids"]))
save_file(logits, out / "expected_logits.safetensors")
