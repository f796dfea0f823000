"""PNG plots and TensorBoard entries for the analysis report and the comparison harness.

matplotlib draws every figure (headless, Agg backend); the same figures go to PNG files and to
TensorBoard images, so what a person opens and what TensorBoard shows cannot disagree.
"""

import os
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..fileio import atomic_write  # noqa: E402


def _label(token) -> str:
    text = repr(token)[1:-1] if isinstance(token, str) else str(token)
    return text if text.strip() else repr(token)


def routing_figure(layer: Dict):
    """Heatmap of P(expert | input token) for the most frequent tokens, with each expert's share."""
    heat = np.asarray(layer["routing_heatmap"]["p_expert_given_token"])
    tokens = [_label(t) for t in layer["routing_heatmap"]["tokens"]]
    E = layer["num_experts"]
    fig, (ax, bar) = plt.subplots(2, 1, figsize=(max(6, 0.35 * E + 3), max(5, 0.22 * len(tokens) + 3)),
                                  gridspec_kw={"height_ratios": [4, 1]})
    im = ax.imshow(heat, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(tokens)), tokens, fontsize=7)
    ax.set_xticks(range(E), [str(e) for e in range(E)], fontsize=7)
    ax.set_title(f"layer {layer['layer']} ({layer['block']}, router {layer['router']}): "
                 "P(top-1 expert | token), most frequent tokens")
    ax.set_xlabel("expert")
    fig.colorbar(im, ax=ax)
    bar.bar(range(E), layer["top1_share"], color="tab:blue", label="top-1 share")
    bar.axhline(1.0 / E, color="gray", linestyle="--", linewidth=1, label="uniform")
    bar.set_xticks(range(E), [str(e) for e in range(E)], fontsize=7)
    bar.set_ylabel("share")
    bar.set_title(f"utilisation entropy {layer['utilisation_entropy']:.3f} (1 = uniform)", fontsize=9)
    bar.legend(fontsize=7)
    fig.tight_layout()
    return fig


def similarity_figure(layer: Dict):
    """Expert output similarity and weight similarity matrices side by side."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, key, title in ((axes[0], "output_similarity", "output cosine (same tokens)"),
                           (axes[1], "weight_similarity", "weight cosine")):
        m = np.asarray(layer[key])
        im = ax.imshow(m, cmap="magma", vmin=-1, vmax=1)
        ax.set_title(f"layer {layer['layer']}: {title}\noff-diagonal mean {layer[key + '_mean']:.3f}", fontsize=9)
        ax.set_xticks(range(m.shape[0]))
        ax.set_yticks(range(m.shape[0]))
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def mix_gate_figure(layer: Dict):
    """Histogram of S2MoE's mixing gate g(x) on the sampled tokens."""
    g = np.asarray(layer["mix_gate"]["_values"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(g, bins=50, range=(0, 1), color="tab:green")
    ax.set_xlabel("g(x): weight of the clean path")
    ax.set_ylabel("tokens")
    ax.set_title(f"layer {layer['layer']}: mixing gate, mean {g.mean():.3f}, std {g.std():.3f}")
    fig.tight_layout()
    return fig


def analysis_figures(report: Dict) -> List[Tuple[str, object]]:
    """(name, figure) for every plot of an analysis report."""
    figures = []
    for layer in report["layers"]:
        i = layer["layer"]
        figures.append((f"layer{i}_routing", routing_figure(layer)))
        figures.append((f"layer{i}_expert_similarity", similarity_figure(layer)))
        if "mix_gate" in layer:
            figures.append((f"layer{i}_mix_gate", mix_gate_figure(layer)))
    return figures


def _write_png(fig, path: str, dpi: Optional[int]) -> None:
    # Through a temporary file of ours renamed over `path`: a symbolic link planted under the name
    # (a received run folder's eval/.../plots/x.png -> ~/.bashrc) is replaced, never written through.
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def save_figures(figures: Sequence[Tuple[str, object]], folder: str) -> List[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, fig in figures:
        path = os.path.join(folder, f"{name}.png")
        _write_png(fig, path, 110)
        paths.append(path)
    return paths


def write_analysis_tensorboard(report: Dict, figures: Sequence[Tuple[str, object]], log_dir: str, step: int) -> None:
    """Scalars, histograms (expert shares, g(x)) and the figures as images, under analysis/."""
    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(log_dir)
    try:
        for layer in report["layers"]:
            p = f"analysis/layer{layer['layer']}/"
            for key in ("utilisation_entropy", "router_entropy_mean", "output_similarity_mean",
                        "weight_similarity_mean", "effective_rank_all", "effective_rank_expert_mean"):
                if layer.get(key) is not None:
                    writer.add_scalar(p + key, layer[key], step)
            writer.add_histogram(p + "top1_share", np.asarray(layer["top1_share"]), step)
            if "mix_gate" in layer:
                writer.add_scalar(p + "mix_gate_mean", layer["mix_gate"]["mean"], step)
                writer.add_histogram(p + "mix_gate", np.asarray(layer["mix_gate"]["_values"]), step)
        for name, fig in figures:
            writer.add_figure(f"analysis/{name}", fig, step, close=False)
    finally:
        writer.close()


def close_figures(figures: Sequence[Tuple[str, object]]) -> None:
    for _, fig in figures:
        plt.close(fig)


def curves_figure(curves: Dict[str, List[List[Tuple[int, float]]]], ylabel: str, title: str):
    """Validation curves: per variant the mean over seeds, with the min-max band."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, runs in curves.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        steps = sorted(set.intersection(*(set(s for s, _ in r) for r in runs)))
        values = np.array([[dict(r)[s] for s in steps] for r in runs])
        line, = ax.plot(steps, values.mean(0), label=f"{name} ({len(runs)} seeds)")
        if len(runs) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str, dpi: Optional[int] = 110) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        _write_png(fig, path, dpi)
    finally:
        plt.close(fig)
    return path
