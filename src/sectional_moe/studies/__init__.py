"""The paper's road map as runnable studies (``experiments/*.yaml``): list, dry-run, run, report.

* :mod:`~sectional_moe.studies.catalog` — the study files as :class:`Study` objects;
* :mod:`~sectional_moe.studies.runner` — validate and cost every job, launch the sweeps, write the report;
* ``python -m sectional_moe.studies`` — the command line (:mod:`~sectional_moe.studies.cli`).

May import :mod:`sectional_moe.cluster`, :mod:`sectional_moe.training.validate`,
:mod:`sectional_moe.models` (spec, flops) and the top-level modules.
"""
