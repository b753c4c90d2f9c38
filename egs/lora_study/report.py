"""The study's report: every scored validation point as a row, the Pareto frontier of accent
against similarity on the held-out Japanese speakers, which method's points dominate which,
seed-to-seed spread, and the table and plot.

Axes, both higher-is-better: `ja_f0_corr` (log-F0 correlation with the held-out speaker's
ground truth after DTW: the pitch accent) and `ja_sim` (Resemblyzer similarity to that speaker's
prompt). A point is on the frontier when no other point is at least as good on both and better
on one.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zipvoice.dataset.manifests import write_text_atomically

X, Y = "ja_sim", "ja_f0_corr"
POINT_KEYS = ("ja_sim", "ja_f0_corr", "ja_f0_rmse", "ja_vuv_error", "en_sim", "ja_failed")
INTERVAL_KEYS = ("ja_sim_ci95", "ja_f0_corr_ci95", "en_sim_ci95")


def _half_width(values: list[float]) -> float:
    """95% half-width of a mean over lines (normal approximation; NaN lines left out)."""
    finite = np.array([v for v in values if math.isfinite(v)])
    if finite.size < 2:
        return math.nan
    return float(1.96 * finite.std(ddof=1) / math.sqrt(finite.size))


def add_intervals(results: Sequence[dict[str, Any]], folder_of: Any) -> None:
    """Each point's 95% half-widths over the eval lines (`<prefix><metric>_ci95`), from the
    scores.tsv files of `folder_of(result)`: how far apart two points must be to differ."""
    from scoring import read_scores

    for result in results:
        folder = folder_of(result)
        for step, point in result["points"].items():
            for sub, prefix, metrics in (("eval", "ja_", ("sim", "f0_corr")),
                                         ("eval_en/eval", "en_", ("sim",))):  # fmt: skip
                path = folder / sub / f"step-{step}" / "scores.tsv"
                if not path.is_file():
                    continue
                lines = read_scores(path).values()
                for metric in metrics:
                    values = [line.get(metric, math.nan) for line in lines]
                    point[f"{prefix}{metric}_ci95"] = _half_width(values)


def _loss_at(curves: dict[str, list], tag: str, step: int) -> float:
    for s, value in curves.get(tag, []):
        if s == step:
            return float(value)
    return math.nan


def point_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (run, validation step) with its scores and losses."""
    rows = []
    for result in results:
        curves = result.get("curves", {})
        for step_text, scores in sorted(result["points"].items(), key=lambda kv: int(kv[0])):
            step = int(step_text)
            row = {k: result.get(k) for k in ("run", "method", "lr", "seed")}
            keys = POINT_KEYS + INTERVAL_KEYS
            row.update(step=step, **{k: scores.get(k, math.nan) for k in keys})
            row["ja_dev_loss"] = _loss_at(curves, "valid/loss", step)
            row["en_forgetting_loss"] = _loss_at(curves, "valid/forgetting_loss", step)
            row["trainable_params"] = result.get("trainable_params")
            row["kind"] = "posthoc" if "source" in result else "train"
            rows.append(row)
    return rows


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point weakly dominates (both coordinates maximised),
    sorted by the first coordinate."""
    keep = []
    for i, (x, y) in enumerate(points):
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        dominated = any(
            (x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points)
            if j != i and math.isfinite(x2) and math.isfinite(y2)
        )  # fmt: skip
        if not dominated:
            keep.append(i)
    return sorted(keep, key=lambda i: points[i][0])


def dominance(rows: Sequence[dict[str, Any]], method: str, others: Sequence[str]) -> dict:
    """How many of the other methods' frontier points some point of `method` dominates:
    `method` dominates `other` when the answer is all of them."""

    def front(name: str) -> list[tuple[float, float]]:
        pts = [(r[X], r[Y]) for r in rows if r["method"] == name and r["step"] > 0]
        return [pts[i] for i in pareto(pts)]

    mine = front(method)
    out = {}
    for other in others:
        theirs = front(other)
        beaten = sum(
            any(x >= ox and y >= oy and (x > ox or y > oy) for x, y in mine) for ox, oy in theirs
        )
        out[other] = {"dominated": beaten, "of": len(theirs)}
    return out


def seed_spread(rows: Sequence[dict[str, Any]], main_seed: int) -> list[dict[str, Any]]:
    """Per repeated (method, lr) and step: mean and standard deviation over seeds."""
    seeded: dict[tuple, list[dict]] = {}
    for r in rows:
        seeded.setdefault((r["method"], r["lr"], r["step"]), []).append(r)
    out = []
    for (method, lr, step), group in sorted(seeded.items()):
        if len(group) < 2 or step == 0:
            continue
        entry: dict[str, Any] = {"method": method, "lr": lr, "step": step, "seeds": len(group)}
        for key in (X, Y, "en_sim"):
            values = np.array([g[key] for g in group], dtype=float)
            entry[f"{key}_mean"] = float(np.nanmean(values))
            entry[f"{key}_sd"] = float(np.nanstd(values, ddof=1))
        out.append(entry)
    return out


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(path, buffer.getvalue())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if not math.isfinite(value) else f"{value:.3f}"
    return str(value)


def markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def run_table(rows: Sequence[dict[str, Any]], frontier: set[tuple], main_seed: int) -> str:
    """One line per (method, lr) of the main seed: its final point, its best-accent point,
    and how many of its points are on the overall frontier."""
    runs: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["seed"] == main_seed and r["step"] > 0:
            runs.setdefault((r["method"], r["lr"]), []).append(r)
    table = []
    for (method, lr), pts in runs.items():
        last = max(pts, key=lambda r: r["step"])
        best = max(pts, key=lambda r: r[Y] if math.isfinite(r[Y]) else -9)
        on = sum((r["run"], r["step"]) in frontier for r in pts)
        table.append([method, f"{lr:g}", last.get("trainable_params") or "-", last["step"],
                      last[Y], last[X], last["en_sim"], last["ja_dev_loss"],
                      last["en_forgetting_loss"], best["step"], best[Y], best[X], on])  # fmt: skip
    headers = ["method", "lr", "trainable", "final step", "accent (f0 corr) ↑", "JA SIM ↑",
               "EN SIM ↑", "JA dev loss ↓", "EN forgetting loss ↓", "best-accent step",
               "its accent", "its JA SIM", "points on frontier"]  # fmt: skip
    return markdown(headers, table)


def plot(path: Path, rows: Sequence[dict[str, Any]], base: dict[str, float],
         ceil: dict[str, dict[str, float]], main_seed: int) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(21, 6.5))
    methods = sorted({r["method"] for r in rows})
    palette = plt.get_cmap("tab20").colors
    color = {m: palette[i % 20] for i, m in enumerate(methods)}
    main = [r for r in rows if r["seed"] == main_seed and r["step"] > 0]
    front = [main[i] for i in pareto([(r[X], r[Y]) for r in main])]
    panels = ((axes[0], X, "held-out JA speakers: SIM to the prompt"),
              (axes[1], "en_sim", "held-out EN speakers: SIM (forgetting)"))  # fmt: skip
    for ax, xkey, title in panels:
        for method, lr in sorted({(r["method"], r["lr"]) for r in main}):
            pts = sorted((r for r in main if r["method"] == method and r["lr"] == lr),
                         key=lambda r: r["step"])  # fmt: skip
            xs, ys = [p[xkey] for p in pts], [p[Y] for p in pts]
            ax.plot(xs, ys, "-", color=color[method], lw=0.7, alpha=0.6)
            label = method if lr == max(r["lr"] for r in main if r["method"] == method) else None
            ax.scatter(xs, ys, color=color[method], s=14 + 10 * np.arange(len(xs)), label=label)
        ax.scatter([base[xkey]], [base[Y]], marker="*", s=220, color="black", label="base model")
        gl = ceil["griffin_lim"]  # far off the points' scale: named, not drawn
        ax.set_xlabel(f"{xkey} (higher: closer to the prompt's voice)")
        ax.set_ylabel("accent: log-F0 correlation with ground truth (higher: better)")
        ax.set_title(f"{title}\n(Griffin-Lim ceiling: accent {gl[Y]:.3f}, SIM {gl[xkey]:.3f};"
                     " point size grows with the step)", fontsize=10)  # fmt: skip
    fx, fy = [r[X] for r in front], [r[Y] for r in front]
    axes[0].step(fx, fy, where="post", color="black", lw=1.4, label="Pareto frontier")
    axes[0].legend(fontsize=7, loc="lower left", ncol=2)
    _loss_panel(axes[2], main, base, color)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _loss_panel(ax: Any, main: Sequence[dict[str, Any]], base: dict[str, float],
                color: dict[str, Any]) -> None:  # fmt: skip
    """The language learned (JA dev loss, lower is better) against the English zero-shot SIM
    kept: the losses' view of the same runs (trained runs only; post-hoc variants have no loss)."""
    for method, lr in sorted({(r["method"], r["lr"]) for r in main if r["kind"] == "train"}):
        pts = sorted((r for r in main if r["method"] == method and r["lr"] == lr),
                     key=lambda r: r["step"])  # fmt: skip
        xs, ys = [p["ja_dev_loss"] for p in pts], [p["en_sim"] for p in pts]
        ax.plot(xs, ys, "-", color=color[method], lw=0.7, alpha=0.6)
        ax.scatter(xs, ys, color=color[method], s=14 + 10 * np.arange(len(xs)))
    ax.axhline(base["en_sim"], color="black", ls=":", lw=0.8)
    ax.set_xlabel("Japanese dev loss (lower: more of the language learned)")
    ax.set_ylabel("en_sim: held-out EN speakers (higher: zero-shot kept)")
    ax.set_title("the losses' view; dotted: the base model's EN SIM")
