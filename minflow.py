"""minflow: reinforcement learning for flow-matching generators, in one file.

Three algorithms on one core of pure functions over tensors:

  Flow-GRPO           (Liu et al. 2025)    the ODE becomes an SDE, so each step is a
                                           Gaussian policy; GRPO with group-normalised
                                           rewards and the same advantage at every step.
  Stepwise-Flow-GRPO  (Savani et al. 2026) intermediate rewards from short-ODE clean
                                           estimates; each step is credited with its gain.
  SuperFlow           (Chen et al. 2025)   variance-aware group sizes per prompt and
                                           step-level advantages weighted by injected noise.

A model enters only as a velocity function `velocity(x, t) -> v`, with t a 0-d tensor
(or a [B] tensor where the caller batches several times together).

Conventions (SD3 / diffusers; the toy uses them too)
  t in [0, 1] is the scheduler's sigma: t = 1 is pure noise, t = 0 is data.
  forward process     x_t = (1 - t) x0 + t eps,          eps ~ N(0, I)
  velocity            v = eps - x0;  sampling runs t from 1 down to 0
  clean estimate      x0_hat = x_t - t v                 (Tweedie)
  noise estimate      x1_hat = x_t + (1 - t) v
  score               grad log p_t(x) = -(x + (1 - t) v) / t

The policy. One step from t to t' < t (dt = t - t') is pi(x' | x_t) = N(mean, std^2 I).
Its log-density is averaged over all non-batch dimensions (as the reference code does;
PPO's clip range is calibrated to that). The loss per trained step k is PPO's clip

  L = max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) + beta KL,  ratio = pi_theta / pi_old,

and the algorithms differ only in where A comes from. They are presets over five axes
(sampler, shared initial noise, group sizes, baseline, step credit): see `Algorithm`.

Reading order: time grid (1) -> one step as a policy (2) -> rollouts and intermediate
rewards (3) -> advantages (4) -> group sizes (5) -> loss (6) -> the axes as presets (7).
Choices that the sources leave open are marked [recon] and are options, not constants.
"""
import math
from dataclasses import dataclass, replace
import torch

from cli import FlagError, check_flags, flag, read_flags
from prompt_allocation import PromptTracker, bin_group_sizes, neyman_group_sizes, prioritised_prompts

# ----------------------------------------------------------------------------------
# 1. The time grid


def sd3_sigmas(num_steps, shift=3.0, num_train_timesteps=1000):
    """Eq. (shifted grid): sigma = shift s / (1 + (shift - 1) s), s linear from 1 down to
    the training grid's smallest sigma, then a final 0: num_steps + 1 values from 1 to 0.

    Equals diffusers' FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(n).sigmas,
    which shifts its sigma_min too (so the last nonzero value is 0.009, not 0, for n = 10).
    """
    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)

    s_min = shifted(torch.tensor(1.0 / num_train_timesteps, dtype=torch.float64))
    s = torch.linspace(1.0, float(s_min), num_steps, dtype=torch.float64)
    return torch.cat([shifted(s), torch.zeros(1, dtype=torch.float64)]).float()


# ----------------------------------------------------------------------------------
# 2. One denoising step as a Gaussian policy

SAMPLERS = ("ode", "flow_grpo", "ddim", "cps")


def _like_batch(t, x):
    """t as float or 0-d or [B] tensor -> float32 tensor that broadcasts against x [B, ...]."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    return t.reshape(t.shape + (1,) * (x.dim() - 1)) if t.dim() == 1 else t


def tweedie_x0(x, v, t):
    """Eq. (Tweedie): x0_hat = x_t - t v, the posterior mean of the clean sample."""
    return x - _like_batch(t, x) * v


def flow_grpo_sigma(t, t_next, noise_level):
    """Eq. (Flow-GRPO sigma_t): sigma_t = a sqrt(t / (1 - t)).

    It diverges at t = 1, so there the reference code puts 1 - t' in place of 1 - t; the
    first step's std sigma_t sqrt(dt) is then exactly a.
    """
    one_minus_t = torch.where(t >= 1, 1 - t_next, 1 - t)
    return noise_level * torch.sqrt(t / one_minus_t)


def ddim_std(t, t_next, noise_level):
    """Stepwise-Flow-GRPO's DDIM-inspired noise, s = a t' sqrt(1 - t). [recon]: the form is
    from notes on the paper, its a was not found. s = 0 at t = 1 and at t' = 0, so those
    steps are deterministic and untrained. Kept apart so it can follow the paper's text."""
    return noise_level * t_next * torch.sqrt(1 - t)


