"""`python -m deepfusion.benchmarks ARGS` runs `deepfusion bench ARGS` (the package docstring lists them)."""

import sys

from deepfusion.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
