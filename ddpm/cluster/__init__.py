"""Everything that knows about SLURM and processes around the run.

Job side (runs on the nodes): :mod:`~ddpm.cluster.tasks` (the submitit callable of each stage's job),
:mod:`~ddpm.cluster.wrapper` (``python -m ddpm.cluster train``: torchrun, the watchdog, the requeue),
:mod:`~ddpm.cluster.attempt` (the run's state machine), :mod:`~ddpm.cluster.squeue` (a job's state),
:mod:`~ddpm.cluster.rendezvous` and :mod:`~ddpm.cluster.probe` (the doctor's job on a node).
Login side: :mod:`~ddpm.cluster.preflight` (checks before anything is queued), :mod:`~ddpm.cluster.executors`
(submission) and :mod:`~ddpm.cluster.doctor` (``launch.py doctor``). The job side imports nothing of the login side.

Model, diffusion and data code never import this package.
"""