def cps_std(t, t_next, noise_level):
    """Coefficients-Preserving Sampling (arXiv 2509.05952): s = t' sin(a pi / 2)."""
    return t_next * math.sin(noise_level * math.pi / 2)


def step_std(t, t_next, sampler="flow_grpo", noise_level=0.7):
    """The policy std of one step; 0 means the step is deterministic (no log-prob)."""
    t, t_next = torch.as_tensor(t, dtype=torch.float32), torch.as_tensor(t_next, dtype=torch.float32)
    if sampler == "ode":
        return torch.zeros_like(t)
    if sampler == "flow_grpo":
        return flow_grpo_sigma(t, t_next, noise_level) * torch.sqrt(t - t_next)
    if sampler == "ddim":
        return ddim_std(t, t_next, noise_level)
    if sampler == "cps":
        return cps_std(t, t_next, noise_level)
    raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")


def sde_step(x, v, t, t_next, sampler="flow_grpo", noise_level=0.7, noise=None, prev_sample=None):
    """One step t -> t_next of the chosen sampler; returns (x_next, mean, std).

    ode        mean = x - dt v, std = 0 (Euler; used for evaluation).
    flow_grpo  Eq. (Flow-GRPO SDE), Euler-Maruyama of the SDE with the ODE's marginals:
               mean = x - dt (v + sigma_t^2 / (2t) (x + (1 - t) v)),  std = sigma_t sqrt(dt).
    ddim, cps  Eq. (DDIM-inspired SDE): mean = (1 - t') x0_hat + sqrt(t'^2 - s^2) x1_hat,
               std = s. They keep the noise coefficient, not the marginal: the mean is exact
               but each step returns at most the marginal variance (Cauchy-Schwarz), a
               deficit that more steps do not remove. The papers trade it for cleaner images.
    With noise_level 0 every sampler is the Euler step. The math runs in float32 whatever
    the network's dtype (bf16 overflows in sigma_t^2 / t). With prev_sample given, x_next is
    that sample (to score a stored transition); with noise given, x_next = mean + std noise.
    """
    x, v = x.float(), v.float()
    t, t_next = _like_batch(t, x), _like_batch(t_next, x)
    dt = t - t_next
    std = step_std(t, t_next, sampler, noise_level)
    if sampler == "ode":
        mean = x - dt * v
    elif sampler == "flow_grpo":
        sigma = flow_grpo_sigma(t, t_next, noise_level)
        mean = x - dt * (v + sigma**2 / (2 * t) * (x + (1 - t) * v))
    else:
        x1_hat = x + (1 - t) * v
        mean = (1 - t_next) * tweedie_x0(x, v, t) + torch.sqrt((t_next**2 - std**2).clamp_min(0)) * x1_hat
    if prev_sample is not None:
        x_next = prev_sample.float()
    else:
        x_next = mean + std * (torch.randn_like(mean) if noise is None else noise.float())
    return x_next, mean, std


def gaussian_log_prob(x, mean, std):
    """Eq. (policy log-prob): log N(x; mean, std^2 I), averaged over non-batch dims -> [B]."""
    x, mean, std = x.float(), mean.float(), torch.as_tensor(std, dtype=torch.float32, device=x.device)
    log_density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.flatten(1).mean(1)


