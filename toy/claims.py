"""Each paper's claims next to what the toy measured, with a verdict per set of held-out seeds.

Verdict rules:
  difference claims  "holds" when the difference of the two seed means, in the claimed
                     direction, exceeds twice its standard error (sqrt(sd_a^2/n_a + sd_b^2/n_b),
                     sd over seeds); otherwise "does not hold";
  range claims       "holds" when the measured value lies at or beyond the favourable end
                     of the paper's range (e.g. Flow-GRPO's final reward reached with at most
                     56.3 % of its trajectories);
  "not testable here" when the run lacks an algorithm the claim needs, or has one seed.
Each claim is judged on each of two disjoint sets of held-out seeds: when the verdicts differ,
it is "unstable". Claims about the DDIM-inspired SDE use stepwise_ddim; every other Stepwise
claim uses stepwise.
"""
import math

import torch

import minflow
from toy import flow

SAMPLER_SEEDS = range(5)
PER_STEP, NO_SAMPLING, NO_CREDIT = "stepwise:gain_norm=per_step", "superflow_no_dynamic_sampling", "superflow_no_step_credit"


def sampler_rewards(base, cfg, levels):
    """Reward of each sampler's own final samples from the base model on the training grid at
    each noise level (the ODE's from the same initial noise alongside), over 5 noise seeds,
    and the total noise each injects, sqrt(sum_k std_k^2)."""
    sigmas = minflow.sd3_sigmas(cfg.num_steps, cfg.shift)
    prompts = torch.arange(flow.NUM_PROMPTS).repeat_interleave(cfg.eval_samples)
    samplers = {"ode": ("ode", "literal"), "flow_grpo": ("flow_grpo", "literal"), "ddim": ("ddim", "literal"),
                "ddim posterior": ("ddim", "posterior")}
    out = {"rewards": {}, "injected_std": {}}
    for a in levels:
        for name, (sampler, schedule) in samplers.items():
            runs = [minflow.rollout(lambda x, t: base(x, t, prompts), torch.randn(len(prompts), 2, generator=gen), sigmas,
                                    sampler, a, gen, ddim_noise=schedule) for gen in
                    (torch.Generator().manual_seed(s) for s in SAMPLER_SEEDS)]
            out["rewards"].setdefault(f"{a:g}", {})[name] = [flow.reward(r.xs[:, -1], prompts, cfg.reward).mean().item()
                                                             for r in runs]
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
        self.curves, self.clock, self.seconds = pick(results["curves"]), pick(results["clock"]), pick(results["seconds"])
        self.zero_std, self.long = pick(results["zero_std_ratio"]), pick(long["curves"]) if long else {}
        self.settings, self.samplers, cfg = results["settings"], samplers, results["config"]
        self.finals = {n: [c[-1][1] for c in runs.values()] for n, runs in self.curves.items()}
        self.base = next(iter(next(iter(self.curves.values())).values()))[0][1]
        self.trajectories, self.budget = cfg["trajectories"], cfg["iters"] * cfg["trajectories"]
        self.never = self.budget + cfg["eval_every"] * cfg["trajectories"]

    def mean_final(self, name):
        return sum(self.finals[name]) / len(self.finals[name])

    def half(self):
        return (self.base + self.mean_final("flow_grpo")) / 2

    def seed_mean_reach(self, name, target):
        """First trajectory count at which the seed-mean curve reaches target, None if never."""
        curves = list(self.curves[name].values())
        mean = torch.tensor([[r for _, r in c] for c in curves]).mean(0).tolist()
        return first_reach(zip([x for x, _ in curves[0]], mean), target)


def difference(a_name, b_name, a, b, direction=1, digits=3, unit=""):
    diff, se, verdict = compare(a, b, direction)
    return (f"{a_name} {fmt(a, digits)}{unit} vs {b_name} {fmt(b, digits)}{unit}; difference {diff:+.{digits}f}{unit} "
            f"(SE {se:.{digits}f})", diff, se, verdict, "")


def sample_efficiency(r):
    area = {n: [sum(x for _, x in c[1:]) / len(c[1:]) for c in r.curves[n].values()] for n in ("stepwise", "flow_grpo")}
    return difference("stepwise", "flow_grpo", area["stepwise"], area["flow_grpo"])


