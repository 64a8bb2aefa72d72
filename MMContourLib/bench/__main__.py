"""``python -m MMContourLib.bench bench ...``: the benchmark alone, without the other subcommands' imports."""
import sys

from .measure import main

sys.exit(main())
