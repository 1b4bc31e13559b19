#!/usr/bin/env python3
"""Checks ft's layering over the `crate::` / `super::` paths of src/ (ARCHITECTURE.md).

1. Every top-level module is on a layer (LAYERS below); a module may use modules on lower
   layers and on its own layer, never one above it, and the graph of top-level modules has no
   cycle.
2. The graph of source files has no cycle. A folder's `mod.rs` is that folder's interface: its
   edges into its own children (declaring, re-exporting, dispatching to them) are not counted;
   every other edge is, including a child's use of its parent's items.

Prints each violation and exits 1, or prints a summary and exits 0. Usage: scripts/check-layers.py
"""
import os
import re
import sys

LAYERS = [
    ["backend", "atomic", "progress", "quant"],
    ["ops", "formats"],
    ["model"],
    ["data", "adapters", "generate"],
    ["loss", "convert"],
    ["train", "eval", "geneval", "score"],
    ["cli"],
    ["main"],
]
LAYER = {m: i for i, names in enumerate(LAYERS) for m in names}

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def module_path(rel):
    """src-relative file → module path (list of names)."""
    parts = rel[:-3].split(os.sep)
    if parts[-1] == "mod":
        parts = parts[:-1]
    if parts == ["lib"]:
        return []
    return parts


def resolve(path):
    """Longest prefix of `path` (module names) that is a file; returns its src-relative path."""
    for n in range(len(path), 0, -1):
        base = os.path.join(*path[:n])
        for cand in (base + ".rs", os.path.join(base, "mod.rs")):
            if os.path.isfile(os.path.join(ROOT, cand)):
                return cand
    return None


def expand(spec):
    """`a::{b, c::{d, e}}` → ['a::b', 'a::c::d', 'a::c::e'] (one `use` tree)."""
    spec = spec.strip()
    m = re.match(r"^(.*?)::\{(.*)\}$", spec, re.S)
    if not m:
        return [spec]
    head, body = m.group(1), m.group(2)
    parts, depth, cur = [], 0, ""
    for ch in body:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    out = []
    for p in parts:
        p = p.strip()
        if not p or p == "self":
            out.append(head)
        elif p:
            out.extend(head + "::" + q for q in expand(p))
    return out


def strip_tests(text):
    """Drops `#[cfg(test)] mod tests { ... }` blocks (tests may reach anywhere below them)."""
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*(pub(\(crate\))?\s+)?mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i : m.start()])
        depth, j = 1, m.end()
        while depth and j < len(text):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def paths_in(text):
    text = re.sub(r"//.*", "", strip_tests(text))
    found = []
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        found.extend(expand(re.sub(r"\s+as\s+\w+", "", m.group(1))))
    found.extend(re.findall(r"\b((?:crate|super)(?:::\w+)+)", text))
    return found


def main():
    files = []
    for d, _, names in os.walk(ROOT):
        files.extend(os.path.relpath(os.path.join(d, n), ROOT) for n in names if n.endswith(".rs"))
    edges = {f: set() for f in files}
    problems = []
    for f in files:
        me = module_path(f)
        text = open(os.path.join(ROOT, f), encoding="utf-8").read()
        for p in paths_in(text):
            parts = p.split("::")
            if parts[0] == "crate":
                target = parts[1:]
            elif parts[0] == "super":
                base = me
                while parts and parts[0] == "super":
                    base = base[:-1]
                    parts = parts[1:]
                target = base + parts
            else:
                continue
            t = resolve(target)
            if t and t != f:
                edges[f].add(t)
    # 1. Layers.
    top = lambda f: module_path(f)[0] if module_path(f) else ("main" if f == "main.rs" else "lib")
    top_edges = {}
    for f, ts in edges.items():
        a = top(f)
        for t in ts:
            b = top(t)
            if a == b or "lib" in (a, b):
                continue
            if a not in LAYER or b not in LAYER:
                problems.append(f"{f}: module {a if a not in LAYER else b} is on no layer (scripts/check-layers.py)")
                continue
            if LAYER[b] > LAYER[a]:
                problems.append(f"{f} → {t}: {a} (layer {LAYER[a] + 1}) uses {b} (layer {LAYER[b] + 1}), an upper layer")
            top_edges.setdefault(a, set()).add(b)
    problems += ["modules in a cycle: " + ", ".join(c) for c in cycles(top_edges)]
    # 2. Files.
    counted = {}
    for f, ts in edges.items():
        folder = os.path.dirname(f)
        counted[f] = {t for t in ts if not (f.endswith("mod.rs") and os.path.dirname(t).startswith(folder) and t != f and folder != "")}
        if f == "lib.rs":
            counted[f] = set()
    problems += ["files in a cycle: " + ", ".join(c) for c in cycles(counted)]
    for p in problems:
        print(p)
    if problems:
        sys.exit(1)
    n = sum(len(v) for v in counted.values())
    print(f"layers ok: {len(files)} files, {n} file edges, no upward import, no cycle")


def cycles(graph):
    """One cycle per strongly connected component of more than one node."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


if __name__ == "__main__":
    main()
