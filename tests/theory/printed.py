"""Compare a computed value with a reference number at the precision the reference was printed."""

from __future__ import annotations


def half_unit(printed: str) -> float:
    """Half a unit in the last printed digit of ``printed`` ("21.6" -> 0.05, "1.29e10" -> 5e7)."""
    text = printed.strip().lower()
    mantissa, _, exponent = text.partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return 0.5 * 10.0 ** (int(exponent or 0) - decimals)


def assert_printed(value: float, printed: str) -> None:
    """``value`` rounds to ``printed``: |value − ref| ≤ half a unit of its last digit.

    For references printed to 3 significant digits a 1e-3 relative tolerance is meaningless (the
    printing alone is off by up to 0.3 %); the check is exactly "same number at that precision".
    """
    ref, tol = float(printed), half_unit(printed)
    assert abs(float(value) - ref) <= tol * (1 + 1e-12), f"{value!r} does not round to the printed reference {printed} (±{tol:g})"
