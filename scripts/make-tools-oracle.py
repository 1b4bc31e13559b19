#!/usr/bin/env python3
"""Renders tests/fixtures/tools/tools.jsonl with tests/fixtures/tools/chat_template.jinja the way
transformers' apply_chat_template does (transformers 5.24: render_jinja_template, its tojson filter)
and writes tests/fixtures/tools/expected.json: per record the full text and the prefix before each
assistant turn (rendered with add_generation_prompt=True), which is where ft's trained span starts.
Needs only `pip install transformers jinja2` (no torch)."""
import json, pathlib
import transformers
from transformers.utils.chat_template_utils import render_jinja_template

d = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/tools"
template = (d / "chat_template.jinja").read_text()
out = []
for line in (d / "tools.jsonl").read_text().splitlines():
    rec = json.loads(line)
    msgs, tools = rec["messages"], rec.get("tools")
    def render(m, gen):
        text, _ = render_jinja_template(conversations=[m], tools=tools, chat_template=template,
                                        add_generation_prompt=gen, bos_token="<|im_start|>", eos_token="<|im_end|>")
        return text[0]
    prefixes = [render(msgs[:i], True) for i, m in enumerate(msgs) if m["role"] == "assistant"]
    out.append({"text": render(msgs, False), "assistant_prefixes": prefixes})
(d / "expected.json").write_text(json.dumps({"transformers": transformers.__version__, "records": out}, indent=1, ensure_ascii=False) + "\n")
