"""A training run's state on disk: the checkpoint (atomic; refused unread when it is not ours), the random
number generators' state it carries, and the per-epoch logs (``log.json``, ``log.csv``, ``loss_curve.png``)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from ..image.fileio import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = 1


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says what to do."""


def rng_state() -> dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    """The state ``save_checkpoint`` wrote. Anything else is refused without unpickling it: a file that
    holds Python objects is not one of ours, whatever torch suggests."""
    import pickle
    import zipfile

    if not path.is_file():
        raise TrainingError(f"nothing to resume: {path} does not exist (start without --resume)")
    start_again = (f"start again without --resume (move {path} away first); the bundles already written "
                   f"beside it (best/, last/) are whole and usable")
    damaged = (f"checkpoint {path} is damaged or truncated (it does not read as a whole file); {start_again}")
    with open(path, "rb") as fh:
        zipped = fh.read(4) == b"PK\x03\x04"  # torch.save's format
    if not zipped:
        raise TrainingError(f"{path} is not an MMContour checkpoint (not a file torch.save wrote); {start_again}")
    if not zipfile.is_zipfile(path):
        raise TrainingError(damaged)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise TrainingError(f"{path} is not an MMContour checkpoint: it holds Python objects that an MMContour "
                            f"checkpoint never contains, so it is refused unread. If it should be this run's "
                            f"checkpoint, {start_again}") from None
    except Exception:  # anything else a damaged archive raises (RuntimeError, KeyError, EOFError, ...)
        raise TrainingError(damaged) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainingError(f"{path} is not an MMContour checkpoint of format {CHECKPOINT_FORMAT}; {start_again}")
    if isinstance(state.get("config"), dict):  # runs started before the prompt template was a setting read notes
        state["config"].setdefault("prompt_template", "table5-v1")  # whole: they resume that way
    return state


def write_logs(out: Path, history: list[dict]) -> None:
    """``log.json``, ``log.csv`` (one row per epoch) and ``loss_curve.png``."""
    atomic_write(out / "log.json", lambda tmp: tmp.write_text(json.dumps(history, indent=1) + "\n"))
    columns = list(dict.fromkeys(k for row in history for k in row))

    def csv_text(tmp: Path) -> None:
        lines = [",".join(columns)]
        lines += [",".join("" if row.get(c) is None else str(row.get(c)) for c in columns) for row in history]
        tmp.write_text("\n".join(lines) + "\n")

    atomic_write(out / "log.csv", csv_text)
    atomic_write(out / "loss_curve.png", lambda tmp: plot_history(history, tmp))


def plot_history(history: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    epochs = [r["epoch"] for r in history]
    ax.plot(epochs, [r["train_loss"] for r in history], "o-", label="train loss (Dice + CE)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    val = [(r["epoch"], r["val_dice"]) for r in history if r.get("val_dice") is not None]
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), "s--", color="tab:green", label="validation Dice")
        ax2.set_ylabel("Dice")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, format="png")
