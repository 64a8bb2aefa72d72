"""``mmcontour demo``: the offline end-to-end example (``inference.demo.run_demo``)."""
from __future__ import annotations

from ..inference.demo import DEMO_NOTE, DEMO_SEED


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="offline end-to-end demo on a synthetic CT with several notes")
    p.add_argument("--out", required=True, help="output folder (summary.json, demo.png, .seg.nrrd per note)")
    p.add_argument("--bundle", help="model bundle (default: the shipped demo bundle)")
    p.add_argument("--llm", help="override where the bundle's LLM is found")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=DEMO_SEED)
    p.add_argument("--note", default=DEMO_NOTE, help="the phantom's true clinical note")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> dict:
    from ..inference.demo import run_demo

    return run_demo(args.out, args.bundle, args.llm, args.device, args.seed, args.note)
