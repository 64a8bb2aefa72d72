"""What a model bundle is, read without torch: its summary for the form and the shipped default bundle.

The Slicer module, its batch script, the worker and the command line all find the default bundle here:
``$MMCONTOUR_BUNDLE`` when set, else ``Resources/Models/demo`` beside the package.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

#: The folder that holds ``MMContourLib/`` and ``Resources/`` (a source checkout or an installed extension).
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
#: The shipped demo bundle, relative to PACKAGE_ROOT: how a scene or setting names "the default bundle".
DEFAULT_BUNDLE = Path("Resources") / "Models" / "demo"


def default_bundle_path() -> Path:
    """``$MMCONTOUR_BUNDLE`` if set, else the shipped demo bundle."""
    env = os.environ.get("MMCONTOUR_BUNDLE")
    return Path(env).expanduser() if env else PACKAGE_ROOT / DEFAULT_BUNDLE


def read_bundle_summary(bundle: str | os.PathLike) -> dict:
    """What the form shows about a bundle without importing torch: name, version, id and the LLM it needs.
    Raises FileNotFoundError / ValueError with a message for the user."""
    path = Path(bundle).expanduser()
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no model bundle at {path} (config.json missing)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file} is not valid JSON: {exc}") from None
    text = config.get("text_encoder") or {}
    return {"name": config.get("name", path.name), "version": str(config.get("version", "")),
            "bundle_id": config.get("bundle_id", ""), "llm_kind": text.get("kind", ""),
            "llm_name": text.get("name", ""), "llm_source": text.get("source", ""),
            "llm_fingerprint": text.get("fingerprint", ""),
            "prompt_template_version": config.get("prompt_template_version", "")}
