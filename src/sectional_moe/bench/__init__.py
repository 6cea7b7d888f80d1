"""Training-speed benchmark: every family side by side, as ratios measured in one run.

``python -m sectional_moe.bench`` (``--help`` for every flag; ``--quick`` for a smoke run) trains
each configuration on synthetic tokens and reports, per configuration:

* training tokens/s and step time (median of the timed steps; warm-up steps excluded);
* achieved *model* FLOP/s: ``flops_per_token(spec)`` (analytic, PaLM convention) x tokens/s;
* the fraction of the machine's matmul peak *at the model's own GEMM shapes*, measured here: the
  forward, input-gradient and weight-gradient GEMMs of every projection of the model (batched over
  experts/sections where the model batches them), timed alone; their FLOPs / their best time is the
  rate this machine reaches on exactly that work (attention scores, norms and the optimiser are
  what the model adds on top). The generic 512^3 probe of :mod:`sectional_moe.hardware` is
  reported too;
* peak memory of a training step: parameters + optimiser state + the step's transient peak
  (CPU: resident-set high-water mark, reset through ``/proc/self/clear_refs`` after
  ``malloc_trim``; CUDA: ``max_memory_allocated``), measured on an extra untimed step;
* every ratio to ``dense`` at the same preset (tokens/s and model FLOP/s).

The framework's own cost is measured on a few *overhead cases* (dense, sectional and token-MoE):
the same model, batch and optimiser trained by a bare PyTorch loop, by Lightning without callbacks
and by Lightning with the metrics callbacks (SpeedMonitor, MemoryMonitor, ExpertLoadMonitor,
WandbSummary); the time spent inside those callbacks' hooks is also summed directly, which is far
less noisy than the difference of two step times.

The machine may be shared, so the configurations run *round-robin*: every round runs a few steps
of each (in a rotated order), and the statistics pool the timed steps of all rounds; a burst of
foreign load then hits every configuration alike instead of one. Each round builds the model
afresh from the same seed (memory stays bounded to one model) and re-warms.

Outputs ``bench.json`` and ``bench.md`` (default ``docs/bench/``) and prints the Markdown.

Modules: :mod:`~.cases` (what is measured), :mod:`~.probes` (FLOP counter, GEMM probe, memory),
:mod:`~.runners` (bare loop and Lightning), :mod:`~.report` (statistics, Markdown), :mod:`~.cli`.
Beside it, each with its own ``python -m``: :mod:`~.ratios` (our dense vs the GPT-2-style reference
and token MoE vs dense, both models interleaved in each of several fresh processes),
:mod:`~.overhead` (the metrics callbacks gated on and off in blocks inside one fit),
:mod:`~.allocator` (``malloc_reuse`` on vs off, a fresh process per side; :mod:`~.fresh` runs
those) and :mod:`~.quality` (bf16-mixed vs fp32 perplexity of finished runs).
May import every package below the entry points (training, callbacks, models, hardware).
"""
