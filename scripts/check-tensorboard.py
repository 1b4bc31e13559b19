"""Reads a run's TensorBoard event files with TensorBoard's own reader (PyPI `tensorboard`:
`EventAccumulator`) and checks every scalar against the run's metrics.jsonl: each numeric key of
each line must be there under `train/<key>` (or `eval/<rest>` for `eval_<rest>`) at that step,
with the value as float32.

Usage: python scripts/check-tensorboard.py RUN_DIR      (pip install tensorboard)
"""
import json
import sys
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

run = Path(sys.argv[1])
acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
acc.Reload()
have = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
checked = 0
for line in (run / "metrics.jsonl").read_text().splitlines():
    m = json.loads(line)
    step = m.get("step", 0)
    for k, v in m.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        tag = "eval/" + k[5:] if k.startswith("eval_") else "train/" + k
        got = have[tag][step]
        assert got == np.float32(v), (tag, step, got, v)
        checked += 1
print(json.dumps({"tags": len(have), "scalars_checked": checked}))
