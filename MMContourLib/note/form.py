"""The MMContour module's form without Qt: widget values <-> ClinicalNote, the combo-box items, and the
texts the widget shows about the note (warnings, suggested notes to compare), the language model and the devices.

The Slicer widget stores these display strings in its parameter node; the .ui lists the same items
(Testing/test_ui.py checks both against ClinicalNote). Like the rest of MMContourLib this never imports
Slicer or Qt; ``slicer_io`` is the MRML side.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

NOT_STATED = "not stated"
SURGERY_LABELS = {"bcs": "breast-conserving surgery", "mastectomy": "total mastectomy"}
DEVICE_CHOICES = {"auto": "auto", "CPU": "cpu", "GPU": "cuda"}
#: The module's segments choice -> the worker's ``structures`` (``inference.contourer.SEGMENT_MODES``).
STRUCTURE_CHOICES = {"Both": "both", "Structures only": "regions", "CTV only": "union"}


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
            "device": tuple(DEVICE_CHOICES),
            "structures": tuple(STRUCTURE_CHOICES)}


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
    from .clinical import ClinicalNote, other_side

    variants = []
    if note.side in ("left", "right"):
        variants.append(note.replace(side=other_side(note.side)))
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
    ``undecided`` (the parameters to mark for the user: not found, or stated twice with different values),
    ``conflicts`` (what the note states twice, for the status area) and, after ``merge``, ``overridden``
    (parameter -> (the note's value, the user's value) where the user chose differently)."""

    values: dict[str, object]
    tooltips: dict[str, str] = field(default_factory=dict)
    undecided: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    overridden: dict[str, tuple[object, object]] = field(default_factory=dict)


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
                tooltips[parameter] = f"undecided: {reason}: choose"
                values.pop(parameter, None)
    conflicts = tuple(f"the note states {_label_of(x['field'])} twice: " + " and ".join(
        f"'{e['text']}' (characters {e['start']}-{e['end']})" for e in x["evidence"])
        if x["evidence"] else x.get("message", "") for x in reading.conflicts)
    return FormFill(values, tooltips, tuple(undecided), conflicts)


FIELD_LABELS = {"age": "age", "side": "treated side", "t_stage": "T stage", "n_stage": "N stage", "m_stage": "M stage",
                "surgery": "surgery", "chemotherapy": "chemotherapy", "pathology": "pathology"}


def parameter_label(parameter: str) -> str:
    """How the form names a parameter to the user: 'N stage (left)', 'treated side'."""
    for name, parameters in FORM_PARAMETERS.items():
        if parameter in parameters:
            side = "left" if parameter.startswith("left") else "right"
            return FIELD_LABELS[name] + (f" ({side})" if len(parameters) > 1 else "")
    return parameter


def _label_of(key: str) -> str:
    """A reading key ('n_stage', 'n_stage.right') as the form names it."""
    name, _, side = key.partition(".")
    return FIELD_LABELS.get(name, name) + (f" ({side})" if side else "")


def widget_name(parameter: str) -> str:
    """The .ui widget bound to a form parameter (Testing/test_ui.py checks the bindings)."""
    return parameter + ("SpinBox" if parameter == "age" else "ComboBox")


def merge(extracted: FormFill, user_edits: Mapping[str, object]) -> FormFill:
    """The user's edits win over the extraction: an edited parameter takes the user's value, loses the
    extraction's tooltip and is no longer undecided."""
    values = {**extracted.values, **user_edits}
    tooltips = {k: ("set by you" if k in user_edits else v) for k, v in extracted.tooltips.items()}
    tooltips.update({k: "set by you" for k in user_edits})
    overridden = {k: (extracted.values[k], v) for k, v in user_edits.items()
                  if k in extracted.tooltips and k not in extracted.undecided and extracted.values.get(k) != v}
    return FormFill(values, tooltips, tuple(p for p in extracted.undecided if p not in user_edits),
                    extracted.conflicts, overridden)


def _shown(parameter: str, side: str) -> bool:
    """Whether the form shows a parameter for this side (the other side's column is hidden)."""
    return not ((side == "left" and parameter.startswith("right")) or (side == "right" and parameter.startswith("left")))


def _moved(parameter: str, old: str, new: str) -> str:
    return new + parameter[len(old):] if parameter.startswith(old) else parameter


def _for_side(extracted: FormFill, side: str) -> FormFill:
    """The extraction as it applies to the form's current side. A one-sided note's per-side values follow the
    side the user chooses (they describe the one cancer); with 'both', the side the note does not describe
    has no N stage or surgery from it: those are undecided."""
    from .clinical import other_side

    noted = extracted.values.get("side")
    if noted not in ("left", "right") or side == noted:
        return extracted
    other = other_side(noted)
    if side == other:
        return replace(extracted, values={_moved(k, noted, other): v for k, v in extracted.values.items()},
                       tooltips={_moved(k, noted, other): v for k, v in extracted.tooltips.items()},
                       undecided=tuple(_moved(p, noted, other) for p in extracted.undecided))
    missing = (other + "NStage", other + "Surgery")
    tooltips = {**extracted.tooltips, **{p: f"undecided: the pasted note describes only the {noted} side: choose"
                                         for p in missing}}
    return replace(extracted, tooltips=tooltips, undecided=(*extracted.undecided, *missing))