def faster_in_trajectories(r):
    reach = {n: [first_reach(c, r.half(), r.never) for c in r.curves[n].values()] for n in ("stepwise", "flow_grpo")}
    return difference("stepwise", "flow_grpo", reach["stepwise"], reach["flow_grpo"], -1, 0)


def faster_in_seconds(r):
    reach = {n: [first_reach(c, r.half(), c[-1][0]) for c in r.clock[n].values()] for n in ("stepwise", "flow_grpo")}
    return difference("stepwise", "flow_grpo", reach["stepwise"], reach["flow_grpo"], -1, 2, " s")


def cleaner_samples(r):
    a = f"{r.settings['stepwise_ddim']['noise_level']:g}"
    rewards, injected = r.samplers["rewards"][a], r.samplers["injected_std"][a]
    measured, diff, se, verdict, _ = difference("ddim", "flow_grpo SDE", rewards["ddim"], rewards["flow_grpo"])
    note = (f"at a = {a}; ODE {fmt(rewards['ode'])}, posterior schedule {fmt(rewards['ddim posterior'])}; injected "
            f"noise sqrt(sum std^2): ddim {injected['ddim']:.2f}, posterior {injected['ddim posterior']:.2f}, "
            f"flow_grpo {injected['flow_grpo']:.2f}; 5 noise seeds, base model")
    return measured, diff, se, verdict, note


def learns_anyway(r):
    measured, diff, se, verdict, _ = difference("stepwise_ddim", "base", r.finals["stepwise_ddim"],
                                                [r.base] * len(r.finals["stepwise_ddim"]))
    return measured, diff, se, verdict, f"stepwise (flow_grpo SDE) ends at {fmt(r.finals['stepwise'])}"


def joint_normalisation(r):
    return difference("joint", "per_step", r.finals["stepwise"], r.finals[PER_STEP])


def steps_share(r):
    target = r.mean_final("flow_grpo")
    count = r.seed_mean_reach("superflow", target)
    share = None if count is None else count / r.budget
    seeds = ", ".join("never" if x is None else f"{100 * x / r.budget:.0f}"
                      for x in (first_reach(c, target) for c in r.curves["superflow"].values()))
    measured = ("seed-mean curve never reaches it" if share is None else f"{100 * share:.1f} % (seed-mean curve)")
    return (f"{measured}; per seed: {seeds} %", share, None,
            "holds" if share is not None and share <= 0.563 else "does not hold", f"flow_grpo's final mean: {target:.3f}")


def time_share(r):
    count = r.seed_mean_reach("superflow", r.mean_final("flow_grpo"))
    if count is None:
        return "superflow never reaches it", None, None, "does not hold", ""
    fg_seconds = sum(r.seconds["flow_grpo"].values()) / len(r.seconds["flow_grpo"])
    sf_seconds = count * sum(r.seconds["superflow"].values()) / len(r.seconds["superflow"]) / r.budget
    saving = 1 - sf_seconds / fg_seconds
    return (f"{100 * saving:.1f} % less ({sf_seconds:.2f} s vs flow_grpo's {fg_seconds:.2f} s)", saving, None,
            "holds" if saving >= 0.052 else "does not hold", "training seconds only; timings on a shared CPU are noisy")


def higher_final(r):
    return difference("superflow", "flow_grpo", r.finals["superflow"], r.finals["flow_grpo"])


def step_credit_matters(r):
    return difference("superflow", "no step credit", r.finals["superflow"], r.finals[NO_CREDIT])


def late_collapse(r):
    drop = {n: [max(x for _, x in c) - c[-1][1] for c in r.long[n].values()] for n in ("superflow", NO_SAMPLING)}
    measured, diff, se, verdict, _ = difference("no dynamic sampling", "superflow", drop[NO_SAMPLING], drop["superflow"])
    iters = next(iter(r.long["superflow"].values()))[-1][0] // r.trajectories
    return measured, diff, se, verdict, f"{iters} iterations a run"


