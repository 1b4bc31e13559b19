#!/usr/bin/env python3
"""Checks ft's GGUF files against llama.cpp's own tools (results go to benches/RESULTS.md).

  check-gguf.py names FILE.gguf
      every metadata key is one gguf-py's constants.py defines (Keys.*, with the file's
      architecture), with the value type gguf-py's writer gives it; every tensor name is one of
      the architecture's MODEL_TENSORS.
  check-gguf.py compare FT.gguf REF.gguf
      the same keys, value types and values (general.name/basename/size_label aside) and the
      same tensors (names, order, shapes, types, bytes; f32 data within 1e-7) as REF, e.g. the
      file llama.cpp's convert_hf_to_gguf.py writes for the same model directory.
  check-gguf.py quants FT_F32.gguf FT_Q.gguf
      every Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 tensor of FT_Q is byte-identical to gguf-py's quantizer
      applied to the same tensor of FT_F32 (ft's f32 export); every K-quant tensor is compared
      with ggml's own quantizer (libggml-base from the llama-cpp-python wheel, if installed):
      bytes, and the dequantization error of both.
  check-gguf.py llama FILE.gguf EXPECTED_DIR [ADAPTER.gguf]
      llama.cpp (llama-cpp-python) evaluates tests/fixtures/chat_tokens.json's cases (with the GGUF
      LoRA adapter applied when given); prints the max |logit - expected| against
      EXPECTED_DIR/expected_logits.safetensors (an oracle model's or adapter's: transformers/PEFT).

Needs the `gguf` package (pip install gguf numpy); `llama` and the K-quant part of `quants`
need llama-cpp-python.
"""
import json
import os
import sys

import numpy as np
import gguf
from gguf import GGUFReader, GGMLQuantizationType as Q
from gguf.constants import Keys, MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES

IGNORED = {"general.name", "general.basename", "general.size_label", "general.finetune", "general.version"}


def all_keys(arch):
    keys = set()
    for group in vars(Keys).values():
        if isinstance(group, type):
            for v in vars(group).values():
                if isinstance(v, str):
                    keys.add(v.replace("{arch}", arch))
    return keys


def fields(r):
    out = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        types = [t.name for t in f.types]
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
            vals = [f.parts[i].tolist() if f.types[-1] != gguf.GGUFValueType.STRING else bytes(f.parts[i]).decode("utf-8", "replace") for i in f.data]
        elif f.types and f.types[0] == gguf.GGUFValueType.STRING:
            vals = bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
        else:
            vals = f.parts[f.data[0]].tolist()
        out[name] = (types, vals)
    return out


def arch_of(r):
    return fields(r)["general.architecture"][1]


def cmd_names(path):
    r = GGUFReader(path)
    arch = arch_of(r)
    ok = True
    keys = all_keys(arch)
    for k in fields(r):
        if k not in keys:
            print(f"key not in gguf-py's constants: {k}")
            ok = False
    a = next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch)
    names = set()
    for t in MODEL_TENSORS[a]:
        base = TENSOR_NAMES[t]
        for bid in range(1000 if "{bid}" in base else 1):
            n = base.format(bid=bid)
            names.update({n + ".weight", n + ".bias"})
    for t in r.tensors:
        # An adapter's tensors are the base's with .lora_a / .lora_b appended.
        if t.name.removesuffix(".lora_a").removesuffix(".lora_b") not in names:
            print(f"tensor not in {arch}'s MODEL_TENSORS: {t.name}")
            ok = False
    print(f"{path}: {len(fields(r))} keys, {len(r.tensors)} tensors: {'ok' if ok else 'MISMATCH'}")
    return ok


def cmd_compare(a_path, b_path):
    a, b = GGUFReader(a_path), GGUFReader(b_path)
    fa, fb = fields(a), fields(b)
    ok = True
    for k in sorted(set(fa) | set(fb)):
        if k in IGNORED:
            continue
        if k not in fa or k not in fb:
            print(f"key only in {'ft' if k in fa else 'reference'}: {k} = {str((fa.get(k) or fb.get(k))[1])[:80]}")
            ok = False
        elif fa[k][0] != fb[k][0]:
            print(f"key {k}: types {fa[k][0]} vs {fb[k][0]}")
            ok = False
        elif fa[k][1] != fb[k][1]:
            va, vb = fa[k][1], fb[k][1]
            close = isinstance(va, float) and abs(va - vb) <= 1e-6 * max(1, abs(vb))
            if not close:
                print(f"key {k}: {str(va)[:80]} vs {str(vb)[:80]}")
                ok = False
    ta, tb = [t.name for t in a.tensors], [t.name for t in b.tensors]
    if ta != tb:
        print(f"tensor order/names differ:\n  ft:  {ta}\n  ref: {tb}")
        ok = False if set(ta) != set(tb) else ok
    bt = {t.name: t for t in b.tensors}
    worst = 0.0
    for t in a.tensors:
        u = bt.get(t.name)
        if u is None:
            continue
        if list(t.shape) != list(u.shape) or t.tensor_type != u.tensor_type:
            print(f"tensor {t.name}: {list(t.shape)} {t.tensor_type.name} vs {list(u.shape)} {u.tensor_type.name}")
            ok = False
            continue
        if bytes(t.data) != bytes(u.data):
            if t.tensor_type == Q.F32:
                d = float(np.abs(np.asarray(t.data, np.float32) - np.asarray(u.data, np.float32)).max())
                worst = max(worst, d)
                if d > 1e-7:
                    print(f"tensor {t.name}: max |diff| {d:.3g}")
                    ok = False
            else:
                print(f"tensor {t.name}: bytes differ")
                ok = False
    print(f"{a_path} vs {b_path}: {len(fa)} keys, {len(ta)} tensors (f32 max diff {worst:.3g}): {'identical' if ok else 'DIFFERENT'}")
    return ok


