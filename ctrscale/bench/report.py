"""The reports of an AUC-versus-batch sweep: mean ± std over seeds per (batch size, method),
Markdown tables and plots.

Every cell is compared with the **best ×1 result of the sweep** — the best mean test AUC at
the smallest batch size over every method — not only with its own method's ×1: methods (and
embedding-update semantics) change the small-batch baseline too, and a method that holds its
own weak baseline has not closed the large-batch gap. The same per frequency bucket of each
eval row's rarest id, and AUC versus wall-clock time for the cost of each method.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CSV_COLUMNS = (
    "batch_size", "scale", "rule", "scaling_rule", "dense_optimizer", "semantics", "seed",
    "embedding_lr", "embedding_l2", "dense_lr", "dense_warmup_steps", "cowclip",
    "auc", "logloss", "bayes_auc", "bayes_auc_gap", "steps", "epochs",
    "train_rows_per_s", "wall_seconds", "run_dir",
)  # fmt: skip


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation; std is None below two values (it is unknown)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def bucket_labels(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The frequency buckets the runs report, in their order (rarest first)."""
    labels: dict[str, None] = {}
    for row in rows:
        labels.update(dict.fromkeys(row.get("buckets") or {}))
    return list(labels)


def summarize(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std over seeds for each (batch size, rule), in batch-size then first-seen order."""
    rows = list(rows)
    labels = bucket_labels(rows)
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["batch_size"], row["rule"]), []).append(row)
    summary = []
    for (batch_size, rule), members in sorted(groups.items(), key=lambda item: item[0][0]):

        def present(key: str, members=members) -> list[float]:
            return [m[key] for m in members if m.get(key) is not None]

        auc_mean, auc_std = mean_std(present("auc"))
        logloss_mean, logloss_std = mean_std(present("logloss"))
        buckets = {}
        for label in labels:
            values = [
                m["buckets"][label]
                for m in members
                if (m.get("buckets") or {}).get(label) is not None
            ]
            buckets[label] = dict(zip(("auc_mean", "auc_std"), mean_std(values), strict=True))
        summary.append(
            {
                "batch_size": batch_size,
                "rule": rule,
                "seeds": sorted(m["seed"] for m in members),
                "auc_mean": auc_mean,
                "auc_std": auc_std,
                "logloss_mean": logloss_mean,
                "logloss_std": logloss_std,
                "bayes_auc": mean_std(present("bayes_auc"))[0],
                "bayes_auc_gap_mean": mean_std(present("bayes_auc_gap"))[0],
                "steps": members[0]["steps"],
                "train_rows_per_s_mean": mean_std(present("train_rows_per_s"))[0],
                "wall_seconds_mean": mean_std(present("wall_seconds"))[0],
                "buckets": buckets,
            }
        )
    return summary


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """One row per run; each frequency bucket's AUC as a column `auc[<bucket>]`."""
    labels = bucket_labels(rows)
    columns = [*CSV_COLUMNS, *(f"auc[{label}]" for label in labels)]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            flat = {key: row.get(key) for key in CSV_COLUMNS}
            flat.update({f"auc[{k}]": v for k, v in (row.get("buckets") or {}).items()})
            writer.writerow(flat)


def percent(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "—"
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def delta(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else value - reference


def points(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:+.2f}"


def best_base(summary: list[dict[str, Any]], bucket: str | None = None) -> tuple[float, str]:
    """The best mean AUC at the smallest batch size over every method, and its method."""
    smallest = min(s["batch_size"] for s in summary)
    candidates = [
        (_auc(s, bucket), s["rule"])
        for s in summary
        if s["batch_size"] == smallest and _auc(s, bucket) is not None
    ]
    return max(candidates) if candidates else (None, None)


def _auc(cell: dict[str, Any], bucket: str | None) -> float | None:
    if bucket is None:
        return cell.get("auc_mean")
    return (cell.get("buckets") or {}).get(bucket, {}).get("auc_mean")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def markdown_table(
    summary: list[dict[str, Any]], rules: list[str], batch_sizes: list[int], base: int
) -> str:
    """Absolute test AUC per (batch size, method); each cell's difference to the best ×1
    result; to its own method's ×1; and per frequency bucket."""
    by_cell = {(s["batch_size"], s["rule"]): s for s in summary}
    bayes = {s["batch_size"]: s["bayes_auc"] for s in summary if s["bayes_auc"] is not None}
    steps = {s["batch_size"]: s["steps"] for s in summary}
    smallest = min(batch_sizes)

    def cell(batch: int, rule: str) -> dict[str, Any]:
        return by_cell.get((batch, rule), {})

    lines = ["Test AUC (%), mean ± std over seeds", ""]
    lines += _table(
        ["batch", "× base", "steps", *rules, "Bayes AUC"],
        [
            [f"{b:,}", f"×{b / base:g}", str(steps.get(b, "—"))]
            + [percent(cell(b, r).get("auc_mean"), cell(b, r).get("auc_std")) for r in rules]
            + [percent(bayes.get(b), None)]
            for b in batch_sizes
        ],
    )
    best, best_rule = best_base(summary) if summary else (None, None)
    if best is not None:
        lines += [
            "",
            f"Difference to the best ×1 result ({percent(best, None)}, {best_rule} at batch "
            f"{smallest:,}), percentage points",
            "",
        ]
        lines += _table(
            ["batch", *rules],
            [[f"{b:,}"] + [points(delta(_auc(cell(b, r), None), best)) for r in rules]
             for b in batch_sizes],
        )  # fmt: skip
    lines += ["", f"Change from each method's own batch {smallest:,} (percentage points)", ""]
    own = {r: _auc(cell(smallest, r), None) for r in rules}
    lines += _table(
        ["batch", *rules],
        [[f"{b:,}"] + [points(delta(_auc(cell(b, r), None), own[r])) for r in rules]
         for b in batch_sizes],
    )  # fmt: skip
    for label in bucket_labels_of(summary):
        bucket_best, bucket_rule = best_base(summary, label)
        lines += [
            "",
            f"Rows whose rarest id was seen {label} times in training: test AUC (%), and the "
            f"difference to that bucket's best ×1 ({percent(bucket_best, None)}, {bucket_rule})",
            "",
        ]
        lines += _table(
            ["batch", *rules],
            [
                [f"{b:,}"] + [_bucket_cell(cell(b, r), label, bucket_best) for r in rules]
                for b in batch_sizes
            ],
        )
    return "\n".join(lines) + "\n"


def _bucket_cell(cell: dict[str, Any], label: str, best: float | None) -> str:
    stats = (cell.get("buckets") or {}).get(label, {})
    mean = stats.get("auc_mean")
    if mean is None:
        return "—"
    delta = "" if best is None else f" ({points(mean - best)})"
    return percent(mean, stats.get("auc_std")) + delta


def bucket_labels_of(summary: list[dict[str, Any]]) -> list[str]:
    labels: dict[str, None] = {}
    for cell in summary:
        labels.update(dict.fromkeys(cell.get("buckets") or {}))
    return list(labels)


def plot(
    path: Path,
    summary: list[dict[str, Any]],
    rules: list[str],
    batch_sizes: list[int],
    seeds: int,
) -> None:
    """`path`: AUC versus batch size (log2 axis), one line per method with ±std error bars;
    beside it `-buckets.png` (one panel per frequency bucket) and `-time.png` (AUC versus
    mean wall-clock seconds per run, one point per batch size)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in tests
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    _auc_lines(axes, summary, rules, None)
    bayes = [s["bayes_auc"] for s in summary if s["bayes_auc"] is not None]
    if bayes:
        axes.axhline(statistics.fmean(bayes), color="black", linestyle="--", label="Bayes-optimal")
    _batch_axis(axes, batch_sizes)
    axes.set_title(f"mean ± std over {seeds} seeds" if seeds > 1 else "one seed")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)

    labels = bucket_labels_of(summary)
    if labels:
        figure, panels = plt.subplots(1, len(labels), figsize=(5 * len(labels), 4.2), squeeze=False)
        for panel, label in zip(panels[0], labels, strict=True):
            _auc_lines(panel, summary, rules, label)
            _batch_axis(panel, batch_sizes)
            panel.set_title(f"rarest id seen {label} times in training")
        panels[0][0].legend(fontsize="small")
        figure.tight_layout()
        figure.savefig(path.with_name(path.stem + "-buckets.png"), dpi=110)
        plt.close(figure)

    figure, axes = plt.subplots(figsize=(7.5, 4.8))
    for rule in rules:
        cells = [s for s in summary if s["rule"] == rule and s["wall_seconds_mean"]]
        cells = [s for s in cells if s["auc_mean"] is not None]
        if cells:
            axes.plot(
                [s["wall_seconds_mean"] for s in cells],
                [s["auc_mean"] for s in cells],
                marker="o",
                label=rule,
            )
    axes.set_xscale("log")
    axes.set_xlabel("wall-clock seconds per run (mean over seeds)")
    axes.set_ylabel("test AUC")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path.with_name(path.stem + "-time.png"), dpi=120)
    plt.close(figure)


def _auc_lines(axes, summary: list[dict[str, Any]], rules: list[str], bucket: str | None):
    for rule in rules:
        cells = [s for s in summary if s["rule"] == rule and _auc(s, bucket) is not None]
        if not cells:
            continue
        stds = [
            (s.get("auc_std") if bucket is None else s["buckets"][bucket].get("auc_std")) or 0.0
            for s in cells
        ]
        axes.errorbar(
            [s["batch_size"] for s in cells],
            [_auc(s, bucket) for s in cells],
            yerr=stds,
            marker="o",
            capsize=3,
            label=rule,
        )


def _batch_axis(axes, batch_sizes: list[int]) -> None:
    axes.set_xscale("log", base=2)
    axes.set_xticks(batch_sizes, [f"{b:,}" for b in batch_sizes], rotation=30)
    axes.minorticks_off()
    axes.set_xlabel("batch size")
    axes.set_ylabel("test AUC")
    axes.grid(alpha=0.3)
