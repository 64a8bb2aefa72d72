"""DICOM in: CT series + RTSTRUCT from a hospital's planning export into images, masks and a training manifest.

``image.ctseries.read_ct_series`` reads one CT series (geometry validated there), ``rtstruct_to_mask``
rasterises the matching structures of an RTSTRUCT onto it, ``rtstruct_to_regions`` also the regions map the
structure names give (``dicom.structure_map``: a hospital's names -> our regions), ``import_dicom`` (``mmcontour import-dicom``) walks a
folder of exports, pairs each CT with its RTSTRUCT, joins the clinical table and writes NIfTI + manifest.csv.
Writing RTSTRUCT / DICOM SEG back is ``dicom.export``.

SimpleITK (GDCM) decodes the CT pixels, so JPEG lossless / JPEG 2000 exports read as well as uncompressed ones;
pydicom reads the headers; matplotlib's ``Path`` fills contour polygons into masks.
"""
from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import os
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from ..image.ctseries import (CTSeriesInfo, DicomError, DicomGeometryError, EmptyContourError,
                              NoMatchingStructureError, WrongSeriesError, _floats, _list_files, _read_header, _text,
                              read_ct_series)
from ..image.fileio import write_text as _write_text
from ..image.readwrite import write_image
from ..data.manifest import MANIFEST_COLUMNS, write_manifest
from ..note.clinical import ClinicalNote
from ..note.targets import REGION_LABELS
from .structure_map import CaseMapping, StructureMap, Verdict, default_structure_map

if TYPE_CHECKING:  # pydicom is imported where it is used
    from pydicom.dataset import Dataset

#: Structure names (fnmatch, case-insensitive) that make up the target; every match is united.
DEFAULT_CTV_PATTERNS = ("CTV", "CTV_*", "CTV[0-9]*", "CTVp", "CTVp_*", "CTVn", "CTVn_*", "CTV-*")
#: Matches of the above that are not the breast/chest-wall + nodal CTV (boost, evaluation, old copies).
DEFAULT_EXCLUDE_PATTERNS = ("z*", "_*", "*boost*", "*_tb", "*_tb_*", "*tumo*bed*", "*eval*", "*old*",
                            "*opt*", "*ptv*", "*ring*", "*^*")
SPLIT_FRACTIONS = (("train", 0.8), ("val", 0.1), ("test", 0.1))


# -- structure names ---------------------------------------------------------------------------------
def match_structures(names: Iterable[str], patterns: Sequence[str] = DEFAULT_CTV_PATTERNS,
                     exclude: Sequence[str] = DEFAULT_EXCLUDE_PATTERNS) -> list[str]:
    """The names that match a pattern and no exclusion (fnmatch, case-insensitive, whole name)."""
    def hit(name, pats):
        return any(fnmatch.fnmatchcase(name.strip().lower(), p.lower()) for p in pats)
    return [n for n in names if hit(n, patterns) and not hit(n, exclude or ())]



# -- RTSTRUCT in --------------------------------------------------------------------------------------
def _roi_names(ds: Dataset) -> dict[int, str]:
    return {int(r.ROINumber): _text(r, "ROIName") for r in ds.get("StructureSetROISequence", [])}


def _referenced_series(ds: Dataset) -> tuple[set[str], set[str], set[str]]:
    """(frames of reference, series UIDs, image SOP instance UIDs) the structure set says it was drawn on."""
    frames, series, sops = set(), set(), set()
    for ref_for in ds.get("ReferencedFrameOfReferenceSequence", []):
        frames.add(_text(ref_for, "FrameOfReferenceUID"))
        for study in ref_for.get("RTReferencedStudySequence", []):
            for ser in study.get("RTReferencedSeriesSequence", []):
                series.add(_text(ser, "SeriesInstanceUID"))
                sops.update(_text(img, "ReferencedSOPInstanceUID") for img in ser.get("ContourImageSequence", []))
    for roi in ds.get("StructureSetROISequence", []):
        frames.add(_text(roi, "ReferencedFrameOfReferenceUID"))
    for roi in ds.get("ROIContourSequence", []):
        for contour in roi.get("ContourSequence", []):
            sops.update(_text(img, "ReferencedSOPInstanceUID") for img in contour.get("ContourImageSequence", []))
    return frames - {""}, series - {""}, sops - {""}


