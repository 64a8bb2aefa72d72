"""Bad inputs and faults, as a hostile user would try them (issue "never silently wrong").

Each case is made by a fixture and run through the real command line (``mmcontour predict`` ...) or the
real writer; every one must be refused with a clear message (exit 2) and leave nothing behind -- never
exit 0 with a wrong result. Add the next one here, so no feature can bring an old one back.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_ct

from MMContourLib.cli.main import main
from MMContourLib.image import fileio
from MMContourLib.image.readwrite import read_image, write_image, write_segmentation

NOTE = "N1, breast conserving surgery, left side"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def predict(capsys, ct, out, bundle, *extra):
    return run(capsys, "predict", "--ct", ct, "--note", NOTE, "--bundle", bundle, "--out", out,
               "--device", "cpu", *extra)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# -- CTs that are not what they seem ---------------------------------------------------------------

def _ct_array(seed=0):
    return sitk.GetArrayFromImage(make_ct(size=(48, 40, 24), seed=seed, dtype=sitk.sitkFloat32))


def truncated_nifti(folder: Path) -> Path:
    """A .nii.gz cut in half, as an interrupted copy leaves it (ITK reads it with zeros for the rest)."""
    whole = folder / "whole.nii.gz"
    sitk.WriteImage(make_ct(size=(48, 40, 24)), str(whole))
    data = whole.read_bytes()
    path = folder / "ct.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    return path


def truncated_but_valid_gzip(folder: Path) -> Path:
    """Half the voxels in a gzip stream that ends properly: only the header's promise tells."""
    whole = folder / "whole.nii.gz"
    sitk.WriteImage(make_ct(size=(48, 40, 24)), str(whole))
    raw = gzip.decompress(whole.read_bytes())
    path = folder / "ct.nii.gz"
    path.write_bytes(gzip.compress(raw[: 352 + (len(raw) - 352) // 2]))
    return path


def uncompressed_truncated_nifti(folder: Path) -> Path:
    whole = folder / "whole.nii"
    sitk.WriteImage(make_ct(size=(48, 40, 24)), str(whole))
    path = folder / "ct.nii"
    path.write_bytes(whole.read_bytes()[:-4000])
    return path


def _nan_ct(folder: Path, fraction: float) -> Path:
    arr = _ct_array()
    arr.reshape(-1)[: int(arr.size * fraction)] = np.nan
    image = sitk.GetImageFromArray(arr)
    image.CopyInformation(make_ct(size=(48, 40, 24)))
    path = folder / "ct.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def partly_nan_nifti(folder: Path) -> Path:
    """ITK's NIfTI reader turns NaN into 0: the check must see the file's own values."""
    return _nan_ct(folder, 0.3)


def all_nan_nifti(folder: Path) -> Path:
    return _nan_ct(folder, 1.0)


def _picture_named(folder: Path, picture: str, name: str) -> Path:
    """A 2D picture (written by its own format) renamed to look like a CT file."""
    source = folder / picture
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((40, 48), np.uint8)), str(source))
    path = folder / name
    shutil.copy(source, path)
    return path


def png_named_nifti(folder: Path) -> Path:
    return _picture_named(folder, "slice.png", "ct.nii.gz")


def jpeg_named_mha(folder: Path) -> Path:
    return _picture_named(folder, "photo.jpg", "ct.mha")


BAD_CTS = {  # fixture -> words the message must contain
    truncated_nifti: "truncated",
    truncated_but_valid_gzip: "truncated",
    uncompressed_truncated_nifti: "truncated",
    partly_nan_nifti: "NaN",
    all_nan_nifti: "all voxels are NaN",
    png_named_nifti: "PNG",
    jpeg_named_mha: "JPEG",
}


@pytest.mark.parametrize("make", list(BAD_CTS), ids=[f.__name__ for f in BAD_CTS])
def test_a_damaged_or_mislabelled_ct_is_refused_before_the_model_loads(make, tiny_bundle, tmp_path, capsys):
    ct = make(tmp_path)
    out = tmp_path / "ctv.seg.nrrd"
    code, _, err = predict(capsys, ct, out, tmp_path / "no-bundle-here")  # the CT is read before the bundle
    assert code == 2 and BAD_CTS[make] in err, err
    assert not out.exists() and "Traceback" not in err
    with pytest.raises(ValueError, match=BAD_CTS[make]):
        read_image(ct)


def test_a_whole_nifti_still_reads():
    """The checks refuse damage, not ordinary files (both compressions, integer and float voxels)."""
    folder = Path(os.environ.get("TMPDIR", "/tmp"))
    for name, dtype in (("ok.nii.gz", sitk.sitkInt16), ("ok.nii", sitk.sitkFloat32)):
        path = folder / f"mmcontour-test-{os.getpid()}-{name}"
        try:
            sitk.WriteImage(make_ct(dtype=dtype), str(path))
            assert read_image(path).GetSize() == (48, 40, 24)
        finally:
            path.unlink(missing_ok=True)


# -- training inputs ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_manifest(tmp_path_factory):
    from test_train import write_cases

    return write_cases(tmp_path_factory.mktemp("bad-train"), n=3, n_val=1)


def _train(capsys, manifest, out, llm, *extra):
    return run(capsys, "train", "--manifest", manifest, "--out", out, "--llm", llm, "--feature-size", "4",
               "--spacing", "6", "6", "9", "--patch", "32", "32", "16", "--epochs", "1", "--batch-size", "2",
               "--device", "cpu", "--warmup-epochs", "0", *extra)


def test_a_corrupt_training_case_is_named_with_its_file(train_manifest, tiny_llm_dir, tmp_path, capsys):
    """Not MONAI's 'applying transform <LoadCaseOnModelGridd object at 0x...>': the case and its file."""
    folder = tmp_path / "data"
    shutil.copytree(train_manifest.parent, folder)
    ct = folder / "cases" / "c1_ct.nii.gz"
    ct.write_bytes(ct.read_bytes()[:300])
    code, _, err = _train(capsys, folder / "manifest.csv", tmp_path / "run", tiny_llm_dir)
    assert code == 2 and "case c1" in err and str(ct) in err and "truncated" in err, err
    assert "object at 0x" not in err and "applying transform" not in err


def test_a_corrupt_manifest_is_named_with_its_line(train_manifest, tiny_llm_dir, tmp_path, capsys):
    folder = tmp_path / "data"
    shutil.copytree(train_manifest.parent, folder)
    lines = (folder / "manifest.csv").read_text().splitlines()
    lines[2] = lines[2].split(",", 1)[0] + ',"unterminated'
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n")
    code, _, err = _train(capsys, folder / "manifest.csv", tmp_path / "run", tiny_llm_dir)
    assert code == 2 and "manifest.csv" in err and "line 3" in err, err


def _evil_checkpoint(path: Path) -> None:
    import torch

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo this would run",))

    torch.save({"format": 1, "payload": Payload()}, path)


def _truncated_checkpoint(path: Path) -> None:
    import torch

    torch.save({"format": 1, "weights": torch.zeros(10_000)}, path)
    path.write_bytes(path.read_bytes()[:20_000])


@pytest.mark.parametrize("make,words", [(_evil_checkpoint, "not an MMContour checkpoint"),
                                         (_truncated_checkpoint, "damaged or truncated")])
def test_a_bad_checkpoint_is_refused_without_torch_s_advice(make, words, train_manifest, tiny_llm_dir, tmp_path,
                                                            capsys):
    out = tmp_path / "run"
    out.mkdir()
    make(out / "checkpoint.pt")
    code, _, err = _train(capsys, train_manifest, out, tiny_llm_dir, "--resume")
    assert code == 2 and words in err and "start again" in err, err
    assert "weights_only" not in err and "this would run" not in capsys.readouterr().out


def test_a_bundle_is_readable_by_others_as_the_umask_says(tmp_path):
    """safetensors creates its file 0600: a bundle on a shared workstation must follow the umask."""
    from conftest import make_bundle

    old = os.umask(0o022)
    try:
        bundle = make_bundle(None, tmp_path / "b")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in bundle.iterdir()}
    assert modes == {"weights.safetensors": 0o644, "config.json": 0o644}, modes
    assert bundle.stat().st_mode & 0o777 == 0o755 and leftovers(tmp_path) == []


