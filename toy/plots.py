"""The toy's figures, drawn from results.json alone (so they can be redrawn without training)."""
import io

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


def _seed_band(ax, runs, label):
    """Mean over seeds as a line, min..max over seeds as a band."""
    xs = np.array([[p[0] for p in run] for run in runs.values()]).mean(0)
    ys = np.array([[p[1] for p in run] for run in runs.values()])
    (line,) = ax.plot(xs, ys.mean(0), label=label)
    ax.fill_between(xs, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)


def reward_curves(results, path):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in results["curves"]:
        _seed_band(axes[0], results["curves"][name], name)
        _seed_band(axes[1], results["clock"][name], name)
    axes[0].set(xlabel="trajectories sampled", ylabel="eval reward (ODE)", title="reward vs samples (band: seeds min-max)")
    axes[1].set(xlabel="training seconds (sampling + update, no eval)", ylabel="eval reward (ODE)", title="reward vs wall-clock")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def sample_clouds(results, path):
    names = ["base"] + list(results["curves"])
    prompts = np.array(results["eval_prompts"])
    centres, colours = flow.mode_centres().numpy(), plt.cm.tab10(np.arange(flow.NUM_PROMPTS))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        x = np.array(results["samples"][name])
        ax.scatter(x[:, 0], x[:, 1], s=3, c=colours[prompts], alpha=0.6)
        ax.scatter(centres[:, 0], centres[:, 1], s=120, facecolors="none", edgecolors=colours, linewidths=2)
        ax.set(xlim=(-3, 3), ylim=(-3, 3), aspect="equal", xticks=[], yticks=[], title=name)
        ax.title.set_fontsize(8)
    fig.suptitle("ODE samples, coloured by prompt; circles: each prompt's target mode (seed 0 after training)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def gain_profiles(results, path):
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (sampler, profile), style in zip(results["gains"]["base"].items(), ["--", ":", "-.", (0, (1, 3))]):
        ax.plot(profile, linestyle=style, color="black", marker=".", label=f"base model ({sampler})")
    for name, profile in results["gains"]["trained"].items():
        ax.plot(profile, marker="o", label=f"{name} (seed 0, trained)")
    ax.set(xlabel="step k (x_k -> x_k+1)", ylabel="mean |gain|  |r_k+1 - r_k|", title="per-step reward gains")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def group_sizes(results, path):
    """Mean group size per prompt over training, for the algorithms whose sizes vary."""
    varying = {n: s for n, s in results["group_sizes"].items() if len({g for run in s.values() for it in run for g in it}) > 1}
    if not varying:
        return None
    p = flow.own_mode_weights().numpy()
    fig, axes = plt.subplots(1, len(varying), figsize=(6 * len(varying), 4), squeeze=False)
    for ax, (name, runs) in zip(axes[0], varying.items()):
        sizes = np.array(list(runs.values())).mean(0)
        for c in range(sizes.shape[1]):
            ax.plot(sizes[:, c], label=f"prompt {c} (p={p[c]:.2f})")
        ax.set(xlabel="iteration", ylabel="group size (mean over seeds)", title=name)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)
    return path


def all_figures(results, out):
    paths = [out / "reward_curves.png", out / "samples.png", out / "gains.png"]
    reward_curves(results, paths[0])
    sample_clouds(results, paths[1])
    gain_profiles(results, paths[2])
    return paths + [p for p in [group_sizes(results, out / "group_sizes.png")] if p]
