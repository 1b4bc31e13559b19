"""Behaviour metric for datasets/json-answers: reads `ft generate --data heldout.jsonl` output
(one JSON line per prompt) on stdin and prints the share of replies that are a JSON object with an
"answer" key, and the share whose answer equals the reference's.

    ft generate --model M [--adapter A] --data datasets/json-answers/heldout.jsonl --max-new-tokens 24 \
      | python3 scripts/json-answers-metric.py
"""
import json
import sys

n = valid = correct = 0
for line in sys.stdin:
    row = json.loads(line)
    n += 1
    text = row["text"].replace("<|im_end|>", "").replace("<|endoftext|>", "").strip()
    try:
        got = json.loads(text)
    except ValueError:
        continue
    if isinstance(got, dict) and "answer" in got:
        valid += 1
        want = json.loads(row["reference"])["answer"]
        correct += got["answer"] == want
print(json.dumps({"samples": n, "json_rate": valid / max(n, 1), "accuracy": correct / max(n, 1)}))
