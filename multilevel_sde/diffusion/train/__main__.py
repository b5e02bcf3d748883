"""``python -m multilevel_sde.diffusion.train ARGS`` is ``mlsde train ARGS`` (what ``torchrun -m`` runs)."""

import sys

from multilevel_sde.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
