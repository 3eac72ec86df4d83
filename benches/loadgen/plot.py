"""Plots of `wafer bench serve` results (matplotlib, Agg): latency against throughput (one point per
run: a sweep draws the curve up to saturation) and each run's latency distributions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

PANELS = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency"))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_vs_throughput(results: list[dict[str, Any]], path: Path) -> Path:
    """2x2 panels: median and the highest percentile of TTFT, TPOT, ITL and E2EL (and their
    simulated medians when the server emulates a wafer) against output tokens/s."""
    plt = _pyplot()
    rs = sorted(results, key=lambda r: r["output_throughput"])
    x = [r["output_throughput"] for r in rs]
    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    for ax, (m, title) in zip(axes.flat, PANELS):
        ax.plot(x, [r[f"median_{m}_ms"] for r in rs], "o-", label="median")
        pcts = sorted((k for k in rs[0] if k.startswith("p") and k.endswith(f"_{m}_ms")
                       and not k.startswith("p_") and "sim" not in k),
                      key=lambda k: float(k[1:].split("_")[0]))
        if pcts:
            ax.plot(x, [r[pcts[-1]] for r in rs], "s--", label=pcts[-1].split("_")[0])
        if f"median_sim_{m}_ms" in rs[0]:
            ax.plot(x, [r.get(f"median_sim_{m}_ms", np.nan) for r in rs], "^:", label="simulated median")
        for xi, r in zip(x, rs):
            ax.annotate(r["label"], (xi, r[f"median_{m}_ms"]), fontsize=7, alpha=0.7,
                        textcoords="offset points", xytext=(3, 3))
        ax.set_title(title)
        ax.set_xlabel("output throughput (tok/s)")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{rs[0]['model_id']} on {rs[0].get('server', '')}: latency vs throughput")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_cdfs(results: list[dict[str, Any]], path: Path) -> Path:
    """Per run, the CDF of TTFT and of the per-token ITL (chunk rule: see metrics.py)."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for r in results:
        ok = [i for i, n in enumerate(r["output_lens"]) if n > 0]
        for ax, vals in ((a, [r["ttfts"][i] for i in ok]), (b, [x for i in ok for x in r["itls"][i]])):
            if vals:
                v = np.sort(np.asarray(vals) * 1e3)
                ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=r["label"])
    for ax, title in ((a, "TTFT"), (b, "ITL (per token)")):
        ax.set_title(f"{title} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if ax is a else "fraction of tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_results(results: list[dict[str, Any]], directory: Path, stem: str) -> list[Path]:
    return [latency_vs_throughput(results, directory / f"{stem}-latency-vs-throughput.png"),
            latency_cdfs(results, directory / f"{stem}-latency-cdf.png")]
