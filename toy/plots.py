"""The toy's figures, drawn from results.json alone (so they can be redrawn without training)."""
import io
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import cli  # noqa: E402
from toy import flow  # noqa: E402


def save(fig, path):
    """Render to memory, then write atomically: a killed run never leaves a torn PNG."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    cli.atomic_write(path, buffer.getvalue())


def _styles(names):
    """One colour and dash per algorithm, stable across figures."""
    colours = plt.cm.tab10(np.arange(10))
    return {n: dict(color=colours[i % 10], linestyle=["-", "--", ":", "-."][i // 10 % 4]) for i, n in enumerate(names)}


def reward_curves(results, path, ylabel="eval reward (ODE, whole pool)"):
    """Eval reward against trajectories and against training seconds: seed mean, min..max band."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    styles = _styles(results["curves"])
    for ax, key in zip(axes, ("curves", "clock")):
        for name, runs in results[key].items():
            points = np.array(list(runs.values()))  # [seeds, evaluations, (x, reward)]
            xs, ys = points[..., 0].mean(0), points[..., 1]
            ax.plot(xs, ys.mean(0), label=name, **styles[name])
            ax.fill_between(xs, ys.min(0), ys.max(0), color=styles[name]["color"], alpha=0.12)
    axes[0].set(xlabel="trajectories sampled", ylabel=ylabel, title="reward vs samples")
    axes[1].set(xlabel="training seconds (sampling + update, no eval)", title="reward vs wall-clock")
    axes[0].legend(fontsize=7)
    save(fig, path)


def sample_clouds(results, path):
    names = ["base"] + list(results["curves"])
    modes = np.array(results["eval_prompts"]) % flow.NUM_MODES
    centres, colours = flow.mode_centres().numpy(), plt.cm.tab10(np.arange(flow.NUM_MODES))
    cols = min(len(names), 5)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        x = np.array(results["samples"][name])
        ax.scatter(x[:, 0], x[:, 1], s=2, c=colours[modes], alpha=0.5)
        ax.scatter(centres[:, 0], centres[:, 1], s=120, facecolors="none", edgecolors=colours, linewidths=2)
        ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal", xticks=[], yticks=[], title=textwrap.fill(name, 34))
        ax.title.set_fontsize(7)
    fig.suptitle("ODE samples of the whole pool after training (first seed), coloured by target mode (circled)",
                 fontsize=9)
    save(fig, path)


def prompts(results, path):
    """Per pool prompt (easy to hard): how often each algorithm drew it, the mean group size
    it got when drawn, and its final eval reward."""
    p = np.array(results["own_mode_weights"])
    pool, styles = np.arange(len(p)), _styles(results["curves"])
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for name in results["curves"]:
        drawn = np.array(list(results["prompts"][name].values()))  # [seeds, iters, k]
        sizes = np.array(list(results["group_sizes"][name].values()))
        counts = np.bincount(drawn.ravel(), minlength=len(p))  # over every seed and iteration
        sized = np.bincount(drawn.ravel(), weights=sizes.ravel(), minlength=len(p))
        finals = np.array(list(results["per_prompt"][name].values())).mean(0)
        for ax, y in zip(axes, (counts / drawn.shape[0] / drawn.shape[1], sized / np.maximum(counts, 1), finals)):
            ax.plot(pool, y, marker=".", label=name, **styles[name])
    axes[2].plot(pool, results["per_prompt"]["base"], color="black", linewidth=2, label="base model")
    for ax, title in zip(axes, ["draws per iteration (mean over seeds)", "mean group size when drawn",
                                "final eval reward (mean over seeds)"]):
        ax.set(xlabel=f"pool prompt, easy to hard (p_c from {p[0]:.2f} to {p[-1]:.2f})", title=title)
    axes[0].legend(fontsize=6)
    save(fig, path)


def all_figures(results, out):
    drawers = {"reward_curves.png": reward_curves, "samples.png": sample_clouds, "prompts.png": prompts}
    for name, draw in drawers.items():
        draw(results, out / name)
    return [out / name for name in drawers]
