"""slicer_io against real MRML nodes (the slicer-core wheel): CT node <-> image, masks -> segmentation node.

Runs without the Slicer application and without torch. The end-to-end path through the real worker
and a real Contourer is in test_worker.py.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")

from conftest import make_ct  # noqa: E402
from MMContourLib.slicer import job as slicer_job  # noqa: E402
from MMContourLib.slicer import mrml as slicer_io  # noqa: E402
from MMContourLib.slicer.job import ContourJob  # noqa: E402
from MMContourLib.slicer.mrml import (GeometryError, SegmentationNotEmptyError, SegmentSpec,  # noqa: E402
                                    segment_ids, segment_mask, volume_node_to_image, write_mask_to_segmentation)

OBLIQUE = (0.8, -0.6, 0.0, 0.6, 0.8, 0.0, 0.0, 0.0, 1.0)


@pytest.fixture()
def scene():
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)  # registers the segmentation converters
    yield scene
    logic.SetMRMLScene(None)
    scene.Clear(1)


def _mask_like(image: sitk.Image, box=(slice(4, 14), slice(8, 30), slice(5, 25))) -> sitk.Image:
    array = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    array[box] = 1
    mask = sitk.GetImageFromArray(array)
    mask.CopyInformation(image)
    return mask


def _ct_in_study(scene, image=None):
    """A CT volume node placed Patient > Study > CT in the subject hierarchy, as the DICOM module does."""
    node = slicer_io.image_to_volume_node(scene, image or make_ct(direction=OBLIQUE), "Planning CT")
    sh = scene.GetSubjectHierarchyNode()
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient 1")
    study = sh.CreateStudyItem(patient, "RT planning")
    item = sh.GetItemByDataNode(node) or sh.CreateItem(study, node)
    sh.SetItemParent(item, study)
    return node, study


def _node_count(scene, cls="vtkMRMLSegmentationNode") -> int:
    return scene.GetNumberOfNodesByClass(cls)


# -- volumes --------------------------------------------------------------------------------------

def test_volume_round_trip_keeps_voxels_and_lps_geometry(scene):
    ct = make_ct(direction=OBLIQUE, origin=(-96.5, 80.25, -72.0), spacing=(0.9, 1.1, 3.0))
    node = slicer_io.image_to_volume_node(scene, ct, "CT")
    back = volume_node_to_image(node)
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(ct))
    assert back.GetPixelID() == ct.GetPixelID()
    assert np.allclose(back.GetSpacing(), ct.GetSpacing())
    assert np.allclose(back.GetOrigin(), ct.GetOrigin())
    assert np.allclose(back.GetDirection(), ct.GetDirection())
    # MRML holds RAS: the node's origin is the LPS origin with x and y negated
    assert np.allclose(node.GetOrigin(), (96.5, -80.25, -72.0))


def test_linear_parent_transform_is_folded_in_only_for_world(scene):
    ct = make_ct()
    node = slicer_io.image_to_volume_node(scene, ct, "CT")
    transform = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(transform)
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 10.0)  # +10 mm towards R  ==  -10 mm in LPS x
    transform.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())
    assert np.allclose(volume_node_to_image(node).GetOrigin(), np.add(ct.GetOrigin(), (-10, 0, 0)))
    assert np.allclose(volume_node_to_image(node, world=False).GetOrigin(), ct.GetOrigin())


def test_empty_volume_and_missing_volume_give_clear_errors(scene):
    empty = slicer.vtkMRMLScalarVolumeNode()
    empty.SetName("nothing loaded")
    scene.AddNode(empty)
    with pytest.raises(ValueError, match="no voxel data"):
        volume_node_to_image(empty)
    with pytest.raises(ValueError, match="choose the planning CT"):
        volume_node_to_image(None)


def test_export_volume_writes_a_file_the_worker_reads(scene, tmp_path):
    ct = make_ct(direction=OBLIQUE)
    node = slicer_io.image_to_volume_node(scene, ct, "CT")
    cache = slicer_job.CtFileCache(tmp_path)
    path = cache.path_for(node)
    again = sitk.ReadImage(str(path))
    assert np.array_equal(sitk.GetArrayViewFromImage(again), sitk.GetArrayViewFromImage(ct))
    assert np.allclose(again.GetDirection(), OBLIQUE)
    mtime = path.stat().st_mtime_ns
    assert cache.path_for(node) == path and path.stat().st_mtime_ns == mtime  # unchanged CT: no rewrite
    from vtk.util import numpy_support
    numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())[:] = 7
    node.GetImageData().Modified()  # the user edited the CT: the next Apply must see the edit
    assert (sitk.GetArrayViewFromImage(sitk.ReadImage(str(cache.path_for(node)))) == 7).all()


# -- segmentations ----------------------------------------------------------------------------------

def test_new_segmentation_node_has_the_mask_on_the_ct_grid_and_its_metadata(scene):
    ct_node, study = _ct_in_study(scene)
    ct = volume_node_to_image(ct_node)
    mask = _mask_like(ct)
    provenance = {"bundle": "/bundles/demo", "bundle_id": "abc123", "llm_fingerprint": "sha256:0f0f",
                  "prompt": "N1, breast conserving surgery, left side"}
    node = write_mask_to_segmentation(scene, ct_node, {"CTV": SegmentSpec(mask, (0.9, 0.2, 0.2), "left")}, provenance)

    assert node.GetScene() is scene and node.GetName() == "Planning CT CTV"
    assert segment_ids(node) == ["CTV"]
    segment = node.GetSegmentation().GetSegment("CTV")
    assert segment.GetName() == "CTV"
    assert np.allclose(segment.GetColor(), (0.9, 0.2, 0.2))
    terminology = segment.GetTerminology()
    # DICOM's RT Target category (CID 9580) and CTV type, in the context the module registers (note/structures.py)
    assert terminology.startswith("Segmentation category and type - MMContour radiotherapy targets~"
                                  "DCM^130041^RT Target~SCT^228792002^Clinical target volume~")
    assert terminology.endswith("SCT^7771000^Left") and terminology.count("~") == 6
    for key, value in provenance.items():
        assert node.GetAttribute(f"MMContour.{key}") == value
    assert node.GetAttribute("MMContour.version")
    # the voxels equal the mask on the CT's own grid (reference geometry: test_reference_geometry_matches_ct)
    back = segment_mask(node, "CTV", ct_node)
    assert slicer_io.same_grid(back, ct)
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(mask))
    # placed beside the CT, under its study
    sh = scene.GetSubjectHierarchyNode()
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study
    assert node.GetDisplayNode() is not None


def test_reference_geometry_matches_ct(scene):
    ct_node, _ = _ct_in_study(scene)
    node = write_mask_to_segmentation(scene, ct_node, {"CTV": _mask_like(volume_node_to_image(ct_node))}, {})
    reference = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    expected = slicer.vtkMRMLSegmentationNode()
    expected.SetReferenceImageGeometryParameterFromVolumeNode(ct_node)
    assert node.GetSegmentation().GetConversionParameter(reference) == \
        expected.GetSegmentation().GetConversionParameter(reference)


def test_every_run_creates_a_new_uniquely_named_node_by_default(scene):
    ct_node, _ = _ct_in_study(scene)
    mask = _mask_like(volume_node_to_image(ct_node))
    first = write_mask_to_segmentation(scene, ct_node, {"CTV": mask}, {})
    second = write_mask_to_segmentation(scene, ct_node, {"CTV": mask}, {})
    assert first is not second and first.GetName() != second.GetName()
    assert _node_count(scene) == 2


def test_existing_segmentation_is_never_touched_without_confirmation(scene):
    ct_node, _ = _ct_in_study(scene)
    ct = volume_node_to_image(ct_node)
    users = write_mask_to_segmentation(scene, ct_node, {"Heart": _mask_like(ct, (slice(0, 3),) * 3)}, {})
    users.SetName("my contours")
    users.SetAttribute("clinic.reviewed", "yes")
    before = (segment_ids(users), users.GetMTime(), users.GetSegmentation().GetMTime())

    with pytest.raises(SegmentationNotEmptyError, match="my contours.*already holds 1 segment"):
        write_mask_to_segmentation(scene, ct_node, {"CTV": _mask_like(ct)}, {"prompt": "x"}, target_node=users)
    assert (segment_ids(users), users.GetMTime(), users.GetSegmentation().GetMTime()) == before
    assert users.GetAttribute("MMContour.prompt") is None
    assert _node_count(scene) == 1

    replaced = write_mask_to_segmentation(scene, ct_node, {"CTV": _mask_like(ct)}, {"prompt": "N0"},
                                          target_node=users, replace_confirmed=True)
    assert replaced is users and segment_ids(users) == ["CTV"]
    assert users.GetAttribute("MMContour.prompt") == "N0" and users.GetAttribute("clinic.reviewed") == "yes"
    assert np.array_equal(sitk.GetArrayViewFromImage(segment_mask(users, "CTV", ct_node)),
                          sitk.GetArrayViewFromImage(_mask_like(ct)))


def test_an_empty_chosen_node_is_filled_without_asking(scene):
    ct_node, _ = _ct_in_study(scene)
    empty = slicer.vtkMRMLSegmentationNode()
    empty.SetName("for the CTV")
    scene.AddNode(empty)
    node = write_mask_to_segmentation(scene, ct_node, {"CTV": _mask_like(volume_node_to_image(ct_node))}, {},
                                      target_node=empty)
    assert node is empty and segment_ids(empty) == ["CTV"] and empty.GetName() == "for the CTV"


def test_a_mask_on_another_grid_is_refused_before_the_scene_changes(scene):
    ct_node, _ = _ct_in_study(scene)
    wrong = _mask_like(make_ct(size=(40, 40, 24)))
    good = _mask_like(volume_node_to_image(ct_node))
    nodes_before = scene.GetNumberOfNodes()
    with pytest.raises(GeometryError, match="not on the grid"):
        write_mask_to_segmentation(scene, ct_node, {"CTV": good, "other": wrong}, {})
    assert scene.GetNumberOfNodes() == nodes_before  # not even half a node


def test_ct_outside_a_study_gets_the_result_beside_it(scene):
    ct_node = slicer_io.image_to_volume_node(scene, make_ct(), "CT")
    node = write_mask_to_segmentation(scene, ct_node, {"CTV": _mask_like(volume_node_to_image(ct_node))}, {})
    sh = scene.GetSubjectHierarchyNode()
    assert sh.GetItemParent(sh.GetItemByDataNode(node)) == sh.GetSceneItemID()


def test_segmentation_follows_the_cts_linear_transform(scene):
    ct_node, _ = _ct_in_study(scene)
    transform = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(transform)
    ct_node.SetAndObserveTransformNodeID(transform.GetID())
    node = write_mask_to_segmentation(scene, ct_node, {"CTV": _mask_like(volume_node_to_image(ct_node))}, {})
    assert node.GetTransformNodeID() == transform.GetID()


def test_compare_notes_results_become_one_coloured_segment_per_note(scene, tmp_path):
    ct_node, _ = _ct_in_study(scene)
    ct = volume_node_to_image(ct_node)
    prompts = ["N1, breast conserving surgery, left side", "N1, breast conserving surgery, right side",
               "N0, breast conserving surgery, left side"]
    results = []
    for i, (prompt, side) in enumerate(zip(prompts, ["left", "right", "left"])):
        path = tmp_path / f"m{i}.nrrd"
        sitk.WriteImage(_mask_like(ct, (slice(i, i + 5), slice(5, 20), slice(5, 20))), str(path))
        results.append({"prompt": prompt, "side": side, "mask_path": str(path), "note": {"side": side},
                        "provenance": {"bundle_id": "b1", "llm_fingerprint": "f1", "prompt": prompt}})
    specs = slicer_job.masks_from_results(results)
    node = write_mask_to_segmentation(scene, ct_node, specs, slicer_job.provenance_for(results), name="compare")
    segmentation = node.GetSegmentation()
    names = [segmentation.GetSegment(i).GetName() for i in segment_ids(node)]
    assert names == prompts
    colors = {tuple(segmentation.GetSegment(i).GetColor()) for i in segment_ids(node)}
    assert len(colors) == 3
    right = segmentation.GetSegment(segment_ids(node)[1])
    assert right.GetTerminology().endswith("SCT^24028007^Right")
    tag = vtk.reference("")
    assert right.GetTag("MMContour.prompt", tag) and str(tag) == prompts[1]
    assert node.GetAttribute("MMContour.prompt") == " | ".join(prompts)
    assert node.GetAttribute("MMContour.compared_notes") == "3"
    for i, sid in enumerate(segment_ids(node)):
        expected = _mask_like(ct, (slice(i, i + 5), slice(5, 20), slice(5, 20)))
        assert np.array_equal(sitk.GetArrayViewFromImage(segment_mask(node, sid, ct_node)),
                              sitk.GetArrayViewFromImage(expected))


# -- ContourJob with an injected fake worker client (the real worker: test_worker.py) --------------

class FakeClient:
    """Answers a contour request like the worker does: progress events, then a result with a mask file."""

    def __init__(self, tmp_path, ct_image, fail: str | None = None):
        self.tmp_path, self.ct_image, self.fail = tmp_path, ct_image, fail
        self.sent, self.cancelled, self._queue = [], [], []

    def send(self, op, **fields):
        rid = str(len(self.sent) + 1)
        self.sent.append((op, fields))
        stored = sitk.ReadImage(fields["ct"])
        assert slicer_io.same_grid(stored, self.ct_image)  # the worker reads the CT on its own grid
        self._queue.append({"id": rid, "event": "progress", "stage": "windows", "done": 1, "total": 2})
        if self.fail:
            self._queue.append({"id": rid, "event": "error", "message": self.fail})
            return rid
        results = []
        for i, note in enumerate(fields["notes"]):
            path = self.tmp_path / f"mask-{rid}-{i}.nrrd"
            sitk.WriteImage(_mask_like(self.ct_image), str(path))
            results.append({"note": note, "prompt": f"prompt {i}", "side": note["side"], "mask_path": str(path),
                            "provenance": {"llm_fingerprint": "sha256:ff", "prompt": f"prompt {i}"}})
        self._queue.append({"id": rid, "event": "result", "results": results, "loaded_model": True})
        return rid

    def cancel(self, rid, grace_s=3.0):
        self.cancelled.append(rid)
        self._queue = [{"id": rid, "event": "cancelled"}]

    def poll(self):
        events, self._queue = self._queue[:1], self._queue[1:]
        return events


def test_contour_job_writes_one_node_when_the_result_arrives(scene, tmp_path):
    from MMContourLib.note.clinical import ClinicalNote

    ct_node, _ = _ct_in_study(scene)
    client = FakeClient(tmp_path, volume_node_to_image(ct_node))
    note = ClinicalNote.parse("N1, breast conserving surgery, left side, age 61")
    job = ContourJob(client, scene, ct_node, [note], bundle="/b", workdir=tmp_path).start()
    assert client.sent[0][1]["notes"] == [note.to_fields()]  # structured fields, nothing lost
    assert _node_count(scene) == 0
    job.poll()
    assert job.state == "running" and job.stage == "windows" and (job.done, job.total) == (1, 2)
    assert _node_count(scene) == 0  # nothing in the scene while it runs
    job.wait(timeout=5)
    assert job.state == "done" and _node_count(scene) == 1
    node = job.segmentation_node
    assert segment_ids(node) == ["CTV"] and node.GetAttribute("MMContour.bundle") == "/b"
    assert node.GetName() == "Planning CT CTV (N1 BCS left)"  # results of edited notes are told apart
    assert node.GetAttribute("MMContour.llm_fingerprint") == "sha256:ff"
    assert not list(tmp_path.glob("mask-*.nrrd"))  # temporary masks removed


def test_contour_job_cancel_and_failure_write_nothing(scene, tmp_path):
    ct_node, _ = _ct_in_study(scene)
    ct = volume_node_to_image(ct_node)
    job = ContourJob(FakeClient(tmp_path, ct), scene, ct_node, ["N1, bcs, left side"], bundle="/b",
                     workdir=tmp_path).start()
    job.cancel()
    job.wait(timeout=5)
    assert job.state == "cancelled" and _node_count(scene) == 0

    failing = ContourJob(FakeClient(tmp_path, ct, fail="bundle not found"), scene, ct_node, ["N1, bcs, left side"],
                         bundle="/b", workdir=tmp_path).start().wait(timeout=5)
    assert failing.state == "failed" and "bundle not found" in failing.error and _node_count(scene) == 0


def test_contour_job_refuses_a_non_empty_target_before_sending(scene, tmp_path):
    ct_node, _ = _ct_in_study(scene)
    ct = volume_node_to_image(ct_node)
    users = write_mask_to_segmentation(scene, ct_node, {"Heart": _mask_like(ct)}, {})
    client = FakeClient(tmp_path, ct)
    with pytest.raises(SegmentationNotEmptyError):
        ContourJob(client, scene, ct_node, ["N1, bcs, left side"], bundle="/b", target_node=users,
                   workdir=tmp_path).start()
    assert client.sent == []
    job = ContourJob(client, scene, ct_node, ["N1, bcs, left side", "N0, bcs, right side"], bundle="/b",
                     target_node=users, replace_confirmed=True, workdir=tmp_path).start().wait(timeout=5)
    assert job.segmentation_node is users and len(segment_ids(users)) == 2
    assert json.loads(users.GetAttribute("MMContour.compared_notes")) == 2


def test_a_seg_nrrd_file_and_a_node_say_the_same_about_each_segment(scene, tmp_path):
    from MMContourLib.image.readwrite import read_segmentation, write_segmentation

    ct_node, _ = _ct_in_study(scene)
    ct = volume_node_to_image(ct_node)
    whole, part = _mask_like(ct), _mask_like(ct, (slice(2, 4), slice(5, 9), slice(5, 9)))  # overlapping
    path = write_segmentation(tmp_path / "r.seg.nrrd", {"CTV": whole, "note 2": part}, sides={"CTV": "left"},
                              attributes={"prompt": "N1, breast conserving surgery,\nleft side"})
    back = read_segmentation(path)
    assert list(back) == ["CTV", "note 2"]
    for name, mask in (("CTV", whole), ("note 2", part)):
        assert slicer_io.same_grid(back[name], ct)
        assert np.array_equal(sitk.GetArrayViewFromImage(back[name]), sitk.GetArrayViewFromImage(mask))
    header = sitk.ReadImage(str(path))
    assert header.GetMetaData("MMContour_prompt") == "N1, breast conserving surgery, left side"
    node = slicer_io.build_segmentation(ct_node, {"CTV": SegmentSpec(whole, slicer_io.result_colors(1)[0], "left")})
    segment = node.GetSegmentation().GetSegment("CTV")
    assert header.GetMetaData("Segment0_Tags") == f"TerminologyEntry:{segment.GetTerminology()}|"
    assert np.allclose([float(c) for c in header.GetMetaData("Segment0_Color").split()], segment.GetColor())


def test_segment_mask_reads_back_under_a_linear_transform(scene):
    ct_node = slicer_io.image_to_volume_node(scene, make_ct(direction=OBLIQUE), "CT")
    transform = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(transform)
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 37.0)
    matrix.SetElement(1, 3, -12.5)
    transform.SetMatrixTransformToParent(matrix)
    ct_node.SetAndObserveTransformNodeID(transform.GetID())
    mask = _mask_like(volume_node_to_image(ct_node))  # the worker's grid: where the user sees the CT
    node = write_mask_to_segmentation(scene, ct_node, {"CTV": mask}, {})
    assert node.GetTransformNodeID() == transform.GetID()
    back = segment_mask(node, "CTV", ct_node)
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(mask))


def test_closing_the_scene_during_a_job_writes_nothing_and_raises_nothing(scene, tmp_path):
    """The module's form lives through scene close and load at any moment of a job: the job ends (cancelled
    when the module cancels it at StartClose, failed when the result arrives after the close) and the
    new scene gets no half-result."""
    ct_node, _ = _ct_in_study(scene)
    ct = volume_node_to_image(ct_node)
    job = ContourJob(FakeClient(tmp_path, ct), scene, ct_node, ["N1, bcs, left side"], bundle="/b",
                     workdir=tmp_path).start()
    job.poll()  # progress
    scene.Clear()  # File > Close scene while the worker runs, the module not cancelling it
    job.wait(timeout=5)
    assert job.state == "failed" and "not in this scene" in job.error and _node_count(scene) == 0
    assert not list(tmp_path.glob("mask-*.nrrd"))

    ct_node, _ = _ct_in_study(scene)
    cancelled = ContourJob(FakeClient(tmp_path, volume_node_to_image(ct_node)), scene, ct_node, ["N1, bcs, left side"],
                           bundle="/b", workdir=tmp_path).start()
    cancelled.cancel(grace_s=0)  # what the module does at StartCloseEvent
    scene.Clear()
    cancelled.wait(timeout=5)
    assert cancelled.state == "cancelled" and _node_count(scene) == 0


# -- per-structure results: one segment per structure --------------------------------------------------

STRUCTURE_BOXES = {"CTV": (slice(2, 16), slice(5, 30), slice(5, 30)),
                   "CTVp_Breast_L": (slice(2, 10), slice(5, 30), slice(5, 30)),
                   "CTVn_L1_L": (slice(10, 13), slice(5, 30), slice(5, 30)),
                   "CTVn_IMN_L": (slice(13, 16), slice(5, 30), slice(5, 30))}


class StructureClient(FakeClient):
    """Answers like the worker with a per-structure bundle: ``segments`` in the request's ``structures`` mode
    (the CTV, then each structure drawn) and a summary; the boxes are hand-made, not a model's choice."""

    def send(self, op, **fields):
        rid = str(len(self.sent) + 1)
        self.sent.append((op, fields))
        mode = fields.get("structures", "both")
        names = {"both": list(STRUCTURE_BOXES), "regions": list(STRUCTURE_BOXES)[1:], "union": ["CTV"]}[mode]
        results = []
        for i, note in enumerate(fields["notes"]):
            segments = []
            for name in names:
                path = self.tmp_path / f"mask-{rid}-{i}-{name}.nrrd"
                sitk.WriteImage(_mask_like(self.ct_image, STRUCTURE_BOXES[name]), str(path))
                segments.append({"name": name, "path": str(path)})
            ctv = self.tmp_path / f"mask-{rid}-{i}.nrrd"
            sitk.WriteImage(_mask_like(self.ct_image, STRUCTURE_BOXES["CTV"]), str(ctv))
            results.append({"note": note, "prompt": f"prompt {i}", "side": note["side"], "mask_path": str(ctv),
                            "segments": segments, "structures": mode,
                            "summary": {"prompt": f"prompt {i}", "volume_cc": 1.0, "structures": [],
                                        "review": {"needs_review": False, "flags": [], "notes": []}},
                            "provenance": {"llm_fingerprint": "sha256:ff", "prompt": f"prompt {i}"}})
        self._queue.append({"id": rid, "event": "result", "results": results, "loaded_model": False})
        return rid