def ggml_quantizer():
    try:
        import ctypes
        import llama_cpp
    except ImportError:
        return None
    lib_dir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    lib = ctypes.CDLL(os.path.join(lib_dir, "libggml-base.so"))
    try:
        ctypes.CDLL(os.path.join(lib_dir, "libggml-cpu.so")).ggml_cpu_init()
    except OSError:
        pass
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    def quantize(qtype, x):
        x = np.ascontiguousarray(x, np.float32)
        rows, cols = x.reshape(-1, x.shape[-1]).shape
        bs, ts = gguf.GGML_QUANT_SIZES[qtype]
        out = np.zeros(rows * cols // bs * ts, np.uint8)
        lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, cols, None)
        return out
    return quantize


def cmd_quants(f32_path, q_path):
    f, q = GGUFReader(f32_path), GGUFReader(q_path)
    ref = {t.name: t for t in f.tensors}
    ggml = ggml_quantizer()
    counts, ok = {}, True
    for t in q.tensors:
        x = np.asarray(ref[t.name].data, np.float32).reshape([int(d) for d in reversed(t.shape)])
        kind = t.tensor_type
        if kind in (Q.F32, Q.F16, Q.BF16):
            continue
        mine = np.asarray(t.data, np.uint8).ravel()
        if kind in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):
            theirs = gguf.quants.quantize(x, kind).ravel()
            same = bytes(mine) == bytes(theirs)
            counts.setdefault(kind.name, [0, 0])[0 if same else 1] += 1
            if not same:
                print(f"{t.name} ({kind.name}): differs from gguf-py")
                ok = False
        elif ggml is not None:
            theirs = ggml(kind, x)
            blocks = gguf.GGML_QUANT_SIZES[kind][1]
            diff = int((mine.reshape(-1, blocks) != theirs.reshape(-1, blocks)).any(axis=1).sum())
            e_mine = float(np.sqrt(np.mean((gguf.quants.dequantize(mine.reshape(t.data.shape), kind).ravel() - x.ravel()) ** 2)))
            e_theirs = float(np.sqrt(np.mean((gguf.quants.dequantize(theirs.reshape(t.data.shape), kind).ravel() - x.ravel()) ** 2)))
            counts.setdefault(kind.name, [0, 0])[0 if diff == 0 else 1] += 1
            if diff:
                print(f"{t.name} ({kind.name}): {diff} of {mine.size // blocks} blocks differ from ggml; rms error ft {e_mine:.4g} vs ggml {e_theirs:.4g}")
            if e_mine > e_theirs * 1.001 + 1e-12:
                ok = False
    summary = ", ".join(f"{k}: {v[0]} identical, {v[1]} different" for k, v in sorted(counts.items()))
    print(f"{q_path}: {summary}: {'ok' if ok else 'MISMATCH'}")
    return ok


def cmd_llama(path, model_dir, lora=None):
    from llama_cpp import Llama
    from safetensors.numpy import load_file
    here = os.path.dirname(os.path.abspath(__file__))
    cases = json.load(open(os.path.join(here, "..", "tests", "fixtures", "chat_tokens.json")))
    expected = load_file(os.path.join(model_dir, "expected_logits.safetensors"))
    m = Llama(model_path=path, lora_path=lora, n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    worst = 0.0
    for i, case in enumerate(cases):
        ids = case["input_ids"]
        m.reset()
        m.eval(ids)
        got = np.asarray(m.scores[: len(ids)], np.float32)
        d = float(np.abs(got - expected[f"logits_{i}"]).max())
        worst = max(worst, d)
    print(f"{path}{' + ' + lora if lora else ''}: llama.cpp logits vs transformers: max |diff| {worst:.3g} over {len(cases)} cases")
    return worst


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    r = {"names": cmd_names, "compare": cmd_compare, "quants": cmd_quants, "llama": cmd_llama}[cmd](*args)
    sys.exit(0 if r is not False else 1)
