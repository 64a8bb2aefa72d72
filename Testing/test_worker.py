"""The warm worker process: protocol, no reload on a note edit (measured), cancel, crash and restart.

Real inference throughout: the tiny random Llama + tiny bundle from conftest.py, small synthetic CTs.
The end-to-end test drives the worker from a real MRML scene exactly as the Slicer widget does.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import make_ct
from MMContourLib.model.bundle_info import read_bundle_summary
from MMContourLib.slicer.worker_client import WorkerClient, explain_exit

pytest.importorskip("torch")

NOTE = "N1, breast conserving surgery, left side"
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # CI shares few cores
REPO = Path(__file__).resolve().parent.parent


def slow_worker() -> WorkerClient:
    """A worker with a slow sliding window (Testing/slow_worker.py), to cancel or kill it mid-run."""
    return WorkerClient(env=THREADS, pythonpath=[str(REPO), str(REPO / "Testing")], module="slow_worker")


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ct") / "ct.nrrd"
    sitk.WriteImage(make_ct(size=(40, 40, 20)), str(path))
    return path


@pytest.fixture(scope="module")
def big_ct_file(tmp_path_factory):
    """Enough sliding windows (8 with the tiny bundle) to cancel in the middle of a run."""
    path = tmp_path_factory.mktemp("ct") / "big.nrrd"
    sitk.WriteImage(make_ct(size=(64, 64, 30)), str(path))
    return path


@pytest.fixture(scope="module")
def client():
    """One warm worker shared by the tests that keep it alive (in file order: the first loads the model)."""
    c = WorkerClient(env=THREADS)
    yield c
    c.close()


@pytest.fixture(scope="module")
def fragile():
    """A slow worker the tests kill; each kill is followed by a restart."""
    c = slow_worker()
    yield c
    c.close()


@pytest.fixture(scope="module")
def slow(tiny_bundle):
    """A slow worker with the tiny model already loaded, to cancel mid-run."""
    c = slow_worker()
    assert c.request("load", bundle=str(tiny_bundle), device="cpu", timeout=120)["event"] == "loaded"
    yield c
    c.close()


def _contour(client, ct, bundle, out, notes=(NOTE,), timeout=120, **extra):
    return client.request("contour", ct=str(ct), notes=list(notes), bundle=str(bundle), device="cpu",
                          out_dir=str(out), timeout=timeout, **extra)


def _progress_until(client, rid, stage, done_at_least, timeout=60):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        for event in client.poll():
            seen.append(event)
            if event.get("id") == rid and event.get("event") == "progress" and event.get("stage") == stage \
                    and event.get("done", 0) >= done_at_least:
                return seen
            assert event.get("event") not in ("result", "error"), event
        time.sleep(0.01)
    raise AssertionError(f"no {stage} progress >= {done_at_least}: {seen}")


def test_contour_then_edit_note_does_not_reload_and_is_fast(client, ct_file, tiny_bundle, tmp_path, record_property):
    from MMContourLib.inference.contourer import Contourer

    t0 = time.perf_counter()
    first = _contour(client, ct_file, tiny_bundle, tmp_path)
    first_s = time.perf_counter() - t0
    assert first["event"] == "result", first
    assert first["loaded_model"] is True and first["loads"] == 1 and first["llm_calls"] == 1
    (result,) = first["results"]
    assert result["prompt"] == NOTE and result["side"] == "left"
    assert result["provenance"]["llm_fingerprint"].startswith("sha256:")
    assert result["provenance"]["bundle"] == str(tiny_bundle.resolve())
    mask = sitk.ReadImage(result["mask_path"])
    ct = sitk.ReadImage(str(ct_file))
    # the worker's mask is the in-process Contourer's mask, on the CT's own grid
    expected = Contourer.from_bundle(tiny_bundle, device="cpu").contour(ct, NOTE).mask
    assert mask.GetSize() == ct.GetSize() and np.allclose(mask.GetOrigin(), ct.GetOrigin())
    assert np.array_equal(sitk.GetArrayViewFromImage(mask), sitk.GetArrayViewFromImage(expected))

    pid = client.pid
    t0 = time.perf_counter()
    second = _contour(client, ct_file, tiny_bundle, tmp_path, notes=["N0, breast conserving surgery, right side"])
    second_s = time.perf_counter() - t0
    assert second["event"] == "result" and client.pid == pid
    assert second["loaded_model"] is False and second["loads"] == 1  # the LLM and U-Net stayed loaded
    assert second["llm_calls"] == 2  # one LLM pass for the new note, none for reloading
    t0 = time.perf_counter()
    third = _contour(client, ct_file, tiny_bundle, tmp_path)  # back to the first note: cached embedding
    third_s = time.perf_counter() - t0
    assert third["llm_calls"] == 2
    print(f"\nfirst Apply {first_s:.2f} s (start worker + load model), edited note {second_s:.3f} s, "
          f"same note again {third_s:.3f} s")
    record_property("first_apply_s", round(first_s, 3))
    record_property("edit_note_apply_s", round(second_s, 3))
    assert second_s < first_s / 3


def test_compare_notes_in_one_request(client, ct_file, tiny_bundle, tmp_path):
    notes = [NOTE, "N1, breast conserving surgery, right side", "N0, breast conserving surgery, left side"]
    calls_before = client.request("load", bundle=str(tiny_bundle), device="cpu", timeout=30)["llm_calls"]
    event = _contour(client, ct_file, tiny_bundle, tmp_path, notes=notes)
    assert [r["prompt"] for r in event["results"]] == notes
    assert [r["side"] for r in event["results"]] == ["left", "right", "left"]
    assert len({r["mask_path"] for r in event["results"]}) == 3
    assert event["llm_calls"] - calls_before == 2  # the first note's embedding was cached


def test_structured_note_fields_reach_the_model_unchanged(client, ct_file, tiny_bundle, tmp_path):
    from MMContourLib.note.clinical import ClinicalNote

    note = ClinicalNote.from_fields(side="both", n_stage="left:N0;right:N2", surgery="left:bcs;right:mastectomy",
                                    age=58, pathology="IDC")
    event = _contour(client, ct_file, tiny_bundle, tmp_path, notes=[note.to_fields()])
    (result,) = event["results"]
    assert result["prompt"] == note.to_prompt() and result["side"] == "both"
    assert result["note"] == note.to_fields()


def test_errors_are_reported_and_the_worker_stays_up(client, ct_file, tiny_bundle, tmp_path):
    pid = client.pid
    missing = client.request("load", bundle=str(tmp_path / "nope"), device="cpu", timeout=60)
    assert missing["event"] == "error" and "bundle folder not found" in missing["message"]
    bad_note = _contour(client, ct_file, tiny_bundle, tmp_path, notes=["N7, bcs, left side"])
    assert bad_note["event"] == "error" and "n_stage" in bad_note["message"]
    assert client.pid == pid and client.alive()
    again = _contour(client, ct_file, tiny_bundle, tmp_path)
    assert again["event"] == "result" and again["loaded_model"] is False  # a bad request did not cost the model


def test_info_reports_devices(client):
    info = client.request("info", timeout=60)
    assert info["event"] == "info" and "torch" in info and isinstance(info["gpus"], list)


def test_cancel_mid_run_keeps_the_model_warm_and_writes_nothing(slow, big_ct_file, tiny_bundle, tmp_path):
    client = slow
    loaded = client.request("load", bundle=str(tiny_bundle), device="cpu", timeout=60)
    assert loaded["event"] == "loaded" and loaded["loaded_model"] is False
    pid = client.pid
    out = tmp_path / "out"
    rid = client.send("contour", ct=str(big_ct_file), notes=[NOTE], bundle=str(tiny_bundle), device="cpu",
                      out_dir=str(out))
    _progress_until(client, rid, "windows", 2)  # of 8
    t0 = time.perf_counter()
    client.cancel(rid, grace_s=10)
    event = client.wait(rid, timeout=30)
    assert event["event"] == "cancelled" and not event.get("killed")
    assert time.perf_counter() - t0 < 5
    assert client.pid == pid and client.alive()
    assert not list(out.glob("*.nrrd"))
    again = _contour(client, big_ct_file, tiny_bundle, out)
    assert again["event"] == "result" and again["loaded_model"] is False


# -- end to end: MRML scene -> worker -> segmentation node (what the Slicer widget does) ------------

def test_slicer_scene_to_segmentation_through_the_warm_worker(client, tiny_bundle, tmp_path):
    slicer = pytest.importorskip("slicer")
    from MMContourLib.slicer import mrml as slicer_io
    from MMContourLib.slicer.job import ContourJob, CtFileCache
    from MMContourLib.inference.contourer import Contourer

    scene = slicer.vtkMRMLScene()
    slicer.vtkSlicerSegmentationsModuleLogic().SetMRMLScene(scene)
    ct_node = slicer_io.image_to_volume_node(
        scene, make_ct(size=(40, 40, 20), direction=(0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)), "CT")
    cache = CtFileCache(tmp_path)
    job = ContourJob(client, scene, ct_node, [NOTE], bundle=str(tiny_bundle), device="cpu",
                               ct_cache=cache, workdir=tmp_path).start()
    stages = []
    job.wait(timeout=120, on_event=lambda e: stages.append(e.get("stage")))
    assert job.state == "done", job.error
    assert {"read-ct", "encode-note", "windows", "postprocess"} <= set(stages)
    node = job.segmentation_node
    expected = Contourer.from_bundle(tiny_bundle, device="cpu").contour(slicer_io.volume_node_to_image(ct_node), NOTE)
    got = slicer_io.segment_mask(node, "CTV", ct_node)
    assert np.array_equal(sitk.GetArrayViewFromImage(got), sitk.GetArrayViewFromImage(expected.mask))
    assert node.GetAttribute("MMContour.prompt") == NOTE
    assert node.GetAttribute("MMContour.llm_fingerprint") == expected.provenance["llm_fingerprint"]
    assert node.GetAttribute("MMContour.bundle") == str(tiny_bundle.resolve())

    # edit the note, Apply again: same worker, no reload, a second node (the first is kept)
    job2 = ContourJob(client, scene, ct_node, ["N0, breast conserving surgery, left side"],
                                bundle=str(tiny_bundle), device="cpu", ct_cache=cache, workdir=tmp_path).start()
    job2.wait(timeout=60)
    assert job2.state == "done" and job2.loaded_model is False
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2
    assert json.loads(json.dumps(job2.results))[0]["prompt"].startswith("N0")


def test_wrong_llm_is_refused_with_a_clear_message(client, tiny_bundle, other_llm_dir):
    event = client.request("load", bundle=str(tiny_bundle), llm=str(other_llm_dir), device="cpu", timeout=60)
    assert event["event"] == "error" and "fingerprint" in event["message"]


# -- workers that get killed ------------------------------------------------------------

@pytest.mark.skipif(sys.platform == "win32", reason="process groups are POSIX; Windows uses taskkill /T")
def test_hard_cancel_kills_the_whole_process_tree_and_next_request_restarts(fragile, big_ct_file, tiny_bundle,
                                                                          tmp_path):
    client = fragile
    out = tmp_path / "out"
    rid = client.send("contour", ct=str(big_ct_file), notes=[NOTE], bundle=str(tiny_bundle), device="cpu",
                      out_dir=str(out))
    _progress_until(client, rid, "windows", 1)
    pgid = os.getpgid(client.pid)
    assert pgid == client.pid  # the worker leads its own process group
    client.cancel(rid, grace_s=0)
    event = client.wait(rid, timeout=30)
    assert event == {"id": rid, "event": "cancelled", "killed": True}
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)  # nothing of the tree is left
    assert not client.alive() and not list(out.glob("*.nrrd"))
    starts = client.starts
    again = _contour(client, big_ct_file, tiny_bundle, out)
    assert again["event"] == "result" and again["loaded_model"] is True and client.starts == starts + 1


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_worker_death_is_reported_and_the_next_request_starts_a_new_one(fragile, big_ct_file, tiny_bundle, tmp_path):
    client = fragile
    starts = client.starts
    rid = client.send("contour", ct=str(big_ct_file), notes=[NOTE], bundle=str(tiny_bundle), device="cpu",
                      out_dir=str(tmp_path))
    _progress_until(client, rid, "windows", 1)
    os.kill(client.pid, signal.SIGKILL)  # what the kernel's OOM killer does
    events = []
    event = client.wait(rid, timeout=30, on_event=events.append)
    assert event["event"] == "error" and event["kind"] == "WorkerDied"
    assert "killed" in event["message"] and "memory" in event["message"]
    died = [e for e in events if e["event"] == "died"]
    assert died and died[0]["returncode"] == -signal.SIGKILL and rid in died[0]["pending"]
    assert not client.alive()
    again = _contour(client, big_ct_file, tiny_bundle, tmp_path)
    assert again["event"] == "result" and client.starts == starts + 1


def test_worker_exits_when_its_client_goes_away(tiny_bundle):
    client = WorkerClient(env=THREADS)
    assert client.request("ping", timeout=60)["event"] == "pong"
    process = client._process
    process.stdin.close()  # Slicer quit or crashed
    assert process.wait(timeout=30) == 0


def test_exit_explanations_are_actionable():
    assert "memory" in explain_exit(-9)
    assert "memory" in explain_exit(1, "RuntimeError: CUDA out of memory. Tried to allocate 2 GiB")
    assert "crashed" in explain_exit(-11)
    assert "status 3" in explain_exit(3)


def test_bundle_summary_names_the_llm_without_torch(tiny_bundle):
    summary = read_bundle_summary(tiny_bundle)
    assert summary["name"] == "tiny-test" and summary["llm_name"] == "tiny-llama"
    assert summary["llm_fingerprint"].startswith("sha256:")
    with pytest.raises(FileNotFoundError, match="no model bundle"):
        read_bundle_summary(tiny_bundle.parent / "missing")


# -- headless batch: Resources/scripts/mmcontour_batch.py ----------------------------------------------

BATCH = Path(__file__).resolve().parent.parent / "Resources" / "scripts" / "mmcontour_batch.py"


def _batch(*args, timeout=180):
    import subprocess

    env = {**os.environ, **THREADS, "PYTHONPATH": ""}  # the script finds MMContourLib itself
    return subprocess.run([sys.executable, str(BATCH), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def batch_manifest(tmp_path_factory):
    folder = tmp_path_factory.mktemp("batch")
    (folder / "cts").mkdir()
    sitk.WriteImage(make_ct(size=(40, 40, 20)), str(folder / "cts" / "a.nrrd"))
    sitk.WriteImage(make_ct(size=(36, 40, 20), seed=1), str(folder / "cts" / "b.nrrd"))
    ctv = sitk.Cast(sitk.ReadImage(str(folder / "cts" / "a.nrrd")) > 0, sitk.sitkUInt8)
    sitk.WriteImage(ctv, str(folder / "cts" / "a_ctv.nrrd"))
    (folder / "cts" / "broken.nrrd").write_text("this is not an image")
    rows = ["case_id,ct,ctv,split,side,n_stage,surgery,age",
            "a,cts/a.nrrd,cts/a_ctv.nrrd,test,left,N1,bcs,61",
            "b,cts/b.nrrd,,test,both,left:N0;right:N2,left:bcs;right:mastectomy,",
            "broken,cts/broken.nrrd,,later,left,N1,bcs,",
            "c,cts/a.nrrd,,later,right,N0,bcs,"]
    (folder / "cases.csv").write_text("\n".join(rows) + "\n")
    return folder / "cases.csv"


def test_batch_contours_every_case_writes_a_summary_and_resumes(batch_manifest, tiny_bundle, tmp_path):
    from MMContourLib.image.readwrite import read_segmentation
    from MMContourLib.inference.contourer import Contourer

    out = tmp_path / "out"
    done = _batch("--", "--manifest", batch_manifest, "--bundle", tiny_bundle, "--out", out, "--device", "cpu",
                  "--split", "test")  # the leading "--" is what Slicer passes through
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["contoured"] == 2 and summary["failed"] == []
    assert [c["case_id"] for c in summary["cases"]] == ["a", "b"] and "dice" in summary["cases"][0]
    assert 0.0 <= summary["cases"][0]["dice"] <= 1.0
    assert summary["cases"][0]["segmentation"] == "a.seg.nrrd" and summary["cases"][0]["volume_cc"] > 0
    assert summary["cases"][1]["prompt"] == ("N0, breast conserving surgery, left side; "
                                             "N2, total mastectomy surgery, right side")
    assert summary["model"]["llm_fingerprint"].startswith("sha256:") and summary["llm_calls"] == 2
    segments = read_segmentation(out / "a.seg.nrrd")
    expected = Contourer.from_bundle(tiny_bundle, device="cpu").contour(
        sitk.ReadImage(str(batch_manifest.parent / "cts" / "a.nrrd")), "N1, breast conserving surgery, left side")
    assert np.array_equal(sitk.GetArrayViewFromImage(segments["CTV"]), sitk.GetArrayViewFromImage(expected.mask))
    header = sitk.ReadImage(str(out / "a.seg.nrrd"))
    assert "DCM^130041^RT Target~SCT^228792002^" in header.GetMetaData("Segment0_Tags")

    # the whole manifest: a and b are kept, c is contoured, the broken CT fails without stopping the batch
    again = _batch("--manifest", batch_manifest, "--bundle", tiny_bundle, "--out", out, "--device", "cpu")
    assert again.returncode == 1 and "1 case(s) failed: broken" in again.stderr
    summary = json.loads((out / "summary.json").read_text())
    status = {c["case_id"]: c["status"].split()[0] for c in summary["cases"]}
    assert status == {"a": "skipped", "b": "skipped", "broken": "failed", "c": "ok"}
    assert summary["status"] == "failed" and summary["failed"] == ["broken"]
    assert (out / "c.seg.nrrd").exists() and not (out / "broken.seg.nrrd").exists()


def test_batch_rejects_a_bad_manifest_before_loading_the_model(batch_manifest, tiny_bundle, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("case_id,ct,side,n_stage,surgery\nx,%s,left,N7,bcs\n" % (batch_manifest.parent / "cts" / "a.nrrd"))
    done = _batch("--manifest", bad, "--bundle", tiny_bundle, "--out", tmp_path / "o", "--device", "cpu")
    assert done.returncode == 2
    assert "line 2" in done.stderr and "n_stage" in done.stderr and "loading" not in done.stderr
    missing = _batch("--manifest", tmp_path / "none.csv", "--out", tmp_path / "o")
    assert missing.returncode == 2 and "manifest not found" in missing.stderr
    no_bundle = _batch("--manifest", batch_manifest, "--bundle", tmp_path / "nope", "--out", tmp_path / "o")
    assert no_bundle.returncode == 2 and "cannot load the model" in no_bundle.stderr


# -- per-structure results ----------------------------------------------------------------------------------

def test_worker_segment_modes_are_the_contourers():
    from MMContourLib.inference.contourer import SEGMENT_MODES
    from MMContourLib.note.form import STRUCTURE_CHOICES
    from MMContourLib.slicer import worker

    assert worker.SEGMENT_MODES == SEGMENT_MODES
    assert set(STRUCTURE_CHOICES.values()) == set(SEGMENT_MODES) and STRUCTURE_CHOICES["Both"] == "both"


class _HandMadeContourer:
    """A warm model whose result has a hand-made label image: the worker's per-structure wiring, not a
    model's choice of structures."""

    device, llm_calls = "cpu", 0
    NAMES = ("CTVp_Breast_L", "CTVn_L1_L", "CTVn_IMN_L")

    def __init__(self, bundle, *, llm, device):
        pass

    def provenance(self, prompt):
        return {"prompt": prompt}

    def contour(self, image, note, progress=None, cancel=None):
        from MMContourLib.inference.contourer import ContourResult
        from MMContourLib.inference.review import Review, structure_reasons
        from MMContourLib.note.clinical import ClinicalNote
        from MMContourLib.note.structures import structure_classes
        from MMContourLib.note.targets import structures_for_note

        note = ClinicalNote.parse(note) if isinstance(note, str) else note
        classes = structure_classes()
        labels = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
        for z, name in enumerate(self.NAMES):
            labels[2 + 4 * z:5 + 4 * z, 10:30, 10:30] = classes.index(name) + 1
        label_image = sitk.GetImageFromArray(labels)
        label_image.CopyInformation(image)
        mask = sitk.Cast(label_image > 0, sitk.sitkUInt8)
        expected = tuple(structures_for_note(note))
        r = ContourResult(mask, sitk.Cast(mask, sitk.sitkFloat32), note, note.to_prompt(), {}, labels=label_image,
                          classes=classes, expected=expected)
        r.review = Review(structure_reasons(r.structure_volumes(), expected, note, None))
        return r


