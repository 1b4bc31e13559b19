#!/usr/bin/env bash
# Export time and peak RSS of `ft export gguf` against llama.cpp's own tools in the same
# invocation: convert_hf_to_gguf.py --outtype f16 / q8_0, and for q4_k_m convert_hf_to_gguf.py
# --outtype f32 followed by llama-quantize (llama.cpp's route; its time and peak RSS are the sum
# and the max of the two). Files go to a scratch directory, removed afterwards.
#
#   LLAMA_CPP=path/to/llama.cpp PYTHON=python3 scripts/bench-export-gguf.sh FT MODEL_DIR [TYPES...]
#
# llama-quantize runs through llama-cpp-python's llama_model_quantize (same C code).
set -euo pipefail
FT=$1; MODEL=$2; shift 2
TYPES=${*:-f16 q8_0 q4_k_m}
PY=${PYTHON:-python3}
: "${LLAMA_CPP:?set LLAMA_CPP to a llama.cpp checkout}"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/bench-export.XXXX")
trap 'rm -rf "$tmp"' EXIT
measure() { # label, command...: prints "label seconds peak_kib"
  local label=$1; shift
  /usr/bin/time -f "%e %M" -o "$tmp/t" "$@" > /dev/null 2> "$tmp/err" || { cat "$tmp/err" >&2; exit 1; }
  echo "$label $(cat "$tmp/t")"
}
cat > "$tmp/quantize.py" <<'PY'
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread = int(sys.argv[3]), 2
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
PY
# llama.cpp's converter, as a command /usr/bin/time can run.
printf '#!/bin/sh\nPYTHONPATH="%s/gguf-py" exec "%s" "%s/convert_hf_to_gguf.py" "%s" --outfile "$1" --outtype "$2"\n' "$LLAMA_CPP" "$PY" "$LLAMA_CPP" "$MODEL" > "$tmp/hf-to-gguf"
chmod +x "$tmp/hf-to-gguf"
for t in $TYPES; do
  read -r _ ft_s ft_k < <(measure ft "$FT" export gguf --model "$MODEL" --out "$tmp/ft.gguf" --type "$t")
  ft_size=$(stat -c %s "$tmp/ft.gguf"); rm -f "$tmp/ft.gguf"
  if [ "$t" = q4_k_m ]; then
    read -r _ c_s c_k < <(measure conv "$tmp/hf-to-gguf" "$tmp/f32.gguf" f32)
    read -r _ q_s q_k < <(measure quant "$PY" "$tmp/quantize.py" "$tmp/f32.gguf" "$tmp/ref.gguf" 15)
    ref_s=$(echo "$c_s + $q_s" | bc); ref_k=$(( c_k > q_k ? c_k : q_k )); rm -f "$tmp/f32.gguf"
  else
    read -r _ ref_s ref_k < <(measure conv "$tmp/hf-to-gguf" "$tmp/ref.gguf" "$t")
  fi
  ref_size=$(stat -c %s "$tmp/ref.gguf"); rm -f "$tmp/ref.gguf"
  printf '%-7s ft %6.2f s %7.0f MiB %6.1f MiB file | llama.cpp %6.2f s %7.0f MiB %6.1f MiB file | time %.2fx, RSS %.2fx\n' \
    "$t" "$ft_s" "$((ft_k / 1024))" "$(echo "$ft_size / 1048576" | bc -l)" "$ref_s" "$((ref_k / 1024))" "$(echo "$ref_size / 1048576" | bc -l)" \
    "$(echo "$ref_s / $ft_s" | bc -l)" "$(echo "$ft_k / $ref_k" | bc -l)"
done
