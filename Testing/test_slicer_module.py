"""MMContour.py's behaviour that can be checked without the Slicer application (issue: the module works in the
Slicer versions people run): what it imports at Slicer start, what it stores in a scene, when the worker starts."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from MMContourLib.model.bundle_info import DEFAULT_BUNDLE, PACKAGE_ROOT
from MMContourLib.slicer.bundle_ref import bundle_reference, resolve_bundle

REPO = Path(__file__).resolve().parent.parent
MODULE_FILE = REPO / "MMContour" / "MMContour.py"


def _tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def _function(name: str, cls: str) -> ast.FunctionDef:
    klass = next(n for n in _tree().body if isinstance(n, ast.ClassDef) and n.name == cls)
    return next(n for n in klass.body if isinstance(n, ast.FunctionDef) and n.name == name)


def _calls(node: ast.AST) -> set[str]:
    return {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", "")
            for n in ast.walk(node) if isinstance(n, ast.Call)}


def _imports_in_subprocess(statements: list[str]) -> list[str]:
    code = "\n".join(statements) + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "MMContour")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_slicer_start_imports_neither_numpy_nor_simpleitk():
    """Every Slicer start runs the module file's top level; our part of it stays light."""
    ours = [ast.unparse(n) for n in _tree().body if isinstance(n, ast.ImportFrom)
            and (n.module or "").split(".")[0] in ("MMContourLib", "MMContourInstall")]
    assert any("MMContourInstall" in s for s in ours) and any("worker" in s for s in ours)
    loaded = _imports_in_subprocess(ours)
    assert not {"numpy", "SimpleITK", "torch", "monai", "transformers"} & set(loaded)


def test_the_phantom_needs_none_of_the_packages_the_module_installs():
    function = next(n for n in _tree().body if isinstance(n, ast.FunctionDef) and n.name == "loadPhantomSample")
    imports = [ast.unparse(n) for n in ast.walk(function) if isinstance(n, ast.ImportFrom)]
    loaded = set(_imports_in_subprocess(imports))
    assert "numpy" in loaded and not {"torch", "monai", "transformers", "accelerate", "gguf"} & loaded
    assert "ensureDependencies" not in _calls(_function("onLoadPhantom", "MMContourWidget"))


def test_showing_the_module_does_not_start_the_worker():
    enter = _calls(_function("enter", "MMContourWidget"))
    assert not {"requestDeviceInfo", "requestInfo", "client", "requestLoad"} & enter
    assert "requestDeviceInfo" in _calls(_function("onLoadModel", "MMContourWidget"))
    assert "requestDeviceInfo" in _calls(_function("run", "MMContourWidget"))


def test_load_model_reports_a_failed_install_in_the_module():
    function = _function("onLoadModel", "MMContourWidget")
    handlers = [n for n in ast.walk(function) if isinstance(n, ast.ExceptHandler)]
    assert handlers and "showLlmStatus" in _calls(handlers[0])


def test_reload_and_test_does_not_skip_inside_run_test():
    assert "skipTest" not in _calls(_function("runTest", "MMContourTest"))


def test_scenes_store_a_portable_reference_to_the_default_bundle(tmp_path, monkeypatch):
    monkeypatch.delenv("MMCONTOUR_BUNDLE", raising=False)
    shipped = PACKAGE_ROOT / DEFAULT_BUNDLE
    assert bundle_reference(shipped) == "" and bundle_reference("") == "" and resolve_bundle("") == shipped
    stale = tmp_path / "Slicer-5.10" / "qt-scripted-modules" / DEFAULT_BUNDLE  # an earlier install, gone now
    assert bundle_reference(stale) == ""
    mine = tmp_path / "my-bundle"
    mine.mkdir()
    assert bundle_reference(mine) == str(mine) and resolve_bundle(str(mine)) == mine
    monkeypatch.setenv("MMCONTOUR_BUNDLE", str(mine))
    assert bundle_reference(mine) == "" and resolve_bundle("") == mine
