"""``python -m MMContourLib.cli ...`` is ``mmcontour ...`` (torchrun starts training this way)."""
import sys

from .main import main

sys.exit(main())
