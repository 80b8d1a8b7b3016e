#!/usr/bin/env python3
"""Fails if the gateway's top-level modules import each other in a cycle.

The layers must read top to bottom (http -> registry -> topology -> subscription, and the
broker side below the registry). A module "uses" another when its files mention
`crate::<other>`; binaries (src/bin, main.rs) and the crate root are left out.
"""

import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


def uses() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for root, _, files in os.walk(SRC):
        if os.sep + "bin" in root:
            continue
        for name in files:
            if not name.endswith(".rs"):
                continue
            rel = os.path.relpath(os.path.join(root, name), SRC)[:-3]
            top = rel.split(os.sep)[0]
            if top in ("main", "lib"):
                continue
            text = open(os.path.join(root, name)).read()
            graph.setdefault(top, set()).update(
                m for m in re.findall(r"crate::([a-z_]+)", text) if m != top)
    return graph


def cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    found: set[tuple[str, ...]] = set()

    def walk(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                found.add(tuple(path[path.index(nxt):] + [nxt]))
            else:
                walk(nxt, path + [nxt])

    for start in graph:
        walk(start, [start])
    return found


if __name__ == "__main__":
    found = cycles(uses())
    for cycle in sorted(found):
        print("import cycle: " + " -> ".join(cycle))
    print(f"{len(found)} import cycles between the modules of src/")
    sys.exit(1 if found else 0)
