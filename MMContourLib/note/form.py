"""The MMContour module's form without Qt: widget values <-> ClinicalNote, the combo-box items, and the
texts the widget shows about the note (warnings, suggested notes to compare), the language model and the devices.

The Slicer widget stores these display strings in its parameter node; the .ui lists the same items
(Testing/test_ui.py checks both against ClinicalNote). Like the rest of MMContourLib this never imports
Slicer or Qt; ``slicer_io`` is the MRML side.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

NOT_STATED = "not stated"
SURGERY_LABELS = {"bcs": "breast-conserving surgery", "mastectomy": "total mastectomy"}
DEVICE_CHOICES = {"auto": "auto", "CPU": "cpu", "GPU": "cuda"}


def form_choices() -> dict[str, tuple[str, ...]]:
    """Items of each clinical-note combo box, in order (the first is the default)."""
    from . import clinical as n

    return {"side": ("left", "right", "both"),
            "n_stage": n.N_STAGES,
            "surgery": tuple(SURGERY_LABELS[s] for s in n.SURGERIES),
            "t_stage": (NOT_STATED, *n.T_STAGES),
            "m_stage": (NOT_STATED, *n.M_STAGES),
            "chemotherapy": (NOT_STATED, *n.CHEMOTHERAPIES),
            "pathology": (NOT_STATED, *n.PATHOLOGIES),
            "device": tuple(DEVICE_CHOICES)}


#: ClinicalNote field -> the form parameters that hold it (per-side fields have a left and a right one).
FORM_PARAMETERS = {"age": ("age",), "side": ("side",), "t_stage": ("leftTStage", "rightTStage"),
                   "n_stage": ("leftNStage", "rightNStage"), "surgery": ("leftSurgery", "rightSurgery"),
                   "m_stage": ("mStage",), "chemotherapy": ("chemotherapy",), "pathology": ("pathology",)}


def _stated(value) -> str:
    value = "" if value is None else str(value)
    return "" if value == NOT_STATED else value


def note_from_form(values: Mapping[str, object]):
    """A ClinicalNote from form values (parameter names as in FORM_PARAMETERS; age 0 = not stated).
    Raises NoteError (``.field`` names the field) or ContradictionError with a message for the user."""
    from .clinical import ClinicalNote, normalise_side

    side = normalise_side(values.get("side") or "left")
    sides = ("left", "right") if side == "both" else (side,)

    def per_side(suffix: str) -> str:
        found = {s: _stated(values.get(s + suffix)) for s in sides}
        if len(sides) == 1:
            return found[sides[0]]
        return ";".join(f"{s}:{v}" for s, v in found.items())

    age = values.get("age")
    return ClinicalNote.from_fields(
        side=side, n_stage=per_side("NStage"), surgery=per_side("Surgery"), t_stage=per_side("TStage"),
        age="" if not age else age, m_stage=_stated(values.get("mStage")),
        chemotherapy=_stated(values.get("chemotherapy")), pathology=_stated(values.get("pathology")))


def form_from_note(note) -> dict[str, object]:
    """The form values that reproduce ``note`` (inverse of note_from_form)."""
    values: dict[str, object] = {"side": note.side, "age": note.age or 0,
                                 "mStage": note.m_stage or NOT_STATED,
                                 "chemotherapy": note.chemotherapy or NOT_STATED,
                                 "pathology": note.pathology or NOT_STATED}
    for findings in note.sides:
        values[findings.side + "NStage"] = findings.n_stage
        values[findings.side + "Surgery"] = SURGERY_LABELS[findings.surgery]
        values[findings.side + "TStage"] = findings.t_stage or NOT_STATED
    return values


def note_warnings(note) -> list[str]:
    """Valid notes that still deserve a second look before trusting the contour."""
    warnings = []
    if note.m_stage == "M1":
        warnings.append("M1: the model was trained on non-metastatic patients; review the contour carefully")
    return warnings


def suggest_variants(note) -> list:
    """Up to three informative alternatives to compare (paper Fig. 5): the other side, node-negative
    (or node-positive), and the other surgery."""
    from .clinical import ClinicalNote

    variants = []
    if note.side in ("left", "right"):
        variants.append(note.replace(side="right" if note.side == "left" else "left"))
    nodes = {s.side: s.node_positive for s in note.sides}
    n_values = {s.side: ("N0" if positive else "N1") for s, positive in zip(note.sides, nodes.values())}
    surgeries = {s.side: ("mastectomy" if s.surgery == "bcs" else "bcs") for s in note.sides}
    if len(note.sides) == 1:
        variants.append(note.replace(n_stage=next(iter(n_values.values()))))
        variants.append(note.replace(surgery=next(iter(surgeries.values()))))
    else:
        variants.append(note.replace(n_stage=";".join(f"{s}:{v}" for s, v in n_values.items())))
        variants.append(note.replace(surgery=";".join(f"{s}:{v}" for s, v in surgeries.items())))
    unique = []
    for v in variants:
        if isinstance(v, ClinicalNote) and v != note and v not in unique:
            unique.append(v)
    return unique[:3]


def llm_location_status(summary: Mapping[str, str], llm_path: str | None) -> tuple[str, bool | None]:
    """What the form says about the language model, without loading it: (message, ok). ``ok`` is None when
    only loading can tell (the fingerprint check happens in the worker, see Load model)."""
    import importlib.util

    name = summary.get("llm_name") or "the bundle's language model"
    fingerprint = summary.get("llm_fingerprint", "")
    short = f" (fingerprint {fingerprint.split(':')[-1][:10]}…)" if fingerprint else ""
    if llm_path:
        path = Path(llm_path).expanduser()
        if not path.exists():
            return f"✗ Not found: {path}", False
        if path.is_dir() and not (path / "config.json").is_file():
            return f"✗ {path} is not a model folder (no config.json); choose the folder or a .gguf file", False
        if path.is_file() and path.suffix.lower() != ".gguf":
            return f"✗ {path.name} is not a .gguf file", False
        return f"The bundle needs {name}{short}; this one is checked against it when the model loads", None
    source = summary.get("llm_source", "")
    if source.startswith("pkg:"):
        package = source[4:].partition("/")[0]
        found = importlib.util.find_spec(package) is not None
    else:
        found = bool(source) and Path(source).expanduser().exists()
    if found:
        return f"✓ Uses the bundle's own language model: {name}{short}", True
    return (f"✗ The bundle's language model {name} was not found at {source or '(no location recorded)'}; "
            "choose its folder or .gguf file"), False


def describe_devices(info: Mapping) -> str:
    """One line for the device row from the worker's ``info`` event."""
    if info.get("error"):
        return str(info["error"])
    gpus = info.get("gpus") or []
    if gpus:
        parts = [f"{g['name']}: {g['free_bytes'] / 2**30:.1f} of {g['total_bytes'] / 2**30:.1f} GB free" for g in gpus]
        return "GPU " + "; ".join(parts)
    if info.get("mps"):
        return "Apple GPU (MPS) available; 'auto' uses the CPU"
    return "No GPU found: the CPU is used (slower)"


