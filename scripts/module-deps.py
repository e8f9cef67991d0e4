#!/usr/bin/env python3
"""Module dependencies of the litestreamd library, and the checks that keep the house in order.

    scripts/module-deps.py          print the dependency graph, fail on a cycle or a shadow path
                                    built outside src/shadow.rs

A dependency is any path a module names (`crate::a::b`, `super::c`, in `use` or inline). An
edge between two modules is lifted to the children of their lowest common ancestor, so
`control::server -> supervisor` counts as `control -> supervisor`: a cycle means two sibling
subtrees need each other, at any level of the tree. A module naming its own ancestor or
descendant is ownership, not a dependency. `src/main.rs` is a separate crate (the binary) and
cannot be part of a cycle of the library.

Written by hand rather than with `cargo modules` because that takes minutes to build on the CI
machine and needs a nightly-pinned rust-analyzer; this needs only Python and the source.
"""

import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def module_of(rel):
    """src-relative file path -> module path tuple (lib.rs -> ())."""
    parts = rel[:-3].split(os.sep)
    if parts[-1] in ("mod", "lib"):
        parts = parts[:-1]
    return tuple(parts)


def strip_comments(text):
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    # Line comments, but not `//` inside a string literal (a URL like "s3://b"): drop only what
    # follows `//` when the quotes before it on the line are balanced.
    out = []
    for line in text.splitlines():
        i = 0
        while True:
            j = line.find("//", i)
            if j < 0:
                break
            if line[:j].count('"') % 2 == 0:
                line = line[:j]
                break
            i = j + 2
        out.append(line)
    return "\n".join(out)


def expand_use_groups(text):
    """`crate::a::{b, c::{d, e}}` -> `crate::a::b crate::a::c::d crate::a::c::e`."""
    pat = re.compile(r"((?:crate|super)(?:::\w+)*)::\{")
    while True:
        m = pat.search(text)
        if not m:
            return text
        prefix, start = m.group(1), m.end()
        depth, k = 1, start
        while depth:
            depth += {"{": 1, "}": -1}.get(text[k], 0)
            k += 1
        inner = text[start : k - 1]
        items, depth, cur = [], 0, ""
        for ch in inner:
            if ch == "," and depth == 0:
                items.append(cur)
                cur = ""
                continue
            depth += {"{": 1, "}": -1}.get(ch, 0)
            cur += ch
        items.append(cur)
        expanded = " ".join(
            f"{prefix}::{it.strip()}" if it.strip() not in ("self", "") else prefix
            for it in items
        )
        text = text[: m.start()] + expanded + text[k:]


def main():
    modules = {}
    for root, _, files in os.walk(SRC):
        for f in files:
            if f.endswith(".rs"):
                rel = os.path.relpath(os.path.join(root, f), SRC)
                if rel != "main.rs":
                    modules[module_of(rel)] = rel
    # Inline `mod name {` blocks (tests) are part of their file's module.

    edges = set()
    for mod, rel in modules.items():
        with open(os.path.join(SRC, rel)) as fh:
            text = expand_use_groups(strip_comments(fh.read()))
        # Relative paths resolve against the file's module; `mod.rs`/`lib.rs` are the module.
        for m in re.finditer(r"\b((?:crate|super)(?:::\w+)+)", text):
            segs = m.group(1).split("::")
            if segs[0] == "crate":
                path, segs = [], segs[1:]
            else:
                path = list(mod)
                while segs and segs[0] == "super":
                    path, segs = path[:-1], segs[1:]
            # The longest prefix that is a module is the target.
            target = tuple(path)
            for s in segs:
                if target + (s,) in modules:
                    target = target + (s,)
                else:
                    break
            if target not in modules:
                continue
            # Lift to the children of the lowest common ancestor.
            n = 0
            while n < min(len(mod), len(target)) and mod[n] == target[n]:
                n += 1
            if n == len(mod) or n == len(target):
                continue  # ancestor or descendant
            edges.add((mod[: n + 1], target[: n + 1]))

    name = lambda m: "::".join(m)
    by_parent = {}
    for a, b in sorted(edges):
        by_parent.setdefault(a[:-1], []).append((a, b))
    for parent in sorted(by_parent):
        print(f"# in {name(parent) or 'crate'}")
        for a, b in by_parent[parent]:
            print(f"{name(a)} -> {name(b)}")

    # Cycles: a depth-first search over the lifted edges.
    graph = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
    state, stack, cycles = {}, [], []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, [])):
            if state.get(w) == 1:
                cycles.append(stack[stack.index(w) :] + [w])
            elif w not in state:
                visit(w)
        stack.pop()
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            visit(v)

    # The shadow WAL's files are named in one module only.
    # (The replica's remote keys are strings built by `layout::join`, not local paths.)
    shadow_names = re.compile(
        r'\.join\(\s*"(generation|lineage|wal|generations)"\s*\)|\.wal"|-litestream"'
    )
    leaks = []
    for mod, rel in sorted(modules.items()):
        if rel == "shadow.rs":
            continue
        with open(os.path.join(SRC, rel)) as fh:
            for no, line in enumerate(strip_comments(fh.read()).splitlines(), 1):
                if shadow_names.search(line):
                    leaks.append(f"src/{rel}:{no}: {line.strip()}")

    ok = True
    if cycles:
        ok = False
        for c in cycles:
            print("cycle: " + " -> ".join(name(m) for m in c), file=sys.stderr)
    if leaks:
        ok = False
        for l in leaks:
            print("shadow path built outside src/shadow.rs: " + l, file=sys.stderr)
    if ok:
        print(f"{len(modules)} modules, {len(edges)} dependencies: no cycle; "
              "no shadow path built outside src/shadow.rs")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
