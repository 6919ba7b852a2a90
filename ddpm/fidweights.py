"""Where the FID Inception weights are: ``sampling.fid_weights`` or torch hub's cache, never downloaded.

Apart from :mod:`ddpm.inception` (pytorch-fid and torchvision take seconds to import) so that launch.py's
preflight checks the file in a fraction of a second. No torch at import.
"""

from __future__ import annotations

from pathlib import Path

from ddpm.errors import FIDError

# pytorch-fid's own weights file (pytorch_fid.inception.FID_WEIGHTS_URL; tests/test_fid.py checks they agree):
# the numbers papers cite
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_NAME = WEIGHTS_URL.rsplit("/", 1)[-1]  # pt_inception-2015-12-05-6726825d.pth


def resolve_weights(path: str | Path | None = None) -> Path:
    """The weights file: ``path`` if given, else the torch hub cache; one-line error when absent."""
    if path is not None:
        p = Path(str(path)).expanduser()
        if not p.is_file():
            raise FIDError(f"FID Inception weights not found: {p} (download: curl -L -o {p} {WEIGHTS_URL})")
        return p
    import torch

    p = Path(torch.hub.get_dir(), "checkpoints", WEIGHTS_NAME)  # torch hub's cache (not a run directory)
    if not p.is_file():
        raise FIDError(f"FID Inception weights not found at {p}; download them once on the login node: "
                       f"mkdir -p {p.parent} && curl -L -o {p} {WEIGHTS_URL} "
                       f"(or set sampling.fid_weights / --weights to a copy)")
    return p
