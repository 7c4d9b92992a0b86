"""minflow: reinforcement learning for flow-matching generators, in one file (torch only).

  Flow-GRPO (Liu et al. 2025): the ODE becomes an SDE, so each step is a Gaussian policy;
    GRPO with group-normalised rewards and the same advantage at every step.
  Stepwise-Flow-GRPO (Savani et al. 2026): intermediate rewards from short-ODE clean
    estimates; each step is credited with its reward gain.
  SuperFlow (Chen et al. 2025): variance-aware prompt draws and group sizes, and step-level
    advantages weighted by the noise each step injected.

A model enters as `velocity(x, t) -> v`, t a 0-d tensor or [B], one time per row. A third
argument, where there is one, says what each row belongs to: `iteration` takes the model as
`velocity(x, t, prompt_ids)`, and `intermediate_rewards`, whose batch mixes trajectories, as
`velocity(x, t, traj_index)`.
Conventions (SD3 / diffusers; the toy uses them too)
  t in [0, 1] is the scheduler's sigma: t = 1 is pure noise, t = 0 is data.
  forward process     x_t = (1 - t) x0 + t eps,          eps ~ N(0, I)
  velocity            v = eps - x0;  sampling runs t from 1 down to 0
  clean estimate      x0_hat = x_t - t v                 (Tweedie)
  noise estimate      x1_hat = x_t + (1 - t) v
  score               grad log p_t(x) = -(x + (1 - t) v) / t
  noise level         `noise_level` is the papers' a, the scale of each sampler's std

The policy: one step from t to t' < t (dt = t - t') is pi(x' | x_t) = N(mean, std^2 I),
its log-density averaged over all non-batch dimensions (as the reference code does; PPO's
clip range is calibrated to that). The loss per trained step k is PPO's clip
  L = max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) + beta KL,  ratio = pi_theta / pi_old,
and the algorithms differ only in where A comes from: presets over six axes (sampler,
shared initial noise, prompt draw, group sizes, baseline, step credit).
Reading order: one whole iteration, `iteration` (8), calls the rest in order; each piece is
defined before it: the time grid (1), one step as a policy (2), rollouts and intermediate
rewards (3), advantages (4), SuperFlow's sampling (5), the loss (6), the axes as presets (7).
Equation labels, Eq. (name), are those of docs/methods.md.
Choices the sources leave open are marked [recon] and are options of `Algorithm`, except
these, fixed: the tracker's uniform prior (a prompt that only scored 0 stays uncertain), the
tracker baseline's batch-wide scale (a group of one has no std), the smallest group (two to
compare under a group mean, one under the tracker), and eps = 1e-4 and the clip at 5 (the
reference code's), kept for every advantage so that the algorithms differ only in their axes.
"""
import math
from dataclasses import dataclass, field, replace

import torch

# ----------------------------------------------------------------------------------
# 1. The time grid


def sd3_sigmas(num_steps, shift=3.0, num_train_timesteps=1000):
    """Eq. (shifted grid): sigma = shift s / (1 + (shift - 1) s), s linear from 1 down to the
    training grid's smallest sigma, then 0: num_steps + 1 values, as diffusers'
    FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(n).sigmas (which shifts s_min)."""
    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)

    s_min = shifted(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64))
    s = torch.linspace(1.0, float(s_min), num_steps, dtype=torch.float64)
    return torch.cat([shifted(s), torch.zeros(1, dtype=torch.float64)]).float()


# ----------------------------------------------------------------------------------
# 2. One denoising step as a Gaussian policy

# "flow_grpo" names both Flow-GRPO's SDE, a sampler, and the Flow-GRPO algorithm, a preset (section 7)
# that samples with it, as do stepwise and superflow. The ODE is deterministic: it evaluates, it is not trained.
SDE_SAMPLERS = ("flow_grpo", "ddim", "cps")
SAMPLERS = ("ode", *SDE_SAMPLERS)
DDIM_NOISE = ("literal", "posterior")


