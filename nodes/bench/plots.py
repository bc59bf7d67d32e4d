"""PNG plots for benchmark tables (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on edge boxes and CI
    import matplotlib.pyplot as plt

    return plt


# The size targets: (card bytes / fp16 KV bytes, F1 / text) a card must reach, drawn on each plot.
SIZE_TARGETS = ((0.1, 0.97), (0.05, 0.90))


def rate_quality_plot(rows: Sequence[Mapping[str, Any]], *, title: str, out: Path) -> Path:
    """x = card bytes / fp16 KV bytes (log), y = F1 relative to the text condition, a labelled point each.

    Conditions without KV (``no-context``, ``facts-only``) have no x: they are dotted lines across, and the
    size targets are stars, so a glance tells which points beat what.
    """
    plt = _pyplot()
    located = sum((r.get("size_vs_fp16") or 0) > 0 for r in rows)
    fig, ax = plt.subplots(figsize=(8, 5) if located <= 12 else (11, 7))
    for row in rows:
        x, y = row.get("size_vs_fp16"), row.get("f1_vs_text")
        if y is None or row.get("condition") == "text":
            continue
        if x is not None and x > 0:
            ax.scatter([x], [y], s=28)
            ax.annotate(str(row["condition"]), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        else:
            ax.axhline(y, color="tab:blue", lw=0.8, ls=":")
            ax.annotate(str(row["condition"]), (0.01, y), xycoords=("axes fraction", "data"), fontsize=7,
                        xytext=(0, 2), textcoords="offset points")  # fmt: skip
    for x, y in SIZE_TARGETS:
        ax.scatter([x], [y], marker="*", s=120, color="black", zorder=3)
        ax.annotate(f"target {1 / x:.0f}x at {y:.0%}", (x, y), fontsize=7, xytext=(4, -10),
                    textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("card bytes / fp16 KV bytes (log)")
    ax.set_ylabel("F1 relative to text")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def ttft_plot(
    series: Mapping[str, Sequence[tuple[float, float]]],
    *,
    title: str,
    out: Path,
    xlabel: str = "context tokens",
) -> Path:
    """One line per series of (x, ttft seconds) points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        pts = sorted(points)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("time to first token (s)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