# -- writes that do not reach the disk whole --------------------------------------------------------

@pytest.fixture()
def small_disk(tmp_path):
    """A 64 KiB file system (tmpfs), nearly filled: a CT's segmentation does not fit."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root); test_a_short_write_is_caught covers the rule")
    try:
        (mount / "filler").write_bytes(b"\0" * 40_000)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _mask(seed=0):
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray((rng.random((60, 128, 128)) > 0.5).astype(np.uint8))  # compresses badly
    return image


@pytest.mark.parametrize("name", ["ctv.nii.gz", "ctv.seg.nrrd", "ctv.nrrd"])
def test_a_full_disk_fails_clearly_and_leaves_nothing(small_disk, name):
    """ITK writes a .nii.gz that is cut short without an error; the read-back check catches it."""
    target = small_disk / name
    with pytest.raises(fileio.WriteError, match="disk"):
        if name.endswith(".seg.nrrd"):
            write_segmentation(target, {"CTV": _mask()})
        else:
            write_image(_mask(), target)
    assert not target.exists() and leftovers(small_disk) == []


def test_a_short_write_is_caught(tmp_path, monkeypatch):
    """Whatever the file system: a writer that silently writes less than it was given is caught."""
    real = sitk.WriteImage

    def short(image, path, *args):
        real(image, path, *args)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) * 3 // 4])

    monkeypatch.setattr(sitk, "WriteImage", short)
    for name in ("ctv.nii.gz", "ctv.nii"):
        with pytest.raises(fileio.WriteError, match="does not read back"):
            write_image(_mask(), tmp_path / name)
        assert not (tmp_path / name).exists()
    assert leftovers(tmp_path) == []


def test_a_killed_writers_temp_file_is_removed_by_the_next_write(tmp_path):
    """kill -9 during a write leaves the temp file; the next write of that file removes it (this host's
    dead process), and leaves a live process's temp file alone."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = fileio._host()
    stale = tmp_path / f".summary.json.mmcontour-tmp.{host}.{dead.pid}.abc123.json"
    stale.write_text("{")
    live = tmp_path / f".summary.json.mmcontour-tmp.{host}.{os.getpid()}.def456.json"
    live.write_text("{")
    fileio.write_json(tmp_path / "summary.json", {"ok": True})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"ok": True}
    assert not stale.exists() and live.exists()