def kl_divergence(mean, ref_mean, std):
    """Eq. (KL): KL(N(mean, std^2) || N(ref_mean, std^2)) = (mean - ref_mean)^2 / (2 std^2),
    averaged over non-batch dims -> [B]. The exact per-step KL of the two policies; the
    reference code divides by 2 sigma_t^2 (no dt), so its beta equals our beta dt."""
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
def rollout(velocity, x, sigmas, sampler="flow_grpo", noise_level=0.7, generator=None, noise=None):
    """Sample trajectories from x at t = sigmas[0] down to sigmas[-1], keeping every state
    and the log-prob of every step (the old policy of PPO). No gradients: a policy gradient
    never differentiates through the sampling chain, only through each step's log-prob.
    noise: [T, B, ...] the steps' noise when drawn beforehand (a rollout in chunks draws it for
    the whole batch first), else drawn here from `generator` a step at a time (no [T, B, ...]
    buffer for long ODE evaluations)."""
    xs, log_probs, stds = [x], [], []
    for k, (t, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        v = velocity(x, t)
        # Noise is drawn at every step, even deterministic ones, so that the same generator
        # gives the same stream whatever the sampler and noise level.
        z = noise[k] if noise is not None else \
            torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        x_next, mean, std = sde_step(x, v, t, t_next, sampler, noise_level, noise=z)
        if float(std) > 0:
            log_probs.append(gaussian_log_prob(x_next, mean, std))
        else:
            log_probs.append(torch.zeros(x.shape[0], device=x.device))
        stds.append(std.reshape(()))
        x = x_next.to(x.dtype)
        xs.append(x)
    return Trajectory(torch.stack(xs, 1), torch.stack(log_probs, 1), torch.stack(stds).cpu(), sigmas.cpu())


def short_ode_x0(velocity, x, t, substeps=5):
    """Stepwise-Flow-GRPO's clean estimate: T' Euler ODE steps on a uniform grid from t to 0.
    T' = 1 is Tweedie's x0_hat; the paper uses T' = 5 (T' <= 3 was noisy in its ablation).
    t may be one time or one per row [B]: each row then runs its own grid."""
    fractions = torch.linspace(1.0, 0.0, substeps + 1)
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    for f, f_next in zip(fractions[:-1], fractions[1:]):
        v = velocity(x, t * f)
        x = (x.float() - _like_batch(t * (f - f_next), x) * v.float()).to(x.dtype)
    return x


def needed_states(stds):
    """The states whose intermediate rewards some trained gain uses -> bool [T+1]. Gain
    g_k = r_{k+1} - r_k needs the states on both sides of step k, and only trained steps get
    an advantage (`advantages` masks the rest), so r_k is needed only next to a trained step.
    For ddim on the 10-step SD3 grid that is 8 of the 11 states: steps 0 and 9 are
    deterministic and step 8 is not trained, so neither r_0 nor r_9 nor r_10 is used."""
    trained = trained_steps(stds)
    needed = torch.zeros(len(trained) + 1, dtype=torch.bool)
    needed[:-1] |= trained
    needed[1:] |= trained
    return needed


@torch.no_grad()
def step_rewards(velocity, traj, reward, substeps=5, final=None, needed=None, groups=None, batch_size=None):
    """Eq. (intermediate rewards): r_k = R(x0_hat_k) for the states k = 0..T -> [B, T+1].

    The clean estimates of all states run together, not state by state: each row of a pass
    is one (trajectory, state) pair with its own t, `batch_size` rows a pass (default: all at
    once). A pass mixes trajectories, so `velocity(x, t, rows)` and `reward(x0, rows)` are told
    the trajectory of each row (to pick its prompt). `reward` may return a future (anything
    with .result(), e.g. a concurrent.futures.Future) instead of a tensor: the next pass then
    runs while that one is scored elsewhere, and every future is collected at the end.

    needed  bool [T+1]: the states to estimate (default all; `needed_states` gives those the
            trained gains use). The others are NaN, which no consumer may read unmasked.
    groups  [B]: the group of each trajectory when a group shares its initial noise; r_0 is
            then estimated once per group and copied to the group's trajectories.
    final   r_T when it is already known (the ordinary final reward); otherwise it is scored.
    """
    B, S = traj.xs.shape[:2]
    needed = torch.ones(S, dtype=torch.bool) if needed is None else torch.as_tensor(needed, dtype=torch.bool).clone()
    rewards = torch.full((B, S), math.nan)
    if final is not None:
        rewards[:, -1] = final.float().cpu()
        needed[-1] = False
    # One row per (state, trajectory), state-major; with shared noise, state 0 needs only one
    # trajectory per group, and its estimate is copied to the others after scoring.
    first = torch.arange(B)
    if groups is not None:
        _, group_of = torch.unique(torch.as_tensor(groups).cpu(), return_inverse=True)
        first = torch.full((int(group_of.max()) + 1,), B).scatter_reduce_(0, group_of, torch.arange(B), "amin")
    states = needed[:-1].nonzero()[:, 0].tolist()
    rows = torch.cat([first if k == 0 else torch.arange(B) for k in states] or [torch.zeros(0, dtype=torch.long)])
    ks = torch.cat([torch.full((len(first) if k == 0 else B,), k) for k in states] or [rows])
    step = batch_size or max(len(rows), 1)
    pending = []
    for i in range(0, len(rows), step):
        r, k = rows[i:i + step], ks[i:i + step]
        x = traj.xs[r.to(traj.xs.device), k.to(traj.xs.device)]
        x0 = short_ode_x0(lambda x, t: velocity(x, t, r), x, traj.sigmas[k].to(x.device), substeps)
        pending.append((r, k, reward(x0, r)))
    if needed[-1]:  # the final state is already clean: scored as it is
        pending.append((torch.arange(B), torch.full((B,), S - 1), reward(traj.xs[:, -1], torch.arange(B))))
    for r, k, scores in pending:
        scores = scores.result() if hasattr(scores, "result") else scores
        rewards[r, k] = torch.as_tensor(scores).float().cpu()
    if groups is not None and needed[0]:
        rewards[:, 0] = rewards[first[group_of], 0]
    return rewards


# ----------------------------------------------------------------------------------
# 4. Advantages


def _groupwise_standardise(values, group_ids, weight, eps, clip):
    """(values - group mean) / (group std + eps), clipped, over the weighted entries of each
    group (values and weight [B, T], groups by row). Groups whose weighted values are all
    equal get exactly 0: they carry no learning signal and are skipped in training."""
    K, gid = int(group_ids.max()) + 1, group_ids.long()
    w = weight.float()
    count = torch.zeros(K).index_add_(0, gid, w.sum(1))
    mean = torch.zeros(K).index_add_(0, gid, (values * w).sum(1)) / count
    centred = values - mean[gid, None]
    std = (torch.zeros(K).index_add_(0, gid, (centred**2 * w).sum(1)) / count).sqrt()
    informative = (_group_span(values.masked_fill(w == 0, math.nan), gid, K) > 0)[gid, None]
    return torch.where(informative, centred / (std[gid, None] + eps), 0.0).clamp(-clip, clip) * w


def _group_span(values, gid, K):
    """max - min of each group's values [B, T], NaN entries left out -> [K] (NaN if none)."""
    hi = torch.full((K,), -math.inf).scatter_reduce_(0, gid, values.nan_to_num(-math.inf).amax(1), "amax")
    lo = torch.full((K,), math.inf).scatter_reduce_(0, gid, values.nan_to_num(math.inf).amin(1), "amin")
    return hi - lo


def group_advantages(rewards, group_ids, std="group", eps=1e-4, clip=5.0):
    """Eq. (GRPO advantage): A_i = clip((r_i - mean_group) / (std + eps), -5, 5) -> [B].

    std="group" divides by the group's std (the paper), std="global" by the batch's (the
    reference code's default). Constant-reward groups give exactly 0 either way.
    """
    rewards, group_ids = rewards.float().cpu(), group_ids.cpu()
    a = _groupwise_standardise(rewards[:, None], group_ids, torch.ones_like(rewards[:, None]), eps, clip)[:, 0]
    if std == "group":
        return a
    if std != "global":
        raise ValueError(f"unknown advantage std {std!r}; expected 'group' or 'global'")
    # Re-scale the group-standardised values by the batch std instead of each group's.
    K, gid = int(group_ids.max()) + 1, group_ids.long()
    mean = torch.zeros(K).index_add_(0, gid, rewards) / torch.bincount(gid, minlength=K)
    centred = torch.where(a != 0, rewards - mean[gid], 0.0)
    return (centred / (rewards.std(unbiased=False) + eps)).clamp(-clip, clip)


def zero_std_fraction(rewards, group_ids):
    """The share of groups whose rewards are all equal (the peers log it as zero_std_ratio)."""
    gid = group_ids.long().cpu()
    return float((_group_span(rewards.float().cpu()[:, None], gid, int(gid.max()) + 1) == 0).float().mean())


def stepwise_advantages(step_rewards, group_ids, eps=1e-4, clip=5.0, mask=None, per_step=False):
    """Eq. (gain advantage): g_k = r_{k+1} - r_k, the reward after a step minus before it
    (gains telescope: sum_k g_k = r_T - r_0), then A_{i,k} = (g_{i,k} - mean) / (std + eps)
    normalised jointly over all G x T gains of the group -> [B, T].

    Joint, not per step: early gains are larger and should count more (`per_step=True`
    normalises each step's G gains on their own, the variant the paper compares against). No
    discounting, no sums of future gains (the paper's ablations found neither better). With
    `mask` [T] or [B, T], only those steps enter the statistics (the others get 0).
    """
    gains = (step_rewards[:, 1:] - step_rewards[:, :-1]).float().cpu()
    weight = torch.ones_like(gains) if mask is None else torch.as_tensor(mask).float().expand_as(gains)
    # Masked gains may be NaN (step_rewards skips the states no trained gain needs): zero
    # them, or NaN * 0 would spread into the statistics.
    gains = gains.where(weight > 0, 0.0)
    if per_step:
        return torch.cat([_groupwise_standardise(gains[:, [k]], group_ids.cpu(), weight[:, [k]], eps, clip)
                          for k in range(gains.shape[1])], 1)
    return _groupwise_standardise(gains, group_ids.cpu(), weight, eps, clip)


def baseline_advantages(rewards, baseline, eps=1e-4, clip=5.0):
    """SuperFlow's baseline [recon, after SPO]: A = r - b with b the tracker's per-prompt value
    from before this iteration's update (so b does not depend on r: unbiased), standardised
    over the whole batch, clipped -> [B]. The batch
    mean is removed too, so a policy that improved since the tracker's update still yields
    signed advantages."""
    d = rewards.float().cpu() - baseline.float().cpu()
    return ((d - d.mean()) / (d.std(unbiased=False) + eps)).clamp(-clip, clip)


def noise_weighted_advantages(advantages, stds, trained=None):
    """SuperFlow's step credit [recon]: A_{i,k} = A_i w_k with w_k = std_k / mean_k(std_k) over
    the trained steps (mean 1) -> [B, T]. Reason: to first order
    R(x_0) - E[R] = sum_k <grad R, std_k eps_k>, so a step's share of the reward deviation
    scales with the noise it injected. `trained` [T] defaults to the steps with std > 0."""
    stds = stds.float().cpu()
    trained = (stds > 0) if trained is None else torch.as_tensor(trained).bool()
    w = torch.where(trained, stds, 0.0)
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12) * trained.sum(-1, keepdim=True)  # no trained step: all 0
    return advantages.float().cpu()[:, None] * w.expand(advantages.shape[0], -1)


