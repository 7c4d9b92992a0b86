"""Training curves of an sd35 run, drawn from its log.jsonl alone.

sd35/train.py redraws OUT/curves.png at every evaluation; for a run whose folder you copied
home from a cluster, draw it yourself:

    python sd35/curves.py --log=runs/sd35/log.jsonl            # writes runs/sd35/curves.png
    python sd35/curves.py --log=copied/log.jsonl --png=here.png
"""
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
from cli import flag  # noqa: E402


def read_log(path):
    """The log's entries, skipping a last line torn by a kill (a JSONL line is complete only
    with its newline)."""
    entries = []
    for line in Path(path).read_text(errors="replace").split("\n")[:-1]:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def _series(entries, key):
    """(iterations, values) of the entries that logged `key`."""
    points = [(e["iteration"], e[key]) for e in entries if "iteration" in e and isinstance(e.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def _line(ax, entries, key, label=None, **style):
    xs, ys = _series(entries, key)
    if xs:
        ax.plot(xs, ys, label=label or key, **style)
    return bool(xs)


def draw(entries, path):
    """Draw the curves of a run's log entries into the PNG `path` (atomically)."""
    train = [e for e in entries if "reward_mean" in e]
    fig, axes = plt.subplots(3, 4, figsize=(18, 11), constrained_layout=True)
    (reward, terms, evaluation, kl), (clip, ratio, zero_std, sizes), (draws, grad, images, unused) = axes
    unused.axis("off")

    xs, mean = _series(train, "reward_mean")
    _, std = _series(train, "reward_std")
    reward.plot(xs, mean, label="mean")
    reward.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.25,
                        label="+- std")
    reward.set_title("training reward")

    names = sorted({k for e in train for k in e if k.startswith("reward_") and k not in ("reward_mean", "reward_std")})
    for name in names:
        _line(terms, train, name, label=name.removeprefix("reward_"))
    terms.set_title("reward terms (training means)")

    evals = [e for e in entries if "eval_reward" in e]
    for key in sorted({k for e in evals for k in e if k.startswith("eval_reward")}):
        _line(evaluation, evals, key, label=key.removeprefix("eval_reward_") if key != "eval_reward" else "total", marker="o")
    evaluation.set_title("evaluation reward (ODE samples, test prompts)")

    _line(kl, train, "kl", label="KL to the reference")
    _line(kl, train, "approx_kl", label="approx KL(old || new)")
    kl.set_yscale("symlog", linthresh=1e-6)
    kl.set_title("KL")
    _line(clip, train, "clipfrac")
    clip.set_title("clip fraction")
    _line(ratio, train, "ratio")
    ratio.set_title("importance ratio (mean)")
    _line(zero_std, train, "zero_std_ratio", label="groups with zero reward spread")
    zero_std.set_ylim(-0.02, 1.02)
    zero_std.set_title("zero-variance group share")

    # Flat under fixed sizes; under SuperFlow's binned sizes the band shows the spread.
    sized = [e for e in train if e.get("group_sizes")]
    if sized:
        its = [e["iteration"] for e in sized]
        sizes.fill_between(its, [min(e["group_sizes"]) for e in sized], [max(e["group_sizes"]) for e in sized],
                           alpha=0.25, label="min..max")
        sizes.plot(its, [sum(e["group_sizes"]) / len(e["group_sizes"]) for e in sized], label="mean")
    sizes.set_title("group sizes")

    _line(draws, train, "drawn_uncertainty", label="drawn prompts")
    _line(draws, train, "pool_uncertainty", label="whole pool")
    draws.set_title("tracker uncertainty of the prompt draw")
    _line(grad, train, "grad_norm", label="largest finite gradient norm")
    grad.set_title("gradient norm (before clipping)")
    for key in ("image_brightness", "image_black_share", "image_white_share", "image_edge_density"):
        _line(images, train, key, label=key.removeprefix("image_"))
    images.set_ylim(-0.02, 1.02)
    images.set_title("final images (hacking alarms)")

    for ax in axes.flat[:-1]:
        ax.set_xlabel("iteration")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not in this log", ha="center", va="center", transform=ax.transAxes, color="gray")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    cli.atomic_write(path, buffer.getvalue())


@dataclass
class Settings:
    log: str = flag("runs/sd35/log.jsonl", lambda v: None if v and Path(v).is_file() else "an existing log.jsonl file")  # the run's log
    png: str = flag("", "text")  # where to write the figure; "" = curves.png next to the log


def main(argv):
    try:
        settings = cli.read_flags(Settings, argv)
    except ValueError as error:
        sys.exit(f"error: {error}")
    png = Path(settings.png or Path(settings.log).with_name("curves.png"))
    draw(read_log(settings.log), png)
    print(f"wrote {png}")


if __name__ == "__main__":
    main(sys.argv[1:])
