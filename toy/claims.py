"""Each paper's claims next to what the toy measured, with a verdict per set of held-out seeds.

A difference claim "holds" when the difference of the two seed means, in the claimed direction,
exceeds twice its standard error (sqrt(sd_a^2/n_a + sd_b^2/n_b), sd over seeds), else "does not
hold"; a range claim holds when the value lies at or beyond the favourable end of the paper's
range; "not testable here" when an algorithm it needs is missing or there is one seed. Each
claim is judged on two disjoint seed sets: when the verdicts differ it is "unstable". Claims
about the DDIM-inspired SDE use stepwise_ddim; every other Stepwise claim uses stepwise.
"""
import math

import torch

import minflow
from toy import flow, train

PER_STEP, NO_SAMPLING = "stepwise:gain_norm=per_step", "superflow_no_dynamic_sampling"
NO_CREDIT = "superflow_no_step_credit"
SAMPLERS = {"ode": ("ode", "literal"), "flow_grpo": ("flow_grpo", "literal"), "ddim": ("ddim", "literal"),
            "ddim posterior": ("ddim", "posterior")}


def sampler_rewards(base, cfg, levels, seeds=range(5)):
    """Reward of each sampler's own final samples from the base model on the training grid, at
    each noise level, over noise seeds; and the noise each injects in all, sqrt(sum_k std_k^2)."""
    sigmas = minflow.sd3_sigmas(cfg.num_steps, cfg.shift)
    prompts = torch.arange(flow.NUM_PROMPTS).repeat_interleave(cfg.eval_samples)
    out = {"rewards": {}, "injected_std": {}}
    for a in levels:
        for name, (sampler, schedule) in SAMPLERS.items():
            finals = [minflow.rollout(lambda x, t: base(x, t, prompts), torch.randn(len(prompts), 2, generator=g),
                                      sigmas, sampler, a, g, ddim_noise=schedule).xs[:, -1]
                      for g in (torch.Generator().manual_seed(s) for s in seeds)]
            out["rewards"].setdefault(f"{a:g}", {})[name] = [flow.reward(x, prompts, cfg.reward).mean().item()
                                                             for x in finals]
            std = minflow.step_std(sigmas[:-1], sigmas[1:], sampler, a, schedule)
            out["injected_std"].setdefault(f"{a:g}", {})[name] = float(std.pow(2).sum().sqrt())
    return out


def stats(values):
    v = torch.tensor([float(x) for x in values], dtype=torch.float64)
    return v.mean().item(), v.std().item() if len(v) > 1 else math.nan, len(v)


def compare(a, b, direction=1):
    """Claim "a > b" (direction 1) or "a < b" (-1) over seeds -> (difference, its SE, verdict)."""
    (ma, sa, na), (mb, sb, nb) = stats(a), stats(b)
    if na < 2 or nb < 2:
        return ma - mb, math.nan, "not testable here"
    se = math.sqrt(sa**2 / na + sb**2 / nb)
    return ma - mb, se, "holds" if direction * (ma - mb) > 2 * se else "does not hold"


def fmt(values, digits=3):
    m, sd, n = stats(values)
    return f"{m:.{digits}f}" if n < 2 else f"{m:.{digits}f} ± {sd:.{digits}f}"


def first_reach(points, target, never=None):
    """First x of a run's (x, reward) points at which reward >= target, else `never`."""
    return next((x for x, r in points if r >= target), never)


class Runs:
    """One reward's results restricted to one set of seeds: what the claims read."""

    def __init__(self, results, seeds, long=None, samplers=None):
        def pick(series):
            return {n: {s: v for s, v in runs.items() if int(s) in seeds} for n, runs in series.items()}
        self.curves, self.clock, self.seconds = (pick(results[key]) for key in ("curves", "clock", "seconds"))
        self.zero_std, self.long = pick(results["zero_std_ratio"]), pick(long["curves"]) if long else {}
        self.settings, self.samplers, cfg = results["settings"], samplers, results["config"]
        self.finals = {n: [c[-1][1] for c in runs.values()] for n, runs in self.curves.items()}
        self.base = next(iter(next(iter(self.curves.values())).values()))[0][1]
        self.trajectories, self.budget = cfg["trajectories"], cfg["iters"] * cfg["trajectories"]
        self.never = self.budget + cfg["eval_every"] * cfg["trajectories"]

    def mean(self, name):
        return sum(self.finals[name]) / len(self.finals[name])

    def half(self):
        return (self.base + self.mean("flow_grpo")) / 2


