"""The toy's figures, drawn from results.json alone (so they can be redrawn without training)."""
import io
import itertools
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import cli  # noqa: E402
from toy import flow  # noqa: E402


def _save(fig, path):
    """Render to memory, then write atomically: a killed run never leaves a torn PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    cli.atomic_write(path, buffer.getvalue())


def _seed_band(ax, runs, label, style):
    """Mean over seeds as a line, min..max over seeds as a band."""
    xs = np.array([[p[0] for p in run] for run in runs.values()]).mean(0)
    ys = np.array([[p[1] for p in run] for run in runs.values()])
    ax.plot(xs, ys.mean(0), label=label, **style)
    ax.fill_between(xs, ys.min(0), ys.max(0), color=style["color"], alpha=0.12)


def _styles(names):
    """One colour and dash per algorithm, stable across figures."""
    colours = plt.cm.tab10(np.arange(10))
    return {n: dict(color=colours[i % 10], linestyle=["-", "--", ":", "-."][i // 10 % 4]) for i, n in enumerate(names)}


def reward_curves(results, path):
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    styles = _styles(results["curves"])
    for name in results["curves"]:
        _seed_band(axes[0], results["curves"][name], name, styles[name])
        _seed_band(axes[1], results["clock"][name], name, styles[name])
    axes[0].set(xlabel="trajectories sampled", ylabel="eval reward (ODE, whole pool)",
                title="reward vs samples (band: seeds min-max)")
    axes[1].set(xlabel="training seconds (sampling + update, no eval)", ylabel="eval reward (ODE, whole pool)",
                title="reward vs wall-clock")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


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
    fig.suptitle("ODE samples of the whole pool, coloured by target mode (circled); seed of the first run, after "
                 "training", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def gain_profiles(results, path):
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    dashes = itertools.cycle(["--", ":", "-.", (0, (1, 3)), (0, (5, 1))])
    for (sampler, profile), style in zip(results["gains"]["base"].items(), dashes):
        ax.plot(profile, linestyle=style, color="black", marker=".", label=f"base model ({sampler})")
    styles = _styles(results["curves"])
    for name, profile in results["gains"]["trained"].items():
        ax.plot(profile, marker="o", markersize=3, label=f"{name} (trained)", **styles[name])
    ax.set(xlabel="step k (x_k -> x_k+1)", ylabel="mean |gain|  |r_k+1 - r_k|", title="per-step reward gains")
    ax.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path)


def prompts(results, path):
    """Per pool prompt (easy to hard): how often each algorithm drew it, the mean group size
    it got when drawn, and its final eval reward."""
    p = np.array(results["own_mode_weights"])
    pool = np.arange(len(p))
    styles = _styles(results["curves"])
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    for name in results["curves"]:
        drawn = np.array([run for run in results["prompts"][name].values()])  # [seeds, iters, k]
        sizes = np.array([run for run in results["group_sizes"][name].values()])
        counts = np.stack([np.bincount(d.ravel(), minlength=len(p)) for d in drawn])  # [seeds, pool]
        per_prompt = np.stack([np.bincount(d.ravel(), weights=s.ravel(), minlength=len(p)) for d, s in zip(drawn, sizes)])
        axes[0].plot(pool, counts.mean(0) / drawn.shape[1], marker=".", label=name, **styles[name])
        axes[1].plot(pool, per_prompt.sum(0) / np.maximum(counts.sum(0), 1), marker=".", label=name, **styles[name])
        axes[2].plot(pool, np.array(list(results["per_prompt"][name].values())).mean(0), marker=".", label=name,
                     **styles[name])
    axes[2].plot(pool, results["per_prompt"]["base"], color="black", linewidth=2, label="base model")
    for ax, title in zip(axes, ["draws per iteration (mean over seeds)", "mean group size when drawn",
                                "final eval reward (mean over seeds)"]):
        ax.set(xlabel="pool prompt, easy to hard (p_c from %.2f to %.2f)" % (p[0], p[-1]), title=title)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path)


def zero_std(results, path):
    """Share of groups with all-equal rewards per iteration (mean over seeds, 5-iteration mean)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    styles = _styles(results["curves"])
    for name, runs in results["zero_std_ratio"].items():
        z = np.array(list(runs.values())).mean(0)
        w = min(5, len(z))
        ax.plot(np.convolve(z, np.ones(w) / w, mode="valid"), label=name, **styles[name])
    ax.set(xlabel="iteration", ylabel="share of zero-variance groups", title="wasted groups (no learning signal)")
    ax.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path)


def all_figures(results, out):
    drawers = {"reward_curves.png": reward_curves, "samples.png": sample_clouds, "gains.png": gain_profiles,
               "prompts.png": prompts, "zero_std.png": zero_std}
    for name, draw in drawers.items():
        draw(results, out / name)
    return [out / name for name in drawers]
