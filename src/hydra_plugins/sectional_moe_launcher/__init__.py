"""Hydra plugin entry of the project's SLURM launcher (the code is in sectional_moe.launcher).

Hydra instantiates a launcher only if its class is defined under the ``hydra_plugins`` package,
hence this subclass; ``conf/hydra/launcher/slurm.yaml`` names it as ``_target_``.
"""

from sectional_moe.launcher import ResilientSlurmLauncher as _ResilientSlurmLauncher


class ResilientSlurmLauncher(_ResilientSlurmLauncher):
    """See :class:`sectional_moe.launcher.ResilientSlurmLauncher`."""