def difference(a_name, b_name, a, b, direction=1, digits=3, unit="", note=""):
    diff, se, verdict = compare(a, b, direction)
    return (f"{a_name} {fmt(a, digits)}{unit} vs {b_name} {fmt(b, digits)}{unit}; difference {diff:+.{digits}f}{unit} "
            f"(SE {se:.{digits}f})", diff, se, verdict, note)


def per_run(r, series, value, names=("stepwise", "flow_grpo")):
    return [[value(c) for c in getattr(r, series)[n].values()] for n in names]


def sample_efficiency(r):
    return difference("stepwise", "flow_grpo", *per_run(r, "curves", lambda c: sum(x for _, x in c[1:]) / len(c[1:])))


def faster_in_trajectories(r):
    reach = per_run(r, "curves", lambda c: first_reach(c, r.half(), r.never))
    return difference("stepwise", "flow_grpo", *reach, -1, 0)


def faster_in_seconds(r):
    reach = per_run(r, "clock", lambda c: first_reach(c, r.half(), c[-1][0]))
    return difference("stepwise", "flow_grpo", *reach, -1, 2, " s")


def cleaner_samples(r):
    a = f"{r.settings['stepwise_ddim']['noise_level']:g}"
    rewards, std = r.samplers["rewards"][a], r.samplers["injected_std"][a]
    return difference("ddim", "flow_grpo SDE", rewards["ddim"], rewards["flow_grpo"], note=(
        f"at a = {a}; ODE {fmt(rewards['ode'])}, posterior schedule {fmt(rewards['ddim posterior'])}; noise injected, "
        f"sqrt(sum std^2): ddim {std['ddim']:.2f}, posterior {std['ddim posterior']:.2f}, "
        f"flow_grpo {std['flow_grpo']:.2f}"))


def learns_anyway(r):
    return difference("stepwise_ddim", "base", r.finals["stepwise_ddim"], [r.base] * len(r.finals["stepwise_ddim"]),
                      note=f"stepwise (flow_grpo SDE) ends at {fmt(r.finals['stepwise'])}")


def steps_share(r):
    target = r.mean("flow_grpo")
    count = train.seed_mean_reach(r.curves["superflow"], target)
    share = None if count is None else count / r.budget
    seeds = ", ".join("never" if x is None else f"{100 * x / r.budget:.0f}"
                      for x in (first_reach(c, target) for c in r.curves["superflow"].values()))
    measured = "seed-mean curve never reaches it" if share is None else f"{100 * share:.1f} % (seed-mean curve)"
    return (f"{measured}; per seed: {seeds} %", share, None, "holds" if share is not None and share <= 0.563 else
            "does not hold", f"flow_grpo's final mean: {target:.3f}")


def time_share(r):
    count = train.seed_mean_reach(r.curves["superflow"], r.mean("flow_grpo"))
    if count is None:
        return "superflow never reaches it", None, None, "does not hold", ""
    fg, sf = (sum(r.seconds[n].values()) / len(r.seconds[n]) for n in ("flow_grpo", "superflow"))
    saving = 1 - count * sf / r.budget / fg
    return (f"{100 * saving:.1f} % less ({count * sf / r.budget:.2f} s vs flow_grpo's {fg:.2f} s)", saving, None,
            "holds" if saving >= 0.052 else "does not hold", "training seconds only; timings on a shared CPU are noisy")


def late_collapse(r):
    drop = per_run(r, "long", lambda c: max(x for _, x in c) - c[-1][1], (NO_SAMPLING, "superflow"))
    iters = next(iter(r.long["superflow"].values()))[-1][0] // r.trajectories
    return difference("no dynamic sampling", "superflow", *drop, note=f"{iters} iterations a run")


def fewer_wasted(r):
    zero = {n: [100 * sum(z) / len(z) for z in r.zero_std[n].values()] for n in r.zero_std}
    return difference("superflow", "flow_grpo", zero["superflow"], zero["flow_grpo"], -1, 1, " %",
                      "all: " + ", ".join(f"{n} {fmt(z, 1)} %" for n, z in zero.items()))