def _contour(scene, ct_node, tmp_path, **kwargs):
    client = StructureClient(tmp_path, volume_node_to_image(ct_node))
    job = ContourJob(client, scene, ct_node, ["N1, breast conserving surgery, left side"], bundle="/b",
                     workdir=tmp_path, **kwargs).start().wait(timeout=5)
    assert job.state == "done", job.error
    return job, client


def test_one_segment_per_structure_with_the_table_colours_and_terminology(scene, tmp_path):
    from MMContourLib.note.structures import SIDE_MODIFIER, STRUCTURES

    ct_node, _ = _ct_in_study(scene)
    ct = volume_node_to_image(ct_node)
    job, client = _contour(scene, ct_node, tmp_path)
    assert client.sent[0][1]["structures"] == "both"  # the default asks the worker for both
    node = job.segmentation_node
    assert segment_ids(node) == list(STRUCTURE_BOXES)
    assert node.GetName() == "Planning CT CTV (N1 BCS left)"  # one note: named by it, whatever the segment count
    segmentation = node.GetSegmentation()
    for name, row in (("CTV", "CTV"), ("CTVp_Breast_L", "CTVp_Breast"), ("CTVn_L1_L", "CTVn_L1"),
                      ("CTVn_IMN_L", "CTVn_IMN")):
        segment = segmentation.GetSegment(name)
        assert segment.GetName() == name
        assert np.allclose(segment.GetColor(), STRUCTURES[row].color)
        terminology = segment.GetTerminology()
        region = STRUCTURES[row].region
        assert f"~{region}~{SIDE_MODIFIER['left']}" in terminology, (name, terminology)
        tag = vtk.reference("")
        assert segment.GetTag("MMContour.prompt", tag) and str(tag) == "prompt 0"
        assert segment.GetTag("MMContour.structure", tag) == (name != "CTV")
        assert np.array_equal(sitk.GetArrayViewFromImage(segment_mask(node, name, ct_node)),
                              sitk.GetArrayViewFromImage(_mask_like(ct, STRUCTURE_BOXES[name])))
    assert len({tuple(segmentation.GetSegment(i).GetColor()) for i in segment_ids(node)}) == 4
    assert not list(tmp_path.glob("mask-*.nrrd"))  # every segment's temporary file removed

    regions, _ = _contour(scene, ct_node, tmp_path, structures="regions")
    assert segment_ids(regions.segmentation_node) == list(STRUCTURE_BOXES)[1:]
    union, _ = _contour(scene, ct_node, tmp_path, structures="union")
    assert segment_ids(union.segmentation_node) == ["CTV"]
    with pytest.raises(ValueError, match="structures 'all'"):
        ContourJob(StructureClient(tmp_path, ct), scene, ct_node, ["N1, bcs, left side"], bundle="/b",
                   structures="all")


