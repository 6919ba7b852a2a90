"""FID Inception weights for machines that cannot download the real ones (the tests, the quickstart sweep).

    python -m tools.fid_test_weights --out data/fid_test/pt_inception-2015-12-05-6726825d.pth

Randomly initialised (seed 0) with the keys and shapes of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
(``ddpm.inception.load_inception`` reads them). Random weights alone give near-constant features (FIDs of 1e-13:
float noise), so the BatchNorm statistics are taken in train mode from one batch of noise, which keeps every
layer at unit scale: the features then depend on the image. FIDs measured with them rank sample sets (a sweep's
points) on this machine; they are not comparable with published FIDs, which need the real weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def write_test_weights(path: Path) -> Path:
    """Write the test weights to ``path`` (its directory made); returns ``path``."""
    import torch

    from ddpm import inception

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = inception.FIDInceptionV3()
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # the plain average of what it sees
        with torch.no_grad():
            inception.FIDFeatures(net).train()(torch.rand(16, 3, 8, 8))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.fid_test_weights", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the .pth file to write")
    args = p.parse_args(argv)
    print(f"fid test weights: {write_test_weights(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
