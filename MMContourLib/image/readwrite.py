"""Reading CTs and writing segmentations (files only; the MRML side is slicer/mrml.py)."""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import SimpleITK as sitk

from ..note.structures import segment_color, terminology_entry
from .fileio import OutputGroup, atomic_write
from .nifti import NiftiError, check_nifti, is_nifti
from .grid import check_same_grid


def read_image(path: str | os.PathLike) -> sitk.Image:
    """A CT from a file SimpleITK reads (NIfTI, NRRD, MHA, ...) or from a folder holding one DICOM series.
    A file whose content is not what its name says, a truncated or damaged NIfTI, or a NIfTI with
    NaN / infinite voxels (which ITK would read as 0) is refused with what it really is."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"CT not found: {path}")
    if path.is_dir():
        from .ctseries import read_ct_series

        image, _info = read_ct_series(path)
        return image
    _check_content(path)
    if is_nifti(path):
        info = check_nifti(path)
        if info.nonfinite:
            total = int(np.prod(info.shape))
            what = "all" if info.nonfinite == total else f"{info.nonfinite} of {total}"
            raise NiftiError(f"{path}: {what} voxels are NaN or infinite (undefined values; ITK would read them "
                             "as 0 HU). Re-export the CT from the scanner or planning system")
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ValueError(f"cannot read {path} as an image: {str(exc).strip().splitlines()[-1]}") from None


#: (what the content is, a test on the first bytes), checked in this order.
_SIGNATURES = (
    ("a PNG picture", lambda b: b.startswith(b"\x89PNG\r\n\x1a\n")),
    ("a JPEG picture", lambda b: b.startswith(b"\xff\xd8\xff")),
    ("a TIFF picture", lambda b: b[:4] in (b"II*\x00", b"MM\x00*")),
    ("a BMP picture", lambda b: b.startswith(b"BM") and len(b) > 14),
    ("a PDF document", lambda b: b.startswith(b"%PDF")),
    ("a ZIP archive", lambda b: b.startswith(b"PK\x03\x04")),
    ("a DICOM file (give its series folder instead)", lambda b: b[128:132] == b"DICM"),
    ("an NRRD image", lambda b: b.startswith(b"NRRD")),
    ("a MetaImage (MHA) image", lambda b: b.lstrip().startswith((b"ObjectType", b"NDims"))),
    ("a NIfTI image", lambda b: b[344:348] in (b"n+1\x00", b"ni1\x00") or b[4:8] in (b"n+2\x00", b"ni2\x00")),
)
_EXPECTED = {".nii": "a NIfTI image", ".nii.gz": "a NIfTI image", ".nrrd": "an NRRD image",
             ".mha": "a MetaImage (MHA) image"}


def _check_content(path: Path) -> None:
    """Refuse a file whose first bytes say it is something else than its name says (a PNG named .nii.gz)."""
    name = path.name.lower()
    ext = next((e for e in (".nii.gz", ".nii", ".nrrd", ".mha") if name.endswith(e)), None)
    if ext is None:
        return
    with open(path, "rb") as fh:
        head = fh.read(1024)
    if ext == ".nii.gz":
        if not head.startswith(b"\x1f\x8b"):
            kind = next((k for k, test in _SIGNATURES if test(head)), "not a gzip-compressed file")
            raise ValueError(f"{path} is named like a compressed NIfTI image but is {kind}; give the CT as "
                             "NIfTI, NRRD or MHA, or its DICOM series folder")
        try:
            with gzip.open(path, "rb") as fh:
                head = fh.read(1024)
        except (OSError, EOFError):
            return  # check_nifti names the damage
    kind = next((k for k, test in _SIGNATURES if test(head)), None)
    if kind is not None and kind != _EXPECTED[ext]:
        raise ValueError(f"{path} is named like {_EXPECTED[ext]} but is {kind}; give the CT as NIfTI, NRRD or MHA, "
                         "or its DICOM series folder")


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True,
                group: OutputGroup | None = None) -> Path:
    """Write atomically (``fileio.atomic_write``), verified by reading the file back: ITK's NIfTI writer
    does not report a short write on a full disk. With ``group`` the file is staged there instead (it
    appears with the group's other outputs, or not at all)."""
    return (group.add if group is not None else atomic_write)(
        path, lambda tmp: sitk.WriteImage(image, str(tmp), compress),
        verify=lambda tmp: _same_voxels(tmp, sitk.GetArrayViewFromImage(image)))


def _same_voxels(path: Path, expected: np.ndarray) -> None:
    """Raise unless the image file at ``path`` reads back whole with exactly ``expected``'s voxels."""
    if is_nifti(path):
        check_nifti(path)
    image = sitk.ReadImage(str(path))  # kept: the view below does not keep the image alive
    back = sitk.GetArrayViewFromImage(image)
    if back.shape != expected.shape or not np.array_equal(back, expected):
        raise ValueError("the voxels read back differ from those written")


def write_segmentation(path: str | os.PathLike, masks: Mapping[str, sitk.Image],
                       colors: Mapping[str, tuple[float, float, float]] | None = None,
                       attributes: Mapping[str, str] | None = None, sides: Mapping[str, str] | None = None,
                       group: OutputGroup | None = None, labels: Mapping[str, int] | None = None) -> Path:
    """Write masks (0/1, all on one grid) as a Slicer ``.seg.nrrd`` (slicerio: one layer per segment, so
    overlapping segments such as the CTV and its structures survive; names, colours and terminology from
    ``note.structures``: a structure's row, its side from ``sides`` or its name's suffix; full extents,
    ``MMContour_<key>`` attributes) or, for other extensions, a labelmap: one label per voxel, segment i ->
    label i + 1 (or ``labels[name]``), a later segment drawn over an earlier one where they overlap; a
    ``.nrrd`` labelmap also records ``MMContour_label<value>`` = segment name and the attributes (NIfTI
    keeps neither). ``sides``: segment name -> 'left' / 'right' / 'both'.
    ``group``: staged in that ``OutputGroup`` (as ``write_image``)."""
    path = Path(path)
    if not masks:
        raise ValueError("no segment to write")
    names = list(masks)
    reference = masks[names[0]]
    for name in names[1:]:
        check_same_grid(masks[name], reference, f"segment {name!r} is not on the same grid as {names[0]!r}")
    arrays = [sitk.GetArrayViewFromImage(masks[n]) > 0 for n in names]
    if not str(path).endswith(".seg.nrrd"):
        values = [int((labels or {}).get(name, i + 1)) for i, name in enumerate(names)]
        if any(not 1 <= v <= 255 for v in values) or len(set(values)) != len(values):
            raise ValueError(f"label values {dict(zip(names, values))} must be distinct, 1-255")
        label_map = np.zeros(arrays[0].shape, np.uint8)
        for value, arr in zip(values, arrays):
            label_map[arr] = value
        out = sitk.GetImageFromArray(label_map)
        out.CopyInformation(reference)
        for value, name in zip(values, names):
            out.SetMetaData(f"MMContour_label{value}", name)
        for key, value in (attributes or {}).items():
            out.SetMetaData(f"MMContour_{key}", str(value).replace("\n", " "))
        return write_image(out, path, group=group)
    import slicerio
    from slicerio.segmentation import terminology_entry_from_string

    size = reference.GetSize()
    # One layer per segment (overlaps survive), built here: slicerio.add_segment packs layers and finds a
    # tight extent with np.nonzero over the whole grid, seconds on a clinical CT, for an extent Slicer
    # would mis-read anyway (it reads a shared layer with its first segment's extent).
    layers = [a.transpose(2, 1, 0).view(np.uint8) for a in arrays]  # (i, j, k), the order NRRD stores
    segments = []
    for i, name in enumerate(names):
        segments.append({
            "id": "CTV" if name == "CTV" else f"Segment_{i + 1}", "name": name, "nameAutoGenerated": False,
            "color": [float(c) for c in (colors or {}).get(name, segment_color(name, i))],
            "colorAutoGenerated": False, "labelValue": 1, "layer": i if len(names) > 1 else 0,
            "extent": [0, size[0] - 1, 0, size[1] - 1, 0, size[2] - 1],
            "terminology": terminology_entry_from_string(terminology_entry(name, (sides or {}).get(name)))})
    segmentation = {"voxels": np.stack(layers) if len(layers) > 1 else layers[0],
                    "ijkToLPS": _ijk_to_lps(reference), "segments": segments}
    segmentation["containedRepresentationNames"] = ["Binary labelmap"]
    for key, value in (attributes or {}).items():
        segmentation[f"MMContour_{key}"] = str(value).replace("\n", " ")
    stacked = np.stack(arrays, axis=-1) if len(arrays) > 1 else arrays[0]  # (k, j, i[, layer]) as ITK reads it
    return (group.add if group is not None else atomic_write)(
        path, lambda tmp: slicerio.write_segmentation(str(tmp), segmentation, compression_level=1),
        verify=lambda tmp: _same_voxels(tmp, stacked.view(np.uint8)))


def read_segmentation(path: str | os.PathLike) -> dict[str, sitk.Image]:
    """Segment name -> uint8 mask of a ``.seg.nrrd`` file (ours or Slicer's), on the file's grid."""
    import slicerio

    segmentation = slicerio.read_segmentation(str(path))
    matrix = np.asarray(segmentation["ijkToLPS"], float)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    result = {}
    for segment in segmentation.get("segments", []):
        mask = slicerio.segment_mask(segmentation, segment)  # (i, j, k)
        image = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.uint8))
        image.SetSpacing(spacing.tolist())
        image.SetOrigin(matrix[:3, 3].tolist())
        image.SetDirection((matrix[:3, :3] / spacing).ravel().tolist())
        result[segment["name"]] = image
    return result


def _ijk_to_lps(image: sitk.Image) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = np.asarray(image.GetDirection(), float).reshape(3, 3) * np.asarray(image.GetSpacing(), float)
    matrix[:3, 3] = image.GetOrigin()
    return matrix