def fewer_wasted(r):
    zero = {n: [100 * sum(z) / len(z) for z in r.zero_std[n].values()] for n in r.zero_std}
    measured, diff, se, verdict, _ = difference("superflow", "flow_grpo", zero["superflow"], zero["flow_grpo"], -1, 1, " %")
    return measured, diff, se, verdict, "all: " + ", ".join(f"{n} {fmt(z, 1)} %" for n, z in zero.items())


SW, SF = "Stepwise-Flow-GRPO", "SuperFlow"
CLAIMS = [  # paper, claim, metric, the entries it needs, how it is measured
    (SW, "higher reward per trajectory sampled (sample efficiency)",
     "mean eval reward over the run's evaluations (area under reward vs trajectories)", ("stepwise", "flow_grpo"),
     sample_efficiency),
    (SW, "faster convergence (trajectories)", "trajectories until a run first reaches half-way from the base reward to "
     "flow_grpo's final mean (never: one evaluation past the budget)", ("stepwise", "flow_grpo"), faster_in_trajectories),
    (SW, "faster convergence (wall-clock; the paper: 1.8-2.4x the time per iteration, yet sooner)", "training seconds "
     "until a run first reaches the same half-way reward (never: its total seconds)", ("stepwise", "flow_grpo"),
     faster_in_seconds),
    (SW, "the DDIM-inspired SDE gives cleaner samples", "reward of each sampler's own final samples (base model, "
     "training grid), ddim minus the flow_grpo SDE at stepwise_ddim's noise level", ("stepwise_ddim",), cleaner_samples),
    (SW, "... while keeping enough stochasticity to learn", "final reward of stepwise_ddim minus the base model's",
     ("stepwise_ddim", "stepwise"), learns_anyway),
    (SW, "joint gain normalisation beats per-step normalisation", "final reward", ("stepwise", PER_STEP),
     joint_normalisation),
    (SF, "reaches Flow-GRPO's final reward with 5.4-56.3 % of its steps", "trajectories superflow needs to reach "
     "flow_grpo's final mean reward, as a share of flow_grpo's", ("superflow", "flow_grpo"), steps_share),
    (SF, "5.2-16.7 % less training time", "training seconds superflow needs to reach flow_grpo's final mean, against "
     "flow_grpo's whole run", ("superflow", "flow_grpo"), time_share),
    (SF, "higher final reward than Flow-GRPO (+1.7-16 %)", "final reward", ("superflow", "flow_grpo"), higher_final),
    (SF, "removing step-level advantage re-estimation costs reward", "final reward", ("superflow", NO_CREDIT),
     step_credit_matters),
    (SF, "removing dynamic sampling brings late-training collapse", "drop from a long run's best eval reward to its final",
     ("superflow", NO_SAMPLING), late_collapse),
    (SF, "fewer wasted samples", "share of groups with all-equal rewards (no learning signal), over training",
     ("superflow", "flow_grpo"), fewer_wasted),
]


def evaluate(runs):
    """The claims on one set of seeds: one dict per claim (paper, claim, metric, measured in
    words, value, spread = its standard error or None for range claims, verdict, note)."""
    rows = []
    for paper, claim, metric, needs, measure in CLAIMS:
        missing = [n for n in needs if n not in runs.curves or (measure is late_collapse and n not in runs.long)]
        if missing:
            measured, value, spread, verdict, note = f"needs {', '.join(missing)}", None, None, "not testable here", ""
        else:
            measured, value, spread, verdict, note = measure(runs)
        rows.append({"paper": paper, "claim": claim, "metric": metric, "measured": measured, "value": value,
                     "spread": spread, "verdict": verdict, "note": note})
    return rows


def combine(per_set):
    """Claims judged on each seed set -> one row per claim with the overall verdict: the
    common verdict when the sets agree, "not testable here" when one could not test it, else
    "unstable"; each set's row is kept under "sets"."""
    rows = []
    for judged in zip(*per_set):
        verdicts = {r["verdict"] for r in judged}
        verdict = verdicts.pop() if len(verdicts) == 1 else \
            "not testable here" if "not testable here" in verdicts else "unstable"
        rows.append({"paper": judged[0]["paper"], "claim": judged[0]["claim"], "metric": judged[0]["metric"],
                     "verdict": verdict, "sets": list(judged)})
    return rows
