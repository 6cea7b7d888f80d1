"""Scaling-law fitters: the Hoffmann/Epoch Chinchilla fit, a generic fitter for any registered law,
VPNLS, Clark et al.'s per-router law, bootstrap intervals, extrapolation checks, explicit drop
rules, and the refusal of fits the data cannot identify.

The recipe follows ``shared/scaling-laws.md`` §2.4 and §8: summed Huber (δ = 1e-3) on log-loss
residuals, L-BFGS-B with exact gradients and tight tolerances from many starts (every start
kept), bootstrap CIs with a selectable resampling unit, held-out extrapolation error, and runs
dropped only by logged :class:`DropRule` objects. Every fitter first checks the design (≥
parameters + 1 points, enough distinct values per input) and attaches an identifiability verdict
(:attr:`FitResult.identified`).

Modules (each imports only modules listed before it; none imports this package's ``__init__``):

* :mod:`.result` — :class:`FitResult`, :class:`BootstrapResult`, JSON conversion;
* :mod:`.identify` — design checks (:class:`Underdetermined`) and the identifiability verdict;
* :mod:`.robust` — Huber loss, the multi-start runner, drop rules;
* :mod:`.chinchilla` — Hoffmann Approach 3 (:func:`fit_chinchilla`), init grids, derived a, b, G;
* :mod:`.parametric` — :func:`fit_parametric` for any registered law, :func:`fit_vpnls`;
* :mod:`.clark` — :func:`fit_clark`, :func:`fit_by_group`;
* :mod:`.resample` — bootstrap, holdout / leave-one-out / k-fold extrapolation checks.

Pure numpy/scipy/pandas.
"""

from sectional_moe.theory.fitting.chinchilla import (
    CHINCHILLA_PARAMS,
    CHINCHILLA_THETA,
    chinchilla_derived,
    chinchilla_jacobian,
    chinchilla_objective,
    chinchilla_predict_log,
    fit_chinchilla,
    hoffmann_init_grid,
    init_grid,
    params_to_theta,
    small_init_grid,
    theta_to_params,
)
from sectional_moe.theory.fitting.clark import fit_by_group, fit_clark
from sectional_moe.theory.fitting.identify import (
    Underdetermined,
    check_design,
    check_positive_finite,
    complex_step_jacobian,
    identifiability,
)
from sectional_moe.theory.fitting.parametric import fit_parametric, fit_vpnls
from sectional_moe.theory.fitting.resample import (
    CHINCHILLA_BOOTSTRAP,
    bootstrap_chinchilla,
    bootstrap_fit,
    bootstrap_verdict,
    chinchilla_fit_predict,
    cross_validate,
    extrapolation_eval,
    extrapolation_metrics,
    holdout_largest,
)
from sectional_moe.theory.fitting.result import BootstrapResult, FitResult, finite_or_none, jsonable
from sectional_moe.theory.fitting.robust import (
    TIGHT_TOL,
    DropRule,
    apply_drop_rules,
    drop_above,
    drop_nonfinite,
    drop_nonpositive,
    drop_top_k,
    drop_undertrained,
    huber,
    huber_grad,
    single_threaded_blas,
)

__all__ = [
    "CHINCHILLA_PARAMS", "CHINCHILLA_THETA", "chinchilla_derived", "chinchilla_jacobian", "chinchilla_objective",
    "chinchilla_predict_log", "fit_chinchilla", "hoffmann_init_grid", "init_grid", "params_to_theta", "small_init_grid",
    "theta_to_params", "fit_by_group", "fit_clark", "Underdetermined", "check_design", "check_positive_finite",
    "complex_step_jacobian", "identifiability", "fit_parametric", "fit_vpnls", "CHINCHILLA_BOOTSTRAP", "bootstrap_chinchilla",
    "bootstrap_fit", "bootstrap_verdict", "chinchilla_fit_predict", "cross_validate", "extrapolation_eval",
    "extrapolation_metrics", "holdout_largest", "BootstrapResult", "FitResult", "finite_or_none", "jsonable", "TIGHT_TOL",
    "DropRule", "apply_drop_rules", "drop_above", "drop_nonfinite", "drop_nonpositive", "drop_top_k", "drop_undertrained",
    "huber", "huber_grad", "single_threaded_blas",
]
