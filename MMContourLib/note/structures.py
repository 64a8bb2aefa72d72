"""What a segment means: the one table of contoured structures (name, colour, terminology codes).

Both segmentation writers read it: the ``.seg.nrrd`` file writer (``image.readwrite``) and the
MRML segmentation node builder (``slicer.mrml``), so a file and a Slicer node say the same thing.

A row is one structure, named in TG-263 style without its side; the side adds the
name suffix (``_L`` / ``_R``) and the terminology's anatomic region modifier. ``CTV`` is the union
of every targeted structure; the other rows are the ESTRO 2015 breast structures, each made of the
sub-regions (``note.targets.REGION_LABELS`` kinds) named in its ``regions``. A clinic that names its
structures otherwise edits this table (names, colours): the network's classes are
``structure_classes()`` of it, and a bundle records the list it was trained with.

Segments that are no row (compare-notes results, named by their note's prompt) are clinical
target volumes: they take the ``CTV`` row's codes and a colour from ``PALETTE`` by position.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Code:
    """A coded concept (DICOM: coding scheme designator, code value, code meaning)."""
    scheme: str
    value: str
    meaning: str

    def __str__(self) -> str:  # Slicer's terminology form
        return f"{self.scheme}^{self.value}^{self.meaning}"


#: Slicer's DICOM master category list has no radiotherapy target (no CTV in any category, Slicer 5.10 to
#: 5.13: Modules/Loadable/Terminologies/Resources/SegmentationCategoryTypeModifier-DICOM-Master.json), so
#: the category and type come from DICOM itself, as the DICOM SEG export writes them (CID 9580 RT Segment
#: Categories: RT Target; SNOMED CT Clinical target volume), in a context of their own that the module
#: registers with Slicer's Terminologies (``terminology_context()``, shipped as TERMINOLOGY_FILE). The
#: anatomic region (Breast, with the side) is in Slicer's DICOM master anatomic list.
CATEGORY_CONTEXT = "Segmentation category and type - MMContour radiotherapy targets"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
TERMINOLOGY_FILE = "Resources/Terminology/SegmentationCategoryTypeModifier-MMContour.json"  # from the root
RT_TARGET = Code("DCM", "130041", "RT Target")
CLINICAL_TARGET_VOLUME = Code("SCT", "228792002", "Clinical target volume")
BREAST = Code("SCT", "76752008", "Breast")
# Anatomic regions of the structures (SNOMED CT, as the TG-263 -> SNOMED CT mapping has them).
CHEST_WALL = Code("SCT", "78904004", "Chest wall structure")
AXILLARY_NODE = Code("SCT", "68171009", "Axillary lymph node structure")
SUPRACLAVICULAR_NODE = Code("SCT", "76838003", "Structure of supraclavicular lymph node")
INTERNAL_MAMMARY_NODE = Code("SCT", "245282001", "Internal mammary lymph node group")
SIDE_MODIFIER = {"left": Code("SCT", "7771000", "Left"), "right": Code("SCT", "24028007", "Right"),
                 "both": Code("SCT", "51440002", "Right and left")}
SIDE_SUFFIX = {"left": "L", "right": "R"}
#: Colours of segments that are not rows of the table, by position (the first is the CTV's).
PALETTE = ((0.90, 0.20, 0.20), (0.15, 0.55, 0.95), (0.20, 0.80, 0.30), (0.95, 0.70, 0.10))


@dataclass(frozen=True)
class Structure:
    name: str  # without the side suffix: "CTV", "CTVp_Breast", "CTVn_L1", "CTVn_IMN"
    color: tuple[float, float, float]
    category: Code = RT_TARGET
    type: Code = CLINICAL_TARGET_VOLUME
    region: Code | None = BREAST
    regions: tuple[str, ...] = ()  # the sub-region kinds (REGION_LABELS keys less the side) it is made of
    description: str = ""  # one line for a clinician

    def name_for(self, side: str | None = None) -> str:
        """The segment name on ``side`` ('left' / 'right'; none or 'both': the plain name)."""
        return f"{self.name}_{SIDE_SUFFIX[side]}" if side in SIDE_SUFFIX else self.name

    def terminology(self, side: str | None = None) -> str:
        """Slicer's terminology entry string:
        context~category~type~typeModifier~anatomicContext~region~regionModifier."""
        region = str(self.region) if self.region else "^^"
        modifier = str(SIDE_MODIFIER[side]) if self.region and side in SIDE_MODIFIER else "^^"
        return f"{CATEGORY_CONTEXT}~{self.category}~{self.type}~^^~{ANATOMIC_CONTEXT}~{region}~{modifier}"


STRUCTURES: dict[str, Structure] = {s.name: s for s in (
    Structure("CTV", PALETTE[0], description="the whole clinical target volume (union of the structures)"),
    Structure("CTVp_Breast", (0.98, 0.60, 0.55), regions=("breast",),
              description="the whole breast after breast-conserving surgery"),
    Structure("CTVp_ChestWall", (0.85, 0.45, 0.80), region=CHEST_WALL, regions=("chestwall",),
              description="the chest wall after mastectomy"),
    Structure("CTVn_L1", (0.20, 0.60, 0.95), region=AXILLARY_NODE, regions=("axilla_l1",),
              description="axillary level 1, lateral to the lateral border of pectoralis minor"),
    Structure("CTVn_L2", (0.10, 0.80, 0.80), region=AXILLARY_NODE, regions=("axilla_l2",),
              description="axillary level 2, behind pectoralis minor"),
    Structure("CTVn_L3", (0.30, 0.80, 0.35), region=AXILLARY_NODE, regions=("axilla_l3",),
              description="axillary level 3, medial to pectoralis minor, below the clavicle"),
    Structure("CTVn_L4", (0.95, 0.80, 0.15), region=SUPRACLAVICULAR_NODE, regions=("supraclavicular",),
              description="level 4, the supraclavicular nodes"),
    Structure("CTVn_IMN", (0.95, 0.50, 0.10), region=INTERNAL_MAMMARY_NODE, regions=("internal_mammary",),
              description="the internal mammary nodes, intercostal spaces 1-3"),
)}
UNION = "CTV"


def structure_classes(table: "dict[str, Structure] | None" = None) -> tuple[str, ...]:
    """The network's foreground classes of a table, in order (class i + 1 is entry i): every row made of
    sub-regions, left then right ("CTVp_Breast_L", "CTVp_Breast_R", "CTVp_ChestWall_L", ...)."""
    rows = (table or STRUCTURES).values()
    return tuple(row.name_for(side) for row in rows if row.regions for side in ("left", "right"))


def structure_for(name: str) -> tuple[Structure | None, str | None]:
    """The table row of a segment name and the side its suffix names: "CTVn_L1_L" -> (CTVn_L1, 'left');
    a name that is no row -> (None, None)."""
    if name in STRUCTURES:
        return STRUCTURES[name], None
    for side, suffix in SIDE_SUFFIX.items():
        if name.endswith("_" + suffix) and name[:-len(suffix) - 1] in STRUCTURES:
            return STRUCTURES[name[:-len(suffix) - 1]], side
    return None, None


def segment_color(name: str, index: int = 0) -> tuple[float, float, float]:
    """The table's colour for a structure; a segment that is no row: the ``index``-th palette colour."""
    row, _ = structure_for(name)
    return row.color if row else palette_color(index)


