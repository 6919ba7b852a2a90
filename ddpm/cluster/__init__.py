"""Everything that knows about SLURM and processes around the run: the torchrun wrapper
(:mod:`~ddpm.cluster.wrapper`, ``python -m ddpm.cluster train``), the stage tasks and submitit executors
(:mod:`~ddpm.cluster.executors`), login-node checks (:mod:`~ddpm.cluster.preflight`), the rendezvous
helpers (:mod:`~ddpm.cluster.rendezvous`) and ``launch.py doctor`` (:mod:`~ddpm.cluster.doctor`).

Model, diffusion and data code never import this package.
"""
