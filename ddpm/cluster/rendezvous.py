"""Where the ranks of a multi-node job meet: the first node of the allocation, a port from the job id.

    host = first_slurm_host(os.environ["SLURM_JOB_NODELIST"])   # "babel-1-[23-25]" -> "babel-1-23"
    port = rendezvous_port(os.environ["SLURM_JOB_ID"])          # 20000 + job_id % 20000
"""

from __future__ import annotations

import subprocess


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list (``babel-1-[23-25]`` -> ``babel-1-23``) via scontrol."""
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0]


def rendezvous_port(job_id: str | int | None, base: int = 20000, span: int = 20000) -> int:
    """A port derived from the job id so concurrent jobs on one node do not collide."""
    return base + (int(job_id) % span if job_id is not None and str(job_id).isdigit() else 9)
