"""Variance-aware sampling for SuperFlow (and Flow-SPO): which prompts an iteration draws and
how many samples each gets [recon]. Section 5 of minflow.py's reading order.

A per-prompt tracker keeps each prompt's reward statistics across iterations; its
uncertainty decides both the prompt draw (`prioritised_prompts`) and the group sizes
(`bin_group_sizes`, the source's; `neyman_group_sizes`, this project's first reconstruction).
minflow's `new_tracker`, `choose_prompts` and `group_sizes` pick among them by the
algorithm's axes. Rewards and uncertainties are tensors; the tracker is the one piece of
state, and it round-trips through `state_dict` for checkpoints.
"""
import math

import torch


class PromptTracker:
    """Per-prompt reward statistics with forgetting, on rewards mapped into [0, 1] [recon].

    kind="beta" (SPO's tracker, the source's): soft Beta counts per prompt, prior a = b = 1,
        Eq. (tracker update)  a <- rho a + sum_i r_i,  b <- rho b + sum_i (1 - r_i)
    once per visit (a group of n samples counts as n Bernoulli observations), value
    v = a / (a + b), uncertainty v (1 - v). The prior keeps an all-zero prompt uncertain for a
    while instead of starving it; an unseen prompt has v = 0.5, the most uncertain.
    kind="moments" (this project's first reconstruction): exponentially weighted moments
    m1 <- rho m1 + (1 - rho) mean(r), likewise m2 for r^2 (a first visit sets them), value m1,
    uncertainty m2 - m1^2: an all-zero prompt has exactly zero uncertainty.
    Rewards enter through `reward_range` (lo, hi): r -> (r - lo) / (hi - lo), clipped to
    [0, 1] and the clipped ones counted; None tracks the running min and max seen.
    """

    def __init__(self, num_prompts, kind="beta", rho=0.9, reward_range=(0.0, 1.0)):
        self.kind, self.rho, self.fixed_range = kind, rho, reward_range is not None
        start = (1.0, 1.0) if kind == "beta" else (0.5, 0.5)  # Beta(1, 1); moments of Bernoulli(0.5)
        self.state = torch.tensor(start, dtype=torch.float64).repeat(num_prompts, 1)
        self.visits = torch.zeros(num_prompts, dtype=torch.long)
        self.range = torch.tensor(reward_range or (math.inf, -math.inf), dtype=torch.float64)
        self.clipped = 0  # rewards outside the stated range so far

    def to_unit(self, rewards):
        lo, hi = self.range.tolist()
        unit = (rewards.double() - lo) / (hi - lo) if hi > lo else torch.full_like(rewards.double(), 0.5)
        return unit.clamp(0, 1)

    def update(self, prompt_ids, rewards):
        prompt_ids, rewards = prompt_ids.long().cpu(), rewards.double().cpu()
        if not self.fixed_range:
            self.range = torch.stack([self.range[0].clamp(max=rewards.min()), self.range[1].clamp(min=rewards.max())])
        self.clipped += int(((rewards < self.range[0]) | (rewards > self.range[1])).sum())
        r = self.to_unit(rewards)
        for p in prompt_ids.unique():
            rp = r[prompt_ids == p]
            if self.kind == "beta":
                self.state[p] = self.rho * self.state[p] + torch.stack([rp.sum(), (1 - rp).sum()])
            else:
                keep = self.rho if self.visits[p] > 0 else 0.0
                self.state[p] = keep * self.state[p] + (1 - keep) * torch.stack([rp.mean(), (rp**2).mean()])
            self.visits[p] += 1

    def value(self, prompt_ids):
        s = self.state[prompt_ids.long().cpu()]
        return (s[:, 0] / s.sum(1) if self.kind == "beta" else s[:, 0]).float()

    def uncertainty(self, prompt_ids):
        v = self.value(prompt_ids).double()
        u = v * (1 - v) if self.kind == "beta" else self.state[prompt_ids.long().cpu(), 1] - v**2
        return u.clamp_min(0).float()

    def baseline(self, prompt_ids):
        """The value from before this iteration's update, back on the reward's own scale."""
        lo, hi = self.range.tolist()
        v = self.value(prompt_ids)
        return lo + v * (hi - lo) if hi > lo else torch.zeros_like(v)

    def state_dict(self):
        return {"kind": self.kind, "rho": self.rho, "fixed_range": self.fixed_range, "clipped": self.clipped,
                "state": self.state.clone(), "visits": self.visits.clone(), "range": self.range.clone()}

    def load_state_dict(self, saved):
        self.__dict__.update({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in saved.items()})


def prioritised_prompts(weights, k, generator=None):
    """Eq. (prioritised sampling) [recon, SPO]: k prompt ids drawn with probability proportional
    to `weights` (SuperFlow: sqrt(v (1 - v)) + eps), without replacement while the pool allows."""
    return torch.multinomial(weights.double().cpu(), k, replacement=k > len(weights), generator=generator)


def apportion(weights, budget, n_min=2, n_max=None, ties=None):
    """Integer sizes proportional to `weights`, clamped to [n_min, n_max], summing exactly to
    `budget`, monotone in the weights -> LongTensor.

    The continuous sizes clamp(lam w_c, n_min, n_max) grow with lam, so lam is found by
    bisection; largest remainders then round to integers, ties going to the larger `ties`
    value (default: the weight), which keeps the sizes monotone in both.
    """
    w, K = weights.double().cpu(), weights.numel()
    ties = w if ties is None else ties.double().cpu()
    n_max = budget if n_max is None else n_max
    if not n_min * K <= budget <= n_max * K:
        raise ValueError(f"budget {budget} cannot be split over {K} prompts with sizes in [{n_min}, {n_max}]")
    lo, hi = 0.0, n_max / float(w.min())
    for _ in range(200):
        lam = (lo + hi) / 2
        lo, hi = (lam, hi) if (lam * w).clamp(n_min, n_max).sum() < budget else (lo, lam)
    ideal = (hi * w).clamp(n_min, n_max)
    sizes = ideal.floor().long()
    order = sorted(range(K), key=lambda c: (sizes[c] >= n_max, -(ideal[c] - sizes[c]), -w[c], -ties[c]))
    for c in order[: budget - int(sizes.sum())]:
        sizes[c] += 1
    return sizes


def bin_group_sizes(uncertainty, budget, num_bins=4, m_max=24):
    """Eq. (binned group sizes) [recon, the secondary source]: rank the prompts by uncertainty
    into `num_bins` equal bins (bin 1 the most uncertain) and give m = M_max - bin + 1, scaled
    so the sizes sum to `budget` -> LongTensor. A narrow range (24 to 21 in the source's
    example) that favours uncertain prompts a little and never starves one."""
    u, K = uncertainty.double().cpu(), uncertainty.numel()
    rank = torch.empty(K, dtype=torch.long)
    rank[torch.argsort(-u, stable=True)] = torch.arange(K)
    return apportion((m_max - rank * num_bins // K).double(), budget, ties=u)


def neyman_group_sizes(variances, budget, n_min=2, n_max=None, floor=0.1):
    """Eq. (Neyman allocation) [recon, aggressive]: n_c proportional to sqrt(var_c) + floor (a
    fraction of the mean std, so solved prompts do not all sink to n_min at once), clamped to
    [n_min, n_max]. A prompt whose observed variance is 0 gets n_min: it starves."""
    sd = variances.double().cpu().clamp_min(0).sqrt()
    w = sd + floor * sd.mean() if sd.sum() > 0 else torch.ones_like(sd)
    return apportion(w, budget, n_min, n_max)