# ----------------------------------------------------------------------------------
# 5. Variance-aware sampling (SuperFlow): per-prompt trackers, prompt choice, group sizes [recon]
#    live in prompt_allocation.py (PromptTracker, prioritised_prompts, bin_group_sizes,
#    neyman_group_sizes); section 7 picks among them by the algorithm's axes.


# ----------------------------------------------------------------------------------
# 6. The loss


def grpo_loss(log_prob, old_log_prob, advantages, clip_range, weight=None):
    """Eq. (PPO-clip): mean of max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)).

    With `weight` [N] the loss is the weighted sum instead of the mean: a data-parallel
    trainer weights each row by 1 / (rows in the global batch) so that gradients summed over
    ranks equal one big batch's, and gives padding rows weight 0. Returns (loss, stats) with
    the ratio's mean, clipfrac (share outside the clip range) and approx_kl =
    mean(log_ratio^2) / 2, the usual estimate of KL(old || new), over rows of nonzero weight.
    """
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    per_row = torch.maximum(unclipped, clipped)
    loss = per_row.mean() if weight is None else (per_row * weight).sum()
    with torch.no_grad():
        real = slice(None) if weight is None else weight != 0
        stats = {
            "ratio": ratio[real].mean().item(),
            "clipfrac": ((ratio[real] - 1).abs() > clip_range).float().mean().item(),
            "approx_kl": 0.5 * (log_ratio[real] ** 2).mean().item(),
        }
    return loss, stats