def _check_references(ds: Dataset, info: CTSeriesInfo, label: str) -> None:
    frames, series, sops = _referenced_series(ds)
    if series and info.series_instance_uid not in series:
        raise WrongSeriesError(f"{label} was drawn on CT series {', '.join(sorted(series))}, not on this CT "
                               f"({info.series_instance_uid}): export the series the structures reference")
    if frames and info.frame_of_reference_uid not in frames:
        raise WrongSeriesError(f"{label} is in frame of reference {', '.join(sorted(frames))}, the CT in "
                               f"{info.frame_of_reference_uid}: it belongs to another scan")
    unknown = sops - set(info.sop_instance_uids)
    if unknown:
        raise WrongSeriesError(f"{label} references {len(unknown)} image(s) that are not in CT series "
                               f"{info.series_instance_uid} (e.g. {sorted(unknown)[0]}): export the complete series")


def _fill_polygon(points_ij: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pixel centres (j, i) inside a closed polygon given in continuous (i, j) index coordinates."""
    from matplotlib.path import Path as PolygonPath

    out = np.zeros(shape, bool)
    lo = np.maximum(np.floor(points_ij.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(points_ij.max(axis=0)).astype(int), [shape[1] - 1, shape[0] - 1])
    if (hi < lo).any():
        return out
    ii, jj = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1))
    inside = PolygonPath(points_ij).contains_points(np.column_stack([ii.ravel(), jj.ravel()]))
    out[lo[1]:hi[1] + 1, lo[0]:hi[0] + 1] = inside.reshape(ii.shape)
    return out


def _as_dataset(rtstruct) -> tuple[Dataset, str]:
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.errors import InvalidDicomError

    if isinstance(rtstruct, Dataset):
        return rtstruct, f"RTSTRUCT {_text(rtstruct, 'SOPInstanceUID')}"
    try:
        return pydicom.dcmread(rtstruct), f"RTSTRUCT {rtstruct}"
    except (InvalidDicomError, OSError) as exc:
        raise DicomError(f"cannot read {rtstruct} as DICOM: {exc}") from None


def _open_rtstruct(rtstruct, ct_info: CTSeriesInfo) -> tuple[Dataset, str, dict[int, str]]:
    ds, label = _as_dataset(rtstruct)
    if _text(ds, "Modality").upper() != "RTSTRUCT":
        raise DicomError(f"{label} has modality {_text(ds, 'Modality') or '?'}, not RTSTRUCT")
    _check_references(ds, ct_info, label)
    return ds, label, _roi_names(ds)


def _structure_masks(ds: Dataset, label: str, names: dict[int, str], chosen: set[str], ct_image: sitk.Image,
                     ct_info: CTSeriesInfo) -> Iterator[tuple[str, np.ndarray]]:
    """(name, bool mask in (k, j, i)) for each ROI named in ``chosen``, one at a time (a CT's worth each).

    Contours of one structure on one slice combine by even-odd (an inner contour is a hole)."""
    size = ct_image.GetSize()
    to_index = np.linalg.inv(ct_info.index_to_physical())
    for roi in ds.get("ROIContourSequence", []):
        name = names.get(int(roi.get("ReferencedROINumber", -1)), "")
        if name not in chosen:
            continue
        roi_mask = np.zeros(size[::-1], bool)
        for n, contour in enumerate(roi.get("ContourSequence", [])):
            data = _floats(contour, "ContourData")
            if _text(contour, "ContourGeometricType").upper() != "CLOSED_PLANAR" or data is None or len(data) < 9:
                continue
            points = np.column_stack([data.reshape(-1, 3), np.ones(len(data) // 3)]) @ to_index.T
            k = float(np.round(points[:, 2].mean()))
            if np.abs(points[:, 2] - k).max() > 0.25:
                raise DicomGeometryError(f"{label}: contour {n + 1} of '{name}' does not lie in a slice plane of the "
                                         f"CT (drawn on another image grid?)")
            if not 0 <= k < size[2]:
                raise DicomGeometryError(f"{label}: contour {n + 1} of '{name}' lies outside the CT's slices")
            roi_mask[int(k)] ^= _fill_polygon(points[:, :2], roi_mask.shape[1:])
        yield name, roi_mask


def _as_image(array: np.ndarray, like: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(array.astype(np.uint8))
    out.CopyInformation(like)
    return out


def rtstruct_to_mask(rtstruct, ct_image: sitk.Image, ct_info: CTSeriesInfo,
                     patterns: Sequence[str] = DEFAULT_CTV_PATTERNS,
                     exclude: Sequence[str] = DEFAULT_EXCLUDE_PATTERNS) -> sitk.Image:
    """The union of the structures whose names match ``patterns`` as a uint8 0/1 mask on the CT grid.

    Contours of one structure on one slice combine by even-odd (an inner contour is a hole); structures
    combine by union. The RTSTRUCT must reference this CT series (WrongSeriesError otherwise)."""
    ds, label, names = _open_rtstruct(rtstruct, ct_info)
    chosen = set(match_structures(names.values(), patterns, exclude))
    if not chosen:
        raise NoMatchingStructureError(
            f"{label}: no structure name matches {', '.join(patterns)} (excluding {', '.join(exclude or ())}); "
            f"it has {', '.join(sorted(names.values())) or 'no structures'}. Pass the target's name as a pattern")
    mask = np.zeros(ct_image.GetSize()[::-1], bool)
    for _, roi_mask in _structure_masks(ds, label, names, chosen, ct_image, ct_info):
        mask |= roi_mask
    if not mask.any():
        raise EmptyContourError(f"{label}: the structure(s) {', '.join(sorted(chosen))} have no closed planar "
                                f"contour covering a voxel of the CT")
    return _as_image(mask, ct_image)


#: A regions map is written when the union-only structures add at most this share of the CTV beyond the
#: region structures (separately drawn structures rarely meet voxel for voxel).
UNION_ONLY_TOLERANCE = 0.01


def rtstruct_to_regions(rtstruct, ct_image: sitk.Image, ct_info: CTSeriesInfo, verdicts: Sequence[Verdict]
                        ) -> tuple[sitk.Image, sitk.Image | None, CaseMapping]:
    """(union ctv, regions label map or None, the case's mapping report) from the verdicts on its names.

    The ctv is the union of every target structure (regions and union-only ones). The regions map
    (REGION_LABELS values; a voxel in two regions takes the higher label) is written only when the
    union-only structures ("CTV", "Nodes", a region without a side) add no more than
    UNION_ONLY_TOLERANCE of the ctv: a part that no region describes cannot be labelled."""
    ds, label, names = _open_rtstruct(rtstruct, ct_info)
    mapping = CaseMapping(list(verdicts))
    by_name = {v.name: v for v in verdicts if v.target}
    if not by_name:
        raise NoMatchingStructureError(f"{label}: no structure maps to a target; it has "
                                       f"{', '.join(sorted(names.values())) or 'no structures'}")
    shape = ct_image.GetSize()[::-1]
    ctv, regions, union_only = np.zeros(shape, bool), np.zeros(shape, np.uint8), np.zeros(shape, bool)
    for name, roi_mask in _structure_masks(ds, label, names, set(by_name), ct_image, ct_info):
        ctv |= roi_mask
        if by_name[name].status == "region":
            regions[roi_mask] = np.maximum(regions[roi_mask], REGION_LABELS[by_name[name].region])
        else:
            union_only |= roi_mask
    if not ctv.any():
        raise EmptyContourError(f"{label}: the structure(s) {', '.join(sorted(by_name))} have no closed planar "
                                f"contour covering a voxel of the CT")
    unlabelled = int(np.count_nonzero(ctv & (regions == 0)))
    share = unlabelled / int(np.count_nonzero(ctv))
    unions = sorted(n for n, v in by_name.items() if v.status == "union")
    if not regions.any():
        mapping.regions_note = "no structure maps to a region: the case has the union ctv only"
    elif share > UNION_ONLY_TOLERANCE:
        mapping.regions_note = (f"{', '.join(unions)} (union only) hold {100 * share:.1f} % of the ctv that no "
                                f"region structure covers: the case has the union ctv only")
    else:
        mapping.regions_written = True
        if unlabelled:
            mapping.regions_note = f"{unlabelled} voxel(s) of the ctv ({100 * share:.2f} %) are in no region"
    return _as_image(ctv, ct_image), _as_image(regions, ct_image) if mapping.regions_written else None, mapping


# -- finding studies in an export ---------------------------------------------------------------------
@dataclass
class SeriesRef:
    series_uid: str
    modality: str
    patient_id: str
    study_uid: str
    frame_of_reference_uid: str
    description: str
    files: list[Path] = field(default_factory=list)
    sop_instance_uids: set[str] = field(default_factory=set)


@dataclass
class RTStructRef:
    path: Path
    sop_instance_uid: str
    patient_id: str
    study_uid: str
    frames_of_reference: set[str]
    referenced_series: set[str]
    referenced_sops: set[str]
    roi_names: list[str]
    label: str
    created: str  # StructureSetDate + Time, for choosing the latest
    approved: bool


@dataclass
class Study:
    patient_id: str
    study_uid: str
    series: list[SeriesRef] = field(default_factory=list)
    rtstructs: list[RTStructRef] = field(default_factory=list)

    @property
    def ct_series(self) -> list[SeriesRef]:
        return [s for s in self.series if s.modality.upper() == "CT"]


def find_studies(root: str | os.PathLike, progress: bool = False) -> list[Study]:
    """Every image series (any modality) and RTSTRUCT under ``root``, grouped by study."""
    return _scan_export(root, progress)[0]


def _scan_export(root, progress: bool) -> tuple[list[Study], list[Path]]:
    """(studies, ignored files): files that are not DICOM, or DICOM objects other than images and RTSTRUCTs."""
    studies: dict[str, Study] = {}
    series: dict[str, SeriesRef] = {}
    ignored: list[Path] = []
    for f in _progress(_list_files(root), progress, "scanning DICOM"):
        ds = _read_header(f)
        if ds is None:
            ignored.append(f)
            continue
        key = _text(ds, "StudyInstanceUID")
        study = studies.setdefault(key, Study(_text(ds, "PatientID"), key))
        modality = _text(ds, "Modality").upper()
        if modality == "RTSTRUCT":
            frames, ser, sops = _referenced_series(ds)
            study.rtstructs.append(RTStructRef(
                f, _text(ds, "SOPInstanceUID"), _text(ds, "PatientID"), key, frames, ser, sops,
                list(_roi_names(ds).values()), _text(ds, "StructureSetLabel"),
                _text(ds, "StructureSetDate") + _text(ds, "StructureSetTime"),
                _text(ds, "ApprovalStatus").upper() == "APPROVED"))
        elif "Rows" in ds:
            uid = _text(ds, "SeriesInstanceUID")
            if uid not in series:
                series[uid] = SeriesRef(uid, modality, _text(ds, "PatientID"), key, _text(ds, "FrameOfReferenceUID"),
                                        _text(ds, "SeriesDescription"))
                study.series.append(series[uid])
            series[uid].files.append(f)
            series[uid].sop_instance_uids.add(_text(ds, "SOPInstanceUID"))
        else:
            ignored.append(f)
    return sorted(studies.values(), key=lambda s: (s.patient_id, s.study_uid)), ignored


def _progress(items, enabled, desc):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="file" if "scan" in desc else "case", leave=False)


# -- import-dicom ----------------------------------------------------------------------------------------
@dataclass
class SkippedCase:
    patient_id: str
    reason: str
    message: str
    source: str = ""


@dataclass
class ImportReport:
    out_dir: Path
    manifest: Path
    imported: list[dict] = field(default_factory=list)  # case_id, patient_id, split, structures, series, rtstruct
    skipped: list[SkippedCase] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    ignored_files: int = 0

    def summary(self) -> dict:
        return {"out": str(self.out_dir), "manifest": str(self.manifest), "imported": len(self.imported),
                "skipped": len(self.skipped), "skipped_by_reason": dict(Counter(s.reason for s in self.skipped)),
                "splits": dict(Counter(c["split"] for c in self.imported)), "ignored_files": self.ignored_files,
                "warnings": self.warnings, "skipped_cases": [asdict(s) for s in self.skipped],
                "regions_maps": sum(bool(c.get("structure_map", {}).get("regions_map")) for c in self.imported),
                "unrecognised_structures": dict(Counter(n for c in self.imported
                                                        for n in c.get("structure_map", {}).get("unrecognised", ())))}


def split_for(patient_id: str) -> str:
    """Deterministic split from a hash of the patient id (80/10/10), stable across runs and machines."""
    u = int.from_bytes(hashlib.sha256(patient_id.encode("utf-8")).digest()[:8], "big") / 2 ** 64
    edge = 0.0
    for name, fraction in SPLIT_FRACTIONS:
        edge += fraction
        if u < edge:
            return name
    return SPLIT_FRACTIONS[-1][0]


_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "test": "test", "testing": "test"}


def read_clinical_table(path: str | os.PathLike) -> dict[str, list[dict[str, str]]]:
    """Rows of a CSV (or .tsv) clinical table by ``patient_id`` (column names are matched case-insensitively)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"clinical table not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    reader = csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    if not reader.fieldnames or "patient_id" not in [c.strip().lower() for c in reader.fieldnames]:
        raise ValueError(f"clinical table {path} needs a 'patient_id' column; it has {reader.fieldnames}")
    rows: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in reader:
        clean = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        if clean.get("patient_id"):
            rows[clean["patient_id"]].append(clean)
    return rows


def _case_id(patient_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", patient_id).strip("._") or "case"
    return safe if safe == patient_id else f"{safe}-{hashlib.sha256(patient_id.encode()).hexdigest()[:6]}"


def _note_row(rows: list[dict[str, str]] | None, patient_id: str) -> tuple[ClinicalNote, str]:
    """The patient's note and split; raises _Skip when the clinical table cannot give them."""
    if not rows:
        raise _Skip("missing-clinical-row", f"patient {patient_id!r} has no row in the clinical table")
    if len(rows) > 1 and any(r != rows[0] for r in rows[1:]):
        raise _Skip("invalid-clinical-row", f"patient {patient_id!r} has {len(rows)} different rows in the "
                                            f"clinical table: keep one")
    row = rows[0]
    try:
        note = ClinicalNote.from_row(row)
    except ValueError as exc:
        raise _Skip("invalid-clinical-row", f"patient {patient_id!r}: {exc}") from None
    split = row.get("split", "")
    if split:
        if split.lower() not in _SPLIT_ALIASES:
            raise _Skip("invalid-clinical-row", f"patient {patient_id!r}: split {split!r} is not train, val or test")
        return note, _SPLIT_ALIASES[split.lower()]
    return note, split_for(patient_id)


class _Skip(Exception):
    def __init__(self, reason: str, message: str, source: str = ""):
        super().__init__(message)
        self.reason, self.message, self.source = reason, message, source


def _pair(patient_id: str, all_series: list[SeriesRef], rtstructs: list[RTStructRef],
          select: Callable[[list[str]], list[str]], wanted_text: str, skip: Callable[..., None],
          warn: Callable[[str], None]) -> tuple[SeriesRef, RTStructRef, list[str]] | None:
    """The one CT series + RTSTRUCT to import for a patient; every other candidate is reported."""
    by_uid = {s.series_uid: s for s in all_series}
    cts = [s for s in all_series if s.modality.upper() == "CT"]
    pairs: dict[str, list[tuple[RTStructRef, list[str]]]] = defaultdict(list)
    for rts in rtstructs:
        src = str(rts.path)
        target = [by_uid[u] for u in rts.referenced_series if u in by_uid]
        if not target and rts.referenced_sops:
            target = [s for s in all_series if s.sop_instance_uids & rts.referenced_sops]
        if not target and not rts.referenced_series and not rts.referenced_sops:
            target = [s for s in cts if s.frame_of_reference_uid in rts.frames_of_reference]
        if not target:
            wanted = ", ".join(sorted(rts.referenced_series)) or "frame of reference " + ", ".join(
                sorted(rts.frames_of_reference))
            if not cts:
                skip("no-ct", f"RTSTRUCT {rts.path.name} was drawn on series {wanted}, and the export holds no CT "
                              f"series for patient {patient_id!r}: export the planning CT with it", src)
            else:
                skip("wrong-series", f"RTSTRUCT {rts.path.name} was drawn on series {wanted}, which is not in the "
                     f"export; the export holds CT series {', '.join(s.series_uid for s in cts)}: export the "
                     f"series the structures reference", src)
            continue
        if len(target) > 1:
            skip("several-ct-series", f"RTSTRUCT {rts.path.name} fits {len(target)} series "
                 f"({', '.join(s.series_uid for s in target)}); cannot tell which it was drawn on", src)
            continue
        series = target[0]
        if series.modality.upper() != "CT":
            skip("non-ct-modality", f"RTSTRUCT {rts.path.name} was drawn on a {series.modality} series "
                 f"({series.series_uid}); MMContour trains on planning CTs", src)
            continue
        names = select(rts.roi_names)
        if not names:
            skip("no-matching-structure", f"RTSTRUCT {rts.path.name}: no structure {wanted_text}; it has "
                 f"{', '.join(rts.roi_names) or 'no structures'}", src)
            continue
        pairs[series.series_uid].append((rts, names))
    for s in cts:
        if s.series_uid in pairs or any(s.series_uid in r.referenced_series for r in rtstructs):
            continue
        message = f"CT series {s.series_uid} ('{s.description}', {len(s.files)} images) has no RTSTRUCT in the export"
        if len(pairs) == 1:
            warn(f"{message}; not used")
        elif not rtstructs:  # otherwise the RTSTRUCTs' own reasons say why nothing was paired
            skip("no-rtstruct", message, str(s.files[0].parent))
    if len(pairs) > 1:
        skip("several-ct-series", f"patient {patient_id!r} has a CTV on {len(pairs)} CT series "
             f"({', '.join(pairs)}): cannot tell which is the planning CT; export only that one", "")
        return None
    if not pairs:
        return None
    (series_uid, candidates), = pairs.items()
    candidates.sort(key=lambda c: (c[0].approved, c[0].created, str(c[0].path)), reverse=True)
    chosen = candidates[0]
    for rts, _ in candidates[1:]:
        warn(f"RTSTRUCT {rts.path} not used: {chosen[0].path.name} on the same CT is "
             f"{'approved' if chosen[0].approved else 'newer'}")
    return by_uid[series_uid], chosen[0], chosen[1]


def _verdicts(structure_map: StructureMap, names: list[str], sides: list[str],
              selected: set[str] | None) -> list[Verdict]:
    """The map's verdicts; with ``selected`` (--pattern / --exclude given) the ctv is exactly those names,
    as before the structure map, and the map only labels the regions among them."""
    verdicts = structure_map.classify_all(names, sides)
    for v in verdicts if selected is not None else ():
        if v.name in selected and not v.target:
            v.status, v.reason = "union", f"selected by --pattern ({v.status}: {v.reason})"
        elif v.name not in selected and v.target:
            v.status, v.reason = "ignored", "not selected by --pattern / --exclude"
    return verdicts


def import_dicom(in_dir: str | os.PathLike, clinical_table: str | os.PathLike, out_dir: str | os.PathLike,
                 patterns: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
                 progress: bool = True, overwrite: bool = False,
                 structure_map: StructureMap | None = None) -> ImportReport:
    """Convert a folder of exported planning studies into ``out_dir``: ``cases/<case_id>/ct.nii.gz`` and
    ``ctv.nii.gz`` on the CT grid (+ ``regions.nii.gz`` when the structures are separate regions,
    ``rtstruct_to_regions``), ``manifest.csv`` (what ``mmcontour train`` reads), ``skipped.csv`` and
    ``skipped.json`` (every case not imported, with the reason and what to do), ``import_report.json``
    (per case: what each structure name was mapped to, ignored for, or not recognised).

    The structure map (default: ``structure_map.DEFAULT_RULES``) decides which structures make the ctv;
    ``patterns`` / ``exclude`` (either given) select them by name as before, the map then only labels
    regions. A bad case never stops the batch. ``overwrite`` is needed when ``out_dir`` already holds a manifest."""
    structure_map = structure_map or default_structure_map()
    by_pattern = patterns is not None or exclude is not None
    if not by_pattern:
        select, wanted_text = structure_map.targets, f"maps to a target (structure map: {structure_map.source})"
    else:
        patterns = tuple(patterns or DEFAULT_CTV_PATTERNS)
        exclude = tuple(DEFAULT_EXCLUDE_PATTERNS if exclude is None else exclude)
        select, wanted_text = (lambda names: match_structures(names, patterns, exclude)), "matches " + ", ".join(patterns)
    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.csv"
    if manifest_path.exists() and not overwrite:
        raise FileExistsError(f"{manifest_path} exists: choose another --out or pass --overwrite")
    clinical = read_clinical_table(clinical_table)
    report = ImportReport(out_dir, manifest_path)
    studies, ignored = _scan_export(in_dir, progress)
    report.ignored_files = len(ignored)
    by_patient: dict[str, tuple[list[SeriesRef], list[RTStructRef]]] = defaultdict(lambda: ([], []))
    for study in studies:
        for s in study.series:
            by_patient[s.patient_id][0].append(s)
        for r in study.rtstructs:
            by_patient[r.patient_id][1].append(r)

    rows = []
    for patient_id in _progress(sorted(by_patient), progress, "importing"):
        all_series, rtstructs = by_patient[patient_id]
        before = len(report.skipped)

        def skip(reason, message, source="", _pid=patient_id):
            report.skipped.append(SkippedCase(_pid, reason, message, source))

        try:
            if not patient_id:
                raise _Skip("missing-clinical-row", "the DICOM has no PatientID to join the clinical table", "")
            paired = _pair(patient_id, all_series, rtstructs, select, wanted_text, skip,
                           lambda text, _pid=patient_id: report.warnings.append(f"{_pid}: {text}"))
            if paired is None:
                if len(report.skipped) == before:
                    skip("no-ct", f"patient {patient_id!r} has no CT series with an RTSTRUCT in the export")
                continue
            series, rts, names = paired
            note, split = _note_row(clinical.get(patient_id), patient_id)
            try:
                image, info = read_ct_series(series.files)
                verdicts = _verdicts(structure_map, rts.roi_names, [s.side for s in note.sides],
                                     set(names) if by_pattern else None)
                mask, regions, mapping = rtstruct_to_regions(rts.path, image, info, verdicts)
            except DicomError as exc:
                raise _Skip(exc.reason, str(exc), str(rts.path)) from None
            case_id = _case_id(patient_id)
            case_dir = out_dir / "cases" / case_id
            write_image(image, case_dir / "ct.nii.gz")
            write_image(mask, case_dir / "ctv.nii.gz")
            row = {"case_id": case_id, "ct": f"cases/{case_id}/ct.nii.gz", "ctv": f"cases/{case_id}/ctv.nii.gz",
                   "split": split, **note.to_fields()}
            if regions is not None:
                write_image(regions, case_dir / "regions.nii.gz")
                row["regions"] = f"cases/{case_id}/regions.nii.gz"
            rows.append(row)
            report.imported.append({"case_id": case_id, "patient_id": patient_id, "split": split,
                                    "structures": [v.name for v in verdicts if v.target],
                                    "structure_map": mapping.to_dict(), "ct_series": series.series_uid,
                                    "rtstruct": str(rts.path), "voxels": int(np.count_nonzero(
                                        sitk.GetArrayViewFromImage(mask)))})
            report.warnings.extend(f"{patient_id}: {w}" for w in info.warnings)
        except _Skip as exc:
            skip(exc.reason, exc.message, exc.source)
        except Exception as exc:  # a case the code did not foresee still must not stop the batch
            skip("error", f"{type(exc).__name__}: {exc}")
    for patient_id in sorted(set(clinical) - set(by_patient)):
        report.skipped.append(SkippedCase(patient_id, "no-dicom", f"patient {patient_id!r} is in the clinical table "
                                                                  f"but not in the DICOM export"))

    out_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(manifest_path, sorted(rows, key=lambda r: r["case_id"]))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=("patient_id", "reason", "message", "source"), lineterminator="\n")
    writer.writeheader()
    writer.writerows(asdict(s) for s in report.skipped)
    _write_text(out_dir / "skipped.csv", buffer.getvalue())
    _write_text(out_dir / "skipped.json", json.dumps([asdict(s) for s in report.skipped], indent=2))
    _write_text(out_dir / "import_report.json", json.dumps({**report.summary(), "structure_map": structure_map.source,
                                                            "cases": report.imported}, indent=2))
    return report


__all__ = ["DEFAULT_CTV_PATTERNS", "DEFAULT_EXCLUDE_PATTERNS", "MANIFEST_COLUMNS", "SPLIT_FRACTIONS", "read_ct_series",
           "find_studies", "match_structures", "rtstruct_to_mask", "rtstruct_to_regions", "UNION_ONLY_TOLERANCE", "import_dicom", "ImportReport", "SkippedCase",
           "split_for", "read_clinical_table", "Study", "SeriesRef", "RTStructRef"]
