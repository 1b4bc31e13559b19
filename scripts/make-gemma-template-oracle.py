"""What transformers 5.24 renders with Gemma 2's and Gemma 3's published chat templates
(`tests/fixtures/templates/gemma{2,3}.jinja`, as `google/gemma-2-2b-it` and
`google/gemma-3-1b-it` ship them) for the conversations of `tests/fixtures/chat.jsonl`: the full
text, the prefix before each assistant turn (with a generation prompt), or the template's error.

Usage: python scripts/make-gemma-template-oracle.py tests/fixtures
"""
import json
import sys
from pathlib import Path

from transformers.utils.chat_template_utils import render_jinja_template

root = Path(sys.argv[1])
convs = [json.loads(l)["messages"] for l in (root / "chat.jsonl").read_text().splitlines() if l.strip()]
out = {}
for name in ["gemma2", "gemma3"]:
    template = (root / "templates" / f"{name}.jinja").read_text()
    cases = []
    for messages in convs:
        def render(msgs, gen):
            rendered, _ = render_jinja_template([msgs], chat_template=template, add_generation_prompt=gen, bos_token="<bos>", eos_token="<eos>")
            return rendered[0]
        try:
            full = render(messages, False)
            prefixes = [render(messages[:i], True) for i, m in enumerate(messages) if m["role"] == "assistant"]
            cases.append({"text": full, "prefixes": prefixes})
        except Exception as e:  # the template's raise_exception
            cases.append({"error": str(e)})
    out[name] = cases
(root / "templates" / "expected.json").write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
print(json.dumps(out, indent=1, ensure_ascii=False)[:1500])
