"""What the subcommands share: the usage error, the note and model argument groups and what they build, the
progress bar, the output check. Light at import (``mmcontour --help`` loads no model code)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..model.bundle_info import default_bundle_path


class UsageError(Exception):
    """A problem with what the user asked for; printed without a traceback, exit status 2."""


def add_note_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("clinical note (free text or structured fields)")
    g.add_argument("--note", help='e.g. "N1, breast conserving surgery, left side" (paper Table 5 form)')
    g.add_argument("--note-file", type=Path, metavar="FILE",
                   help="the note as free text (consult note, pathology report; see mmcontour read-note): an "
                        "undecided or conflicting field stops the run")
    g.add_argument("--age")
    g.add_argument("--side", help="left / right / both (Lt, Rt, bilateral ...)")
    g.add_argument("--t", dest="t_stage", help="T stage, e.g. cT1c, Tis")
    g.add_argument("--n", dest="n_stage", help="N stage, e.g. N0, 1mi, pN1a, ypN2; bilateral: left:N0;right:N2")
    g.add_argument("--m", dest="m_stage", help="M stage, e.g. M0")
    g.add_argument("--surgery", help="bcs / mastectomy (lumpectomy, partial, total, MRM ...)")
    g.add_argument("--chemotherapy", help="none / adjuvant / neoadjuvant")
    g.add_argument("--pathology", help="IDC / ILC / DCIS / ...")


#: Each note field's flag, so that a conflict names what the user typed.
NOTE_FLAGS = {"age": "--age", "side": "--side", "t_stage": "--t", "n_stage": "--n", "m_stage": "--m",
              "surgery": "--surgery", "chemotherapy": "--chemotherapy", "pathology": "--pathology"}


def note_text(text: str | None, file: Path | None) -> str:
    """The note's text from ``--text`` or a file, refused when empty."""
    if file is not None:
        if not file.is_file():
            raise UsageError(f"note file not found: {file}")
        try:
            text = file.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{file} is not UTF-8 text ({exc.reason}); save the note as plain UTF-8 text") from None
    if not (text or "").strip():
        raise UsageError(f"the note {'in ' + str(file) if file else 'text'} is empty")
    return text


def note_from_args(args):
    """The note from --note and the field flags: a fact both state must agree (note.clinical.note_from_parts)."""
    from ..note.clinical import note_from_parts

    fields = {k: getattr(args, k) for k in NOTE_FLAGS if getattr(args, k, None) not in (None, "")}
    note_file = getattr(args, "note_file", None)
    if note_file is not None:
        from ..note.clinical import note_from_reading
        from ..note.freetext import read_note

        if args.note:
            raise UsageError("give the note once: --note TEXT or --note-file FILE, not both")
        return note_from_reading(read_note(note_text(None, note_file)), fields, text_name=f"the note file {note_file}",
                                 field_name=NOTE_FLAGS)
    if not args.note and not fields:
        raise UsageError("give the clinical note: --note TEXT, --note-file FILE, or --side, --n and --surgery "
                         "(and optional fields)")
    return note_from_parts(args.note, fields, text_name="--note", field_name=NOTE_FLAGS)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--bundle", default=None, help="model bundle folder (default: the shipped demo bundle)")
    g.add_argument("--llm", help="where the bundle's LLM is: a local folder or a .gguf file (default: as the bundle says)")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--dtype", default="auto",
                   help="LLM weights: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32 | int8 (8-bit, bitsandbytes)")
    g.add_argument("--roi", type=int, nargs=3, metavar=("X", "Y", "Z"), help="sliding-window size (multiples of 16)")
    g.add_argument("--overlap", type=float, help="sliding-window overlap (default: the bundle's)")
    g.add_argument("--sw-batch-size", type=int, default=1)
    g.add_argument("--allow-download", action="store_true",
                   help="let --llm name a Hugging Face hub id and download it (off by default: MMContour works offline)")
    s = parser.add_argument_group("speed and memory (docs/performance.md)")
    s.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="U-Net arithmetic: auto (bf16 autocast on a GPU, fp32 on the CPU)")
    s.add_argument("--channels-last", action="store_true", help="channels-last 3D memory layout for the U-Net")
    s.add_argument("--compile", action="store_true", help="torch.compile the U-Net (the first contour pays for it)")
    s.add_argument("--cache-features", default="auto", choices=("auto", "device", "host", "off"),
                   help="keep the note-independent encoder features of the last CT, so an edited note skips "
                        "them (auto: on the GPU if there is room, else host memory)")
    s.add_argument("--offload-llm", action="store_true",
                   help="move the LLM off the GPU after encoding the note; on a CPU, free it and load it again "
                        "for the next new note (less memory while the U-Net runs, slower note edits)")


def contourer_from_args(args):
    from ..inference.contourer import Contourer

    bundle = Path(args.bundle) if args.bundle else default_bundle_path()
    return Contourer.from_bundle(bundle, llm=args.llm, device=args.device, dtype=args.dtype, roi_size=args.roi,
                                 overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                                 allow_download=args.allow_download, precision=args.precision,
                                 channels_last=args.channels_last, compile=args.compile,
                                 cache_features=args.cache_features, offload_llm=args.offload_llm)


def tqdm_progress(enabled: bool = True):
    """A progress(stage, done, total) callback drawing one tqdm bar per stage on stderr."""
    from tqdm import tqdm

    state = {"stage": None, "bar": None}

    def progress(stage: str, done: int, total: int) -> None:
        if not enabled:
            return
        if state["stage"] != stage:
            if state["bar"] is not None:
                state["bar"].close()
            state["stage"], state["bar"] = stage, tqdm(total=total, desc=stage, file=sys.stderr, leave=False)
        bar = state["bar"]
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total and stage == "postprocess":
            bar.close()

    return progress


def check_output(path: Path, overwrite: bool, inputs=()) -> None:
    """Refuse, before anything heavy runs, an output that is one of ``inputs`` (the same file after resolving
    links, or inside an input folder such as the CT's DICOM series), that exists (unless --overwrite), or whose
    folder does not exist or cannot be written (tried with a temp file, which also catches a read-only mount)."""
    from ..image.fileio import temp_path

    path = Path(path)
    for given in inputs:
        if not given:
            continue
        source = Path(given).expanduser()
        same = path.exists() and source.exists() and os.path.samefile(path, source)
        if same or path.resolve() == source.resolve():
            raise UsageError(f"{path} is the input {given}: an output never replaces an input; choose another name")
        if source.is_dir() and source.resolve() in path.resolve().parents:
            raise UsageError(f"{path} is inside the input folder {given}: it could replace one of its files or be "
                             "read as part of it next time; write it elsewhere")
    if path.exists() and not overwrite:
        raise UsageError(f"{path} exists; MMContour never overwrites a file unless you pass --overwrite")
    if not path.parent.exists():
        raise UsageError(f"output folder {path.parent} does not exist")
    try:
        temp_path(path).unlink()
    except OSError as exc:
        raise UsageError(f"cannot write in the output folder {path.parent} ({exc.strerror or exc}); choose "
                         "another output folder") from None


def check_outputs(paths, overwrite: bool, inputs=()) -> None:
    """``check_output`` for each output of one run, which must also differ from each other."""
    seen = {}
    for path in paths:
        key = Path(path).resolve()
        if key in seen:
            raise UsageError(f"{seen[key]} and {path} are the same file: give each output its own name")
        seen[key] = path
        check_output(Path(path), overwrite, inputs)
