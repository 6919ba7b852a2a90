"""``python -m ddpm.cluster train --run-dir D``: the torchrun wrapper for one node (the sbatch route)."""

import sys

from ddpm.cluster.wrapper import main

sys.exit(main())
