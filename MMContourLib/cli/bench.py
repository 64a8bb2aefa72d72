"""``mmcontour bench`` (and ``python -m MMContourLib.bench bench ...``): the command line of ``bench.measure``."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from ..bench.presets import PRESETS, Preset

#: The ``mmcontour bench --help`` description: the first line of bench.measure's docstring.
DESCRIPTION = "``mmcontour bench``: speed and memory of contouring (and training) at a chosen scale."

#: The parts of a bench run (``run_bench(what=...)``) that --only / --skip name.
ALL = ("window-ratio", "encode", "contour", "reference", "train")


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure speed and memory (contouring, note edits, training)",
                              description=DESCRIPTION)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.add_argument("--out", help="also write the JSON report to this file")
    p.add_argument("--only", nargs="+", choices=ALL, help=f"run only these parts (default: all of {', '.join(ALL)})")
    p.add_argument("--skip", nargs="+", choices=ALL, default=[], help="leave these parts out")
    p.add_argument("--device", help="override the preset's device (cpu | cuda | cuda:N)")
    p.add_argument("--llm", help="use this LLM folder instead of a random one of the preset's shape")
    p.add_argument("--llm-layers", type=int, help="7B-shaped LLM with only this many layers (to extrapolate per layer)")
    p.add_argument("--bundle", help="use this bundle (e.g. the shipped demo bundle) instead of a random one")
    p.add_argument("--roi", type=int, nargs=3, metavar=("X", "Y", "Z"))
    p.add_argument("--overlap", type=float)
    p.add_argument("--sw-batch-size", type=int)
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), help="U-Net precision")
    p.add_argument("--llm-dtype", choices=("auto", "fp32", "bf16", "fp16", "int8"),
                   help="LLM weights (int8: 8-bit through bitsandbytes)")
    p.add_argument("--channels-last", choices=("on", "off"))
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net (first windows pay the compile)")
    p.add_argument("--cache-features", choices=("auto", "device", "host", "off"),
                   help="feature cache for note edits (default auto)")
    p.add_argument("--no-edited-note", action="store_true", help="skip the edited-note contour")
    p.add_argument("--offload-llm", action="store_true",
                   help="contour with the LLM moved off the GPU / released on the CPU after each encoding")
    p.add_argument("--repeats", type=int)
    p.add_argument("--reference-windows", type=int, help="time only this many windows of the reference loop")
    p.add_argument("--train-patch", type=int, nargs=3, metavar=("X", "Y", "Z"))
    p.add_argument("--train-batch", type=int)
    p.add_argument("--offload-modes", action="store_true",
                   help="GPU: also measure peak memory with the LLM resident and with it moved off after encoding")
    p.add_argument("--scaleout", type=int, default=0, metavar="N",
                   help="also train with N CPU processes under torchrun (gloo) against one")
    p.add_argument("--work", help="folder for the random LLM and bundle (default: $MMCONTOUR_CACHE/bench)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)


def preset_from_args(args) -> Preset:
    preset = PRESETS[args.preset]()
    changes = {}
    if args.bundle:  # the bundle's own model, grid and windows unless the command line says otherwise
        cfg = json.loads((Path(args.bundle) / "config.json").read_text())
        changes.update(feature_size=cfg["network"]["feature_size"], spacing=tuple(cfg["preprocessing"]["spacing"]),
                       roi=tuple(cfg["inference"]["roi_size"]), overlap=cfg["inference"]["overlap"],
                       name=f"{preset.name}+bundle")
    if args.llm_layers:
        changes["llm_shape"] = {**preset.llm_shape, "num_hidden_layers": args.llm_layers}
    for name, attr in (("device", "device"), ("overlap", "overlap"), ("sw_batch_size", "sw_batch_size"),
                       ("precision", "precision"), ("repeats", "repeats"), ("reference_windows", "reference_windows"),
                       ("train_batch", "train_batch"), ("llm_dtype", "llm_dtype")):
        if getattr(args, name, None) is not None:
            changes[attr] = getattr(args, name)
    if args.roi:
        changes["roi"] = tuple(args.roi)
    if args.train_patch:
        changes["train_patch"] = tuple(args.train_patch)
    if args.channels_last:
        changes["channels_last"] = args.channels_last == "on"
    if args.compile:
        changes["compile"] = True
    if args.cache_features:
        changes["cache_features"] = args.cache_features
    if args.no_edited_note:
        changes["edited_note"] = False
    if args.offload_llm:
        changes["offload_llm"] = True
    return replace(preset, **changes)


def run(args) -> dict:
    from ..bench.measure import run_bench
    from ..model.llm import cache_root

    preset = preset_from_args(args)
    what = set(args.only or ALL) - set(args.skip)
    work = Path(args.work) if args.work else cache_root() / "bench"
    say = (lambda msg: None) if args.quiet or args.json else (lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    report = run_bench(preset, work, what=what, llm=args.llm, bundle=args.bundle, offload_modes=args.offload_modes,
                       scaleout=args.scaleout, say=say)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    if not args.json:
        print(format_table(report["summary"]))
    return report


def format_table(summary: dict) -> str:
    width = max(len(k) for k in summary)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in summary.items())


def main(argv=None) -> int:
    """``python -m MMContourLib.bench bench ...``: the bench alone, without the other subcommands'
    imports (the GPU machine has no DICOM libraries)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m MMContourLib.bench")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    report = args.func(args)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 0
