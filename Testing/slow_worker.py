"""A worker whose sliding window is slow, so the cancel tests can stop a tiny model mid-run:
``python -m slow_worker`` (Testing/ on PYTHONPATH), started by ``WorkerClient(module="slow_worker")``."""
from __future__ import annotations

import sys
import time

from MMContourLib.inference.contourer import Contourer
from MMContourLib.slicer import worker

SECONDS_PER_WINDOW = 0.25


class SlowContourer(Contourer):
    """The real Contourer, sleeping after every sliding window (before the worker sees its progress)."""

    def contour(self, image, note, progress=None, cancel=None):
        def slow(stage: str, done: int, total: int) -> None:
            if stage == "windows" and done:
                time.sleep(SECONDS_PER_WINDOW)
            if progress is not None:
                progress(stage, done, total)

        return super().contour(image, note, progress=slow, cancel=cancel)


if __name__ == "__main__":
    sys.exit(worker.main(contourer_factory=SlowContourer))
