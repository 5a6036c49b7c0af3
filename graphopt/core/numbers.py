"""Numbers as people read them: counts with SI suffixes, bytes in binary units, ratios, seconds.

One place, so the terminal, the reports and the analysis tables print the same number the same way.
"""

from __future__ import annotations


def format_count(n: int | float | None) -> str:
    """A count with an SI suffix: ``999``, ``1.00k``, ``45.7k``, ``456.7k``, ``1.23M``, ``4.10G``.

    Three significant digits below 10 of a unit, one decimal above; ``None`` is ``"unknown"``.

    >>> format_count(1234567), format_count(456_700), format_count(42), format_count(None)
    ('1.23M', '456.7k', '42', 'unknown')
    """
    if n is None:
        return "unknown"
    return _scaled(n, 1000, ("", "k", "M", "G", "T", "P"), sep="")


def format_bytes(n: int | float | None) -> str:
    """A byte size in binary units: ``512 B``, ``1.50 KiB``, ``97.8 MiB``; ``None`` is ``"unknown"``.

    >>> format_bytes(512), format_bytes(1536), format_bytes(102_500_000)
    ('512 B', '1.50 KiB', '97.8 MiB')
    """
    if n is None:
        return "unknown"
    return _scaled(n, 1024, ("B", "KiB", "MiB", "GiB", "TiB", "PiB"), sep=" ")


def _scaled(n: int | float, base: int, units: tuple[str, ...], sep: str) -> str:
    sign, value, exponent = ("-" if n < 0 else ""), abs(n), 0
    # Compare the *printed* value with the base, so 999_990 reads 1.00M rather than 1000.0k.
    while exponent < len(units) - 1 and round(value, 1) >= base:
        value, exponent = value / base, exponent + 1
    if exponent == 0:
        text = f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}"
    else:
        text = f"{value:.2f}" if round(value, 2) < 10 else f"{value:.1f}"
    return f"{sign}{text}{sep}{units[exponent]}"


def format_ratio(before: float | None, after: float | None) -> str:
    """``after / before`` as ``0.482×``; ``"-"`` when either is unknown or ``before`` is 0.

    >>> format_ratio(1000, 482), format_ratio(None, 3), format_ratio(0, 0)
    ('0.482×', '-', '-')
    """
    if before is None or after is None or before == 0:
        return "-"
    return f"{after / before:.3g}×"


def format_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.0f} ms" if s >= 0.0005 else "<1 ms"
    return f"{s:.2f} s" if s < 60 else f"{int(s // 60)} min {s % 60:.0f} s"
