"""Command line of the theory package: ``python -m sectional_moe.theory <command>``.

Commands (each takes ``--json`` for machine-readable output):

* ``cost``  — the paper's reduction factors (literal and reconstructed), E_opt, exact block FLOPs;
* ``fit chinchilla FILE.csv`` — Hoffmann/Epoch Huber fit, multi-start, bootstrap CIs, extrapolation checks;
* ``fit kappa FILE.csv`` — overhead constant κ from a sweep (quadratic vs linear, AIC), in the planner's unit;
* ``fit law NAME FILE.csv`` — generic fit of a registry law (zhao, fine_grained, joint_moe, ...);
* ``fit clark FILE.csv`` — Clark et al. per-router law (one fit per ``--group-col`` value);
* ``isoflop SOURCE`` — Hoffmann's Approaches 2 and 1 and Wan-style allocation laws from a sweep
  directory or W&B runs (read with the report's readers), the files the report writes
  (``runs.csv``, ``curves.csv``), or a CSV of runs;
* ``plan``  — compute-optimal configurations, their data and the Hydra sweep command;
* ``laws``  — the registry of laws with their coefficient sets and provenance.

Fits refuse data that cannot determine them and mark a fit "NOT IDENTIFIED" when the data do not
pin its parameters (``sectional_moe.theory.fitting.identify``); ``--plot FILE.png`` draws data,
fit and residuals. Bad input stops with one line naming the flag, exit code 2.

This module imports only the standard library at import time (``--help`` stays fast); each
command imports what it needs from ``theory``. ``isoflop`` of a sweep directory or W&B runs also
uses the report's readers: this module is an entry point, the one place in ``theory`` that may
import the report (tests/test_architecture.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from typing import Any, Sequence

CHINCHILLA_SETS = ("epoch", "epoch_huber_grid", "epoch_mle", "hoffmann_rounded", "hoffmann_tex")
LAW_NAMES = ("chinchilla", "clark", "fine_grained", "joint_moe", "zhao")
"""Registry names, spelled out so that ``--help`` needs no numpy; a test checks them against
:data:`sectional_moe.theory.laws.LAWS`."""


class CliError(ValueError):
    """Bad input: printed as one ``error:`` line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + message
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


