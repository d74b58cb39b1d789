#!/usr/bin/env python3
"""Import loops between a crate's top-level modules (docs/design.md).

Usage: scripts/import-loops.py CRATE/src [...]   (EDGES=1 also prints each edge)

A module's dependencies are the `crate::x` paths in its non-test code
(doc links count: they are dependencies of the reader). Exits 1 when a
loop is found, naming its modules.
"""
import os
import re
import sys


def modules(src):
    out = {}
    for root, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            parts = os.path.relpath(path, src)[:-3].split("/")
            if parts[-1] in ("mod", "lib", "main"):
                parts = parts[:-1]
            out["::".join(parts) or "lib"] = open(path).read()
    return out


def deps(name, text, names):
    text = re.sub(r"#\[cfg\(test\)\]\s*mod tests\s*\{.*", "", text, flags=re.S)
    found = set()
    for m in re.finditer(r"crate::((?:[a-z_0-9]+::)*[a-z_0-9]+)", text):
        path = m.group(1).split("::")
        for i in range(len(path), 0, -1):
            if "::".join(path[:i]) in names:
                found.add("::".join(path[:i]))
                break
    for m in re.finditer(r"use crate::\{([^;]*)\};", text, flags=re.S):
        for item in re.split(r",\s*", m.group(1)):
            head = item.strip().split("::")[0].split("{")[0].strip()
            if head in names:
                found.add(head)
    found.discard(name)
    return found


def loops(graph):
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def main():
    sys.setrecursionlimit(10000)
    failed = False
    for src in sys.argv[1:]:
        mods = modules(src)
        names = set(mods)
        top = lambda m: m.split("::")[0]
        graph = {}
        for name, text in mods.items():
            for d in deps(name, text, names):
                if os.environ.get("EDGES"):
                    print(f"{src}: {name} -> {d}")
                if top(d) != top(name):
                    graph.setdefault(top(name), set()).add(top(d))
            graph.setdefault(top(name), set())
        for comp in loops(graph):
            print(f"{src}: import loop: {' -> '.join(comp)}")
            failed = True
        print(f"{src}: {len(graph)} modules checked")
    sys.exit(1 if failed else 0)


main()
