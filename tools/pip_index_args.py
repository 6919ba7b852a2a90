"""pip's index settings as uv flags, so ``make venv`` (uv: about 1 min; pip: about 2.5) installs from where pip would.

    python3 tools/pip_index_args.py       # e.g. --extra-index-url file:///opt/pypi/simple --find-links /opt/wheels

It reads ``pip config list`` (pip.conf files and ``PIP_*`` variables): index-url, extra-index-url, find-links
and constraint. An ``:env:`` (variable) setting comes before the files', as in pip; multi-valued keys keep
every value once. No pip configuration prints nothing (uv then uses PyPI).
"""

from __future__ import annotations

import shlex
import subprocess
import sys

FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint"}


def uv_flags(listing: str) -> list[str]:
    """uv flags for the lines of ``pip config list`` (``scope.key='value'``); only one ``--index-url``."""
    values: dict[str, list[str]] = {key: [] for key in FLAGS}
    for line in listing.splitlines():
        scoped, sep, raw = line.partition("=")
        key = scoped.rsplit(".", 1)[-1]
        if not sep or key not in FLAGS:
            continue
        for value in " ".join(shlex.split(raw)).split():
            if value not in values[key]:
                values[key].append(value)
    values["index-url"] = values["index-url"][:1]
    return [arg for key, flag in FLAGS.items() for value in values[key] for arg in (flag, value)]


def main() -> int:
    try:
        listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        listing = ""
    print(shlex.join(uv_flags(listing)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
