"""The MRML side: CT volume nodes <-> SimpleITK images, contour masks -> segmentation nodes.

Only MRML/VTK API is used (no ``slicer.util``, no Qt), so everything here runs against the
``slicer-core`` wheel as well as inside the Slicer application; functions take the ``scene``.
``slicer`` and ``vtk`` are imported inside the functions: importing this module costs nothing
and never needs Slicer.

Rules this module keeps ("nothing the user had is lost"):

* A new segmentation node is created by default, with a unique name.
* A non-empty existing node is modified only when the caller says the user confirmed replacing it
  (``replace_confirmed``); otherwise :class:`SegmentationNotEmptyError` is raised before anything
  is touched.
* A result is built completely in a node outside the scene and only then added (or copied into
  the confirmed target in one step), so the scene never holds a half-written segmentation.

The module's form (widget values <-> ClinicalNote, its status texts) is ``note.form``; one Apply (CT to the
worker, its result into the scene) is ``slicer.job``; the checks of the Python packages the module needs
are ``slicer.requirements``.

Coordinates: MRML is RAS, ITK/SimpleITK is LPS. The voxel grid is shared, so a mask computed on
``volume_node_to_image(ct)`` maps voxel-for-voxel onto the CT.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

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
    # the labelmap comes with the segmentation's parent transform applied, so the reference is in world too
    reference.SetImageToWorldMatrix(_numpy_to_matrix(ijk_to_ras(reference_volume, world=True)))
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


__all__ = ["SegmentSpec", "SegmentationNotEmptyError", "GeometryError", "volume_node_to_image", "image_to_volume_node",
           "export_volume", "build_segmentation", "write_mask_to_segmentation", "segment_mask", "segment_ids",
           "result_colors", "same_grid", "ijk_to_ras"]