def policy_loss(velocity, x, x_next, t, t_next, old_log_prob, advantages, sampler, noise_level,
                clip_range, beta=0.0, ref_velocity=None, weight=None):
    """The training loss of a batch of stored transitions (x -> x_next from t to t_next, each
    [N] or shared): the policy's log-prob of x_next, PPO-clip, plus beta times the exact KL
    to the reference policy (`ref_velocity`, e.g. the model with its LoRA switched off).
    `weight` as in grpo_loss."""
    v = velocity(x, t)
    _, mean, std = sde_step(x, v, t, t_next, sampler, noise_level, prev_sample=x_next)
    loss, stats = grpo_loss(gaussian_log_prob(x_next, mean, std), old_log_prob, advantages, clip_range, weight)
    if beta > 0:
        with torch.no_grad():
            _, ref_mean, _ = sde_step(x, ref_velocity(x, t), t, t_next, sampler, noise_level, prev_sample=x_next)
        kl = kl_divergence(mean, ref_mean, std)
        loss = loss + beta * (kl.mean() if weight is None else (kl * weight).sum())
        stats["kl"] = (kl.mean() if weight is None else kl[weight != 0].mean()).item()
    return loss, stats


# ----------------------------------------------------------------------------------
# 7. The algorithms as presets over the axes


