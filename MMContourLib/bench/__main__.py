"""``python -m MMContourLib.bench bench ...``: the benchmark alone, without the other subcommands' imports."""
import sys

from ..cli.bench import main

sys.exit(main())