def test_the_worker_sends_every_segment_and_the_summary_into_one_segment_per_structure(ct_file, tiny_bundle,
                                                                                     tmp_path):
    """In-process server with a hand-made result -> the result event -> ContourJob -> a real segmentation."""
    import io

    from MMContourLib.slicer import worker

    out = io.StringIO()
    server = worker._Server(out, contourer_factory=_HandMadeContourer)
    server._contour({"id": "1", "op": "contour", "ct": str(ct_file), "bundle": str(tiny_bundle),
                     "notes": ["N0, breast conserving surgery, left side"], "out_dir": str(tmp_path / "out")})
    event = json.loads(out.getvalue().splitlines()[-1])
    assert event["event"] == "result", event
    (result,) = event["results"]
    assert [s["name"] for s in result["segments"]] == ["CTV", *_HandMadeContourer.NAMES]
    assert result["segments"][0]["path"] == result["mask_path"]  # the CTV is written once
    summary = result["summary"]
    volumes = {s["name"]: s["volume_cc"] for s in summary["structures"]}
    assert volumes["CTVn_L1_L"] > 5 and volumes["CTVp_Breast_R"] == 0
    flagged = [f for f in summary["review"]["flags"] if f["structure"]]
    assert {f["structure"] for f in flagged} == {"CTVn_L1_L", "CTVn_IMN_L"}  # N0: no nodes, each named

    with pytest.raises(ValueError, match="structures 'every'"):
        server._contour({"id": "2", "ct": str(ct_file), "bundle": str(tiny_bundle), "notes": [NOTE],
                         "out_dir": str(tmp_path / "out"), "structures": "every"})
    server._contour({"id": "3", "ct": str(ct_file), "bundle": str(tiny_bundle), "notes": [NOTE],
                     "out_dir": str(tmp_path / "out"), "structures": "regions"})
    regions = json.loads(out.getvalue().splitlines()[-1])["results"][0]
    assert [s["name"] for s in regions["segments"]] == list(_HandMadeContourer.NAMES)

    slicer = pytest.importorskip("slicer")
    from MMContourLib.slicer import mrml as slicer_io
    from MMContourLib.slicer.job import ContourJob

    class Replay:  # hands the worker's event to the job as the client would
        def send(self, op, **fields):
            return "1"

        def cancel(self, rid, grace_s=3.0):
            pass

        def poll(self):
            return [event]

    scene = slicer.vtkMRMLScene()
    slicer.vtkSlicerSegmentationsModuleLogic().SetMRMLScene(scene)
    ct = sitk.ReadImage(str(ct_file))
    ct_node = slicer_io.image_to_volume_node(scene, ct, "CT")
    job = ContourJob(Replay(), scene, ct_node, ["N0, breast conserving surgery, left side"], bundle=str(tiny_bundle),
                     workdir=tmp_path).start().wait(timeout=5)
    assert job.state == "done", job.error
    node = job.segmentation_node
    assert slicer_io.segment_ids(node) == ["CTV", *_HandMadeContourer.NAMES]
    labels = _HandMadeContourer(None, llm=None, device="cpu").contour(ct, NOTE).structures
    for name, mask in labels.items():
        got = slicer_io.segment_mask(node, name, ct_node)
        assert np.array_equal(sitk.GetArrayViewFromImage(got), sitk.GetArrayViewFromImage(mask)), name
    assert not (tmp_path / "out").exists() or not [p for p in (tmp_path / "out").glob("mask-1-*")]


def test_a_per_structure_bundle_through_the_real_worker(client, ct_file, tiny_llm_dir, tmp_path):
    """A random per-structure bundle: whatever it draws, the worker sends exactly ContourResult.segments."""
    from MMContourLib.bench.fixtures import make_bundle
    from MMContourLib.inference.contourer import Contourer
    from MMContourLib.note.structures import structure_classes

    bundle = make_bundle(tmp_path / "per-structure", tiny_llm_dir, structures=structure_classes())
    event = _contour(client, ct_file, bundle, tmp_path / "out")
    assert event["event"] == "result", event
    (result,) = event["results"]
    expected = Contourer.from_bundle(bundle, device="cpu").contour(sitk.ReadImage(str(ct_file)), NOTE)
    segments = expected.segments("both")
    assert [s["name"] for s in result["segments"]] == list(segments)
    for entry in result["segments"]:
        assert np.array_equal(sitk.GetArrayViewFromImage(sitk.ReadImage(entry["path"])),
                              sitk.GetArrayViewFromImage(segments[entry["name"]])), entry["name"]
    assert [s["name"] for s in result["summary"]["structures"]] == list(structure_classes())
    assert result["summary"]["review"]["reasons"] == expected.review.to_dict()["reasons"]
