"""Reading CTs and writing segmentations (files only; the MRML side is slicer_io.py)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
import SimpleITK as sitk

#: SNOMED CT codes used in the segment terminology (scheme^value^meaning).
CTV_TYPE = "SCT^228792002^Clinical target volume"
CTV_CATEGORY = "SCT^91723000^Anatomical Structure"
BREAST_REGION = "SCT^76752008^Breast"
SIDE_MODIFIER = {"left": "SCT^7771000^Left", "right": "SCT^24028007^Right", "both": "SCT^51440002^Right and left"}
DEFAULT_COLORS = [(0.90, 0.20, 0.20), (0.15, 0.55, 0.95), (0.20, 0.80, 0.30), (0.95, 0.70, 0.10)]


def terminology_entry(side: str | None = None) -> str:
    """Slicer's terminology string (contextName~category~type~typeModifier~anatomicContext~region~regionModifier)."""
    modifier = SIDE_MODIFIER.get(side or "", "^^")
    return ("Segmentation category and type - DICOM master list~" + CTV_CATEGORY + "~" + CTV_TYPE + "~^^~"
            "Anatomic codes - DICOM master list~" + BREAST_REGION + "~" + modifier)


def read_image(path: str | os.PathLike) -> sitk.Image:
    """A CT from a file SimpleITK reads (NIfTI, NRRD, MHA, ...) or from a folder holding one DICOM series."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CT not found: {path}")
    if path.is_dir():
        try:
            from .dicomrt import read_ct_series
        except ImportError:  # pragma: no cover - dicomrt is part of the package
            read_ct_series = None
        if read_ct_series is not None:
            image, _info = read_ct_series(path)
            return image
        reader = sitk.ImageSeriesReader()
        files = reader.GetGDCMSeriesFileNames(str(path))
        if not files:
            raise ValueError(f"no DICOM series in {path}")
        reader.SetFileNames(files)
        return reader.Execute()
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ValueError(f"cannot read {path} as an image: {str(exc).strip().splitlines()[-1]}") from None


def _atomic_target(path: Path) -> Path:
    """A temp file beside ``path`` with the same (possibly double) suffix, so writers pick the right format."""
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith((".nii.gz", ".seg.nrrd")) else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the result should have ordinary permissions
    return Path(tmp)


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write atomically: a reader never sees a half-written file, and a failure leaves nothing behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_target(path)
    try:
        sitk.WriteImage(image, str(tmp), compress)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_segmentation(path: str | os.PathLike, masks: Mapping[str, sitk.Image],
                       colors: Mapping[str, tuple[float, float, float]] | None = None,
                       attributes: Mapping[str, str] | None = None, sides: Mapping[str, str] | None = None) -> Path:
    """Write masks (uint8 0/1, all on one grid) as a Slicer ``.seg.nrrd`` (one layer per segment,
    names, colours, SNOMED terminology) or, for other extensions, a labelmap (segment i -> label i+1)."""
    path = Path(path)
    if not masks:
        raise ValueError("no segment to write")
    names = list(masks)
    reference = masks[names[0]]
    for name in names[1:]:
        other = masks[name]
        if other.GetSize() != reference.GetSize() or not np.allclose(other.GetOrigin(), reference.GetOrigin()):
            raise ValueError(f"segment {name!r} is not on the same grid as {names[0]!r}")
    arrays = [sitk.GetArrayViewFromImage(masks[n]) > 0 for n in names]
    if not str(path).endswith(".seg.nrrd"):
        labels = np.zeros(arrays[0].shape, np.uint8)
        for i, arr in enumerate(arrays):
            labels[arr] = i + 1
        out = sitk.GetImageFromArray(labels)
        out.CopyInformation(reference)
        return write_image(out, path)
    # Slicer's 4D seg.nrrd: one component per segment (layer), so overlapping segments survive.
    stacked = np.stack([a.astype(np.uint8) for a in arrays], axis=-1)
    out = sitk.GetImageFromArray(stacked, isVector=True) if len(names) > 1 else sitk.GetImageFromArray(stacked[..., 0])
    out.CopyInformation(reference)
    colors = dict(colors or {})
    size = reference.GetSize()
    for i, name in enumerate(names):
        color = colors.get(name, DEFAULT_COLORS[i % len(DEFAULT_COLORS)])
        prefix = f"Segment{i}_"
        out.SetMetaData(prefix + "ID", f"Segment_{i + 1}" if name != "CTV" else "CTV")
        out.SetMetaData(prefix + "Name", name)
        out.SetMetaData(prefix + "NameAutoGenerated", "0")
        out.SetMetaData(prefix + "Color", " ".join(f"{c:.4f}" for c in color))
        out.SetMetaData(prefix + "ColorAutoGenerated", "0")
        out.SetMetaData(prefix + "LabelValue", "1")
        out.SetMetaData(prefix + "Layer", str(i) if len(names) > 1 else "0")
        out.SetMetaData(prefix + "Extent", f"0 {size[0] - 1} 0 {size[1] - 1} 0 {size[2] - 1}")
        side = (sides or {}).get(name)
        out.SetMetaData(prefix + "Tags", f"TerminologyEntry:{terminology_entry(side)}|")
    out.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    out.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    out.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    for key, value in (attributes or {}).items():
        out.SetMetaData(f"MMContour_{key}", str(value).replace("\n", " "))
    return write_image(out, path)


def read_segmentation(path: str | os.PathLike) -> dict[str, sitk.Image]:
    """Inverse of write_segmentation for ``.seg.nrrd`` files: segment name -> uint8 mask."""
    image = sitk.ReadImage(str(path))
    names = []
    i = 0
    while image.HasMetaDataKey(f"Segment{i}_Name"):
        names.append(image.GetMetaData(f"Segment{i}_Name"))
        i += 1
    arr = sitk.GetArrayFromImage(image)
    if arr.ndim == 3:
        arr = arr[..., None]
    result = {}
    for i, name in enumerate(names):
        layer = int(image.GetMetaData(f"Segment{i}_Layer")) if image.HasMetaDataKey(f"Segment{i}_Layer") else 0
        label = int(image.GetMetaData(f"Segment{i}_LabelValue")) if image.HasMetaDataKey(f"Segment{i}_LabelValue") else 1
        mask = sitk.GetImageFromArray((arr[..., layer] == label).astype(np.uint8))
        mask.SetOrigin(image.GetOrigin())
        mask.SetSpacing(image.GetSpacing())
        mask.SetDirection(image.GetDirection())
        result[name] = mask
    return result