def test_a_deleted_or_hidden_structure_stays_so_and_the_next_run_is_whole(scene, tmp_path):
    ct_node, _ = _ct_in_study(scene)
    first, _ = _contour(scene, ct_node, tmp_path)
    node = first.segmentation_node
    node.GetSegmentation().RemoveSegment("CTVn_L1_L")  # the user deletes a structure ...
    node.GetDisplayNode().SetSegmentVisibility("CTVn_IMN_L", False)  # ... and hides another
    after_edit = (segment_ids(node), node.GetSegmentation().GetMTime())

    second, _ = _contour(scene, ct_node, tmp_path)  # Apply again into a new segmentation (the default)
    assert second.segmentation_node is not node
    assert segment_ids(second.segmentation_node) == list(STRUCTURE_BOXES)
    assert second.segmentation_node.GetDisplayNode().GetSegmentVisibility("CTVn_IMN_L")
    assert (segment_ids(node), node.GetSegmentation().GetMTime()) == after_edit  # the edited node untouched
    assert not node.GetDisplayNode().GetSegmentVisibility("CTVn_IMN_L")

    # into the edited node itself: refused before the worker is asked, unless the user confirms replacing
    client = StructureClient(tmp_path, volume_node_to_image(ct_node))
    with pytest.raises(SegmentationNotEmptyError):
        ContourJob(client, scene, ct_node, ["N1, bcs, left side"], bundle="/b", target_node=node,
                   workdir=tmp_path).start()
    assert client.sent == [] and segment_ids(node) == after_edit[0]
    replaced, _ = _contour(scene, ct_node, tmp_path, target_node=node, replace_confirmed=True)
    assert replaced.segmentation_node is node and segment_ids(node) == list(STRUCTURE_BOXES)


def test_compare_notes_with_structures_gives_one_ctv_segment_per_note(scene, tmp_path):
    ct_node, _ = _ct_in_study(scene)
    client = StructureClient(tmp_path, volume_node_to_image(ct_node))
    job = ContourJob(client, scene, ct_node, ["N1, bcs, left side", "N0, bcs, left side"], bundle="/b",
                     workdir=tmp_path).start().wait(timeout=5)
    assert client.sent[0][1]["structures"] == "union"  # no per-structure files that no segment would use
    node = job.segmentation_node
    assert [node.GetSegmentation().GetSegment(i).GetName() for i in segment_ids(node)] == ["prompt 0", "prompt 1"]
    assert node.GetName() == "Planning CT CTV by note"
    assert [r["summary"]["prompt"] for r in job.results] == ["prompt 0", "prompt 1"]  # for the compare lines
    assert not list(tmp_path.glob("mask-*.nrrd"))
