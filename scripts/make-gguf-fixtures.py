#!/usr/bin/env python3
"""Makes the GGUF reference fixtures under tests/fixtures/gguf/ from llama.cpp's own code.

1. quants.safetensors: f32 inputs (`input_<i>`, rows x cols) and, for each, the bytes of
   gguf-py's quantizers (`q8_0_<i>`, `q4_0_<i>`, `q4_1_<i>`, `q5_0_<i>`, `q5_1_<i>`) and of ggml's
   reference quantizers through libggml (`q4_k_<i>`, `q5_k_<i>`, `q6_k_<i>`, for inputs whose
   rows are a multiple of 256).
2. converter/<model>.json: what llama.cpp's convert_hf_to_gguf.py writes (--outtype f32) for each
   tiny model of tests/fixtures/models: every metadata key with its gguf value type and value
   (string arrays as their count and SHA-256), every tensor with its shape, type and the SHA-256
   of its bytes. The tiny models' tokenizer is byte-level BPE with an unknown pre-tokenizer hash
   (the converter then says "gpt-2", as ft does) and Gemma 2 / Phi-3 read it as BPE (the
   converter otherwise insists on a SentencePiece tokenizer.model); SmolLM3 is converted with
   no_rope_layers as llama.cpp runs it (every 4th layer without RoPE).

Needs: LLAMA_CPP=<a llama.cpp checkout, e.g. the one vendored in the llama-cpp-python sdist>,
torch, transformers, sentencepiece, numpy, safetensors, and llama-cpp-python for the K-quants.
Usage: LLAMA_CPP=... scripts/make-gguf-fixtures.py
"""
import hashlib
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "tests", "fixtures")
LLAMA_CPP = os.environ["LLAMA_CPP"]
sys.path.insert(0, os.path.join(LLAMA_CPP, "gguf-py"))
import gguf  # noqa: E402  (llama.cpp's own gguf-py)
from gguf import GGUFReader  # noqa: E402

sys.path.insert(0, HERE)
check = runpy.run_path(os.path.join(HERE, "check-gguf.py"), run_name="fixtures")


