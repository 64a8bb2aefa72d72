"""How a saved scene names the model bundle: "" means the default bundle, so a scene stays valid when the
extension folder moves (it does with every Slicer update) or ``$MMCONTOUR_BUNDLE`` changes."""
from __future__ import annotations

import os
from pathlib import Path

from ..model.bundle_info import DEFAULT_BUNDLE, default_bundle_path


def bundle_reference(path: str | os.PathLike | None) -> str:
    """What the parameter node stores for ``path``: "" for the default bundle (also a shipped demo bundle
    of an earlier install that is gone now, as old scenes saved it), else the path as given."""
    if not path:
        return ""
    given = Path(path).expanduser()
    if given == default_bundle_path():
        return ""
    if not given.exists() and given.parts[-len(DEFAULT_BUNDLE.parts):] == DEFAULT_BUNDLE.parts:
        return ""
    return str(path)


def resolve_bundle(reference: str | os.PathLike | None) -> Path:
    """The bundle folder a stored reference means."""
    return Path(reference).expanduser() if reference else default_bundle_path()