def test_an_output_group_writes_all_or_nothing(tmp_path):
    def fail(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(fileio.WriteError, match="disk is full"):
        with fileio.OutputGroup() as group:
            group.add(tmp_path / "a.txt", lambda tmp: tmp.write_text("a"))
            group.add(tmp_path / "b.txt", fail)
    assert list(tmp_path.iterdir()) == []
    with fileio.OutputGroup() as group:
        group.add(tmp_path / "a.txt", lambda tmp: tmp.write_text("a"))
        group.add(tmp_path / "b.txt", lambda tmp: tmp.write_text("b"))
        assert not (tmp_path / "a.txt").exists()  # nothing in place before the group ends
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


# -- a fact stated twice: the note and a flag ---------------------------------------------------------

@pytest.fixture()
def ct_file(tmp_path) -> Path:
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(make_ct(), str(path))
    return path


NOTE_VS_FLAG = {  # flags given with NOTE -> (field, the note's value, the flag's value)
    ("--side", "right"): ("side", "'left'", "'right'"),
    ("--n", "N0"): ("n_stage", "'N1'", "'N0'"),
    ("--surgery", "mastectomy"): ("surgery", "'bcs'", "'mastectomy'"),
}


@pytest.mark.parametrize("flag", list(NOTE_VS_FLAG), ids=[f[0] for f in NOTE_VS_FLAG])
def test_a_flag_that_contradicts_the_note_is_refused(flag, ct_file, tmp_path, capsys):
    out = tmp_path / "ctv.seg.nrrd"
    code, _, err = predict(capsys, ct_file, out, tmp_path / "no-bundle-here", *flag)  # refused before the bundle
    field, in_note, in_flag = NOTE_VS_FLAG[flag]
    assert code == 2 and field in err and in_note in err and in_flag in err and flag[0] in err, err
    assert not out.exists() and "Traceback" not in err


def test_a_flag_that_agrees_with_the_note_is_fine(ct_file, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "ctv.seg.nrrd"
    code, stdout, err = predict(capsys, ct_file, out, tiny_bundle, "--side", "Lt", "--n", "pN1a", "--age", "61",
                                "--json")
    assert code == 0, err
    assert json.loads(stdout)["prompt"] == NOTE and out.exists()


# -- outputs: never an input, checked before anything loads, written together or not at all -----------------

@pytest.fixture()
def dicom_ct(tmp_path) -> Path:
    from dicom_phantoms import Series, phantom

    hu, _ = phantom(shape=(30, 80, 80))  # covers what the tiny bundle needs
    return Series(tmp_path / "dicom", hu).folder


def out_is_the_ct(tmp_path, ct, dicom):
    return [ct, ct, "--overwrite"]


def out_is_a_link_to_the_ct(tmp_path, ct, dicom):
    link = tmp_path / "link.nrrd"
    link.symlink_to(ct)
    return [ct, link, "--overwrite"]


def rtstruct_over_a_slice(tmp_path, ct, dicom):
    return [dicom, tmp_path / "ctv.seg.nrrd", "--out-rtstruct", sorted(dicom.iterdir())[0], "--overwrite"]


def rtstruct_inside_the_series(tmp_path, ct, dicom):
    return [dicom, tmp_path / "ctv.seg.nrrd", "--out-rtstruct", dicom / "RS.dcm"]


def two_outputs_one_file(tmp_path, ct, dicom):
    return [dicom, tmp_path / "ctv.seg.nrrd", "--out-rtstruct", tmp_path / "x.dcm", "--out-dicom-seg", tmp_path / "x.dcm"]


def bad_roi_name(tmp_path, ct, dicom):
    return [dicom, tmp_path / "ctv.seg.nrrd", "--out-rtstruct", tmp_path / "rs.dcm", "--roi-name", "CTV {side}"]


def roi_color_word(tmp_path, ct, dicom):
    return [dicom, tmp_path / "ctv.seg.nrrd", "--out-rtstruct", tmp_path / "rs.dcm", "--roi-color", "red"]


def roi_color_out_of_range(tmp_path, ct, dicom):
    return [dicom, tmp_path / "ctv.seg.nrrd", "--out-rtstruct", tmp_path / "rs.dcm", "--roi-color", "300,0,0"]


def rtstruct_from_a_nifti_ct(tmp_path, ct, dicom):
    return [ct, tmp_path / "ctv.seg.nrrd", "--out-rtstruct", tmp_path / "rs.dcm"]


def not_a_ct_in_hu(tmp_path, ct, dicom):
    scaled = sitk.Cast(make_ct(), sitk.sitkFloat32) / 4000.0 + 0.5  # an image rescaled to 0..1
    path = tmp_path / "scaled.nrrd"
    sitk.WriteImage(scaled, str(path))
    return [path, tmp_path / "ctv.seg.nrrd"]


BAD_OUTPUTS = {  # fixture -> words the message must contain
    out_is_the_ct: "is the input",
    out_is_a_link_to_the_ct: "is the input",
    rtstruct_over_a_slice: "inside the input folder",
    rtstruct_inside_the_series: "inside the input folder",
    two_outputs_one_file: "same file",
    bad_roi_name: "placeholder {lat}",
    roi_color_word: "'red' must be three integers",
    roi_color_out_of_range: "'300,0,0' must be three integers",
    rtstruct_from_a_nifti_ct: "DICOM series folder",
    not_a_ct_in_hu: "does not look like a CT",
}


@pytest.mark.parametrize("make", list(BAD_OUTPUTS), ids=[f.__name__ for f in BAD_OUTPUTS])
def test_bad_outputs_and_options_are_refused_before_the_model_loads(make, ct_file, dicom_ct, tmp_path, capsys):
    before = {p: p.read_bytes() for p in [ct_file, *dicom_ct.iterdir()]}
    ct, out, *extra = make(tmp_path, ct_file, dicom_ct)
    code, _, err = predict(capsys, ct, out, tmp_path / "no-bundle-here", *extra)  # refused before the bundle
    assert code == 2 and BAD_OUTPUTS[make] in err and "Traceback" not in err, err
    assert {p: p.read_bytes() for p in [ct_file, *dicom_ct.iterdir()]} == before  # the inputs are untouched
    assert not (tmp_path / "ctv.seg.nrrd").exists() and not (tmp_path / "rs.dcm").exists()
    assert leftovers(tmp_path) == [] and sorted(p.name for p in dicom_ct.iterdir()) == sorted(p.name for p in before
                                                                                              if p.parent == dicom_ct)


@pytest.fixture()
def read_only_folder(tmp_path):
    """A folder nobody may write in: a read-only tmpfs as root (root ignores modes), mode 0555 otherwise."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_read_only_output_folder_is_refused_before_the_model_loads(read_only_folder, ct_file, tmp_path, capsys):
    code, _, err = predict(capsys, ct_file, read_only_folder / "ctv.seg.nrrd", tmp_path / "no-bundle-here")
    assert code == 2 and "cannot write in the output folder" in err and "Traceback" not in err, err


def test_one_runs_outputs_are_written_together_or_not_at_all(dicom_ct, tiny_bundle, tmp_path, capsys, monkeypatch):
    """The DICOM SEG fails on a full disk after the .seg.nrrd and the RTSTRUCT were made: none of them stays."""
    import errno

    from pydicom.dataset import Dataset

    real = Dataset.save_as

    def full_disk(self, filename, *args, **kwargs):
        if getattr(self, "Modality", "") == "SEG":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, filename, *args, **kwargs)

    monkeypatch.setattr(Dataset, "save_as", full_disk)
    outputs = [tmp_path / "ctv.seg.nrrd", tmp_path / "rs.dcm", tmp_path / "seg.dcm"]
    code, _, err = predict(capsys, dicom_ct, outputs[0], tiny_bundle, "--out-rtstruct", outputs[1],
                           "--out-dicom-seg", outputs[2])
    assert code == 2 and "disk is full" in err, err
    assert not any(p.exists() for p in outputs) and leftovers(tmp_path) == []
    monkeypatch.setattr(Dataset, "save_as", real)
    code, _, err = predict(capsys, dicom_ct, outputs[0], tiny_bundle, "--out-rtstruct", outputs[1],
                           "--out-dicom-seg", outputs[2])
    assert code == 0 and all(p.exists() for p in outputs), err  # the corrected re-run is not blocked by leftovers


# -- manifest re-runs: an output answers the note it was made from --------------------------------------

def _one_case_manifest(folder: Path, ct: Path, note: str) -> Path:
    path = folder / "manifest.csv"
    path.write_text(f'case_id,ct,note\na,{ct.name},"{note}"\n')
    return path


def test_a_rerun_after_the_note_changed_redoes_the_case(ct_file, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "out"

    def rerun(note):
        manifest = _one_case_manifest(tmp_path, ct_file, note)
        code, _, err = run(capsys, "predict", "--manifest", manifest, "--out", out, "--bundle", tiny_bundle,
                           "--device", "cpu", "--json")
        assert code == 0, err
        return json.loads((out / "summary.json").read_text())["cases"][0]

    assert rerun(NOTE)["status"] == "ok"
    assert rerun(NOTE)["status"] == "skipped"  # unchanged: the old output still answers it
    right = "N1, breast conserving surgery, right side"
    case = rerun(right)
    assert case["status"] == "redone: note changed" and case["prompt"] == right and case["previous"]["prompt"] == NOTE
    header = sitk.ImageFileReader()
    header.SetFileName(str(out / "a.seg.nrrd"))
    header.ReadImageInformation()
    assert header.GetMetaData("MMContour_prompt") == right  # the summary never pairs a prompt with another's file


def test_a_rerun_never_replaces_a_file_it_did_not_make(ct_file, tiny_bundle, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    sitk.WriteImage(sitk.Image([4, 4, 4], sitk.sitkUInt8), str(out / "a.seg.nrrd"))  # the user's own file
    before = (out / "a.seg.nrrd").read_bytes()
    manifest = _one_case_manifest(tmp_path, ct_file, NOTE)
    code, stdout, _ = run(capsys, "predict", "--manifest", manifest, "--out", out, "--bundle", tiny_bundle,
                          "--device", "cpu", "--json")
    case = json.loads((out / "summary.json").read_text())["cases"][0]
    assert code == 1 and case["status"] == "failed" and "--overwrite" in case["error"]
    assert json.loads(stdout)["exit_code"] == 1 and "cases failed" in json.loads(stdout)["meaning"]
    assert (out / "a.seg.nrrd").read_bytes() == before


# -- --json answers every failure with JSON ------------------------------------------------------------

def json_refused_note(tmp_path, ct):
    return ["predict", "--ct", ct, "--note", "N7, BCS, left", "--out", tmp_path / "o.seg.nrrd", "--json"], 2


def json_bad_flag(tmp_path, ct):
    return ["predict", "--ct", ct, "--note", NOTE, "--out", tmp_path / "o.seg.nrrd", "--precision", "fp8",
            "--json"], 2


def json_missing_manifest(tmp_path, ct):
    return ["train", "--manifest", tmp_path / "missing.csv", "--out", tmp_path / "b", "--json"], 2


def json_missing_bundle(tmp_path, ct):
    return ["evaluate", "--bundle", tmp_path / "nobundle", "--manifest", tmp_path / "m.csv", "--out",
            tmp_path / "e", "--json"], 2


def json_import_nothing(tmp_path, ct):
    return ["import-dicom", "--in", tmp_path / "none", "--clinical", tmp_path / "c.csv", "--out", tmp_path / "i",
            "--json"], 2


JSON_FAILURES = [json_refused_note, json_bad_flag, json_missing_manifest, json_missing_bundle, json_import_nothing]


@pytest.mark.parametrize("make", JSON_FAILURES, ids=[f.__name__ for f in JSON_FAILURES])
def test_a_failed_json_run_answers_in_json(make, ct_file, tmp_path, capsys):
    argv, expected = make(tmp_path, ct_file)
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own refusal keeps its exit
        code = exc.code
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert code == expected and data["ok"] is False and data["exit_code"] == expected, (out, err)
    assert data["error"] and "refused" in data["meaning"] and "Traceback" not in err


# -- grids no planning CT has ---------------------------------------------------------------------------

def _ct_with(folder: Path, spacing=(4.0, 4.0, 6.0), direction=None, size=(48, 40, 24)) -> Path:
    path = folder / "odd.nrrd"
    image = make_ct(size=size, spacing=spacing)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


ODD_GRIDS = {  # fixture -> words the message must contain
    lambda f: _ct_with(f, spacing=(50.0, 50.0, 50.0), size=(12, 10, 6)): "more than 10 mm",
    lambda f: _ct_with(f, spacing=(2.0, 2.0, 15.0)): "more than 10 mm",
    lambda f: _ct_with(f, direction=(1, 0.2, 0, 0, 1, 0, 0, 0, 1)): "not orthonormal",
}


@pytest.mark.parametrize("make", list(ODD_GRIDS), ids=["50mm-voxels", "15mm-slices", "sheared-direction"])
def test_a_grid_no_planning_ct_has_is_refused_with_what_to_do(make, tmp_path, capsys):
    ct = make(tmp_path)
    out = tmp_path / "ctv.seg.nrrd"
    code, _, err = predict(capsys, ct, out, tmp_path / "no-bundle-here")
    assert code == 2 and ODD_GRIDS[make] in err and "Traceback" not in err, err
    assert "planning CT" in err or "Re-export" in err
    assert not out.exists()


def test_coarse_but_clinical_grids_are_still_accepted():
    from MMContourLib.image.preprocess import validate_ct

    for spacing in ((5.0, 5.0, 10.0), (0.98, 0.98, 2.5)):
        validate_ct(make_ct(spacing=spacing))
    _, notes = validate_ct(make_ct(spacing=(6.0, 6.0, 10.0)))  # a downsampled copy: contoured, with a note
    assert any("coarser than a planning CT" in n for n in notes)
    rotated = make_ct()
    c, s = np.cos(0.3), np.sin(0.3)
    rotated.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))  # oblique, but a rotation
    validate_ct(rotated)
