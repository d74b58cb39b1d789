#!/usr/bin/env python3
"""Functions longer than a limit (docs/design.md): scripts/long-functions.py [--max N] DIR...

Counts the lines from a `fn` line to its closing brace, test modules
excluded; prints the longest first and exits 1 when one is over the limit.
"""
import os
import re
import sys

args = sys.argv[1:]
limit = 150
if args[:1] == ["--max"]:
    limit, args = int(args[1]), args[2:]
found = []
for top in args:
    for root, _, files in os.walk(top):
        if "/tests" in root or root.endswith("tests"):
            continue
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            lines = open(path).read().split("\n")
            end_of_code = next((i for i, l in enumerate(lines) if l.startswith("#[cfg(test)]")), len(lines))
            for i, l in enumerate(lines[:end_of_code]):
                m = re.match(r"^(\s*)(pub(\([a-z]+\))? )?(const )?(unsafe )?(extern \"C\" )?fn ([a-z_0-9]+)", l)
                if not m or l.rstrip().endswith(";"):
                    continue
                indent = m.group(1)
                for j in range(i + 1, end_of_code):
                    if lines[j] == indent + "}":
                        found.append((j - i + 1, f"{path}:{i + 1}", m.group(7)))
                        break
found.sort(reverse=True)
over = [x for x in found if x[0] > limit]
for n, where, name in found[:10]:
    print(f"{n:5} {where} {name}")
print(f"{len(over)} over {limit} lines")
sys.exit(1 if over else 0)
