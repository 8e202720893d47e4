"""SLO attainment vs arrival rate, one line per policy (matplotlib, imported only here)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from dualmap_pd.sim.capacity import CapacityResult


class PlotUnavailable(RuntimeError):
    pass


def require_matplotlib() -> None:
    """Fail early (before hours of simulation) if plotting cannot work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib: pip install 'dualmap-pd[plot]'") from None


def plot_attainment(results: Mapping[str, CapacityResult], path: str | Path, target: float, title: str = "") -> Path:
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, res in results.items():
        # Overload points (squares) continue each policy's curve past its capacity.
        pts = sorted([(p.qps, p.slo_attainment) for p in res.points] + [(o.qps, o.slo_attainment) for o in res.overload])
        (line,) = ax.plot([q for q, _ in pts], [a for _, a in pts], marker="o", ms=3, label=f"{name} ({res.capacity_qps:.2f})")
        if res.overload:
            ax.plot([o.qps for o in res.overload], [o.slo_attainment for o in res.overload], "s", ms=6, color=line.get_color())
    ref = next((r.overload_reference for r in results.values() if r.overload_reference), None)
    if ref is not None:
        for factor in sorted({o.factor for r in results.values() for o in r.overload}):
            ax.axvline(ref[1] * factor, color="grey", ls=":", lw=0.8)
            ax.text(ref[1] * factor, 0.02, f" {factor:g}x {ref[0]}", fontsize=7, color="grey", rotation=90, va="bottom")
    ax.axhline(target, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("arrival rate (requests/s)")
    ax.set_ylabel("TTFT SLO attainment")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "SLO attainment vs arrival rate (legend: capacity)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
