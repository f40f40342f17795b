"""Turn eval rows into what people read: the markdown summary table (suite average per policy/budget, with the
fidelity metrics beside it), NIAH depth x length heatmaps (one PNG per policy/budget) and a per-layer
attention-recall plot. Pure functions of the rows; matplotlib runs headless (Agg)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def spec_name(row: dict) -> str:
    return "full" if row["budget"] is None else f"{row['policy']}@{row['budget']}"


def _order(names) -> list[str]:
    def key(n):
        if n == "full":
            return (0, "", 0)
        policy, budget = n.split("@")
        return (1 if policy == "snapkv" else 2, policy, int(budget))
    return sorted(set(names), key=key)


def summary_table(rows: list[dict]) -> str:
    """Markdown: one line per policy@budget; exact-match score (0-100) per suite task, the suite average, the
    NIAH grid average, mean compression, token agreement and attention-mass recall vs the full cache."""
    suite = [r for r in rows if r["group"] == "suite"]
    grid = [r for r in rows if r["group"] == "niah_grid"]
    tasks = list(dict.fromkeys(r["task"] for r in suite))
    by = defaultdict(list)
    for r in rows:
        by[spec_name(r)].append(r)
    head = ["policy@budget"] + tasks + ["**suite avg**", "NIAH grid", "compression", "agreement@64", "attn recall"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in _order(by):
        rs = by[name]
        s = [r for r in rs if r["group"] == "suite"]
        cells = [name] + [f"{100 * _mean(r['score'] for r in s if r['task'] == t):.1f}" for t in tasks]
        cells.append(f"**{100 * _mean(r['score'] for r in s):.1f}**" if s else "-")
        g = [r for r in rs if r["group"] == "niah_grid"]
        cells.append(f"{100 * _mean(r['score'] for r in g):.1f}" if grid else "-")
        cells.append(f"{_mean(r['compression'] for r in rs):.1f}x")
        cells.append(f"{_mean(r['agreement'] for r in rs):.3f}")
        cells.append(f"{_mean(_mean(r['recall']) for r in rs):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def niah_heatmaps(rows: list[dict], directory: Path, prefix: str = "niah") -> list[Path]:
    """One PNG per policy@budget: exact-match score by needle depth (rows) x prompt length (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [r for r in rows if r["group"] == "niah_grid"]
    if not grid:
        return []
    directory.mkdir(parents=True, exist_ok=True)
    depths = sorted({r["depth"] for r in grid})
    lengths = sorted({r["length"] for r in grid})
    paths = []
    for name in _order(spec_name(r) for r in grid):
        cells = defaultdict(list)
        for r in grid:
            if spec_name(r) == name:
                cells[(r["depth"], r["length"])].append(r["score"])
        data = [[_mean(cells[(d, n)]) if cells[(d, n)] else float("nan") for n in lengths] for d in depths]
        fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(lengths), 1.2 + 0.5 * len(depths)))
        ax.imshow(data, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for i, row in enumerate(data):
            for j, v in enumerate(row):
                ax.text(j, i, "-" if v != v else f"{v:.0%}", ha="center", va="center", fontsize=9)
        # "8K" for 8128 too: the longest column is cut short of the model's 8192 positions to leave room to answer
        ax.set_xticks(range(len(lengths)), [f"{round(n / 1024)}K" if abs(n / 1024 - round(n / 1024)) < 0.1 else
                                            str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"NIAH, SmolLM2-135M: {name}", fontsize=10)
        fig.tight_layout()
        path = directory / f"{prefix}_{name.replace('@', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def recall_plot(rows: list[dict], path: Path) -> Path | None:
    """Mean attention-mass recall per layer, one line per compressed policy@budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compressed = [r for r in rows if r["budget"] is not None and r["compression"] > 1]
    if not compressed:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in _order(spec_name(r) for r in compressed):
        rs = [r["recall"] for r in compressed if spec_name(r) == name]
        per_layer = [_mean(col) for col in zip(*rs)]
        ax.plot(range(len(per_layer)), per_layer, label=name, linestyle="-" if name.startswith("snapkv") else "--")
    ax.set_xlabel("layer")
    ax.set_ylabel("attention-mass recall")
    ax.set_ylim(0, 1.02)
    ax.set_title("Share of the full cache's attention mass on kept positions", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
