#!/usr/bin/env python3
"""Replaces one "## " section of a Markdown file (up to the next "## " heading) with
the contents of a file, or appends it; the bench scripts use it for BENCHMARKS.md.

usage: bench/replace-section.py FILE.md "## Heading" SECTION_FILE
"""
import sys

path, head, new = sys.argv[1], sys.argv[2], open(sys.argv[3]).read()
try:
    lines = open(path).read().splitlines(keepends=True)
except FileNotFoundError:
    lines = []
out, i, done = [], 0, False
while i < len(lines):
    if lines[i].rstrip("\n") == head:
        out.append(new + "\n")
        done = True
        i += 1
        while i < len(lines) and not lines[i].startswith("## "):
            i += 1
        continue
    out.append(lines[i])
    i += 1
if not done:
    if not out:
        out.append("# Benchmarks\n\n")
    elif not "".join(out).endswith("\n\n"):
        out.append("\n")
    out.append(new)
open(path, "w").write("".join(out))
