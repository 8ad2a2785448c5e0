"""Benchmark plots (matplotlib, the ``bench`` extra: ``pip install moeinf[bench]``).

``plot_replay``: ``moeinf bench replay`` results, fetches per token against pool capacity, one panel per trace.
"""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'moeinf[bench]'"
                           " (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_replay(runs: list[dict], out: Path | str) -> Path:
    """One panel per trace: each policy's fetches per token at every capacity, with pure on-demand LRU and
    Belady's MIN (the floor) drawn as bounds. ``runs``: ``moeinf bench replay --json`` objects."""
    plt = _pyplot()
    traces = list(dict.fromkeys(r["trace"] for r in runs))
    fig, axes = plt.subplots(1, len(traces), figsize=(6.4 * len(traces), 4.6), squeeze=False)
    for ax, trace in zip(axes[0], traces):
        _replay_panel(ax, sorted((r for r in runs if r["trace"] == trace), key=lambda r: r["capacity_share"]))
    return _save(plt, fig, out)


def _save(plt, fig, out: Path | str) -> Path:
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _replay_panel(ax, runs: list[dict]) -> None:
    x = [100 * r["capacity_share"] for r in runs]
    ax.plot(x, [r["lru_fetches_per_token"] for r in runs], "k--", lw=1.5, zorder=3, label="bound: on-demand LRU")
    ax.plot(x, [r["belady_fetches_per_token"] for r in runs], "k:", lw=2, zorder=3, label="bound: Belady (floor)")
    names = list(dict.fromkeys(row["policy"] for r in runs for row in r["results"]))
    for name in names:
        points = [(100 * r["capacity_share"], row["fetches_per_token"]) for r in runs for row in r["results"]
                  if row["policy"] == name]
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=4, label=f"memd: {name}")
    first = runs[0]
    ax.set_title(f"{Path(first['trace']).name}: {first['num_layers']} layers x {first['num_experts']} experts, "
                 f"{first['expert_bytes'] / 2**20:.0f} MiB each", fontsize=10)
    ax.set_xlabel("pool capacity, % of all experts")
    ax.set_ylabel("expert fetches per token")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{v:g}" for v in x])
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


# ---------------------------------------------------------------------------------------------------- bench e2e
E2E_STYLES = {"transformers-resident": "k--", "accelerate-offload": "s-", "moeinf-ondemand-lru": "^-", "moeinf": "o-",
              "llama.cpp": "D-"}


def plot_e2e_decode_vs_memory(doc: dict, out: Path | str) -> Path:
    """``moeinf bench e2e --json`` (one or several runs merged): decode ms per token (p50, 1 client) of every system
    against the expert-memory share, log scale, with transformers-resident (everything in memory, no limit) as a
    reference line and the compute floor (``e2e_floor.py``) below it; under ``--memory-limit-total``, against the
    total limit every system shared."""
    if doc.get("memory_limit_total"):
        return plot_e2e_decode_vs_total(doc, out)
    plt = _pyplot()
    rows = [r for r in doc["systems"] if r.get("concurrency") == 1 and r.get("decode_ms_per_token_p50")]
    shares = {m: 100 * v["fraction"] for m, v in doc["memory_limits"].items()}
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for name, style in E2E_STYLES.items():
        points = sorted((shares[r["expert_memory"]], r["decode_ms_per_token_p50"]) for r in rows
                        if r["system"] == name and r["expert_memory"] in shares)
        if name == "transformers-resident" and points:
            ax.axhline(points[0][1], color="k", ls="--", lw=1.2, label=f"{name} (all in memory, no limit)")
        elif points:
            ax.plot([p[0] for p in points], [p[1] for p in points], style, ms=5, label=name)
    _compute_floor(ax, doc)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted(shares.values())
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}%" for t in ticks])
    ax.set_xlabel("expert memory, % of all experts (each system under the same memory limit)")
    plain = plt.matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_ylabel("decode ms per token (p50)")
    ax.set_title(f"{Path(doc['model']).name}: decode time per token vs expert memory", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(plt, fig, out)


def _compute_floor(ax, doc: dict) -> None:
    """The run's compute floor as a dotted line: the weights a decode token reads over the measured bandwidth."""
    if floor := doc.get("compute_floor"):
        label = f"compute floor ({floor['bytes_per_token'] / 2**20:.0f} MiB/token at {floor['gbps']:.1f} GB/s)"
        ax.axhline(floor["ms"], color="0.5", ls=":", lw=1.2, label=label)


def plot_e2e_decode_vs_total(doc: dict, out: Path | str) -> Path:
    """``bench e2e --memory-limit-total``: decode ms per token (p50, 1 client) against the total memory limit each
    system ran under (its expert share beside each point), transformers-resident as a reference line, the compute
    floor below it."""
    plt = _pyplot()
    rows = [r for r in doc["systems"] if r.get("concurrency") == 1 and r.get("decode_ms_per_token_p50")]
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for name, style in E2E_STYLES.items():
        mine = [r for r in rows if r["system"] == name]
        if name == "transformers-resident" and mine:
            ax.axhline(mine[0]["decode_ms_per_token_p50"], color="k", ls="--", lw=1.2,
                       label=f"{name} (all in memory, no limit)")
            continue
        points = sorted((r["memory_limit_bytes"] / 2**30, r["decode_ms_per_token_p50"], r.get("expert_fraction"))
                        for r in mine if r.get("memory_limit_bytes"))
        if not points:
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], style, ms=5, label=name)
        for x, y, share in points:
            if share is not None:
                ax.annotate(f"{100 * share:.0f}%", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    _compute_floor(ax, doc)
    ax.set_yscale("log")
    plain = plt.matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("total memory limit, GiB (every system under the same limit; labels: its expert memory share)")
    ax.set_ylabel("decode ms per token (p50)")
    ax.set_title(f"{Path(doc['model']).name}: decode time per token at equal total memory", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(plt, fig, out)
