"""Training one run: the ``train()`` entry, the LightningModule, the optimiser, start-up validation.

* :mod:`~sectional_moe.training.run` — ``train(cfg)`` / ``main(cfg)``, what ``python train.py`` calls;
* :mod:`~sectional_moe.training.module` — the LightningModule; :mod:`~.optim` AdamW and schedules;
  :mod:`~.rng` RNG states in checkpoints;
* :mod:`~sectional_moe.training.validate` — every config key checked once, before any compute;
  :mod:`~.overrides` — the command line checked before Hydra composes (Hydra-level errors in one
  line, a sweep-wide error once);
* :mod:`~sectional_moe.training.startup` — a run's start-up: secrets, Hydra's record, threads,
  quiet output, the printed config; :mod:`~.memory` — the memory estimate checked before allocation;
* :mod:`~sectional_moe.training.compiling` — ``torch.compile`` (Inductor) with a trial step and a
  one-line fallback to eager (``compile=true|auto``; the rule is ``device.CompileRule``).

May import every package below it (models, data, callbacks, runs, tracking) and the top-level
modules; only the entry points and the studies/bench import it.
"""