def palette_color(index: int) -> tuple[float, float, float]:
    return PALETTE[index % len(PALETTE)]


def terminology_entry(name: str = "CTV", side: str | None = None) -> str:
    """The terminology string of segment ``name`` on ``side`` (default: the side its name's suffix says);
    a segment that is no row is a clinical target volume of the breast."""
    row, named_side = structure_for(name)
    return (row or STRUCTURES["CTV"]).terminology(side or named_side)


def terminology_context() -> dict:
    """The terminology context of the table's categories and types, in the JSON form Slicer's
    ``vtkSlicerTerminologiesModuleLogic.LoadTerminologyFromFile`` reads (Testing/test_ui.py checks that
    TERMINOLOGY_FILE is this)."""
    def code(c: Code) -> dict:
        return {"CodingSchemeDesignator": c.scheme, "CodeValue": c.value, "CodeMeaning": c.meaning}

    categories: dict[Code, dict[Code, tuple[float, float, float]]] = {}
    for row in STRUCTURES.values():
        categories.setdefault(row.category, {}).setdefault(row.type, row.color)
    return {"SegmentationCategoryTypeContextName": CATEGORY_CONTEXT,
            "@schema": "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#",
            "SegmentationCodes": {"Category": [
                {**code(category), "showAnatomy": True,
                 "Type": [{**code(kind), "recommendedDisplayRGBValue": [round(255 * v) for v in color]}
                          for kind, color in types.items()]}
                for category, types in categories.items()]}}


__all__ = ["Code", "Structure", "STRUCTURES", "UNION", "structure_classes", "SIDE_MODIFIER", "PALETTE", "structure_for", "segment_color",
           "palette_color", "terminology_entry", "terminology_context", "CATEGORY_CONTEXT", "TERMINOLOGY_FILE"]