def quant_fixture():
    from safetensors.numpy import save_file
    rng = np.random.default_rng(20261130)
    shapes = [(4, 256), (3, 512), (2, 96), (1, 1536)]
    out = {}
    ggml = check["ggml_quantizer"]()
    assert ggml is not None, "llama-cpp-python is needed for the K-quants"
    for i, (r, c) in enumerate(shapes):
        x = (rng.standard_normal((r, c)) * 0.05).astype(np.float32)
        x[0, 5] = 0.9  # an outlier
        x[-1, :32] = 0.0  # an all-zero block
        x[r // 2, 64:96] = 0.25  # a constant block
        out[f"input_{i}"] = x
        for name, q in [("q8_0", gguf.GGMLQuantizationType.Q8_0), ("q4_0", gguf.GGMLQuantizationType.Q4_0), ("q4_1", gguf.GGMLQuantizationType.Q4_1), ("q5_0", gguf.GGMLQuantizationType.Q5_0), ("q5_1", gguf.GGMLQuantizationType.Q5_1)]:
            out[f"{name}_{i}"] = gguf.quants.quantize(x, q).reshape(-1).astype(np.uint8)
        if c % 256 == 0:
            for name, q in [("q4_k", gguf.GGMLQuantizationType.Q4_K), ("q5_k", gguf.GGMLQuantizationType.Q5_K), ("q6_k", gguf.GGMLQuantizationType.Q6_K)]:
                out[f"{name}_{i}"] = ggml(q, x).reshape(-1)
    os.makedirs(os.path.join(FIX, "gguf"), exist_ok=True)
    save_file(out, os.path.join(FIX, "gguf", "quants.safetensors"))
    print("wrote quants.safetensors:", ", ".join(sorted(out)))


def header(path):
    r = GGUFReader(path)
    meta = {}
    for name, (types, vals) in check["fields"](r).items():
        if isinstance(vals, list) and vals and isinstance(vals[0], str):
            vals = {"count": len(vals), "sha256": hashlib.sha256("\n".join(vals).encode()).hexdigest()}
        elif isinstance(vals, list) and len(vals) > 64:
            vals = {"count": len(vals), "sha256": hashlib.sha256(json.dumps(vals).encode()).hexdigest()}
        meta[name] = {"types": types, "value": vals}
    tensors = [{"name": t.name, "shape": [int(d) for d in reversed(t.shape)], "type": t.tensor_type.name, "sha256": hashlib.sha256(bytes(t.data)).hexdigest()} for t in r.tensors]
    return {"metadata": meta, "tensors": tensors}


CONVERT = r'''
import sys, runpy
sys.path.insert(0, sys.argv[1] + "/gguf-py"); sys.path.insert(0, sys.argv[1])
import conversion.base as base, conversion.gemma as gemma, conversion.phi as phi
orig = base.TextModel.get_vocab_base_pre
def pre(self, tok):
    try:
        return orig(self, tok)
    except NotImplementedError:
        return "gpt-2"
base.TextModel.get_vocab_base_pre = pre
gemma.Gemma2Model.set_vocab = lambda self: self._set_vocab_gpt2()
phi.Phi3MiniModel.set_vocab = lambda self: self._set_vocab_gpt2()
root = sys.argv[1]
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(root + "/convert_hf_to_gguf.py", run_name="__main__")
'''


def converter_fixtures():
    models = ["llama", "llama3-rope-tied-bf16", "mistral", "mistral-swa", "mixtral", "qwen2", "qwen3", "qwen3-moe", "smollm3", "gemma2", "gemma3", "phi3"]
    out_dir = os.path.join(FIX, "gguf", "converter")
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "convert.py")
        open(script, "w").write(CONVERT)
        for m in models:
            src = os.path.join(FIX, "models", m)
            # The converter names the model after its directory (and llama.cpp keys vocab quirks
            # on "phi3" in that name), so convert a copy named "tiny".
            work = os.path.join(tmp, m, "tiny")
            shutil.copytree(src, work)
            if m == "smollm3":
                cfg = json.load(open(os.path.join(work, "config.json")))
                cfg["no_rope_layers"] = [int((i + 1) % 4 != 0) for i in range(cfg["num_hidden_layers"])]
                json.dump(cfg, open(os.path.join(work, "config.json"), "w"), indent=2)
            gg = os.path.join(tmp, m + ".gguf")
            subprocess.run([sys.executable, script, LLAMA_CPP, work, "--outfile", gg, "--outtype", "f32"], check=True, capture_output=True)
            h = header(gg)
            h["source"] = f"llama.cpp convert_hf_to_gguf.py --outtype f32 of tests/fixtures/models/{m}" + (" with no_rope_layers every 4th" if m == "smollm3" else "")
            json.dump(h, open(os.path.join(out_dir, m + ".json"), "w"), indent=1)
            print("wrote", m, len(h["metadata"]), "keys", len(h["tensors"]), "tensors")


LORA_CONVERT = r'''
import sys, runpy
root = sys.argv[1]
sys.path.insert(0, root + "/gguf-py"); sys.path.insert(0, root)
sys.argv = ["convert_lora_to_gguf.py"] + sys.argv[2:]
runpy.run_path(root + "/convert_lora_to_gguf.py", run_name="__main__")
'''


def adapter_fixtures():
    """converter/adapter-<name>.json: convert_lora_to_gguf.py --outtype f32 of an oracle adapter."""
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "convert_lora.py")
        open(script, "w").write(LORA_CONVERT)
        for a in ["lora-r4", "embed-lora-r4"]:
            work = os.path.join(tmp, a, "tiny")
            shutil.copytree(os.path.join(FIX, "adapters", a), work)
            gg = os.path.join(tmp, a + ".gguf")
            subprocess.run([sys.executable, script, LLAMA_CPP, "--base", os.path.join(FIX, "models", "llama"), "--outfile", gg, "--outtype", "f32", work], check=True, capture_output=True)
            h = header(gg)
            h["source"] = f"llama.cpp convert_lora_to_gguf.py --outtype f32 of tests/fixtures/adapters/{a} on tests/fixtures/models/llama"
            json.dump(h, open(os.path.join(FIX, "gguf", "converter", f"adapter-{a}.json"), "w"), indent=1)
            print("wrote adapter", a, len(h["tensors"]), "tensors")


if __name__ == "__main__":
    quant_fixture()
    converter_fixtures()
    adapter_fixtures()