def final_reward(a, b, a_label=None, b_label=None):
    return lambda r: difference(a_label or a, b_label or b, r.finals[a], r.finals[b])


SW, SF, FINAL = "Stepwise-Flow-GRPO", "SuperFlow", "final reward"
CLAIMS = [  # paper, claim, metric, the entries it needs, how it is measured
    (SW, "higher reward per trajectory sampled (sample efficiency)", "mean eval reward over the run's evaluations "
     "(area under reward vs trajectories)", ("stepwise", "flow_grpo"), sample_efficiency),
    (SW, "faster convergence (trajectories)", "trajectories until a run first reaches half-way from the base reward "
     "to flow_grpo's final mean (never: one evaluation past the budget)", ("stepwise", "flow_grpo"),
     faster_in_trajectories),
    (SW, "faster convergence (wall-clock; the paper: 1.8-2.4x the time per iteration, yet sooner)", "training "
     "seconds until a run first reaches that half-way reward (never: its total)", ("stepwise", "flow_grpo"),
     faster_in_seconds),
    (SW, "the DDIM-inspired SDE gives cleaner samples", "reward of each sampler's own final samples (base model, 5 "
     "noise seeds), ddim minus the flow_grpo SDE at stepwise_ddim's noise level", ("stepwise_ddim",), cleaner_samples),
    (SW, "... while keeping enough stochasticity to learn", "final reward of stepwise_ddim minus the base model's",
     ("stepwise_ddim", "stepwise"), learns_anyway),
    (SW, "joint gain normalisation beats per-step normalisation", FINAL, ("stepwise", PER_STEP),
     final_reward("stepwise", PER_STEP, "joint", "per_step")),
    (SF, "reaches Flow-GRPO's final reward with 5.4-56.3 % of its steps", "trajectories superflow needs to reach "
     "flow_grpo's final mean reward, as a share of flow_grpo's", ("superflow", "flow_grpo"), steps_share),
    (SF, "5.2-16.7 % less training time", "training seconds superflow needs to reach flow_grpo's final mean, against "
     "flow_grpo's whole run", ("superflow", "flow_grpo"), time_share),
    (SF, "higher final reward than Flow-GRPO (+1.7-16 %)", FINAL, ("superflow", "flow_grpo"),
     final_reward("superflow", "flow_grpo")),
    (SF, "removing step-level advantage re-estimation costs reward", FINAL, ("superflow", NO_CREDIT),
     final_reward("superflow", NO_CREDIT, b_label="no step credit")),
    (SF, "removing dynamic sampling brings late-training collapse", "drop from a long run's best eval reward to its "
     "final", ("superflow", NO_SAMPLING), late_collapse),
    (SF, "fewer wasted samples", "share of groups with all-equal rewards (no learning signal), over training",
     ("superflow", "flow_grpo"), fewer_wasted),
]


def evaluate(runs):
    """The claims on one set of seeds: one dict per claim (paper, claim, metric, measured in
    words, value, spread = its standard error or None for range claims, verdict, note)."""
    rows = []
    for paper, claim, metric, needs, measure in CLAIMS:
        missing = [n for n in needs if n not in (runs.long if measure is late_collapse else runs.curves)]
        measured, value, spread, verdict, note = measure(runs) if not missing else \
            (f"needs {', '.join(missing)}", None, None, "not testable here", "")
        rows.append({"paper": paper, "claim": claim, "metric": metric, "measured": measured, "value": value,
                     "spread": spread, "verdict": verdict, "note": note})
    return rows


def combine(per_set):
    """The claims judged on each seed set -> one row per claim: the common verdict when the sets
    agree, "not testable here" when one could not test it, else "unstable"; each set's row in "sets"."""
    rows = []
    for judged in zip(*per_set):
        verdicts = {r["verdict"] for r in judged}
        verdict = verdicts.pop() if len(verdicts) == 1 else \
            "not testable here" if "not testable here" in verdicts else "unstable"
        rows.append({**{k: judged[0][k] for k in ("paper", "claim", "metric")}, "verdict": verdict,
                     "sets": list(judged)})
    return rows
