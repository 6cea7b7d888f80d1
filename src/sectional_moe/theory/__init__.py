"""Theory of the sectional MoE: cost model, scaling laws, fitters and a compute-optimal planner.

Pure numpy / scipy / pandas (no torch), so it runs anywhere and imports in milliseconds.

* :mod:`~sectional_moe.theory.cost_model` — Sane 2025's cost model: A_trad, the reported
  reduction factors (literal, to falsify), the R1 reconstructions, S(E) and E_opt, exact block
  FLOPs via :mod:`sectional_moe.flops`, and κ fitted from measured step times;
* :mod:`~sectional_moe.theory.laws` — registry of published laws and coefficient sets
  (Chinchilla/Epoch, Clark, fine-grained, Ludziejewski 2025, Zhao 2025, Wan 2026);
* :mod:`~sectional_moe.theory.fitting` — Huber/L-BFGS-B multi-start fits, VPNLS, Clark,
  bootstrap, held-out extrapolation, explicit drop rules;
* :mod:`~sectional_moe.theory.planner` — budget → configurations → Hydra sweep command;
* ``python -m sectional_moe.theory cost | fit | plan | laws`` — the command line.

Every formula's docstring says whether it is a paper's statement ([P]), a secondary source's
([S]), derived here ([D]) or our reconstruction ([I]).
"""

from sectional_moe.theory.cost_model import (
    EOpt,
    KappaFit,
    block_flops_comparison,
    e_opt,
    e_opt_closed_form,
    e_opt_table,
    fit_kappa,
    kappa_in_macs,
    qkv_cost_traditional,
    r1_parallel_qkv_factor,
    r1_qkv_cost_fraction,
    r1_summed_qkv_factor,
    reduction_table,
    reported_attention_factor,
    reported_qkv_factor,
    savings,
)
from sectional_moe.theory.fitting import (
    DropRule,
    FitResult,
    apply_drop_rules,
    bootstrap_chinchilla,
    bootstrap_fit,
    extrapolation_eval,
    extrapolation_metrics,
    fit_chinchilla,
    fit_clark,
    fit_parametric,
    fit_vpnls,
    hoffmann_init_grid,
)
from sectional_moe.theory.laws import LAWS, Law, chinchilla_frontier, get_law, wan_d_opt, wan_m_opt, zhao_optima
from sectional_moe.theory.planner import Plan, PlannedRun, plan

__all__ = [
    "EOpt", "KappaFit", "block_flops_comparison", "e_opt", "e_opt_closed_form", "e_opt_table", "fit_kappa", "kappa_in_macs",
    "qkv_cost_traditional", "r1_parallel_qkv_factor", "r1_qkv_cost_fraction", "r1_summed_qkv_factor",
    "reduction_table", "reported_attention_factor", "reported_qkv_factor", "savings",
    "DropRule", "FitResult", "apply_drop_rules", "bootstrap_chinchilla", "bootstrap_fit", "extrapolation_eval",
    "extrapolation_metrics", "fit_chinchilla", "fit_clark", "fit_parametric", "fit_vpnls", "hoffmann_init_grid",
    "LAWS", "Law", "chinchilla_frontier", "get_law", "wan_d_opt", "wan_m_opt", "zhao_optima",
    "Plan", "PlannedRun", "plan",
]
