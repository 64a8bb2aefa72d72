#!/usr/bin/env python3
"""MMContourLib's import graph against its layers: circles, and arrows that run upward.

Reads every module's imports as text (``ast``; imports inside functions count too), runs nothing.
Usage: ``python3 bench/import_layers.py [MMContourLib]`` -- prints the layers, the line count of each
sub-package, every circle and every upward or forbidden arrow; exits 1 if there is one.
``Testing/test_layers.py`` asserts the same.
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

#: Sub-package -> layer; a module may import its own layer and lower ones, never a higher one.
LAYERS = {
    "note": 0, "image": 1,                  # base
    "data": 2, "dicom": 2,                  # data
    "model": 3,                             # the model
    "inference": 4, "training": 4,          # use
    "cli": 5, "slicer": 5, "bench": 5,      # top
}
LAYER_NAMES = {0: "base (note)", 1: "base (image)", 2: "data", 3: "model", 4: "use", 5: "top"}
#: Arrows that are forbidden although the layer order would allow them.
FORBIDDEN = {("note", sub) for sub in LAYERS if sub != "note"}


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph(root: Path) -> dict[str, set[str]]:
    mods = modules(root)
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def sub_package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in list(g):
        if v not in index:
            strong(v)
    return found


def bad_arrows(g: dict[str, set[str]]) -> list[tuple[str, str, str]]:
    """(importer, imported, why) for every arrow that runs up a layer, or is forbidden, or leaves the layers."""
    bad = []
    for src, targets in sorted(g.items()):
        s = sub_package(src)
        for dst in sorted(targets):
            d = sub_package(dst)
            if s is None or d is None:  # the package root holds only __version__
                if d is not None:
                    bad.append((src, dst, "the package root imports a sub-package"))
                continue
            if s not in LAYERS or d not in LAYERS:
                bad.append((src, dst, f"{s if s not in LAYERS else d} is in no layer"))
            elif (s, d) in FORBIDDEN:
                bad.append((src, dst, f"{s} imports nothing of ours"))
            elif LAYERS[d] > LAYERS[s]:
                bad.append((src, dst, f"upward: {LAYER_NAMES[LAYERS[s]]} -> {LAYER_NAMES[LAYERS[d]]}"))
    return bad


def line_counts(root: Path) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for name, path in modules(root).items():
        counts[sub_package(name) or "(root)"] += len(path.read_text(encoding="utf-8").splitlines())
    return dict(counts)


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else "MMContourLib").resolve()
    g = graph(root)
    found_circles, arrows = circles(g), bad_arrows(g)
    counts = line_counts(root)
    print(f"{len(g)} modules, {sum(len(t) for t in g.values())} imports, {len(found_circles)} circle(s), "
          f"{len(arrows)} upward or forbidden arrow(s)")
    for layer in sorted(set(LAYERS.values()), reverse=True):
        subs = [s for s, l in LAYERS.items() if l == layer]
        print(f"  {LAYER_NAMES[layer]:13s} " + ", ".join(f"{s}/ ({counts.get(s, 0)} lines)" for s in subs))
    for c in found_circles:
        print("  circle: " + " <-> ".join(c))
    for src, dst, why in arrows:
        print(f"  arrow: {src} -> {dst} ({why})")
    return 1 if found_circles or arrows else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