@dataclass(frozen=True)
class Algorithm:
    sampler: str = flag("flow_grpo", SAMPLERS[1:])  # the SDE that makes each step a Gaussian policy (section 2)
    noise_level: float = flag(0.7, "[0, 2]")  # a in the samplers' noise schedules (CPS's authors use 0.8)
    shared_noise: bool = flag(False, (False, True))  # all trajectories of a group start from one x_1 (Stepwise)
    prompt_sampling: str = flag("uniform", ("uniform", "variance"))  # which pool prompts an iteration draws: "variance" favours uncertain ones
    group_sizes: str = flag("fixed", ("fixed", "bins", "neyman"))  # G per prompt: fixed, SuperFlow's uncertainty bins, or Neyman
    tracker: str = flag("beta", ("beta", "moments"))  # per-prompt statistics: SPO's Beta counts, or EMA moments (prompt_allocation.py)
    baseline: str = flag("group", ("group", "tracker"))  # "group" mean (GRPO) or the tracker's value (SuperFlow, SPO)
    advantage_std: str = flag("group", ("group", "global"))  # GRPO's scale: "group" std (paper) or "global" (ref. code)
    step_credit: str = flag("uniform", ("uniform", "gains", "noise"))  # per-step credit: same A, reward gains, injected noise
    gain_norm: str = flag("joint", ("joint", "per_step"))  # gains normalised over the group's G x T, or per step
    substeps: int = flag(5, "[1, 100]")  # T': Euler substeps per intermediate clean estimate (gains only)
    bins: int = flag(4, "[1, 64]")  # K uncertainty bins for group_sizes=bins
    m_max: int = flag(24, "[1, 10000]")  # M_max: bin k gets M_max - k + 1, then all are scaled to the budget
    n_min: int = flag(2, "[2, 10000]")  # smallest group under Neyman sizes (2 keeps a group normalisable)
    n_max: int = flag(0, "[0, 100000]")  # largest group under Neyman sizes; 0 means no bound but the budget
    rho: float = flag(0.9, "[0, 1)")  # forgetting factor of the per-prompt tracker, per visit
    sampling_eps: float = flag(0.05, "(0, 10]")  # eps in sqrt(v (1 - v)) + eps: every prompt keeps a chance

    RELATIONS = (
        ("baseline", lambda a: a.step_credit != "gains" or a.baseline == "group", "group with --step_credit=gains "
         "(gains are normalised within each group)"),
        ("m_max", lambda a: a.m_max >= a.bins, "at least --bins={bins}, so every bin's size is positive"),
        ("n_max", lambda a: a.n_max == 0 or a.n_max >= a.n_min, "0 or at least --n_min={n_min}"),
    )

    def __post_init__(self):
        check_flags(self)

    @property
    def uses_tracker(self):
        return self.group_sizes != "fixed" or self.baseline == "tracker" or self.prompt_sampling == "variance"


SUPERFLOW = Algorithm(prompt_sampling="variance", group_sizes="bins", baseline="tracker", step_credit="noise")
PRESETS = {
    "flow_grpo": Algorithm(),
    "stepwise": Algorithm(sampler="ddim", shared_noise=True, step_credit="gains"),
    "superflow": SUPERFLOW,
    # The rows of SuperFlow's ablation table:
    "superflow_no_dynamic_sampling": replace(SUPERFLOW, prompt_sampling="uniform", group_sizes="fixed"),
    "superflow_no_step_credit": replace(SUPERFLOW, step_credit="uniform"),
    "flow_spo": Algorithm(prompt_sampling="variance", baseline="tracker"),
}


