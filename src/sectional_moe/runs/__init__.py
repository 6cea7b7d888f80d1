"""Run directories: what a run writes where, and how a run is identified, resumed and recorded.

* :mod:`~sectional_moe.runs.layout` — :class:`RunDir`, every file name and marker of a run;
* :mod:`~sectional_moe.runs.identity` — run keys, names, sweep groups, the identity config;
* :mod:`~sectional_moe.runs.status` — ``status.json``;
* :mod:`~sectional_moe.runs.lock` — one live process per run directory (host + pid, stale takeover);
* :mod:`~sectional_moe.runs.checkpoints` — atomic, verified checkpoints and resume selection (torch).

Everything but ``checkpoints`` is torch-free (the Hydra plugin scan imports it). May import the
top-level modules (errors, env, files, secrets); nothing else of ours.
"""