# --------------------------------------------------------------------------------------------
# output helpers
# --------------------------------------------------------------------------------------------
def _clean(x: Any) -> Any:
    """Strict-JSON-safe: NaN/±inf/complex → None, numpy scalars and arrays → Python."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (str, bool)) or x is None:
        return x
    if isinstance(x, int):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, complex) or type(x).__name__.startswith("complex") or type(x).__name__ == "NAType":
        return None
    if hasattr(x, "to_dict") and hasattr(x, "columns"):  # a DataFrame
        return _clean(x.to_dict(orient="records"))
    if hasattr(x, "tolist"):  # numpy arrays and scalars
        return _clean(x.tolist())
    return str(x)


def _emit_json(obj: Any) -> None:
    print(json.dumps(_clean(obj), indent=2, allow_nan=False))


def _fmt(v: Any, spec: str | None = None) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)) or type(v).__name__ == "NAType":
        return "-"
    try:
        if v != v:  # NaN of any float type
            return "-"
    except (TypeError, ValueError):
        pass
    if spec:
        try:
            return format(v, spec)
        except (TypeError, ValueError):
            return str(v)
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int) or (hasattr(v, "is_integer") and type(v).__name__.startswith("int")):
        return str(int(v))
    if isinstance(v, float) or type(v).__name__.startswith("float"):
        a = abs(float(v))
        return f"{v:.4g}" if (a >= 1e5 or (a < 1e-3 and a > 0)) else f"{v:.4f}".rstrip("0").rstrip(".") if a < 1e3 else f"{v:.1f}"
    return str(v)


def format_table(df: Any, formats: dict[str, str] | None = None) -> str:
    """A plain fixed-width text table (right-aligned) of a DataFrame, for the human output."""
    formats = formats or {}
    cols = list(df.columns)
    cells = [[_fmt(row[c], formats.get(c)) for c in cols] for _, row in df.iterrows()]
    widths = [max(len(str(c)), *(len(r[i]) for r in cells)) if cells else len(str(c)) for i, c in enumerate(cols)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"{flag} {text!r}: use comma-separated integers, e.g. {flag} 2,4,8") from None
    if not out or min(out) <= 0:
        raise CliError(f"{flag} {text!r}: use positive integers, e.g. {flag} 2,4,8")
    return out


def _identified_line(fit: Any) -> str:
    if fit.identified:
        ident = fit.identifiability
        cond = ident.get("condition_number")
        return f"  identified: yes (rank {ident.get('rank')} of {ident.get('n_params')}" + (f", condition number {cond:.3g})" if cond else ")")
    return "  NOT IDENTIFIED: " + "; ".join(fit.identifiability.get("reasons", []))


# --------------------------------------------------------------------------------------------
# CSV input
# --------------------------------------------------------------------------------------------
def _read_csv(path: str) -> Any:
    import pandas as pd

    try:
        return pd.read_csv(path)
    except FileNotFoundError:
        raise CliError(f"file {path!r} not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise CliError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from None


def _need(df: Any, path: str, cols: dict[str, str]) -> None:
    """``cols``: column → the flag that names it. Missing ones are an error naming the flag."""
    missing = [f"{c!r} ({flag})" for c, flag in cols.items() if c not in df.columns]
    if missing:
        raise CliError(f"{path}: no column {', '.join(missing)}; the CSV has {list(df.columns)}: set the flag to one of them")


def _numeric(df: Any, path: str, cols: Sequence[str]) -> Any:
    """The columns as floats; a cell that is not a number (empty cells are allowed: dropped as
    non-finite and listed) is an error naming its row and column."""
    import pandas as pd

    df = df.copy()
    for c in dict.fromkeys(cols):
        raw = df[c]
        num = pd.to_numeric(raw, errors="coerce")
        bad = num.isna() & raw.notna() & (raw.astype(str).str.strip() != "")
        if bad.any():
            i = bad.idxmax()
            raise CliError(f"{path}: row {i} (line {i + 2}), column {c!r}: {raw[i]!r} is not a number; fix the cell or remove the row")
        df[c] = num.astype(float)
    return df


# --------------------------------------------------------------------------------------------
# cost
# --------------------------------------------------------------------------------------------
def cmd_cost(args: argparse.Namespace) -> int:
    import pandas as pd

    from sectional_moe.theory import cost_model as cm

    experts = _int_list(args.experts, "--experts")
    for flag, v in (("--d-model", args.d_model), ("--seq-len", args.seq_len)):
        if v <= 0:
            raise CliError(f"{flag} {v}: must be > 0")
    if min(args.kappa) <= 0:
        raise CliError(f"--kappa {args.kappa}: every κ must be > 0 (MACs per E² per sequence and layer)")
    table = cm.reduction_table(d_model=args.d_model, seq_len=args.seq_len, experts=experts)
    a_trad = cm.qkv_cost_traditional(d_model=args.d_model, seq_len=args.seq_len)
    b_trad = cm.attention_cost_traditional(d_model=args.d_model, seq_len=args.seq_len)
    eopt = {view: [cm.e_opt(a_trad=a_trad, kappa=k, view=view) for k in args.kappa] for view in ("parallel", "summed")}
    exact = None
    if not args.no_exact:
        exact = cm.block_flops_comparison(
            d_model=args.d_model, seq_len=args.seq_len, experts=experts, n_heads=args.n_heads,
            n_kv_heads=args.n_kv_heads, d_ff=args.d_ff, vocab_size=args.vocab_size,
        )
    if args.json:
        _emit_json({
            "d_model": args.d_model, "seq_len": args.seq_len, "A_trad_macs": a_trad, "B_trad_macs_qk": b_trad,
            "reduction_factors": table.to_dict(orient="records"),
            "e_opt": {view: [dict(kappa=k, **r.to_dict()) for k, r in zip(args.kappa, rs)] for view, rs in eopt.items()},
            "exact_block_flops": exact.to_dict(orient="records") if exact is not None else None,
            "kappa_unit": "MACs per E² per sequence and layer (the unit of A_trad)",
            "provenance": {
                "reported_qkv": "[S] arxivlens, literal (E^3+1)/E^2", "reported_attention": "[S] arxivlens, literal 3(2+3L)/(2E)",
                "r1_parallel": "[I] E^3/(E^2+1)", "r1_summed": "[I] E^2/(E+1)", "e_opt": "[I] reconstruction of S(E), paper-notes §2.4",
                "exact_block_flops": "[D] sectional_moe.models.flops on 1-layer specs",
            },
        })
        return 0
    print(f"Sectional MoE cost model (Sane 2025), d0={args.d_model}, L={args.seq_len}")
    print(f"A_trad = 3·L·d0² = {a_trad:.4g} MACs [S];  B_trad = L²·d0 = {b_trad:.4g} MACs (QKᵀ) [D]")
    print()
    print("Reduction factors cost_trad/cost_sect (literal strings: reading unknown)")
    print(format_table(table.rename(columns={
        "reported_qkv": "lit (E³+1)/E² [S]", "r1_parallel": "R1 E³/(E²+1) [I]", "r1_summed": "sum E²/(E+1) [I]",
        "reported_attention": "lit 3(2+3L)/(2E) [S]"}),
        {"d0/E": ".0f", "L/E": ".0f", "lit (E³+1)/E² [S]": ".3f", "R1 E³/(E²+1) [I]": ".3f", "sum E²/(E+1) [I]": ".3f", "lit 3(2+3L)/(2E) [S]": ".1f"}))
    print()
    for view, rs in eopt.items():
        print(f"E_opt of S(E) = A_trad(1 − A_sect/A_trad) − κE² [I], experts {view} (κ in MACs per E² per sequence and layer)")
        df = pd.DataFrame([{"kappa": k, "closed (A/2κ)^(1/3)": r.closed_form, "root dS/dE=0": r.numeric_root,
                            "best int": r.best_integer, "best 2^k": r.best_power_of_two} for k, r in zip(args.kappa, rs)])
        print(format_table(df, {"kappa": ".0e", "closed (A/2κ)^(1/3)": ".2f", "root dS/dE=0": ".2f"}))
        print()
    if exact is not None:
        print("Exact FLOPs, dense block / sectional block [D] (sectional_moe.models.flops, 1 layer, r = E, LM head excluded;")
        print(f"  n_heads={args.n_heads or max(1, args.d_model // 128)}, n_kv_heads={args.n_kv_heads or 'n_heads'}, d_ff={args.d_ff or cm.llama_d_ff(args.d_model)})")
        cols = ["E", "ratio_qkv", "ratio_attn_scores", "ratio_attn_out", "ratio_ffn", "ratio_block", "r1_summed", "r1_parallel", "reported_qkv"]
        print(format_table(exact[cols].rename(columns=lambda c: c.replace("ratio_", "")), {c.replace("ratio_", ""): ".3f" for c in cols[1:]}))
        bad = exact[exact["note"] != ""]
        for _, row in bad.iterrows():
            print(f"  E={row['E']}: {row['note']}")
    return 0


# --------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------
def _check_holdout_flags(args: argparse.Namespace) -> None:
    """Before any fitting: the extrapolation flags must go together."""
    if args.holdout is None and (args.holdout_above is not None or args.folds is not None):
        raise CliError("--holdout-above and --folds need --holdout (above, kfold)")
    if args.holdout_above is not None and args.holdout != "above":
        raise CliError("--holdout-above needs --holdout above")
    if args.folds is not None and args.holdout != "kfold":
        raise CliError("--folds needs --holdout kfold")
    if args.holdout == "above" and args.holdout_above is None:
        raise CliError("--holdout above needs --holdout-above C (a budget in FLOPs, C = 6·N·D)")
    if args.folds is not None and args.folds < 2:
        raise CliError(f"--folds {args.folds}: use at least 2")


def _holdout(args: argparse.Namespace, fit: Any, kept: Any) -> dict[str, Any] | None:
    from sectional_moe.theory import fitting as ft

    if args.holdout is None:
        return None
    data = kept.assign(_C=6.0 * kept[args.n_col] * kept[args.d_col]).reset_index(drop=True)
    fp = ft.chinchilla_fit_predict(fit, n_col=args.n_col, d_col=args.d_col, loss_col=args.loss_col, delta=args.delta)
    if args.holdout in ("loo", "kfold"):
        return ft.cross_validate(data=data, fit_predict=fp, target=args.loss_col, scheme=args.holdout, k=args.folds or 5, seed=args.seed)
    return ft.extrapolation_eval(data=data, fit_predict=fp, target=args.loss_col, holdout=args.holdout, budget_col="_C",
                                 n_col=args.n_col, threshold=args.holdout_above)


def cmd_fit_chinchilla(args: argparse.Namespace) -> int:
    import pandas as pd

    from sectional_moe.theory import fitting as ft

    if args.chinchilla_bootstrap and not args.bootstrap:
        raise CliError("--chinchilla-bootstrap needs --bootstrap N")
    if args.bootstrap < 0:
        raise CliError(f"--bootstrap {args.bootstrap}: must be >= 0")
    _check_holdout_flags(args)
    df = _read_csv(args.file)
    if args.d_col not in df.columns and args.c_col:
        _need(df, args.file, {args.n_col: "--n-col", args.c_col: "--c-col"})
        df = _numeric(df, args.file, [args.n_col, args.c_col])
        df[args.d_col] = df[args.c_col] / (6.0 * df[args.n_col])
    _need(df, args.file, {args.n_col: "--n-col", args.d_col: "--d-col (or --c-col)", args.loss_col: "--loss-col"})
    if args.bootstrap_unit != "run":
        _need(df, args.file, {args.bootstrap_unit: "--bootstrap-unit"})
    df = _numeric(df, args.file, [args.n_col, args.d_col, args.loss_col])
    rules = [ft.drop_nonfinite(args.n_col, args.d_col, args.loss_col), ft.drop_nonpositive(args.n_col, args.d_col, args.loss_col)]
    if args.max_loss is not None:
        rules.append(ft.drop_above(args.loss_col, args.max_loss))
    if args.min_tokens_per_param is not None:
        rules.append(ft.drop_undertrained(tokens=args.d_col, params=args.n_col, min_tokens_per_param=args.min_tokens_per_param))
    if args.drop_top_k:
        rules.append(ft.drop_top_k(args.loss_col, args.drop_top_k))
    kept, dropped = ft.apply_drop_rules(df, rules)
    grid = {"hoffmann": None, "small": ft.small_init_grid()}[args.grid]
    fit = ft.fit_chinchilla(N=kept[args.n_col], D=kept[args.d_col], L=kept[args.loss_col], delta=args.delta, init=grid,
                            reduce=args.reduce, n_jobs=args.jobs)
    fit.dropped = dropped
    if args.bootstrap:
        kw: dict[str, Any] = dict(n_boot=args.bootstrap, unit=args.bootstrap_unit, seed=args.seed)
        if args.chinchilla_bootstrap:
            kw.update(ft.CHINCHILLA_BOOTSTRAP, n_boot=args.bootstrap)
        ft.bootstrap_chinchilla(fit, data=kept.reset_index(drop=True), n_col=args.n_col, d_col=args.d_col, loss_col=args.loss_col, **kw)
    extrap = _holdout(args, fit, kept)
    if args.starts_csv:
        fit.starts.to_csv(args.starts_csv, index=False)
    if args.plot:
        from sectional_moe.theory import plots

        plots.save(plots.chinchilla_figure(fit, N=kept[args.n_col].to_numpy(), D=kept[args.d_col].to_numpy(), L=kept[args.loss_col].to_numpy(),
                                           n_label=f"N ({args.n_col})"), args.plot)
    if args.json:
        out = fit.to_dict()
        out["frontier_convention"] = "C = 6 N D"
        if extrap is not None:
            out["extrapolation"] = extrap
        if args.plot:
            out["plot"] = args.plot
        _emit_json(out)
        return 0
    s = fit.settings
    print(f"Chinchilla fit L = E + A/N^α + B/D^β (Hoffmann Eq. 2 [P]) on {fit.n_points} points of {args.file}")
    print(f"  {s['reduce']}-reduced Huber δ={s['delta']:g} on ln L, LSE parameterisation, L-BFGS-B + analytic gradient, "
          f"options {s['options']}, α and β in {s['bounds']['alpha']}")
    print(f"  starts: {s['n_starts']} ({s['n_starts_at_best']} reach the best objective); objective {fit.objective:.10g}; converged: {fit.success}")
    print(_identified_line(fit))
    if len(dropped):
        print(f"  dropped {len(dropped)} rows:")
        for _, r in dropped.iterrows():
            print(f"    row {r['row']}: {r['rule']}: {r['reason']}")
    rows = []
    values = {**fit.params, **fit.derived}
    b = fit.bootstrap
    for k, v in values.items():
        row = {"param": k, "value": v}
        if b is not None:
            row.update({"se": b.se.get(k), f"p{b.settings['ci'][0]:g}": b.ci_low.get(k), f"p{b.settings['ci'][1]:g}": b.ci_high.get(k)})
        rows.append(row)
    print()
    table = pd.DataFrame(rows)
    print(format_table(table, {"value": ".6g", "se": ".3g", **{c: ".5g" for c in table.columns if c.startswith("p") and c != "param"}}))
    if b is not None:
        print(f"  bootstrap: {len(b.samples)} resamples by {b.settings['unit']} (fraction {b.settings['fraction']:g}, "
              f"replace={b.settings['replace']}), {b.n_failed} failed")
    if extrap is not None:
        how = {"loo": "leave-one-out", "kfold": f"{extrap.get('folds')}-fold"}.get(extrap["holdout"], f"held out: {extrap['holdout']}")
        print(f"  extrapolation ({how}, {extrap['n_test']} predicted points, {extrap['n_train']} fitted): R²={_fmt(extrap['r2'])} "
              f"NMSE={_fmt(extrap['nmse'])} NMAE={_fmt(extrap['nmae'])} MAE={_fmt(extrap['mae'], '.4g')}")
        if extrap.get("note"):
            print(f"    {extrap['note']}")
        if extrap.get("failed_folds"):
            print(f"    {extrap['failed_folds']} refit(s) failed: {extrap['failures'][0]}")
    for w in fit.warnings:
        print(f"  warning: {w}")
    if args.plot:
        print(f"  plot: {args.plot}")
    return 0


def cmd_fit_kappa(args: argparse.Namespace) -> int:
    import pandas as pd

    from sectional_moe.theory import cost_model as cm
    from sectional_moe.theory import fitting as ft

    df = _read_csv(args.file)
    need = {args.e_col: "--e-col", args.time_col: "--time-col"}
    for col, flag in ((args.compute_col, "--compute-col"), (args.work_col, "--work-col")):
        if col:
            need[col] = flag
    _need(df, args.file, need)
    cols = list(need)
    df = _numeric(df, args.file, cols)
    if (args.sequences_per_step is None) != (args.sectional_layers is None):
        raise CliError("--sequences-per-step and --sectional-layers go together (both convert κ to MACs per E² per sequence and layer)")
    if args.sequences_per_step is not None and not args.work_col:
        raise CliError("--sequences-per-step needs --work-col (FLOPs per step: the FLOP rate comes from the exact compute term)")
    kept, dropped = ft.apply_drop_rules(df, [ft.drop_nonfinite(*cols)])
    r = cm.fit_kappa(experts=kept[args.e_col], step_time=kept[args.time_col],
                     compute=kept[args.work_col] if args.work_col else None,
                     compute_time=kept[args.compute_col] if args.compute_col else None, view=args.view, a_time=args.a_time)
    converted = None
    if args.sequences_per_step is not None:
        if r.rate is None:
            raise CliError(f"--sequences-per-step: the fit has no positive compute time a ({r.a_fit:.3g}), so no FLOP rate to convert κ with")
        converted = cm.kappa_in_macs(kappa_s=r.kappa, flop_rate=r.rate, sequences_per_step=args.sequences_per_step,
                                     sectional_layers=args.sectional_layers)
    if args.plot:
        from sectional_moe.theory import plots

        plots.save(plots.kappa_figure(r, experts=kept[args.e_col].to_numpy(), step_time=kept[args.time_col].to_numpy()), args.plot)
    if args.json:
        out = r.to_dict()
        out["dropped"] = dropped.to_dict(orient="records")
        out["kappa_macs_per_E2_seq_layer"] = converted
        _emit_json(out)
        return 0
    term = f"exact compute from column {args.work_col!r}" if r.compute_term == "exact" else f"R1 {r.view} (fallback)"
    print(f"κ fit from {len(kept)} measurements of {args.file} (mode {r.mode}, compute term g(E): {term}) [I]")
    rows = []
    for name, m in r.models.items():
        slope = "kappa" if name == "quadratic" else "lambda"
        rows.append({"model": m.formula, "slope": m.coef[slope], "se": m.se[slope], "RSS": m.rss, "AIC": m.aic, "AICc": m.aicc})
    print(format_table(pd.DataFrame(rows), {"slope": ".4g", "se": ".3g", "RSS": ".4g", "AIC": ".2f", "AICc": ".2f"}))
    verdict = "quadratic (as the paper claims [S])" if r.preferred == "quadratic" else "linear (against the paper's quadratic claim)"
    print(f"  preferred by AIC: {verdict}; ΔAIC(linear − quadratic) = {r.delta_aic:.2f}")
    unit = "time of the costliest run's compute" if r.compute_term == "exact" else "A_trad in time units"
    print(f"  κ = {r.kappa:.4g} ± {r.kappa_se:.2g} (time per E² per step); a ({unit}) = {r.a_time:.4g} ({r.a_time_source})")
    if r.rate is not None:
        print(f"  measured compute rate: {r.rate:.4g} per time unit (FLOP/s when --work-col is FLOPs per step and times are seconds)")
    if converted is not None:
        print(f"  κ = {converted:.4g} MACs per E² per sequence and sectional layer (the planner's unit: plan --kappa {converted:.4g}) [I]")
    print(f"  E_opt measured (lowest mean step time in the sweep): {r.measured_e_opt:g}")
    print(f"  E_opt of the fitted curve (continuous, within the sweep): {r.fitted_e_opt:.3f}")
    if r.predicted:
        p = r.predicted
        print(f"  E_opt predicted by S(E) [I]: closed form {p.closed_form:.3f}, root {p.numeric_root:.3f}, best integer {p.best_integer}, best power of two {p.best_power_of_two}")
    else:
        print(f"  E_opt predicted: n/a ({r.predicted_note})")
    print()
    print(format_table(r.per_e, {"mean_time": ".5g", "fit_quadratic": ".5g", "fit_linear": ".5g"}))
    return 0


def _parse_mapping(items: Sequence[str], flag: str, example: str) -> dict[str, str]:
    out = {}
    for it in items:
        if "=" not in it:
            raise CliError(f"{flag} {it!r}: use NAME=VALUE, e.g. {flag} {example}")
        k, v = it.split("=", 1)
        out[k] = v
    return out


def cmd_fit_law(args: argparse.Namespace) -> int:
    import pandas as pd

    from sectional_moe.theory import fitting as ft
    from sectional_moe.theory import laws as lw

    law = lw.get_law(args.law)
    df = _read_csv(args.file)
    mapping = {k: k for k in law.inputs}
    given = _parse_mapping(args.input or [], "--input", "N=n_total")
    unknown = sorted(set(given) - set(law.inputs))
    if unknown:
        raise CliError(f"--input {unknown}: law {law.name} has inputs {list(law.inputs)}")
    mapping.update(given)
    _need(df, args.file, {**{c: f"--input {k}=COLUMN" for k, c in mapping.items()}, args.loss_col: "--loss-col"})
    cols = list(mapping.values()) + [args.loss_col]
    df = _numeric(df, args.file, cols)
    kept, dropped = ft.apply_drop_rules(df, [ft.drop_nonfinite(*cols), ft.drop_nonpositive(args.loss_col)])
    try:
        fixed = {k: float(v) for k, v in _parse_mapping(args.fix or [], "--fix", "c=1.7").items()}
    except ValueError:
        raise CliError(f"--fix {args.fix}: values must be numbers, e.g. --fix c=1.7") from None
    if args.init is not None and args.init not in law.published:
        raise CliError(f"--init {args.init!r}: law {law.name} has coefficient sets {sorted(law.published)}")
    if args.starts < 0:
        raise CliError(f"--starts {args.starts}: must be >= 0")
    inputs = {k: kept[c].to_numpy() for k, c in mapping.items()}
    fit = ft.fit_parametric(law, inputs=inputs, L=kept[args.loss_col], loss=args.loss,
                            delta=args.delta, init=args.init, fixed=fixed, n_random_starts=args.starts, seed=args.seed)
    fit.dropped = dropped
    if args.plot:
        from sectional_moe.theory import plots

        plots.save(plots.parametric_figure(fit, law, inputs=inputs, L=kept[args.loss_col].to_numpy()), args.plot)
    if args.json:
        _emit_json(fit.to_dict())
        return 0
    print(f"{law.name} fit ({law.citation}; form {law.form_provenance}) on {fit.n_points} points")
    print(f"  {law.formula}")
    print(f"  loss {fit.settings['loss']} δ={args.delta:g}, {fit.settings['n_starts']} starts ({fit.settings['n_starts_at_best']} at best), objective {fit.objective:.10g}")
    print(_identified_line(fit))
    print(format_table(pd.DataFrame([{"param": k, "value": v, "fixed": k in fixed} for k, v in fit.params.items()]), {"value": ".6g"}))
    for w in fit.warnings:
        print(f"  warning: {w}")
    return 0


def cmd_fit_clark(args: argparse.Namespace) -> int:
    import pandas as pd

    from sectional_moe.theory import fitting as ft

    df = _read_csv(args.file)
    cols = [args.n_col, args.e_col, args.loss_col]
    _need(df, args.file, {args.n_col: "--n-col", args.e_col: "--e-col", args.loss_col: "--loss-col",
                          **({args.group_col: "--group-col"} if args.group_col else {})})
    df = _numeric(df, args.file, cols)
    kept, _ = ft.apply_drop_rules(df, [ft.drop_nonfinite(*cols), ft.drop_nonpositive(*cols)])
    groups = {k: g for k, g in kept.groupby(args.group_col, sort=True)} if args.group_col else {"all": kept}
    fits = {}
    for key, g in groups.items():
        try:
            fits[key] = ft.fit_clark(N=g[args.n_col], E=g[args.e_col], L=g[args.loss_col])
        except ft.Underdetermined as err:
            raise CliError(f"group {key!r}: {err}" if args.group_col else str(err)) from None
    if args.plot:
        from sectional_moe.theory import plots

        plots.save(plots.clark_figure(fits, groups, n_col=args.n_col, e_col=args.e_col, loss_col=args.loss_col), args.plot)
    if args.json:
        _emit_json({str(k): v.to_dict() for k, v in fits.items()})
        return 0
    rows = [{"group": k, **v.params, **v.derived, "objective": v.objective, "n": v.n_points, "identified": v.identified} for k, v in fits.items()]
    print("Clark et al. 2022 law per group [S]: log10 L = a log10 N + b log10 Ê + c log10 N log10 Ê + d")
    print(format_table(pd.DataFrame(rows), {"a": ".4f", "b": ".4f", "c": ".4f", "d": ".4f", "e_start": ".3f", "e_max": ".1f", "N_cut": ".3g", "objective": ".3g"}))
    for k, v in fits.items():
        if not v.identified:
            print(f"  {k}: NOT IDENTIFIED: " + "; ".join(v.identifiability.get("reasons", [])))
        for w in v.warnings:
            print(f"  {k}: warning: {w}")
    return 0


# --------------------------------------------------------------------------------------------
# isoflop
# --------------------------------------------------------------------------------------------
REPORT_COLUMNS = {"run": "run_id", "N": "params_non_embedding", "M": "flops_per_token", "C": "compute_flops"}
"""Columns of the report's tidy table (``runs.csv``) the analysis reads; detected automatically (N falls back
to ``params_total`` in a table written before the non-embedding count was a column)."""


def _collected(source: str) -> tuple[Any, Any]:
    """(the tidy run table, the training curves) of a sweep directory or ``wandb:ENTITY/PROJECT[/GROUP]``,
    read as the report reads them (the CLI is an entry point: it may use the report's readers)."""
    from sectional_moe.report.analysis import training_curves
    from sectional_moe.report.sources import collect

    try:
        table = collect(source)
    except (FileNotFoundError, ValueError) as err:
        raise CliError(f"{err}; give a sweep directory, wandb:ENTITY/PROJECT[/GROUP], a CSV of runs, or the directory "
                       f"where `python -m sectional_moe.report SOURCE` wrote runs.csv") from None
    return table, training_curves(table)


def _isoflop_files(source: str) -> tuple[str, str | None]:
    """(runs CSV, curves CSV or None) of SOURCE: a CSV file, or a directory holding a report's
    ``runs.csv`` (itself or its ``report/``), whose ``curves.csv`` carries the training curves."""
    from pathlib import Path

    path = Path(source)
    if path.is_file():
        return str(path), None
    if path.is_dir():
        for d in (path, path / "report"):
            if (d / "runs.csv").is_file():
                curves = d / "curves.csv"
                return str(d / "runs.csv"), str(curves) if curves.is_file() else None
        return "", None  # a sweep directory (run directories or offline W&B runs): collected like the report does
    raise CliError(f"{source}: no such file or directory (a CSV of runs, a sweep directory, a report's directory, or wandb:ENTITY/PROJECT[/GROUP])")


def _isoflop_runs(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(runs with columns run, family, N, M, C, L; curves with run, C, L or None; the conventions)."""
    import pandas as pd

    collected_curves = None
    if args.source.startswith("wandb:"):
        runs_path, curves_path = "", None
    else:
        runs_path, curves_path = _isoflop_files(args.source)
    if runs_path:
        df = _read_csv(runs_path)
    else:
        df, collected_curves = _collected(args.source)
        runs_path = args.source
    curves_path = args.curves or curves_path
    if "params_non_embedding" not in df.columns and "params_total" in df.columns:  # a table from before the column
        df = df.assign(params_non_embedding=df["params_total"])
    report = all(c in df.columns for c in REPORT_COLUMNS.values())
    if report:  # the report's tidy table: finished runs, exact counts
        loss = args.loss_col or "val_loss_best"
        _need(df, runs_path, {loss: "--loss-col", **({"state": "the report's state column"} if "state" in df.columns else {})})
        if "state" in df.columns:
            df = df[df["state"] == "done"]
        df = _numeric(df, runs_path, [*list(REPORT_COLUMNS.values())[1:], loss])
        runs = pd.DataFrame({k: df[c] for k, c in REPORT_COLUMNS.items()})
        runs["run"] = runs["run"].astype(str)
        runs["family"] = df["family"].astype(str) if "family" in df.columns else "all"
        runs["L"] = df[loss]
        convention = (f"the report's table: N = params_non_embedding, M = flops_per_token (exact), C = compute_flops = M·D, "
                      f"L = {loss}")
    else:
        loss = args.loss_col or "L"
        need = {args.n_col: "--n-col", loss: "--loss-col"}
        has_c, has_d, has_m = args.c_col in df.columns, args.d_col in df.columns, args.m_col in df.columns
        if not has_c and not has_d:
            need[args.d_col] = "--d-col (or --c-col)"
        _need(df, runs_path, need)
        df = _numeric(df, runs_path, [c for c in (args.n_col, loss, args.c_col, args.d_col, args.m_col) if c in df.columns])
        N = df[args.n_col]
        M = df[args.m_col] if has_m else (df[args.c_col] / df[args.d_col] if has_c and has_d else 6.0 * N)
        C = df[args.c_col] if has_c else M * df[args.d_col]
        family = df[args.family_col].astype(str) if args.family_col in df.columns else pd.Series("all", index=df.index)
        run = df[args.run_col].astype(str) if args.run_col in df.columns else pd.Series([f"row{i}" for i in df.index], index=df.index)
        runs = pd.DataFrame({"run": run, "family": family, "N": N, "M": M, "C": C, "L": df[loss]})
        convention = (f"M from {args.m_col!r}" if has_m else "M = C/D" if has_c and has_d else "M = 6N (C = 6ND)") + f", L = {loss}"
    curves = collected_curves
    if curves_path:
        cdf = _read_csv(curves_path)
        _need(cdf, curves_path, {"run": "a curves CSV column", "C": "a curves CSV column (FLOPs)", "L": "a curves CSV column (loss)"})
        cdf = _numeric(cdf, curves_path, ["C", "L"])
        curves = pd.DataFrame({"run": cdf["run"].astype(str), "C": cdf["C"], "L": cdf["L"]})
        if not report and args.run_col not in df.columns:
            raise CliError(f"--curves needs --run-col naming the run column of {runs_path} (no column {args.run_col!r})")
    return runs, curves, convention


def cmd_isoflop(args: argparse.Namespace) -> int:
    from sectional_moe.theory import isoflop as iso

    if args.bootstrap < 0:
        raise CliError(f"--bootstrap {args.bootstrap}: must be >= 0")
    if not 0 < args.budget_tol < 1:
        raise CliError(f"--budget-tol {args.budget_tol}: use a fraction in (0, 1), e.g. 0.05")
    runs, curves, convention = _isoflop_runs(args)
    results = iso.isoflop_analysis(runs, curves, tol=args.budget_tol, n_boot=args.bootstrap, seed=args.seed)
    if args.plot:
        from sectional_moe.theory import plots

        plots.save(plots.isoflop_figure(results, runs), args.plot)
    if args.json:
        _emit_json({"source": args.source, "conventions": convention, "families": [r.to_dict() for r in results]})
        return 0
    print(f"IsoFLOP analysis of {args.source} ({len(runs)} runs; {convention}; budgets: runs within {100 * args.budget_tol:g} % of C)")
    print("Hoffmann et al. 2022 Approach 2 [P method]: a parabola of loss in ln N (and ln M) per budget, its minimum, then power laws")
    for r in results:
        a2 = r.approach2
        print()
        print(f"== family {r.family} ({r.n_runs} runs)")
        prof = a2["profiles_N"].merge(a2["profiles_M"][["C", "M_opt"]], on="C", how="left")
        cols = ["C", "runs", "sizes", "N_min", "N_max", "N_opt", "M_opt", "L_opt", "status"]
        print(format_table(prof[cols], {"C": ".3g", "N_min": ".3g", "N_max": ".3g", "N_opt": ".4g", "M_opt": ".4g", "L_opt": ".4f"}))
        if a2.get("reason"):
            print(f"  Approach 2: no power law: {a2['reason']}")
        else:
            b = a2.get("bootstrap", {})

            def ci(name: str) -> str:
                return f" (95 % CI [{b['ci_low'][name]:.3f}, {b['ci_high'][name]:.3f}], {b['n_boot'] - b['failed']} resamples)" if "ci_low" in b else ""

            n, m, d = a2["N_opt"], a2["M_opt"], a2["D_opt"]
            print(f"  N_opt(C) = {n['k']:.4g}·C^{n['exponent']:.4f}{ci('a')}  [{n['n']} budgets]")
            print(f"  M_opt(C) = {m['k']:.4g}·C^{m['exponent']:.4f}{ci('m')}  (training FLOPs/token)")
            print(f"  D_opt(C) = {d['k']:.4g}·C^{d['exponent']:.4f}{ci('b')}  (= C/M_opt)")
            print(f"  a + b = {a2['a_plus_b']:.4f} (exactly 1 only when M ∝ N; with exact FLOPs ≈ 1)")
            print("  published, for comparison (exponents comparable; coefficients depend on data, tokenizer and N/C conventions):")
            print(f"    Wan et al. 2026 [P] (token MoE): M_opt = {iso.WAN_2026['M_coef']}·C^{iso.WAN_2026['M_exp']}, "
                  f"D_opt = {iso.WAN_2026['D_coef']}·C^{iso.WAN_2026['D_exp']}")
            ref = iso._chinchilla_reference()
            print(f"    Chinchilla, Epoch refit [P] (dense): N_opt ∝ C^{ref['a']:.4f}, D_opt ∝ C^{ref['b']:.4f}")
        a1 = r.approach1
        if a1 is None:
            print("  Approach 1 (envelope of training curves): no training curves (no curves.csv beside runs.csv, no --curves)")
        elif a1.get("reason"):
            print(f"  Approach 1 (envelope of training curves): {a1['reason']}")
        else:
            b1 = a1.get("bootstrap", {})
            ci1 = f" (95 % CI [{b1['ci_low']['a']:.3f}, {b1['ci_high']['a']:.3f}])" if "ci_low" in b1 else ""
            print(f"  Approach 1 (envelope of {a1['n_runs']} training curves): N_opt ∝ C^{a1['N_opt']['exponent']:.4f}{ci1}, "
                  f"D_opt ∝ C^{a1['D_opt']['exponent']:.4f}; winners in order: {', '.join(a1['winners'][:6])}")
        for note in r.notes:
            print(f"  note: {note}")
    if args.plot:
        print(f"\nplot: {args.plot}")
    return 0


# --------------------------------------------------------------------------------------------
# plan, laws
# --------------------------------------------------------------------------------------------
def cmd_plan(args: argparse.Namespace) -> int:
    import pandas as pd

    from sectional_moe.theory import planner as pl

    if args.kappa is not None and args.kappa_from is not None:
        raise CliError("--kappa and --kappa-from both give κ: pass one")
    if args.kappa_group is not None and args.kappa_from is None:
        raise CliError("--kappa-group needs --kappa-from fits.json")
    if args.fit_family is not None and args.from_fit is None:
        raise CliError("--fit-family needs --from-fit fits.json")
    if args.from_fit is not None and args.law == "wan2026":
        raise CliError("--from-fit gives a Chinchilla law; drop --law wan2026")
    if args.from_fit is not None and args.coefficients is not None:
        raise CliError("--from-fit and --coefficients both give the law's coefficients: pass one")
    kappa, kappa_origin = args.kappa, None
    if args.kappa_from is not None:
        kappa, kappa_origin = pl.kappa_from_fits(args.kappa_from, group=args.kappa_group)
    coefficients: Any = args.coefficients or "epoch_mle"
    origin = None
    if args.from_fit is not None:
        coefficients, origin = pl.coefficients_from_fit(args.from_fit, family=args.fit_family or args.family)
    p = pl.plan(
        budget=args.budget, family=args.family, experts=_int_list(args.experts, "--experts") if args.experts else None, routing=args.routing,
        law=args.law, coefficients=coefficients, coefficients_origin=origin, seq_len=args.seq_len, batch_size=args.batch_size,
        vocab_size=args.vocab_size, top_k=args.top_k, kappa=kappa, kappa_origin=kappa_origin, sectional_every=args.sectional_every,
        per_expert=args.per_expert, group=args.group, data=args.data, data_tokens=args.data_tokens, hub_path=args.hub_path,
        max_epochs=args.max_epochs, lr=args.lr,
    )
    if args.json:
        _emit_json(p.to_dict())
        return 0
    print(f"Plan for C = {p.budget:.3g} FLOPs, family {p.family}")
    print(f"  law: {p.law_provenance}")
    print("  allocation: " + ", ".join(f"{k}={v:.4g}" for k, v in p.allocation.items()))
    print(f"  batch: {p.batch_rule}")
    print(f"  learning rate: {p.lr_rule}")
    print(f"  experts: {p.expert_choice.get('rule')}")
    d = p.data
    if d["ok"]:
        print(f"  data: data={d['name']}, {d['train_tokens']:.3g} training tokens ({d['how']}); the plan uses {d['epochs']:.3g} epochs "
              f"(max {d['max_epochs']:g}; {d['chosen']})")
    else:
        print(f"  data: data=hub ({d['chosen']})")
    rows = [{
        "E": r.experts, "top_k": r.top_k, "d_model": r.d_model, "layers": r.n_layers, "heads": f"{r.n_heads}/{r.n_kv_heads}",
        "seq": r.seq_len, "N_total": r.n_total, "N_active": r.n_active, "M (FLOP/tok)": r.flops_per_token,
        f"vs {r.target_name}": r.matched, "gap": f"{100 * r.target_gap:+.1f}%", "tokens": r.tokens, "D_opt(law)": r.law_d_opt,
        "batch": r.batch_size, "steps": r.max_steps, "lr": r.lr, "pred. loss": r.predicted_loss,
    } for r in p.runs]
    target_col = f"vs {p.runs[0].target_name}"
    print(format_table(pd.DataFrame(rows), {"N_total": ".3g", "N_active": ".3g", "M (FLOP/tok)": ".3g", target_col: ".4g",
                                             "tokens": ".3g", "D_opt(law)": ".3g", "lr": ".3g", "pred. loss": ".4g"}))
    print("  tokens = C / M (exact training FLOPs per token incl. attention and LM head); steps = tokens / (batch · seq_len); "
          "gap = planned / law target − 1")
    for r in p.runs[:1]:
        print(f"  predicted loss ({r.predicted_loss_law}): {r.predicted_loss_note}")
        if r.optimum_loss is not None:
            print(f"  the law's optimum at this budget: {r.optimum_loss:.4g} nats; the planned allocation: {r.predicted_loss:.4g} "
                  f"(N {100 * r.target_gap:+.1f} %, D {100 * r.tokens_gap:+.1f} % from the optimum)")
    for w in p.warnings:
        print(f"  warning: {w}")
    for n in p.notes:
        print(f"  note: {n}")
    print()
    for c in p.commands:
        print(c)
    return 0


def cmd_laws(args: argparse.Namespace) -> int:
    from sectional_moe.theory import laws as lw

    if args.json:
        _emit_json({"loss_laws": {k: v.describe() for k, v in lw.LAWS.items()}, "allocation_laws": lw.ALLOCATION_LAWS})
        return 0
    for law in lw.LAWS.values():
        print(f"{law.name}: {law.formula}")
        print(f"  {law.citation} (arXiv {law.arxiv}); form {law.form_provenance}")
        print(f"  units: {law.conventions}")
        print(f"  a fit needs >= {len(law.params) + 1} points and distinct values: "
              + ", ".join(f"{k} {v}" for k, v in law.design_rules().items()))
        for name, cs in law.published.items():
            vals = ", ".join(f"{k}={v:.6g}" for k, v in cs.values.items())
            print(f"  - {name} {cs.provenance}: {vals}")
        print()
    for name, a in lw.ALLOCATION_LAWS.items():
        print(f"{name}: {a['formula']}  {a['provenance']}")
        print(f"  {a['citation']} (arXiv {a['arxiv']}); {a['conventions']}")
    return 0


# --------------------------------------------------------------------------------------------
def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m sectional_moe.theory", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("cost", help="reduction factors of the sectional MoE and its optimal expert count")
    c.add_argument("--d-model", type=int, default=4096)
    c.add_argument("--seq-len", type=int, default=2048)
    c.add_argument("--kappa", type=float, nargs="+", default=[1e7, 1e8, 1e9], help="overhead MACs per E² per sequence and layer (one or more)")
    c.add_argument("--experts", default="1,2,4,8,16,32,64")
    c.add_argument("--n-heads", type=int, default=None, help="for the exact FLOP table (default d_model/128)")
    c.add_argument("--n-kv-heads", type=int, default=None, help="default n_heads (MHA, as A_trad assumes)")
    c.add_argument("--d-ff", type=int, default=None, help="SwiGLU width (default LLaMA's 8/3·d rounded to 256)")
    c.add_argument("--vocab-size", type=int, default=32000)
    c.add_argument("--no-exact", action="store_true", help="skip the exact per-config FLOP table")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_cost)

    f = sub.add_parser("fit", help="fit a law to a CSV of runs")
    fs = f.add_subparsers(dest="what", required=True)

    fc = fs.add_parser("chinchilla", help="L = E + A/N^α + B/D^β by the Hoffmann/Epoch recipe")
    fc.add_argument("file")
    fc.add_argument("--n-col", default="N")
    fc.add_argument("--d-col", default="D")
    fc.add_argument("--c-col", default=None, help="compute column; D = C/(6N) when --d-col is absent")
    fc.add_argument("--loss-col", default="L")
    fc.add_argument("--delta", type=_positive_float, default=1e-3)
    fc.add_argument("--reduce", choices=["sum", "mean"], default="sum")
    fc.add_argument("--grid", choices=["hoffmann", "small"], default="hoffmann", help="hoffmann: the 4500-start grid (1-4 min)")
    fc.add_argument("--bootstrap", type=int, default=0, metavar="K", help="K bootstrap refits (0: none)")
    fc.add_argument("--bootstrap-unit", default="run", help="'run' or a column to resample clusters of")
    fc.add_argument("--chinchilla-bootstrap", action="store_true", help="Hoffmann's variant: 80%% without replacement, 10/90 percentiles (needs --bootstrap)")
    fc.add_argument("--drop-top-k", type=int, default=0, help="drop the K highest-loss rows (Epoch used 5)")
    fc.add_argument("--max-loss", type=float, default=None, help="drop rows with loss above this (diverged)")
    fc.add_argument("--min-tokens-per-param", type=float, default=None, help="drop under-trained rows (D/N below this)")
    fc.add_argument("--holdout", choices=["largest_budget", "largest_N", "above", "loo", "kfold"], default=None,
                    help="extrapolation check: hold out the largest budget / N, or every run with C = 6ND >= --holdout-above; "
                         "or pool leave-one-out / k-fold predictions")
    fc.add_argument("--holdout-above", type=_positive_float, default=None, metavar="C", help="budget threshold (FLOPs) for --holdout above")
    fc.add_argument("--folds", type=int, default=None, metavar="K", help="folds of --holdout kfold (default 5)")
    fc.add_argument("--jobs", type=int, default=1, help="worker processes for the multi-start grid")
    fc.add_argument("--starts-csv", default=None, help="write every start's result to this CSV")
    fc.add_argument("--plot", default=None, metavar="FILE.png", help="draw data, fit, residuals and the bootstrap band")
    fc.add_argument("--seed", type=int, default=0)
    fc.add_argument("--json", action="store_true")
    fc.set_defaults(func=cmd_fit_chinchilla)

    fk = fs.add_parser("kappa", help="overhead constant κ from step time vs E (quadratic vs linear, AIC)")
    fk.add_argument("file")
    fk.add_argument("--e-col", default="experts")
    fk.add_argument("--time-col", default="step_time")
    fk.add_argument("--compute-col", default=None, help="analytic compute time per step to subtract (overhead mode)")
    fk.add_argument("--work-col", default=None,
                    help="exact compute of each run (FLOPs per step, for a FLOP rate) used as g(E); default: R1 (fallback)")
    fk.add_argument("--view", choices=["summed", "parallel"], default="summed", help="R1 compute shape g(E) when no --work-col")
    fk.add_argument("--a-time", type=float, default=None, help="A_trad in the time unit, for the predicted E_opt")
    fk.add_argument("--sequences-per-step", type=_positive_float, default=None,
                    help="with --sectional-layers: convert κ (s/E² per step) to MACs per E² per sequence and sectional layer")
    fk.add_argument("--sectional-layers", type=int, default=None, help="sectional layers of the measured model")
    fk.add_argument("--plot", default=None, metavar="FILE.png", help="draw step time, both overhead fits and residuals")
    fk.add_argument("--json", action="store_true")
    fk.set_defaults(func=cmd_fit_kappa)

    fl = fs.add_parser("law", help="generic multi-start fit of a registry law")
    fl.add_argument("law", choices=LAW_NAMES)
    fl.add_argument("file")
    fl.add_argument("--input", action="append", metavar="INPUT=COLUMN", help="map a law input to a CSV column (repeatable)")
    fl.add_argument("--loss-col", default="L")
    fl.add_argument("--loss", choices=["huber_log", "huber", "mse"], default="huber_log")
    fl.add_argument("--delta", type=_positive_float, default=1e-3)
    fl.add_argument("--init", default=None, help="published coefficient set to start from (default: the law's default)")
    fl.add_argument("--fix", action="append", metavar="PARAM=VALUE", help="hold a coefficient fixed (repeatable)")
    fl.add_argument("--starts", type=int, default=20, help="random starts around the init")
    fl.add_argument("--plot", default=None, metavar="FILE.png", help="draw observed vs fitted and residuals")
    fl.add_argument("--seed", type=int, default=0)
    fl.add_argument("--json", action="store_true")
    fl.set_defaults(func=cmd_fit_law)

    fcl = fs.add_parser("clark", help="Clark et al. 2022 law, one fit per group (router)")
    fcl.add_argument("file")
    fcl.add_argument("--n-col", default="N")
    fcl.add_argument("--e-col", default="E")
    fcl.add_argument("--loss-col", default="L")
    fcl.add_argument("--group-col", default=None)
    fcl.add_argument("--plot", default=None, metavar="FILE.png", help="draw loss vs E per N with the fits, and residuals")
    fcl.add_argument("--json", action="store_true")
    fcl.set_defaults(func=cmd_fit_clark)

    fi = sub.add_parser("isoflop", help="IsoFLOP profiles (Approach 2), training-curve envelope (Approach 1), allocation laws")
    fi.add_argument("source", help="a sweep directory (run directories or offline W&B runs), wandb:ENTITY/PROJECT[/GROUP], "
                                   "a report's directory (its runs.csv and curves.csv), or a CSV of runs")
    fi.add_argument("--loss-col", default=None, help="loss column (default L; val_loss_best in a report's runs.csv)")
    fi.add_argument("--n-col", default="N", help="CSV: parameters")
    fi.add_argument("--c-col", default="C", help="CSV: training compute in FLOPs (else M·D)")
    fi.add_argument("--d-col", default="D", help="CSV: training tokens")
    fi.add_argument("--m-col", default="M", help="CSV: training FLOPs per token (else C/D, else 6N)")
    fi.add_argument("--family-col", default="family", help="CSV: one analysis per value (absent: one family)")
    fi.add_argument("--run-col", default="run", help="CSV: run names (joins --curves)")
    fi.add_argument("--curves", default=None, help="CSV of training curves (columns run, C, L) for Approach 1")
    fi.add_argument("--budget-tol", type=float, default=0.05, help="runs within this fraction of C form one budget (default 0.05)")
    fi.add_argument("--bootstrap", type=int, default=200, metavar="K", help="bootstrap resamples for the bands (0: none; default 200)")
    fi.add_argument("--plot", default=None, metavar="FILE.png", help="draw the profiles and N_opt(C)")
    fi.add_argument("--seed", type=int, default=0)
    fi.add_argument("--json", action="store_true")
    fi.set_defaults(func=cmd_isoflop)

    pp = sub.add_parser("plan", help="compute-optimal configurations, their data and the Hydra sweep command")
    pp.add_argument("--budget", type=_positive_float, required=True, help="training compute C in FLOPs")
    pp.add_argument("--family", choices=["dense", "moe", "sectional"], required=True)
    pp.add_argument("--experts", default=None, help="comma list; default: chosen from the laws (Zhao G* for moe, exact cost + κE² for sectional)")
    pp.add_argument("--routing", default=None)
    pp.add_argument("--law", choices=["chinchilla", "wan2026"], default=None)
    pp.add_argument("--coefficients", default=None, choices=CHINCHILLA_SETS, help="published Chinchilla set (default epoch_mle)")
    pp.add_argument("--from-fit", default=None, metavar="FITS.json",
                    help="plan from our own Chinchilla fit: `theory fit chinchilla --json` output or a report's fits.json")
    pp.add_argument("--fit-family", default=None, help="which family's fit of a report's fits.json (default --family)")
    pp.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the largest power of two <= d_model/2)")
    pp.add_argument("--batch-size", type=int, default=None,
                    help="sequences per step; default round(0.2920·C^0.3271 / seq_len) (DeepSeek LLM Eq. 1)")
    pp.add_argument("--lr", type=_positive_float, default=None, help="peak learning rate; default 0.3118·C^-0.125 (DeepSeek LLM Eq. 1)")
    pp.add_argument("--vocab-size", type=int, default=8192)
    pp.add_argument("--top-k", type=int, default=None, help="moe experts per token; default round(Zhao G*) = 7, fine-grained")
    pp.add_argument("--kappa", type=float, default=None,
                    help="sectional overhead κ in MACs per E² per sequence and sectional layer (default: a placeholder, see notes)")
    pp.add_argument("--kappa-from", default=None, metavar="FITS.json", help="κ measured by a report (its fits.json), converted")
    pp.add_argument("--kappa-group", default=None, help="which κ fit of --kappa-from (its group label)")
    pp.add_argument("--sectional-every", type=int, default=2, help="every k-th layer sectional (conf/model/sectional.yaml: 2)")
    pp.add_argument("--data", default=None, choices=["shakespeare", "wikitext103", "hub", "text_files"],
                    help="data config; default: the smallest known corpus holding the planned tokens")
    pp.add_argument("--data-tokens", type=_positive_float, default=None, help="training tokens of --data (required for hub/text_files)")
    pp.add_argument("--hub-path", default=None, help="data.hub_path of --data hub")
    pp.add_argument("--max-epochs", type=_positive_float, default=1.0, help="epochs of the data a plan may use (default 1)")
    pp.add_argument("--per-expert", type=int, default=1, help="shapes to propose per expert count")
    pp.add_argument("--group", default=None, help="W&B group (default plan_<budget>)")
    pp.add_argument("--json", action="store_true")
    pp.set_defaults(func=cmd_plan)

    lp = sub.add_parser("laws", help="list the registry of scaling laws")
    lp.add_argument("--json", action="store_true")
    lp.set_defaults(func=cmd_laws)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyError as err:
        print(f"error: {err.args[0] if err.args else err}", file=sys.stderr)
        return 2
    except ValueError as err:  # CliError, Underdetermined, PlanError, bad values
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