def make_algorithm(spec):
    """'superflow' or a preset with axis overrides, 'stepwise:group_sizes=bins'."""
    name, *overrides = spec.split(":")
    if name not in PRESETS:
        raise FlagError(f"unknown algorithm {name!r}; expected one of {', '.join(PRESETS)}")
    return read_flags(Algorithm, ["--" + o for o in overrides], base=PRESETS[name])


def trained_steps(stds):
    """Steps that are trained -> bool [T]: the stochastic ones except the last of them. That
    one lands on the grid's tiny final sigma (0.009 on the SD3 grid), so its std is tiny
    (0.006 for flow_grpo, 0.005 for ddim, whose very last step is already deterministic)
    and its log-prob gradient, which scales as 1 / std^2, would swamp every other step."""
    mask = stds > 0
    if mask.any():
        mask[int(mask.nonzero().max())] = False
    return mask


def new_tracker(algo, num_prompts, reward_range=(0.0, 1.0)):
    """The per-prompt tracker the algorithm needs, or None."""
    return PromptTracker(num_prompts, algo.tracker, algo.rho, reward_range) if algo.uses_tracker else None


def choose_prompts(algo, pool_size, k, tracker=None, generator=None):
    """The iteration's k prompt ids from a pool: uniformly (distinct while the pool allows),
    or prioritised by the tracker's uncertainty (SuperFlow, SPO)."""
    if algo.prompt_sampling == "variance":
        weights = tracker.uncertainty(torch.arange(pool_size)).double().sqrt() + algo.sampling_eps
        return prioritised_prompts(weights, k, generator)
    if k <= pool_size:
        return torch.randperm(pool_size, generator=generator)[:k]
    return torch.randint(pool_size, (k,), generator=generator)


def group_sizes(algo, num_groups, budget, tracker=None, prompt_ids=None):
    """The size of each of the iteration's groups: budget / groups, or SuperFlow's allocation."""
    if algo.group_sizes == "fixed":
        if budget % num_groups:
            raise ValueError(f"budget {budget} does not split evenly over {num_groups} groups")
        return torch.full((num_groups,), budget // num_groups, dtype=torch.long)
    if algo.group_sizes == "bins":
        return bin_group_sizes(tracker.uncertainty(prompt_ids), budget, algo.bins, algo.m_max)
    return neyman_group_sizes(tracker.uncertainty(prompt_ids), budget, algo.n_min, algo.n_max or None)


def initial_noise(sizes, shape, shared, generator=None, device=None):
    """x_1 for every trajectory [sum(sizes), *shape]; one draw per group if shared."""
    draws = int(len(sizes)) if shared else int(sizes.sum())
    x = torch.randn((draws, *shape), generator=generator, device=device)
    return x.repeat_interleave(sizes.to(x.device), 0) if shared else x


def advantages(algo, rewards, group_ids, stds, step_rewards=None, baseline=None, eps=1e-4, clip=5.0):
    """The advantage of every (trajectory, step) under the algorithm's baseline and step
    credit -> [B, T], 0 on untrained steps. `step_rewards` [B, T+1] is needed for gains,
    `baseline` [B] (the tracker's, before this iteration's update) for the tracker baseline."""
    trained = trained_steps(stds.cpu())
    if algo.step_credit == "gains":
        return stepwise_advantages(step_rewards, group_ids, eps, clip, trained, algo.gain_norm == "per_step")
    if algo.baseline == "tracker":
        a = baseline_advantages(rewards, baseline, eps, clip)
    else:
        a = group_advantages(rewards, group_ids, algo.advantage_std, eps, clip)
    if algo.step_credit == "noise":
        return noise_weighted_advantages(a, stds, trained)
    return a[:, None] * trained.float()


def transitions(traj, adv, mask=None):
    """Flatten (trajectory, step) pairs into training rows: a dict of x, x_next, t, t_next,
    old_log_prob, advantage and the trajectory index. `mask` [B, T] picks the pairs; by default
    those with nonzero advantage (constant-reward groups and untrained steps carry no signal)."""
    b, k = torch.nonzero(adv != 0 if mask is None else mask, as_tuple=True)
    return {
        "x": traj.xs[b, k], "x_next": traj.xs[b, k + 1], "t": traj.sigmas[k], "t_next": traj.sigmas[k + 1],
        "old_log_prob": traj.log_probs[b, k], "advantage": adv[b, k], "sample": b,
    }
