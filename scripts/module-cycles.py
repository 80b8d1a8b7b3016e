#!/usr/bin/env python3
"""Fails if the gateway's code imports in a cycle, between top-level modules or between
files.

The layers must read top to bottom: server -> connect -> registry -> topology ->
subscription, with the broker side below the registry and the HTTP routes beside
connect. What counts as a use is what the compiler sees: paths in code (`use` items and
paths in expressions, `crate::`, `super::` and `self::` alike), not doc comments or
comments, and not test code (files named tests.rs, model_tests.rs, sim.rs or testing.rs,
and `#[cfg(test)] mod ... { ... }` blocks). Binaries (src/bin, main.rs) and the crate root
(lib.rs, which wires the parts) are left out.

    python3 scripts/module-cycles.py          # exit 1 and the cycles, if any
    python3 scripts/module-cycles.py --graph  # the module graph
"""

import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
TEST_FILES = {"tests.rs", "model_tests.rs", "sim.rs", "testing.rs"}


def strip_comments(text: str) -> str:
    """The code without comments and string literals (which may hold `crate::` too)."""
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r'r#*"(?:.|\n)*?"#*', '""', text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    return re.sub(r"//[^\n]*", "", text)


def strip_test_modules(code: str) -> str:
    """The code without `#[cfg(test)] mod name { ... }` blocks."""
    out = []
    i = 0
    pattern = re.compile(r"#\[cfg\(test\)\]\s*(?:pub(?:\([a-z]+\))?\s+)?mod\s+\w+\s*\{")
    while True:
        m = pattern.search(code, i)
        if not m:
            out.append(code[i:])
            return "".join(out)
        out.append(code[i:m.start()])
        depth, j = 1, m.end()
        while j < len(code) and depth:
            depth += {"{": 1, "}": -1}.get(code[j], 0)
            j += 1
        i = j


def module_of(rel: str) -> list[str]:
    """A file's module path: src/a/b.rs and src/a/b/mod.rs are ["a", "b"]."""
    parts = rel[:-3].split(os.sep)
    if parts[-1] == "mod":
        parts = parts[:-1]
    return parts


def files() -> dict[tuple[str, ...], str]:
    found = {}
    for root, _, names in os.walk(SRC):
        if os.sep + "bin" in root + os.sep:
            continue
        for name in names:
            if not name.endswith(".rs") or name in TEST_FILES:
                continue
            rel = os.path.relpath(os.path.join(root, name), SRC)
            if rel in ("main.rs", "lib.rs"):
                continue
            found[tuple(module_of(rel))] = os.path.join(root, name)
    return found


def paths_used(code: str) -> list[list[str]]:
    """Every path that starts with crate/super/self, with `use` groups expanded."""
    used = []
    for m in re.finditer(r"\buse\s+([^;]+);", code):
        used.extend(expand(re.sub(r"\s+", "", m.group(1))))
    for m in re.finditer(r"\b((?:crate|super|self)(?:::\w+)+)", code):
        used.append(m.group(1).split("::"))
    return [p for p in used if p and p[0] in ("crate", "super", "self")]


def expand(tree: str) -> list[list[str]]:
    """`a::{b, c::{d, e}}` as [[a, b], [a, c, d], [a, c, e]]."""
    if "{" not in tree:
        return [tree.split(" as ")[0].split("::")]
    head, _, rest = tree.partition("{")
    inner = rest[: rest.rindex("}")]
    items, depth, cur = [], 0, ""
    for ch in inner:
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
            continue
        depth += {"{": 1, "}": -1}.get(ch, 0)
        cur += ch
    items.append(cur)
    prefix = [p for p in head.rstrip(":").split("::") if p]
    out = []
    for item in filter(None, items):
        for sub in expand(item):
            out.append(prefix + [s for s in sub if s])
    return out


def resolve(module: tuple[str, ...], path: list[str], known: set) -> tuple[str, ...] | None:
    """The file-level module a path names, from `module`'s point of view."""
    if path[0] == "crate":
        base, rest = [], path[1:]
    else:
        base = list(module)
        rest = path
        # A file's own `super` is its parent module (mod.rs files are their module).
        while rest and rest[0] in ("super", "self"):
            if rest[0] == "super":
                base = base[:-1]
            rest = rest[1:]
    target = None
    for i in range(len(rest) + 1):
        candidate = tuple(base + rest[:i])
        if candidate in known:
            target = candidate
    return target


def graphs():
    known = files()
    file_graph: dict[tuple, set] = {m: set() for m in known}
    for module, path in known.items():
        code = strip_test_modules(strip_comments(open(path).read()))
        for used in paths_used(code):
            target = resolve(module, used, set(known))
            # A module's use of its own children is its table of contents, not a layer.
            if target and target != module and target[: len(module)] != module:
                file_graph[module].add(target)
    top_graph: dict[str, set] = {}
    for module, targets in file_graph.items():
        top_graph.setdefault(module[0], set()).update(t[0] for t in targets if t[0] != module[0])
    return file_graph, top_graph


def cycles(graph: dict) -> set[tuple]:
    found: set[tuple] = set()

    def walk(node, path):
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                cycle = path[path.index(nxt):]
                i = cycle.index(min(cycle))
                found.add(tuple(cycle[i:] + cycle[:i] + [cycle[i]]))
            elif len(path) < 12:
                walk(nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, [start])
    return found


def name(node) -> str:
    return "::".join(node) if isinstance(node, tuple) else node


if __name__ == "__main__":
    file_graph, top_graph = graphs()
    if "--graph" in sys.argv:
        for module in sorted(top_graph):
            print(f"{module} -> {', '.join(sorted(top_graph[module])) or '-'}")
    found = cycles(top_graph) | cycles(file_graph)
    for cycle in sorted(found, key=lambda c: [name(n) for n in c]):
        print("import cycle: " + " -> ".join(name(n) for n in cycle))
    print(f"{len(found)} import cycles between the modules and files of src/")
    sys.exit(1 if found else 0)
