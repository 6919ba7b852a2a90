"""``python -m ddpm.cluster train --run-dir D``: the torchrun wrapper for one node (the sbatch route);
``python -m ddpm.cluster requeue --run-dir D``: requeue this job or array task (the templates' stop trap)."""

import sys

from ddpm.cluster.wrapper import main

sys.exit(main())
