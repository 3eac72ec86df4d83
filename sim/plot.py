"""A picture of a plan: each wafer's PE grid with every stage's region coloured and labelled."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from sim.placement import Plan  # noqa: E402

_KIND_COLOURS = {"embed": "#2b8cbe", "head": "#e34a33", "embed_head": "#8856a7"}


def draw_plan(plan: Plan, path: str) -> None:
    hw = plan.hw
    n = plan.n_wafers
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.5, 4.2 * cols), 3.2 * rows + 0.6), squeeze=False)
    cmap = plt.get_cmap("viridis")
    n_layers = plan.shape.n_layers
    for ax in axes.flat[n:]:
        ax.axis("off")
    for w, ax in zip(plan.wafers, axes.flat):
        ax.add_patch(Rectangle((0, 0), hw.pe_cols, hw.pe_rows, facecolor="#eeeeee", edgecolor="black", lw=1))
        centres = []
        for r in w.regions:
            st = r.stage
            colour = _KIND_COLOURS.get(st.kind) or cmap(0.15 + 0.8 * st.layer / max(1, n_layers - 1))
            ax.add_patch(Rectangle((r.col0, r.row0), r.cols, r.rows, facecolor=colour,
                                   edgecolor="white", lw=0.6))
            cx, cy = r.col0 + r.cols / 2, r.row0 + r.rows / 2
            centres.append((cx, cy))
            label = {"embed": "E", "head": "H", "embed_head": "E/H"}.get(st.kind, str(st.layer))
            if r.cols >= hw.pe_cols / 40:
                ax.text(cx, cy, label, ha="center", va="center", fontsize=6 if r.cols < hw.pe_cols / 16 else 8,
                        color="white")
        xs, ys = zip(*centres)
        ax.plot(xs, ys, color="black", lw=0.5, alpha=0.5)  # the token's path
        ax.set_xlim(0, hw.pe_cols)
        ax.set_ylim(hw.pe_rows, 0)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        first, last = w.regions[0].stage.label, w.regions[-1].stage.label
        ax.set_title(f"wafer {w.index}: {first}..{last}, {100 * w.pes_used / w.pes_total:.0f}% of PEs",
                     fontsize=9)
    fig.suptitle(f"{plan.shape.name} ({int(plan.shape.bytes_per_weight * 8)}-bit) on {n} x {hw.name} "
                 f"({hw.pe_rows}x{hw.pe_cols} PEs), KV for {plan.context} x {plan.batch}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
