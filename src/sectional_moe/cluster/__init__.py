"""Launching: sweeps expanded into jobs, the SLURM (and submitit-local) launchers, sbatch job files.

* :mod:`~sectional_moe.cluster.sweeps` — expand a sweep, the end-of-multirun summary;
* :mod:`~sectional_moe.cluster.launcher` — the Hydra launchers (resilient SLURM job arrays);
* :mod:`~sectional_moe.cluster.sbatch` — one line of overrides per array task for ``slurm/array.sbatch``.

Torch-free. May import :mod:`sectional_moe.runs`, :mod:`sectional_moe.resolvers` and the top-level modules.
"""
