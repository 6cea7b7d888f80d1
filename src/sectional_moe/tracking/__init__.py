"""Experiment tracking: the W&B and CSV loggers, W&B run ids, and reading W&B run files back.

* :mod:`~sectional_moe.tracking.loggers` — loggers built from the ``logger`` group, closing W&B runs;
* :mod:`~sectional_moe.tracking.wandb_ids` — the W&B id of a run directory, online/offline mode;
* :mod:`~sectional_moe.tracking.wandb_files` — a reader for ``run-<id>.wandb`` files.

May import :mod:`sectional_moe.runs` and the top-level modules.
"""
