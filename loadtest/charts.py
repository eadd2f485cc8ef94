"""PNG charts (matplotlib, installed by ``make bench`` from loadtest/requirements.txt).

- ``latency.png``: the latency percentile spectrum per target for each throughput scenario,
  from the client histograms of every round merged;
- ``cpu.png``: the terminator's CPU per unit of work per target (median, min-max bars), and
  the PSS per idle connection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.load import Histogram
from loadtest.report import CPU_UNITS, TARGET_ORDER, cells

COLORS = {"edgeterm": "#d62728", "haproxy": "#1f77b4", "nginx": "#2ca02c"}
QUANTILES = (50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.99)


def _nines(q: float) -> float:
    return -math.log10(1.0 - q / 100.0)


def write(records: Sequence[dict[str, Any]], directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    directory.mkdir(parents=True, exist_ok=True)
    cs = cells(records)
    written: list[Path] = []

    scenarios = [s for s in CPU_UNITS if any(k[0] == s for k in cs)]
    if scenarios:
        fig, axes = plt.subplots(1, len(scenarios), figsize=(3.0 * len(scenarios), 3.4), dpi=80)
        axes_list = list(axes) if len(scenarios) > 1 else [axes]
        for ax, scenario in zip(axes_list, scenarios, strict=True):
            for target in TARGET_ORDER:
                cell = cs.get((scenario, target))
                if cell is None:
                    continue
                hist = Histogram()
                for run in cell.runs:
                    hist.merge(Histogram.from_pairs(run.get("latency_hist") or []))
                points = [(q, hist.percentile(q)) for q in QUANTILES if hist.count]
                xs = [_nines(q) for q, v in points if v is not None]
                ys = [v / 1000.0 for _, v in points if v is not None]
                ax.plot(xs, ys, marker="o", ms=3, label=target, color=COLORS.get(target))
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _pos: f"{v:g}"))
            ax.yaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xticks([_nines(q) for q in (50.0, 90.0, 99.0, 99.9, 99.99)])
            ax.set_xticklabels(["50", "90", "99", "99.9", "99.99"], fontsize=7)
            ax.set_title(scenario, fontsize=9)
            ax.set_xlabel("percentile", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, which="both", alpha=0.3)
        axes_list[0].set_ylabel("latency per request, ms (log)", fontsize=8)
        axes_list[0].legend(fontsize=7)
        fig.tight_layout()
        path = directory / "latency.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)

    panels: list[tuple[str, str]] = [(s, CPU_UNITS[s][1]) for s in scenarios]
    if any(k[0] == "idle" for k in cs):
        panels.append(("idle", "KiB PSS/connection"))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 3.0), dpi=80)
        axes_list = list(axes) if len(panels) > 1 else [axes]
        for ax, (scenario, unit) in zip(axes_list, panels, strict=True):
            names, meds, lows, highs = [], [], [], []
            for target in TARGET_ORDER:
                cell = cs.get((scenario, target))
                if cell is None:
                    continue
                s = cell.spread("kib_per_conn") if scenario == "idle" else cell.cpu
                if s is None:
                    continue
                names.append(target)
                meds.append(s.median)
                lows.append(s.median - s.low)
                highs.append(s.high - s.median)
            ax.bar(
                names,
                meds,
                yerr=[lows, highs],
                capsize=3,
                color=[COLORS.get(n, "grey") for n in names],
            )
            ax.set_title(f"{scenario}\n{unit}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.tick_params(axis="x", rotation=30)
            ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        path = directory / "cpu.png"
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
