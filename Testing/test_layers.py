"""The package's layers (docs/INTERFACES.md): no import circles, nothing imports upward."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layers():
    spec = importlib.util.spec_from_file_location("import_layers", ROOT / "bench" / "import_layers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("import_layers", module)
    spec.loader.exec_module(module)
    return module


def test_no_circles_and_nothing_imports_upward():
    layers = _layers()
    graph = layers.graph(ROOT / "MMContourLib")
    assert len(graph) > 30  # the scan saw the package, not an empty folder
    assert layers.circles(graph) == []
    assert layers.bad_arrows(graph) == []


def test_every_sub_package_is_in_a_layer():
    layers = _layers()
    subs = {p.name for p in (ROOT / "MMContourLib").iterdir() if (p / "__init__.py").is_file()}
    assert subs == set(layers.LAYERS)


def test_the_model_and_the_note_stay_independent():
    layers = _layers()
    graph = layers.graph(ROOT / "MMContourLib")
    for src, targets in graph.items():
        s = layers.sub_package(src)
        used = {layers.sub_package(t) for t in targets} - {s, None}
        if s == "note":
            assert not used, f"{src} imports {used}"
        if s == "model":
            assert not used & {"training", "inference", "cli", "slicer", "bench", "data", "dicom"}, src


def test_the_checker_finds_a_circle_and_an_upward_arrow():
    layers = _layers()
    graph = {"MMContourLib.note.a": {"MMContourLib.model.b"}, "MMContourLib.model.b": {"MMContourLib.note.a"}}
    assert layers.circles(graph) == [["MMContourLib.model.b", "MMContourLib.note.a"]]
    assert {why.split(":")[0] for _, _, why in layers.bad_arrows(graph)} == {"note imports nothing of ours"}
    up = {"MMContourLib.image.x": {"MMContourLib.dicom.y"}}
    assert layers.bad_arrows(up)[0][2].startswith("upward")