@dataclass(frozen=True)
class FormFill:
    """Form values read from a pasted note: ``values`` by form parameter, ``tooltips`` (where each came from),
    and ``undecided`` (the parameters to mark for the user: not found, or stated twice with different values)."""

    values: dict[str, object]
    tooltips: dict[str, str] = field(default_factory=dict)
    undecided: tuple[str, ...] = ()


def _parameters(key: str, sides: tuple[str, ...]) -> tuple[str, ...]:
    """Form parameters of a reading key ('n_stage', 'n_stage.left', 'side', ...)."""
    name, _, side = key.partition(".")
    names = FORM_PARAMETERS.get(name, ())
    if len(names) == 1:
        return names
    wanted = (side,) if side else sides or ("left", "right")
    return tuple(n for n in names if n.startswith(wanted))


def _display(key: str, value: str) -> object:
    name = key.partition(".")[0]
    if name == "age":
        return int(value) if value else 0
    if name == "surgery":
        return SURGERY_LABELS[value]
    return value or (NOT_STATED if name in ("t_stage", "m_stage", "chemotherapy", "pathology") else value)


def form_from_reading(reading) -> FormFill:
    """The form filled from a ``freetext.NoteReading``. Per-side values go to the side the note names; when the
    side is undecided they fill both columns, and the side is marked for the user."""
    sides = reading.sides
    values: dict[str, object] = {}
    tooltips: dict[str, str] = {}
    for key, value in reading.values.items():
        for parameter in _parameters(key, sides):
            values[parameter] = _display(key, value)
            found = "; ".join(f"'{e.text}' ({e.rule}, characters {e.start}-{e.end})"
                              for e in reading.evidence.get(key, []))
            tooltips[parameter] = f"{value}: from {found}" if found else f"{value}"
    for name in ("age", "t_stage", "m_stage", "chemotherapy", "pathology"):  # a pasted note replaces old values
        for parameter in _parameters(name, sides):
            values.setdefault(parameter, _display(name, ""))
    undecided: list[str] = []
    for key in [*reading.unresolved, *(x["field"] for x in reading.conflicts)]:
        for parameter in _parameters(key, sides):
            if parameter not in undecided:
                undecided.append(parameter)
                reason = reading.reasons.get(key) or "not found in the note"
                if any(x["field"] == key for x in reading.conflicts):
                    reason = "the note states different values: " + ", ".join(
                        next(x["values"] for x in reading.conflicts if x["field"] == key))
                tooltips[parameter] = f"undecided: {reason}"
                values.pop(parameter, None)
    return FormFill(values, tooltips, tuple(undecided))


def merge(extracted: FormFill, user_edits: Mapping[str, object]) -> FormFill:
    """The user's edits win over the extraction: an edited parameter takes the user's value, loses the
    extraction's tooltip and is no longer undecided."""
    values = {**extracted.values, **user_edits}
    tooltips = {k: ("set by you" if k in user_edits else v) for k, v in extracted.tooltips.items()}
    tooltips.update({k: "set by you" for k in user_edits})
    return FormFill(values, tooltips, tuple(p for p in extracted.undecided if p not in user_edits))


__all__ = ["NOT_STATED", "SURGERY_LABELS", "DEVICE_CHOICES", "FORM_PARAMETERS", "form_choices", "note_from_form",
           "form_from_note", "note_warnings", "suggest_variants", "llm_location_status", "describe_devices",
           "FormFill", "form_from_reading", "merge"]
