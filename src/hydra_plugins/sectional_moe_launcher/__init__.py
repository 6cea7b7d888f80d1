"""Hydra plugin entry of the project's launchers and sweeper (the code is in sectional_moe.cluster).

Hydra instantiates a launcher or sweeper only if its class is defined under the ``hydra_plugins``
package, hence these subclasses; ``conf/hydra/launcher/{slurm,local}.yaml`` and
``conf/hydra/sweeper/optuna.yaml`` name them as ``_target_``.
"""

from sectional_moe.cluster.launcher import LocalLauncher as _LocalLauncher
from sectional_moe.cluster.launcher import ResilientSlurmLauncher as _ResilientSlurmLauncher
from sectional_moe.cluster.optuna_sweeper import OptunaSweeper as _OptunaSweeper


class ResilientSlurmLauncher(_ResilientSlurmLauncher):
    """See :class:`sectional_moe.cluster.launcher.ResilientSlurmLauncher`."""


class LocalLauncher(_LocalLauncher):
    """See :class:`sectional_moe.cluster.launcher.LocalLauncher`."""


class OptunaSweeper(_OptunaSweeper):
    """See :class:`sectional_moe.cluster.optuna_sweeper.OptunaSweeper`."""