@dataclass
class PastedNote:
    """The Paste note box between widget events: the form filled from the pasted text (``extracted``) and
    the parameters the user set since (``edits``), which win (``merge``)."""

    extracted: FormFill | None = None
    edits: dict[str, object] = field(default_factory=dict)

    def read(self, text: str, scorer=None) -> dict[str, object]:
        """Read a pasted note; returns the form values to set (undecided parameters keep theirs, marked)."""
        from .freetext import read_note

        self.edits = {}
        self.extracted = form_from_reading(read_note(text, scorer)) if text.strip() else None
        return dict(self.extracted.values) if self.extracted else {}

    def side(self) -> str | None:
        return self.edits.get("side", self.extracted.values.get("side") if self.extracted else None)

    def edited(self, parameter: str, value: object) -> dict[str, object]:
        """The user set a parameter (after a paste); returns the form values that follow from it: changing a
        one-sided note's side takes its per-side values (the note's and the user's) to the new column."""
        if self.extracted is None:
            return {}
        old = self.side()
        shown = self.view(old or "both")
        if value == shown.values.get(parameter) and parameter not in shown.undecided:
            return {}  # a field left as it was (a spin box reports every focus change) is not the user's value
        self.edits[parameter] = value
        if parameter != "side" or {old, value} != {"left", "right"}:
            return {}
        self.edits = {_moved(k, old, value): v for k, v in self.edits.items()}
        shown = merge(_for_side(self.extracted, value), self.edits).values
        return {k: v for k, v in shown.items() if k.startswith(value)}

    def view(self, side: str) -> FormFill | None:
        """What the form shows for ``side``: values, tooltips, the undecided parameters and overrides of the
        shown columns, and the note's conflicts. None before a paste."""
        if self.extracted is None:
            return None
        merged = merge(_for_side(self.extracted, side), self.edits)
        return replace(merged, undecided=tuple(p for p in merged.undecided if _shown(p, side)),
                       overridden={k: v for k, v in merged.overridden.items() if _shown(k, side)})

    def display(self, side: str, default_tooltips: Mapping[str, str]) -> "PasteDisplay":
        """Everything the widget shows about the paste for ``side``; tooltips fall back to ``default_tooltips``
        (the .ui's) for every parameter there."""
        view = self.view(side)
        tooltips = {name: (view.tooltips if view else {}).get(name, tip) for name, tip in default_tooltips.items()}
        marked = view.undecided if view else ()
        status = "" if view is None else ("⚠ Choose the marked fields" if marked
                                          else "✓ Form filled: hover a field to see where its value came from")
        return PasteDisplay(tooltips, marked, status, self.blocking(side), tuple(self.warnings(side)))

    def blocking(self, side: str) -> str:
        """Why Apply must wait for the user ('' when it need not)."""
        view = self.view(side)
        if view is None or not view.undecided:
            return ""
        return ("choose what the pasted note leaves open (marked in the form): "
                + ", ".join(parameter_label(p) for p in view.undecided))

    def warnings(self, side: str) -> list[str]:
        """For the status area: the note's conflicts, and each value the user chose differently from the
        note, naming both values (the user's edit wins, but never silently)."""
        view = self.view(side)
        if view is None:
            return []
        noted_tips = _for_side(self.extracted, side).tooltips
        warnings = [f"pasted note: {c}" for c in view.conflicts]
        for parameter, (noted, chosen) in view.overridden.items():
            where = noted_tips.get(parameter, "").partition(": from ")[2]
            warnings.append(f"{parameter_label(parameter)} is '{chosen}' (set by you), but the pasted note says "
                            f"'{noted}'" + (f", from {where}" if where else ""))
        return warnings


@dataclass(frozen=True)
class PasteDisplay:
    """What the widget shows for the Paste note box: every note parameter's tooltip, the parameters to mark
    (undecided), the line under the box, why Apply waits ('' when it need not) and the status area's warnings."""

    tooltips: dict[str, str]
    marked: tuple[str, ...]
    status: str
    blocking: str
    warnings: tuple[str, ...]


def note_status(error: str | None, warnings=(), blocking: str = "") -> tuple[str, str]:
    """The line under the prompt and its kind ('ok', 'warn', 'bad'): the note's error or what the user must
    still choose, then every warning; '✓ Valid note' when there is nothing to say."""
    lines = [f"✗ {error}"] if error else []
    if blocking and not error:
        lines.append(f"✗ {blocking[0].upper()}{blocking[1:]}")
    lines += [f"⚠ {w}" for w in warnings]
    kind = "bad" if error or blocking else "warn" if warnings else "ok"
    return "\n".join(lines) or "✓ Valid note", kind


__all__ = ["NOT_STATED", "SURGERY_LABELS", "DEVICE_CHOICES", "STRUCTURE_CHOICES", "FORM_PARAMETERS", "form_choices", "note_from_form",
           "form_from_note", "note_warnings", "suggest_variants", "llm_location_status", "describe_devices",
           "FormFill", "form_from_reading", "merge", "FIELD_LABELS", "parameter_label", "widget_name", "PastedNote",
           "PasteDisplay", "note_status"]