def _broadcast_time(t, x):
    """t as float or 0-d or [B] tensor (one time per row) -> float32 tensor that broadcasts against x [B, ...]."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    return t.reshape(t.shape + (1,) * (x.dim() - 1)) if t.dim() == 1 else t


def tweedie_x0(x, v, t):
    """Eq. (Tweedie): x0_hat = x_t - t v, the posterior mean of the clean sample."""
    return x - _broadcast_time(t, x) * v


def flow_grpo_sigma(t, t_next, noise_level):
    """Eq. (Flow-GRPO sigma_t): sigma_t = a sqrt(t / (1 - t)). At t = 1 it diverges, so there
    the reference code puts 1 - t' for 1 - t: the first step's std sigma_t sqrt(dt) is a."""
    one_minus_t = torch.where(t >= 1, 1 - t_next, 1 - t)
    return noise_level * torch.sqrt(t / one_minus_t)


def ddim_std(t, t_next, noise_level, schedule="literal"):
    """Stepwise-Flow-GRPO's DDIM-inspired noise s [recon: the form is from notes on the paper].
    literal    s = a t' sqrt(1 - t), as the notes write it. They also say it injects the most
               randomness at t = 1, yet the formula is 0 there (and at t' = 0): those steps
               are deterministic and untrained.
    posterior  s = a t' sqrt(1 - ((1 - t) t' / ((1 - t') t))^2), the std of x_t' given x_t and
               x0 for a Markov process with the marginals N((1 - t) x0, t^2): a t' at t = 1,
               0 at t' = 0, so the first step is stochastic as the paper's figure draws it.
    """
    if schedule == "literal":
        return noise_level * t_next * torch.sqrt(1 - t)
    ratio = (1 - t) * t_next / ((1 - t_next) * t)
    return noise_level * t_next * torch.sqrt((1 - ratio**2).clamp_min(0))


def step_std(t, t_next, sampler="flow_grpo", noise_level=0.7, ddim_noise="literal"):
    """The policy std of one step (noise_level is a); 0 means the step is deterministic (no log-prob)."""
    t, t_next = torch.as_tensor(t, dtype=torch.float32), torch.as_tensor(t_next, dtype=torch.float32)
    if sampler == "ode":
        return torch.zeros_like(t)
    if sampler == "flow_grpo":
        return flow_grpo_sigma(t, t_next, noise_level) * torch.sqrt(t - t_next)
    if sampler == "ddim":
        return ddim_std(t, t_next, noise_level, ddim_noise)
    if sampler == "cps":  # Coefficients-Preserving Sampling (arXiv 2509.05952)
        return t_next * math.sin(noise_level * math.pi / 2)
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")


def step_mean_std(x, v, t, t_next, sampler="flow_grpo", noise_level=0.7, ddim_noise="literal"):
    """The Gaussian policy of one step t -> t_next: (mean, std). In float32 whatever the
    network's dtype (bf16 overflows in sigma_t^2 / t); at noise_level 0 all are Euler's step.

    ode        mean = x - dt v, std = 0 (Euler; used for evaluation).
    flow_grpo  Eq. (Flow-GRPO SDE), Euler-Maruyama of the SDE with the ODE's marginals:
               mean = x - dt (v + sigma_t^2 / (2t) (x + (1 - t) v)),  std = sigma_t sqrt(dt),
               the drift v - (sigma_t^2 / 2) score: by Fokker-Planck the score term pulls the
               density back exactly as much as the injected noise spreads it.
    ddim, cps  Eq. (DDIM-inspired SDE): mean = (1 - t') x0_hat + sqrt(t'^2 - s^2) x1_hat,
               std = s. The mean is exact but a step returns at most the marginal variance
               (Cauchy-Schwarz), a deficit more steps do not remove: traded for cleaner images.
    """
    x, v = x.float(), v.float()
    t, t_next = _broadcast_time(t, x), _broadcast_time(t_next, x)
    std = step_std(t, t_next, sampler, noise_level, ddim_noise)
    if sampler == "ode":
        return x - (t - t_next) * v, std
    if sampler == "flow_grpo":
        sigma = flow_grpo_sigma(t, t_next, noise_level)
        return x - (t - t_next) * (v + sigma**2 / (2 * t) * (x + (1 - t) * v)), std
    x1_hat = x + (1 - t) * v
    return (1 - t_next) * tweedie_x0(x, v, t) + torch.sqrt((t_next**2 - std**2).clamp_min(0)) * x1_hat, std


def sde_step(x, v, t, t_next, sampler="flow_grpo", noise_level=0.7, noise=None, ddim_noise="literal"):
    """One sampled step: x_next = mean + std z -> (x_next, mean, std); z is `noise` if given."""
    mean, std = step_mean_std(x, v, t, t_next, sampler, noise_level, ddim_noise)
    return mean + std * (torch.randn_like(mean) if noise is None else noise.float()), mean, std


def gaussian_log_prob(x, mean, std):
    """Eq. (policy log-prob): log N(x; mean, std^2 I), averaged over non-batch dims -> [B]."""
    x, mean, std = x.float(), mean.float(), torch.as_tensor(std, dtype=torch.float32, device=x.device)
    log_density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.flatten(1).mean(1)


def kl_divergence(mean, ref_mean, std):
    """Eq. (KL): KL(N(mean, std^2) || N(ref_mean, std^2)) = (mean - ref_mean)^2 / (2 std^2),
    averaged over non-batch dims -> [B]. The reference code's is ours times dt: our beta is its beta dt."""
    std = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    return ((mean.float() - ref_mean.float()) ** 2 / (2 * std**2)).flatten(1).mean(1)


# ----------------------------------------------------------------------------------
# 3. Rollouts and intermediate rewards


@dataclass
class Trajectory:
    xs: torch.Tensor  # [B, T+1, ...] states on the grid; xs[:, 0] is the initial noise
    log_probs: torch.Tensor  # [B, T] log pi(x_{k+1} | x_k) at sampling time; 0 where std = 0
    stds: torch.Tensor  # [T] the policy std of each step (0: deterministic, not trained)
    sigmas: torch.Tensor  # [T+1] the time grid the states sit on


@torch.no_grad()
def rollout(velocity, x, sigmas, sampler="flow_grpo", noise_level=0.7, generator=None, noise=None,
            ddim_noise="literal"):
    """Sample from x at t = sigmas[0] down to sigmas[-1], keeping every state and each step's
    log-prob (PPO's old policy). No gradients: a policy gradient differentiates only each
    step's log-prob, never the chain. `noise` [T, B, ...] is the steps' noise drawn beforehand;
    else it is drawn from `generator` step by step (no [T, B, ...] buffer for long ODEs)."""
    xs, log_probs, stds = [x], [], []
    for k, (t, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        # Noise is drawn at every step, even deterministic ones, so that the same generator
        # gives the same stream whatever the sampler and noise level.
        z = noise[k] if noise is not None else \
            torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        x_next, mean, std = sde_step(x, velocity(x, t), t, t_next, sampler, noise_level, z, ddim_noise)
        stochastic = float(std) > 0
        log_probs.append(gaussian_log_prob(x_next, mean, std) if stochastic else
                         torch.zeros(x.shape[0], device=x.device))
        stds.append(std.reshape(()))
        x = x_next.to(x.dtype)
        xs.append(x)
    return Trajectory(torch.stack(xs, 1), torch.stack(log_probs, 1), torch.stack(stds).cpu(), sigmas.cpu())


def short_ode_x0(velocity, x, t, substeps=5):
    """Stepwise-Flow-GRPO's clean estimate: T' Euler ODE steps on a uniform grid from t to 0
    (t one time, or one per row). T' = 1 is Tweedie's x0_hat; the paper uses T' = 5."""
    fractions = torch.linspace(1.0, 0.0, substeps + 1)
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    for f, f_next in zip(fractions[:-1], fractions[1:]):
        v = velocity(x, t * f)
        x = (x.float() - _broadcast_time(t * (f - f_next), x) * v.float()).to(x.dtype)
    return x


def trained_steps(stds):
    """Steps that are trained -> bool [T]: the stochastic ones (std > 0) except the last of them,
    which starts from (flow_grpo) or lands on (ddim, cps) the grid's tiny last nonzero sigma: its
    std is tiny (0.005 to 0.008 on SD3's 10 steps), its log-prob (x' - mean)^2 / (2 std^2) so
    steep in the mean that its gradient would swamp every other step's."""
    mask = stds > 0
    if mask.any():
        mask[int(mask.nonzero().max())] = False
    return mask


def needed_states(stds):
    """The states whose intermediate rewards some trained gain uses -> bool [T+1]: gain
    g_k = r_{k+1} - r_k needs both sides of step k, and only trained steps get an advantage."""
    trained = trained_steps(stds)
    needed = torch.zeros(len(trained) + 1, dtype=torch.bool)
    needed[:-1] |= trained
    needed[1:] |= trained
    return needed


@torch.no_grad()
def intermediate_rewards(velocity, traj, reward, substeps=5, needed=None, final=None):
    """Eq. (intermediate rewards): r_k = R(x0_hat_k), x0_hat_k the short-ODE clean estimate of
    state k, for the `needed` states (default all; the others stay NaN) -> [B, T+1]; r_T is the
    final reward, `final` when known. All of them form one batch, so `velocity(x, t, traj_index)`
    and `reward(x0, traj_index)` get each row's trajectory; sd35/policy.py splits it into passes."""
    B, S = traj.xs.shape[:2]
    needed = torch.ones(S, dtype=torch.bool) if needed is None else torch.as_tensor(needed, dtype=torch.bool)
    states = needed[:-1].nonzero()[:, 0]
    traj_index = torch.arange(B).repeat(len(states))  # row i * B + b is state states[i] of trajectory b
    x = traj.xs[:, states].transpose(0, 1).flatten(0, 1)
    x0 = short_ode_x0(lambda x, t: velocity(x, t, traj_index), x, traj.sigmas[states].repeat_interleave(B), substeps)
    table = torch.full((B, S), math.nan)
    table[:, states] = reward(x0, traj_index).float().cpu().view(len(states), B).T
    if final is not None or needed[-1]:
        table[:, -1] = (reward(traj.xs[:, -1], torch.arange(B)) if final is None else final).float().cpu()
    return table


# ----------------------------------------------------------------------------------
# 4. Advantages


def _group_span(values, group_ids, num_groups):
    """max - min of each group's values [B, T] (row b in group group_ids[b]), NaN entries left
    out -> [num_groups] (NaN if none)."""
    hi = torch.full((num_groups,), -math.inf).scatter_reduce_(0, group_ids, values.nan_to_num(-math.inf).amax(1),
                                                              "amax")
    lo = torch.full((num_groups,), math.inf).scatter_reduce_(0, group_ids, values.nan_to_num(math.inf).amin(1), "amin")
    return hi - lo


def _groupwise_standardise(values, group_ids, weight, eps, clip):
    """(values - group mean) / (group std + eps), clipped, over the weighted entries of each
    group (values and weight [B, T], groups by row). Groups whose weighted values are all
    equal get exactly 0: they carry no learning signal and are skipped in training."""
    num_groups, group_ids, w = int(group_ids.max()) + 1, group_ids.long(), weight.float()
    count = torch.zeros(num_groups).index_add_(0, group_ids, w.sum(1))
    mean = torch.zeros(num_groups).index_add_(0, group_ids, (values * w).sum(1)) / count
    centred = values - mean[group_ids, None]
    std = (torch.zeros(num_groups).index_add_(0, group_ids, (centred**2 * w).sum(1)) / count).sqrt()
    informative = (_group_span(values.masked_fill(w == 0, math.nan), group_ids, num_groups) > 0)[group_ids, None]
    return torch.where(informative, centred / (std[group_ids, None] + eps), 0.0).clamp(-clip, clip) * w


def group_advantages(rewards, group_ids, std="group", eps=1e-4, clip=5.0):
    """Eq. (GRPO advantage): A_i = clip((r_i - mean_group) / (std + eps), -5, 5) -> [B], std the
    group's (the paper) or the batch's ("global", the reference code's default). Constant-reward
    groups give exactly 0 either way."""
    rewards, group_ids = rewards.float().cpu(), group_ids.cpu()
    a = _groupwise_standardise(rewards[:, None], group_ids, torch.ones_like(rewards[:, None]), eps, clip)[:, 0]
    if std == "group":
        return a
    if std != "global":
        raise ValueError(f"unknown advantage std {std!r}; expected 'group' or 'global'")
    # Re-scale the group-centred values by the batch std instead of each group's.
    num_groups, group_ids = int(group_ids.max()) + 1, group_ids.long()
    mean = torch.zeros(num_groups).index_add_(0, group_ids, rewards) / torch.bincount(group_ids, minlength=num_groups)
    centred = torch.where(a != 0, rewards - mean[group_ids], 0.0)
    return (centred / (rewards.std(unbiased=False) + eps)).clamp(-clip, clip)


def zero_std_fraction(rewards, group_ids):
    """The share of groups whose rewards are all equal (the peers log it as zero_std_ratio)."""
    group_ids = group_ids.long().cpu()
    return float((_group_span(rewards.float().cpu()[:, None], group_ids, int(group_ids.max()) + 1) == 0).float().mean())


def gain_advantages(state_rewards, group_ids, eps=1e-4, clip=5.0, mask=None, per_step=False):
    """Eq. (gain advantage): from the rewards of the states r_k [B, T+1], the gains
    g_k = r_{k+1} - r_k, the reward after a step minus before it (gains telescope:
    sum_k g_k = r_T - r_0), then A_{i,k} = clip((g_{i,k} - mean) / (std + eps), -clip, clip)
    normalised jointly over all G x T gains of the group -> [B, T]. Joint, since early gains
    are larger and should count more (`per_step=True`: each step's G gains apart, the variant
    the paper compares against); no discounting or sums of future gains (no better in its
    ablations). With `mask` [T] or [B, T], only those steps count (the others get 0)."""
    gains = (state_rewards[:, 1:] - state_rewards[:, :-1]).float().cpu()
    weight = torch.ones_like(gains) if mask is None else torch.as_tensor(mask).float().expand_as(gains)
    # Masked gains may be NaN (states no trained gain needs are not estimated): zero them, or
    # NaN * 0 would spread into the statistics.
    gains, group_ids = gains.where(weight > 0, 0.0), group_ids.cpu()
    if per_step:
        return torch.cat([_groupwise_standardise(gains[:, [k]], group_ids, weight[:, [k]], eps, clip)
                          for k in range(gains.shape[1])], 1)
    return _groupwise_standardise(gains, group_ids, weight, eps, clip)


def baseline_advantages(rewards, baseline, eps=1e-4, clip=5.0):
    """SuperFlow's baseline [recon, after SPO]: A = r - b, b the tracker's per-prompt value
    from before this iteration's update (independent of r: unbiased), standardised over the
    whole batch (so a group may be 1), clipped -> [B]."""
    d = rewards.float().cpu() - baseline.float().cpu()
    return ((d - d.mean()) / (d.std(unbiased=False) + eps)).clamp(-clip, clip)


def noise_weighted_advantages(advantage, stds, trained=None):
    """SuperFlow's step credit [recon]: A_{i,k} = A_i w_k with w_k = std_k / mean_k(std_k) over
    the trained steps (default: std > 0) -> [B, T]. To first order R(x_0) - E[R] =
    sum_k <grad R, std_k eps_k>: a step's share scales with the noise it injected, std_k =
    sigma_t sqrt(dt) for the Flow-GRPO SDE."""
    stds = stds.float().cpu()
    trained = (stds > 0) if trained is None else torch.as_tensor(trained).bool()
    w = torch.where(trained, stds, 0.0)
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12) * trained.sum(-1, keepdim=True)  # no trained step: all 0
    return advantage.float().cpu()[:, None] * w.expand(advantage.shape[0], -1)


# ----------------------------------------------------------------------------------
# 5. SuperFlow's sampling: a tracker per prompt, the prompt draw, the group sizes [recon]


class PromptTracker:
    """SPO's per-prompt Beta tracker with forgetting, on rewards mapped into [0, 1] [recon]:
    Eq. (tracker update)  a <- rho a + sum_i r_i,  b <- rho b + sum_i (1 - r_i)  per visit,
    prior a = b = 1, value v = a / (a + b), uncertainty v (1 - v). The prior keeps a prompt
    whose samples all scored 0 uncertain for a while instead of starving it. Rewards enter by
    `reward_range` (lo, hi) -> (r - lo) / (hi - lo), clipped to [0, 1] and the clipped ones
    counted; None tracks the running min and max seen."""

    def __init__(self, num_prompts, rho=0.9, reward_range=(0.0, 1.0)):
        self.rho, self.fixed_range = rho, reward_range is not None
        self.state = torch.ones(num_prompts, 2, dtype=torch.float64)
        self.visits = torch.zeros(num_prompts, dtype=torch.long)
        self.range = torch.tensor(reward_range or (math.inf, -math.inf), dtype=torch.float64)
        self.clipped = 0  # rewards outside the stated range so far

    def update(self, prompt_ids, rewards):
        prompt_ids, rewards = prompt_ids.long().cpu(), rewards.double().cpu()
        if not self.fixed_range:
            self.range = torch.stack([self.range[0].clamp(max=rewards.min()), self.range[1].clamp(min=rewards.max())])
        self.clipped += int(((rewards < self.range[0]) | (rewards > self.range[1])).sum())
        lo, hi = self.range.tolist()
        r = ((rewards - lo) / (hi - lo) if hi > lo else torch.full_like(rewards, 0.5)).clamp(0, 1)
        for p in prompt_ids.unique():
            rp = r[prompt_ids == p]
            self.state[p] = self.rho * self.state[p] + torch.stack([rp.sum(), (1 - rp).sum()])
            self.visits[p] += 1

    def value(self, prompt_ids):
        s = self.state[prompt_ids.long().cpu()]
        return (s[:, 0] / s.sum(1)).float()

    def uncertainty(self, prompt_ids):
        v = self.value(prompt_ids).double()
        return (v * (1 - v)).float()

    def baseline(self, prompt_ids):
        """The value from before this iteration's update, back on the reward's own scale."""
        lo, hi = self.range.tolist()
        v = self.value(prompt_ids)
        return lo + v * (hi - lo) if hi > lo else torch.zeros_like(v)

    def state_dict(self):
        return {"rho": self.rho, "fixed_range": self.fixed_range, "clipped": self.clipped,
                "state": self.state.clone(), "visits": self.visits.clone(), "range": self.range.clone()}

    def load_state_dict(self, saved):
        self.__dict__.update({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in saved.items()})


def prioritised_prompts(weights, k, generator=None):
    """Eq. (prioritised sampling) [recon, SPO]: k prompt ids drawn with probability proportional
    to `weights` (SuperFlow: sqrt(v (1 - v)) + eps), without replacement while the pool allows."""
    return torch.multinomial(weights.double().cpu(), k, replacement=k > len(weights), generator=generator)


def apportion(weights, budget, n_min=2, ties=None):
    """Integer sizes proportional to `weights`, at least n_min, summing exactly to `budget`,
    monotone in the weights -> LongTensor. max(lam w, n_min) grows with lam: bisection finds
    lam, largest remainders round, ties go to the larger `ties` (default: the weight)."""
    w, num_prompts = weights.double().cpu(), weights.numel()
    ties = w if ties is None else ties.double().cpu()
    if n_min * num_prompts > budget:
        raise ValueError(f"budget {budget} cannot be split over {num_prompts} prompts with at least {n_min} each")
    lo, hi = 0.0, budget / float(w.min())
    for _ in range(200):
        lam = (lo + hi) / 2
        lo, hi = (lam, hi) if (lam * w).clamp_min(n_min).sum() < budget else (lo, lam)
    ideal = (hi * w).clamp_min(n_min)
    sizes = ideal.floor().long()
    order = sorted(range(num_prompts), key=lambda c: (-(ideal[c] - sizes[c]), -w[c], -ties[c]))
    for c in order[: budget - int(sizes.sum())]:
        sizes[c] += 1
    return sizes


def bin_group_sizes(uncertainty, budget, bins=4, largest=24, smallest=21, n_min=2):
    """Eq. (binned group sizes) [recon, a secondary source]: rank the prompts by uncertainty into
    `bins` equal bins, the most uncertain first, sized evenly from `largest` down to `smallest`
    (the source's m = M_max - bin + 1: 24 to 21 in 4 bins), scaled to sum to `budget`, each at
    least n_min -> LongTensor. The source's narrow range never starves a prompt."""
    u, num_prompts = uncertainty.double().cpu(), uncertainty.numel()
    rank = torch.empty(num_prompts, dtype=torch.long)
    rank[torch.argsort(-u, stable=True)] = torch.arange(num_prompts)
    spacing = (largest - smallest) / max(bins - 1, 1)
    return apportion(largest - (rank * bins // num_prompts).double() * spacing, budget, n_min, ties=u)


# ----------------------------------------------------------------------------------
# 6. The loss


def grpo_loss(log_prob, old_log_prob, advantage, clip_range, weight=None):
    """Eq. (PPO-clip): mean of max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) -> (loss, stats).

    With `weight` [N], the weighted sum instead: a data-parallel trainer weights each row by
    1 / (the optimiser step's rows over all ranks), so that the ranks' gradients, summed, equal
    one big batch's. stats over the rows of nonzero weight: the ratio's mean, clipfrac (share
    outside the clip range), approx_kl = mean(log_ratio^2) / 2, the usual estimate of KL(old || new)."""
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    per_row = torch.maximum(-advantage * ratio, -advantage * ratio.clamp(1 - clip_range, 1 + clip_range))
    loss = per_row.mean() if weight is None else (per_row * weight).sum()
    with torch.no_grad():
        real = slice(None) if weight is None else weight != 0
        stats = {"ratio": ratio[real].mean().item(), "approx_kl": 0.5 * (log_ratio[real] ** 2).mean().item(),
                 "clipfrac": ((ratio[real] - 1).abs() > clip_range).float().mean().item()}
    return loss, stats


def policy_loss(velocity, batch, algo, clip_range, beta=0.0, ref_velocity=None, weight=None):
    """The training loss of a `batch` of stored transitions (a dict of x, x_next, t, t_next,
    old_log_prob and advantage, as `transitions` makes them): the log-prob of x_next under the
    current `velocity` and `algo`'s sampler (anything with sampler, noise_level and ddim_noise,
    e.g. an Algorithm), PPO-clip, plus beta times the exact KL to the reference policy
    (`ref_velocity`, e.g. the model with its LoRA switched off). `weight` as in grpo_loss."""
    x, t, t_next, x_next = batch["x"], batch["t"], batch["t_next"], batch["x_next"]
    sampler_settings = (algo.sampler, algo.noise_level, algo.ddim_noise)
    mean, std = step_mean_std(x, velocity(x, t), t, t_next, *sampler_settings)
    loss, stats = grpo_loss(gaussian_log_prob(x_next, mean, std), batch["old_log_prob"], batch["advantage"],
                            clip_range, weight)
    if beta > 0:
        with torch.no_grad():
            ref_mean, _ = step_mean_std(x, ref_velocity(x, t), t, t_next, *sampler_settings)
        kl = kl_divergence(mean, ref_mean, std)
        loss = loss + beta * (kl.mean() if weight is None else (kl * weight).sum())
        stats["kl"] = (kl.mean() if weight is None else kl[weight != 0].mean()).item()
    return loss, stats


# ----------------------------------------------------------------------------------
# 7. The algorithms as presets over the axes


def declared(default, accepts):
    """A settings field with its default and the values it accepts, kept as the field's metadata:
    an interval "[lo, hi)" (inf allowed), a tuple of values, or a function value -> None if
    accepted, else what is expected. cli.py checks them where flags and files are read."""
    return field(default=default, metadata={"accepts": accepts})


@dataclass(frozen=True)
class Algorithm:
    sampler: str = declared("flow_grpo", SDE_SAMPLERS)  # the SDE that makes each step a Gaussian policy (section 2)
    noise_level: float = declared(0.7, "[0, 2]")  # a, the papers' scale of each sampler's std (CPS's authors use 0.8)
    ddim_noise: str = declared("literal", DDIM_NOISE)  # the DDIM-inspired SDE's schedule; posterior: random at t = 1
    shared_noise: bool = declared(False, (False, True))  # all trajectories of a group start from one x_1 (Stepwise)
    prompt_sampling: str = declared("uniform", ("uniform", "variance"))  # the prompt draw; variance: uncertain ones
    group_sizing: str = declared("fixed", ("fixed", "bins"))  # the budget split: even, or SuperFlow's uncertainty bins
    baseline: str = declared("group", ("group", "tracker"))  # group mean (GRPO) or the tracker's value (SuperFlow, SPO)
    advantage_std: str = declared("group", ("group", "global"))  # GRPO's scale: group std (paper), global (ref. code)
    step_credit: str = declared("uniform", ("uniform", "gains", "noise"))  # same A, reward gains, or injected noise
    gain_norm: str = declared("joint", ("joint", "per_step"))  # gains normalised over the group's G x T, or per step
    substeps: int = declared(5, "[1, 100]")  # T': Euler substeps per intermediate clean estimate (gains only)
    bins: int = declared(4, "[1, 64]")  # K uncertainty bins for group_sizing=bins
    group_max: int = declared(24, "[1, 10000]")  # the most uncertain bin's size before scaling to the budget (M_max)
    group_min: int = declared(21, "[1, 10000]")  # the least uncertain bin's before scaling (the source's M_max - K + 1)
    rho: float = declared(0.9, "[0, 1)")  # forgetting factor of the per-prompt tracker, per visit
    sampling_eps: float = declared(0.05, "(0, 10]")  # eps in sqrt(v (1 - v)) + eps: every prompt keeps a chance

    # What must hold between fields: (the field a refusal names, the test, what it expects).
    RELATIONS = (
        ("baseline", lambda a: a.step_credit != "gains" or a.baseline == "group", "group with --step_credit=gains "
         "(gains are normalised within each group)"),
        ("group_min", lambda a: a.group_min <= a.group_max, "at most --group_max={group_max}"),
    )

    @property
    def uses_tracker(self):
        return self.group_sizing != "fixed" or self.baseline == "tracker" or self.prompt_sampling == "variance"


STEPWISE = Algorithm(shared_noise=True, step_credit="gains")
SUPERFLOW = Algorithm(prompt_sampling="variance", group_sizing="bins", baseline="tracker", step_credit="noise")
PRESETS = {
    "flow_grpo": Algorithm(),
    "stepwise": STEPWISE,  # on Flow-GRPO's SDE: the paper's main results
    "stepwise_ddim": replace(STEPWISE, sampler="ddim"),  # on its DDIM-inspired SDE (its Fig. 6)
    "superflow": SUPERFLOW,
    # The rows of SuperFlow's ablation table:
    "superflow_no_dynamic_sampling": replace(SUPERFLOW, prompt_sampling="uniform", group_sizing="fixed"),
    "superflow_no_step_credit": replace(SUPERFLOW, step_credit="uniform"),
    "flow_spo": Algorithm(prompt_sampling="variance", baseline="tracker"),
}


def check_trains_something(algo, sigmas):
    """Refuse (ValueError), in one line naming the flag, a sampler and grid on which no step is trained."""
    if not trained_steps(step_std(sigmas[:-1], sigmas[1:], algo.sampler, algo.noise_level, algo.ddim_noise)).any():
        raise ValueError(f"--sampler={algo.sampler}: expected a sampler with a trained step on this "
                        f"{len(sigmas) - 1}-step grid (a stochastic step before the last stochastic one)")


def new_tracker(algo, num_prompts, reward_range=(0.0, 1.0)):
    """The per-prompt tracker the algorithm needs, or None."""
    return PromptTracker(num_prompts, algo.rho, reward_range) if algo.uses_tracker else None


def choose_prompts(algo, pool_size, k, tracker=None, generator=None):
    """The iteration's k prompt ids: uniform (distinct while the pool allows) or prioritised."""
    if algo.prompt_sampling == "variance":
        weights = tracker.uncertainty(torch.arange(pool_size)).double().sqrt() + algo.sampling_eps
        return prioritised_prompts(weights, k, generator)
    if k <= pool_size:
        return torch.randperm(pool_size, generator=generator)[:k]
    return torch.randint(pool_size, (k,), generator=generator)  # a pool smaller than k repeats


def allocate_groups(algo, num_groups, budget, tracker=None, prompt_ids=None):
    """The size of each of the iteration's groups: budget / groups, or SuperFlow's bins."""
    if algo.group_sizing == "fixed":
        if budget % num_groups:
            raise ValueError(f"budget {budget} does not split evenly over {num_groups} groups")
        return torch.full((num_groups,), budget // num_groups, dtype=torch.long)
    smallest = 1 if algo.baseline == "tracker" else 2  # a group mean needs two samples to compare
    return bin_group_sizes(tracker.uncertainty(prompt_ids), budget, algo.bins, algo.group_max, algo.group_min, smallest)


def initial_noise(sizes, shape, shared, generator=None, device=None):
    """x_1 for every trajectory [sum(sizes), *shape]; one draw per group if shared."""
    draws = int(len(sizes)) if shared else int(sizes.sum())
    x = torch.randn((draws, *shape), generator=generator, device=device)
    return x.repeat_interleave(sizes.to(x.device), 0) if shared else x


def step_advantages(algo, rewards, group_ids, stds, state_rewards=None, baseline=None, eps=1e-4, clip=5.0):
    """The advantage of every (trajectory, step) -> [B, T], 0 on untrained steps. Gains need the
    intermediate rewards `state_rewards` [B, T+1], the tracker `baseline` [B] (read before its update)."""
    trained = trained_steps(stds.cpu())
    if algo.step_credit == "gains":
        return gain_advantages(state_rewards, group_ids, eps, clip, trained, algo.gain_norm == "per_step")
    if algo.baseline == "tracker":
        a = baseline_advantages(rewards, baseline, eps, clip)
    else:
        a = group_advantages(rewards, group_ids, algo.advantage_std, eps, clip)
    if algo.step_credit == "noise":
        return noise_weighted_advantages(a, stds, trained)
    return a[:, None] * trained.float()


def transitions(traj, adv, mask=None):
    """Flatten (trajectory, step) pairs into training rows (x, x_next, t, t_next, old_log_prob,
    advantage, sample: the trajectory): those of `mask` [B, T], by default those with nonzero advantage."""
    b, k = torch.nonzero(adv != 0 if mask is None else mask, as_tuple=True)
    return {"x": traj.xs[b, k], "x_next": traj.xs[b, k + 1], "t": traj.sigmas[k], "t_next": traj.sigmas[k + 1],
            "old_log_prob": traj.log_probs[b, k], "advantage": adv[b, k], "sample": b}


# ----------------------------------------------------------------------------------
# 8. One iteration, every algorithm: the functions above in the order a trainer calls them


@dataclass(frozen=True)
class Setup:
    """What every iteration of a run shares."""
    reward: object  # R(x0 [B, ...], prompt ids [B]) -> [B], the reward of clean samples
    pool_size: int  # the prompts are the ids 0 .. pool_size - 1
    sample_shape: tuple  # one sample's shape: (2,) in the toy, SD3.5's latent (16, 64, 64) at 512 px
    sigmas: torch.Tensor  # the training time grid (section 1)
    prompts_per_iter: int  # prompts drawn an iteration, one group each
    trajectories: int  # the iteration's budget, over all its groups
    minibatches: int = 1  # optimiser steps an iteration, each over a share of the transitions
    clip_range: float = 1e-4  # PPO's eps
    beta: float = 0.0  # weight of the KL to the reference policy


def iteration(algo, setup, velocity, optimiser_step, ref_velocity=None, tracker=None, generator=None):
    """One iteration of `algo`: draw, sample, score, credit, train, then update the tracker ->
    {prompt_ids, group_sizes, rewards, zero_std_ratio}. `velocity(x, t, prompt_ids)` is the model
    being trained, each row with its prompt; `ref_velocity` the same for the KL term's reference;
    `optimiser_step(loss)` backpropagates the loss and steps the optimiser."""
    prompt_ids = choose_prompts(algo, setup.pool_size, setup.prompts_per_iter, tracker, generator)
    sizes = allocate_groups(algo, len(prompt_ids), setup.trajectories, tracker, prompt_ids)
    group_ids = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    prompts = prompt_ids[group_ids]  # the prompt of each trajectory
    x1 = initial_noise(sizes, setup.sample_shape, algo.shared_noise, generator)
    traj = rollout(lambda x, t: velocity(x, t, prompts), x1, setup.sigmas, algo.sampler, algo.noise_level, generator,
                   ddim_noise=algo.ddim_noise)
    with torch.no_grad():
        rewards, state_rewards = setup.reward(traj.xs[:, -1], prompts), None
        if algo.step_credit == "gains":  # r_k at the states that some trained gain needs
            state_rewards = intermediate_rewards(lambda x, t, b: velocity(x, t, prompts[b]), traj,
                                                 lambda x0, b: setup.reward(x0, prompts[b]), algo.substeps,
                                                 needed_states(traj.stds), rewards)
    # The tracker's value from before this iteration's update, so that the baseline does not
    # depend on the rewards it is subtracted from.
    baseline = tracker.baseline(prompts) if algo.baseline == "tracker" else None
    adv = step_advantages(algo, rewards, group_ids, traj.stds, state_rewards, baseline)
    batch = transitions(traj, adv)  # the trained steps whose advantage is not 0
    for share in torch.randperm(len(batch["advantage"]), generator=generator).chunk(setup.minibatches):
        part, part_prompts = {k: v[share] for k, v in batch.items()}, prompts[batch["sample"][share]]
        reference = None if ref_velocity is None else lambda x, t: ref_velocity(x, t, part_prompts)
        loss, _ = policy_loss(lambda x, t: velocity(x, t, part_prompts), part, algo, setup.clip_range, setup.beta,
                              reference)
        optimiser_step(loss)
    if tracker is not None:
        tracker.update(prompts, rewards)
    return {"prompt_ids": prompt_ids, "group_sizes": sizes, "rewards": rewards,
            "zero_std_ratio": zero_std_fraction(rewards, group_ids)}
