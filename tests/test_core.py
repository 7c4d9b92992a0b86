"""The core's math, one property per test, in the order of minflow.py's sections."""

from dataclasses import fields, replace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import cli
import minflow


@pytest.mark.parametrize("n,shift", [(1, 3.0), (10, 3.0), (40, 3.0), (10, 1.0), (25, 5.0)])
def test_sigma_grid_equals_diffusers(n, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(n)
    ours = minflow.sd3_sigmas(n, shift)
    assert ours.shape == (n + 1,)
    torch.testing.assert_close(ours, scheduler.sigmas.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampler", minflow.SAMPLERS)
def test_every_sampler_at_noise_level_zero_is_the_euler_step(sampler):
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(6, 3, 4, 4, generator=g), torch.randn(6, 3, 4, 4, generator=g)
    for t, t_next in [(1.0, 0.96), (0.7, 0.6), (0.278, 0.009), (0.009, 0.0),
                      (torch.rand(6, generator=g) * 0.5 + 0.5, torch.rand(6, generator=g) * 0.4)]:
        x_next, mean, std = minflow.sde_step(x, v, t, t_next, sampler, noise_level=0.0, noise=torch.randn_like(x))
        dt = torch.as_tensor(t - t_next).reshape(-1, 1, 1, 1) if torch.is_tensor(t) else t - t_next
        torch.testing.assert_close(mean, x - dt * v, rtol=0, atol=1e-6)
        torch.testing.assert_close(x_next, mean, rtol=0, atol=0)
        assert float(torch.as_tensor(std).abs().max()) == 0.0


def test_log_prob_equals_torch_normal():
    g = torch.Generator().manual_seed(1)
    x, mean = torch.randn(5, 2, 3, generator=g), torch.randn(5, 2, 3, generator=g)
    std = torch.rand(5, 1, 1, generator=g) + 0.1
    expected = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x).flatten(1).mean(1)
    torch.testing.assert_close(minflow.gaussian_log_prob(x, mean, std), expected)


def test_kl_is_the_exact_gaussian_kl():
    g = torch.Generator().manual_seed(2)
    mean, ref = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    std = torch.tensor(0.3)
    p, q = torch.distributions.Normal(mean, std), torch.distributions.Normal(ref, std)
    torch.testing.assert_close(minflow.kl_divergence(mean, ref, std), torch.distributions.kl_divergence(p, q).mean(1))


def gaussian_velocity(m, s):
    """The exact velocity E[eps - x0 | x_t] of data N(m, s^2 I)."""
    def velocity(x, t):
        mu, var = (1 - t) * m, ((1 - t) * s) ** 2 + t**2
        return (t - (1 - t) * s**2) * (x - mu) / var - m
    return velocity


def marginal(m, s, t):
    return (1 - t) * m, ((1 - t) * s) ** 2 + t**2


def flow_grpo_variance_errors(num_steps, m=1.5, s=0.5):
    """|sampled - analytic| marginal variance at t = 3/4 and at t = 0, from 40k samples."""
    sigmas = minflow.sd3_sigmas(num_steps, shift=1.0)
    x = torch.randn(40000, 1, generator=torch.Generator().manual_seed(0))
    traj = minflow.rollout(gaussian_velocity(m, s), x, sigmas, "flow_grpo", 0.7, torch.Generator().manual_seed(1))
    assert (traj.stds[:-1] > 0).all() and (traj.log_probs[:, :-1] != 0).all()
    for k in range(0, num_steps + 1, num_steps // 10):
        assert abs(traj.xs[:, k].mean() - marginal(m, s, float(sigmas[k]))[0]) < 0.02
    return [abs(float(traj.xs[:, k].var()) - marginal(m, s, float(sigmas[k]))[1]) for k in (num_steps // 4, num_steps)]


def test_flow_grpo_sde_reproduces_the_marginals():
    # Measured: the final variance is off by 0.003 at 100 steps (Monte Carlo noise is 0.002);
    # on the way the error comes from the coarse first steps and shrinks as steps grow.
    early_50, _ = flow_grpo_variance_errors(50)
    early_200, final_200 = flow_grpo_variance_errors(200)
    assert final_200 < 0.01
    assert early_200 < 0.04 and early_200 < 0.75 * early_50


@pytest.mark.parametrize("sampler,a", [("ddim", 0.7), ("cps", 0.8)])
def test_ddim_and_cps_keep_the_mean_and_never_exceed_the_marginal_variance(sampler, a):
    m, s = 1.5, 0.5
    sigmas = minflow.sd3_sigmas(100, shift=1.0)
    x = torch.randn(40000, 1, generator=torch.Generator().manual_seed(0))
    traj = minflow.rollout(gaussian_velocity(m, s), x, sigmas, sampler, a, torch.Generator().manual_seed(1))
    for k in range(1, 101):
        mu, var = marginal(m, s, float(sigmas[k]))
        assert abs(traj.xs[:, k].mean() - mu) < 0.02
        assert traj.xs[:, k].var() <= var * 1.02 + 1e-4, (k, traj.xs[:, k].var(), var)
    # The deficit is real: these samples end at variance 0.216 (ddim) and 0.156 (cps), against 0.25.
    assert traj.xs[:, -1].var() < 0.235


def toy_velocity(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))

    def velocity(x, t):
        t = torch.as_tensor(t, dtype=torch.float32).expand(x.shape[0])[:, None]
        return net(torch.cat([x, t], 1))
    return net, velocity


@pytest.mark.parametrize("sampler", ["flow_grpo", "ddim", "cps"])
def test_on_policy_ratio_is_exactly_one(sampler):
    net, velocity = toy_velocity()
    sigmas = minflow.sd3_sigmas(10)
    traj = minflow.rollout(velocity, torch.randn(16, 2), sigmas, sampler, 0.7, torch.Generator().manual_seed(0))
    adv = torch.randn(16)
    for k in torch.nonzero(minflow.trained_steps(traj.stds))[:, 0]:
        rows = {"x": traj.xs[:, k], "x_next": traj.xs[:, k + 1], "t": sigmas[k], "t_next": sigmas[k + 1],
                "old_log_prob": traj.log_probs[:, k], "advantage": adv}
        loss, stats = minflow.policy_loss(velocity, rows, replace(minflow.Algorithm(), sampler=sampler), 1e-4)
        assert stats["ratio"] == 1.0 and stats["clipfrac"] == 0.0 and stats["approx_kl"] == 0.0
        torch.testing.assert_close(loss, -adv.mean())


def test_ppo_clip_stops_the_gradient_outside_the_range():
    log_prob = torch.tensor([0.5, -0.5, 0.0], requires_grad=True)
    adv = torch.tensor([1.0, -1.0, 1.0])
    loss, stats = minflow.grpo_loss(log_prob, torch.zeros(3), adv, clip_range=0.2)
    loss.backward()
    # ratio e^0.5 with A > 0 and e^-0.5 with A < 0 are clipped: no gradient; the third is not.
    assert log_prob.grad[0] == 0 and log_prob.grad[1] == 0 and log_prob.grad[2] != 0
    assert stats["clipfrac"] == pytest.approx(2 / 3)


def test_one_step_on_a_positive_advantage_raises_its_log_prob():
    net, velocity = toy_velocity(1)
    sigmas = minflow.sd3_sigmas(10)
    traj = minflow.rollout(velocity, torch.randn(8, 2), sigmas, "flow_grpo", 0.7, torch.Generator().manual_seed(0))
    k = 3
    rows = {"x": traj.xs[:, k], "x_next": traj.xs[:, k + 1], "t": sigmas[k], "t_next": sigmas[k + 1],
            "old_log_prob": traj.log_probs[:, k], "advantage": torch.ones(8)}
    before = traj.log_probs[:, k].clone()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2)
    loss, _ = minflow.policy_loss(velocity, rows, minflow.Algorithm(), clip_range=10.0)
    loss.backward()
    opt.step()
    with torch.no_grad():
        mean, std = minflow.step_mean_std(rows["x"], velocity(rows["x"], rows["t"]), rows["t"], rows["t_next"])
        after = minflow.gaussian_log_prob(rows["x_next"], mean, std)
    assert after.mean() > before.mean() + 1e-4


def test_group_advantages_normalise_within_groups():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 30.0, 5.0, 5.0, 5.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    a = minflow.group_advantages(rewards, groups, eps=0.0, clip=100.0)
    for g in (0, 1):
        assert abs(a[groups == g].mean()) < 1e-6 and abs(a[groups == g].std(unbiased=False) - 1) < 1e-5
    assert (a[groups == 2] == 0).all()  # constant group: exactly zero
    glob = minflow.group_advantages(rewards, groups, std="global", eps=0.0, clip=100.0)
    torch.testing.assert_close(glob[:3], (rewards[:3] - 2.0) / rewards.std(unbiased=False))
    assert (glob[groups == 2] == 0).all()
    assert minflow.zero_std_fraction(rewards, groups) == pytest.approx(1 / 3)
    assert minflow.group_advantages(rewards, groups, clip=0.5).abs().max() <= 0.5


def test_constant_float_rewards_give_exact_zeros():
    # 0.1 * 3 / 3 != 0.1 in floating point: the zero must not come from subtraction.
    rewards, groups = torch.full((6,), 0.1), torch.tensor([0, 0, 0, 1, 1, 1])
    assert (minflow.group_advantages(rewards, groups) == 0).all()
    assert (minflow.gain_advantages(torch.full((6, 5), 0.1), groups) == 0).all()


def test_gains_telescope_and_joint_normalisation():
    g = torch.Generator().manual_seed(3)
    step_r = torch.rand(12, 6, generator=g)
    groups = torch.arange(3).repeat_interleave(4)
    gains = step_r[:, 1:] - step_r[:, :-1]
    torch.testing.assert_close(gains.sum(1), step_r[:, -1] - step_r[:, 0])
    a = minflow.gain_advantages(step_r, groups, eps=0.0, clip=100.0)
    assert a.shape == (12, 5)
    for grp in range(3):
        block = a[groups == grp]
        assert abs(block.mean()) < 1e-5 and abs(block.std(unbiased=False) - 1) < 1e-5
    # Joint, not per step: a step whose gains are all large keeps a large mean advantage.
    step_r[:, 1] += 5.0
    a = minflow.gain_advantages(step_r, groups, eps=0.0, clip=100.0)
    assert (a[:, 0] > 0).all() and (a[:, 1] < 0).all()
    masked = minflow.gain_advantages(step_r, groups, mask=torch.tensor([True, True, False, True, False]))
    assert (masked[:, [2, 4]] == 0).all()
    # Per step (the comparison the paper makes): every step's gains are standardised on their own,
    # so the large step no longer stands out.
    per_step = minflow.gain_advantages(step_r, groups, eps=0.0, clip=100.0, per_step=True)
    for grp in range(3):
        block = per_step[groups == grp]
        torch.testing.assert_close(block.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
        torch.testing.assert_close(block.std(0, unbiased=False), torch.ones(5), atol=1e-4, rtol=0)


def test_noise_weighted_advantages_are_zero_without_a_trained_step():
    a = minflow.noise_weighted_advantages(torch.tensor([1.0, -1.0]), torch.zeros(4))
    assert torch.equal(a, torch.zeros(2, 4))


def test_noise_weighted_advantages_have_mean_one_weights_on_trained_steps():
    stds = torch.tensor([0.7, 0.5, 0.3, 0.0, 0.006])
    trained = minflow.trained_steps(stds)
    assert trained.tolist() == [True, True, True, False, False]
    a = minflow.noise_weighted_advantages(torch.tensor([2.0, -1.0]), stds, trained)
    weights = a[0] / 2.0
    torch.testing.assert_close(weights[trained].mean(), torch.tensor(1.0))
    assert (weights[~trained] == 0).all() and weights[0] > weights[1] > weights[2]
    torch.testing.assert_close(a[1], -weights)


def test_bin_sizes_follow_the_sources_example_sum_to_the_budget_and_are_monotone():
    # The source's example: M_max 24, K 4 bins, one prompt a bin -> 24 (most uncertain) .. 21.
    u = torch.tensor([0.1, 0.25, 0.0, 0.2])
    assert minflow.bin_group_sizes(u, 90, bins=4, largest=24, smallest=21).tolist() == [22, 24, 21, 23]
    g = torch.Generator().manual_seed(5)
    for trial in range(200):
        K = int(torch.randint(1, 40, (1,), generator=g))
        bins = int(torch.randint(1, 9, (1,), generator=g))
        largest = 1 + int(torch.randint(0, 30, (1,), generator=g))
        smallest = 1 + int(torch.randint(0, largest, (1,), generator=g))
        n_min = int(torch.randint(1, 3, (1,), generator=g))
        budget = int(torch.randint(2 * K, 40 * K + 1, (1,), generator=g))
        u = torch.rand(K, generator=g) * (torch.rand(K, generator=g) > 0.3)
        sizes = minflow.bin_group_sizes(u, budget, bins, largest, smallest, n_min)
        assert sizes.dtype == torch.long and int(sizes.sum()) == budget and (sizes >= n_min).all()
        assert (sizes[:, None] >= sizes[None, :])[u[:, None] > u[None, :]].all(), (u, sizes)
        # Never starves: the smallest group keeps the bins' ratio of the largest (-1 for rounding).
        assert sizes.min() >= min(budget // K, smallest * sizes.max() // largest - 1) or sizes.min() == n_min
    # Equal uncertainty everywhere (the first iteration) gives near-equal groups.
    sizes = minflow.bin_group_sizes(torch.full((8,), 0.25), 128)
    assert sizes.sum() == 128 and sizes.max() - sizes.min() <= 3
    with pytest.raises(ValueError, match="cannot be split"):
        minflow.bin_group_sizes(torch.rand(4), 7, n_min=2)


def test_a_wider_size_range_reaches_groups_of_one_only_under_the_tracker_baseline():
    u = torch.linspace(0.25, 0.0, 8)
    tracker = minflow.PromptTracker(8)
    tracker.state[:, 0] = torch.linspace(1, 40, 8, dtype=torch.float64)  # values 0.5 .. 0.98
    wide = dict(group_sizing="bins", bins=8, group_max=24, group_min=1)
    for baseline, smallest in [("tracker", 1), ("group", 2)]:
        algo = replace(minflow.Algorithm(), baseline=baseline, **wide)
        sizes = minflow.allocate_groups(algo, 8, 64, tracker, torch.arange(8))
        assert sizes.sum() == 64 and sizes.min() == smallest and sizes[0] == sizes.max()
    assert minflow.bin_group_sizes(u, 64, 8, 24, 1, 1).tolist()[-1] == 1
    with pytest.raises(cli.FlagError, match="--group_min=30: expected at most --group_max=24"):
        cli.make_algorithm("superflow:group_min=30")


def test_beta_tracker_matches_a_hand_computation():
    tracker = minflow.PromptTracker(3, rho=0.5)
    assert tracker.value(torch.arange(3)).tolist() == [0.5] * 3  # the prior Beta(1, 1)
    assert tracker.uncertainty(torch.arange(3)).tolist() == [0.25] * 3
    tracker.update(torch.tensor([0, 0, 1]), torch.tensor([1.0, 0.5, 0.0]))
    # prompt 0: a = 0.5 * 1 + 1.5 = 2.0, b = 0.5 * 1 + 0.5 = 1.0; prompt 1: a = 0.5, b = 1.5
    torch.testing.assert_close(tracker.state[:2], torch.tensor([[2.0, 1.0], [0.5, 1.5]], dtype=torch.float64))
    torch.testing.assert_close(tracker.value(torch.tensor([0, 1, 2])), torch.tensor([2 / 3, 0.25, 0.5]))
    torch.testing.assert_close(tracker.uncertainty(torch.tensor([0, 1])), torch.tensor([2 / 9, 0.1875]))
    tracker.update(torch.tensor([1, 1]), torch.tensor([0.0, 0.0]))  # a second visit forgets half the first
    torch.testing.assert_close(tracker.state[1], torch.tensor([0.25, 2.75], dtype=torch.float64))
    assert tracker.visits.tolist() == [1, 2, 0]
    # An all-zero prompt keeps some uncertainty: the prior, so it is not starved.
    assert tracker.uncertainty(torch.tensor([1]))[0] > 0.05


def test_tracker_round_trips_through_its_state_dict():
    ids = torch.tensor([0, 0, 1, 1])
    t = minflow.PromptTracker(3, rho=0.8, reward_range=None)
    t.update(ids, torch.tensor([3.0, -1.0, 2.0, 5.0]))
    clone = minflow.PromptTracker(3)
    clone.load_state_dict(t.state_dict())
    assert torch.equal(clone.state, t.state) and torch.equal(clone.range, t.range) and clone.rho == 0.8
    assert torch.equal(clone.baseline(torch.arange(3)), t.baseline(torch.arange(3)))
    assert torch.equal(clone.visits, t.visits) and clone.fixed_range is False


def test_tracker_maps_rewards_by_a_stated_or_running_range_and_counts_clipping():
    tracker = minflow.PromptTracker(2, rho=1.0, reward_range=(0.0, 26.0))
    tracker.update(torch.tensor([0, 0, 0]), torch.tensor([13.0, 30.0, -2.0]))  # 0.5, clipped 1, clipped 0
    assert tracker.clipped == 2
    torch.testing.assert_close(tracker.state[0], torch.tensor([2.5, 2.5], dtype=torch.float64))
    # The baseline is the value on the reward's own scale: v = 0.5 -> 13.
    torch.testing.assert_close(tracker.baseline(torch.tensor([0, 1])), torch.tensor([13.0, 13.0]))
    running = minflow.PromptTracker(2, rho=1.0, reward_range=None)
    running.update(torch.tensor([0, 1]), torch.tensor([-4.0, 6.0]))  # range becomes [-4, 6]
    assert running.range.tolist() == [-4.0, 6.0] and running.clipped == 0
    torch.testing.assert_close(running.value(torch.tensor([0, 1])), torch.tensor([1 / 3, 2 / 3]))


def test_tracker_baseline_is_the_value_before_the_update():
    algo = minflow.PRESETS["superflow"]
    tracker = minflow.new_tracker(algo, 2)
    ids, rewards = torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 1.0, 0.0, 1.0])
    before = tracker.baseline(ids)
    tracker.update(ids, rewards)
    assert before.tolist() == [0.5] * 4 and not torch.equal(tracker.baseline(ids), before)
    stds = torch.tensor([0.3, 0.2, 0.1])
    a = minflow.step_advantages(algo, rewards, torch.tensor([0, 0, 1, 1]), stds, baseline=before)
    d = rewards - 0.5  # r - v with v from before: standardised over the batch
    torch.testing.assert_close(a[:, 0], ((d - d.mean()) / (d.std(unbiased=False) + 1e-4)) * 0.3 / 0.25)


def chi_square(counts, expected):
    return float(((counts - expected) ** 2 / expected).sum())


def test_prioritised_sampling_follows_the_weights():
    weights = torch.tensor([0.05, 0.55, 0.3, 0.05, 0.5])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([minflow.prioritised_prompts(weights, 1, g) for _ in range(20000)])[:, 0]
    counts = torch.bincount(draws, minlength=5).double()
    # 4 degrees of freedom: 18.5 is the 0.999 quantile of chi-square(4).
    assert chi_square(counts, 20000 * weights.double() / weights.sum()) < 18.5
    # Two without replacement from three: P(i in) = w_i / W + sum_j w_j / W * w_i / (W - w_j).
    w = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    W = w.sum()
    inclusion = torch.stack([w[i] / W + sum(w[j] / W * w[i] / (W - w[j]) for j in range(3) if j != i) for i in range(3)])
    picks = torch.stack([minflow.prioritised_prompts(w, 2, g) for _ in range(20000)])
    assert all(len(set(p.tolist())) == 2 for p in picks[:100])
    counts = torch.bincount(picks.flatten(), minlength=3).double()
    assert chi_square(counts, 20000 * inclusion) < 13.8  # 0.999 quantile, 2 dof
    # choose_prompts: weights sqrt(v (1 - v)) + eps from the tracker, seeded draws repeat.
    algo = minflow.PRESETS["superflow"]
    tracker = minflow.new_tracker(algo, 4)
    tracker.update(torch.tensor([0, 1, 1]), torch.tensor([1.0, 1.0, 0.0]))
    a = minflow.choose_prompts(algo, 4, 3, tracker, torch.Generator().manual_seed(3))
    b = minflow.choose_prompts(algo, 4, 3, tracker, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and len(set(a.tolist())) == 3
    uniform = minflow.choose_prompts(minflow.Algorithm(), 10, 4, None, torch.Generator().manual_seed(3))
    assert len(set(uniform.tolist())) == 4 and minflow.choose_prompts(minflow.Algorithm(), 2, 5).shape == (5,)


def test_presets_are_axis_choices_and_mix():
    for preset in minflow.PRESETS.values():
        cli.check_flags(preset)  # an Algorithm does not check itself: the presets are checked here
    assert cli.make_algorithm("flow_grpo") == minflow.Algorithm()
    mix = cli.make_algorithm("stepwise:group_sizing=bins:bins=2")
    assert (mix.sampler, mix.shared_noise, mix.step_credit, mix.group_sizing, mix.bins) == ("flow_grpo", True, "gains", "bins", 2)
    assert minflow.PRESETS["stepwise_ddim"] == replace(minflow.PRESETS["stepwise"], sampler="ddim")
    sf = minflow.PRESETS["superflow"]
    assert (sf.prompt_sampling, sf.group_sizing, sf.baseline, sf.step_credit) == ("variance", "bins", "tracker", "noise")
    assert minflow.PRESETS["superflow_no_dynamic_sampling"] == replace(sf, prompt_sampling="uniform", group_sizing="fixed")
    assert minflow.PRESETS["superflow_no_step_credit"] == replace(sf, step_credit="uniform")
    spo = minflow.PRESETS["flow_spo"]
    assert (spo.prompt_sampling, spo.group_sizing, spo.baseline, spo.step_credit) == ("variance", "fixed", "tracker", "uniform")
    for bad, message in [("grpo", "unknown algorithm 'grpo'"),
                         ("flow_grpo:sampler=euler", "--sampler=euler: expected one of flow_grpo, ddim, cps"),
                         ("stepwise:baseline=tracker", "--baseline=tracker: expected group with --step_credit=gains"),
                         ("superflow:group_min=x", "--group_min=x: expected an integer in \\[1, 10000\\]"),
                         ("superflow:rho=1", "--rho=1.0: expected a number in \\[0, 1\\)"),
                         ("stepwise:ddim_noise=exact", "--ddim_noise=exact: expected one of literal, posterior"),
                         ("superflow:size=3", "unknown flag --size")]:
        with pytest.raises(ValueError, match=message):
            cli.make_algorithm(bad)


def test_flags_are_refused_with_their_declared_range_and_undeclared_ones_fail():
    from dataclasses import dataclass

    import cli

    @dataclass
    class Settings:
        every: int = cli.flag(5, "[1, inf)")
        rate: float = cli.flag(0.1, "(0, 1]")
        mode: str = cli.flag("a", ("a", "b"))
        RELATIONS = (("every", lambda s: s.every % 5 == 0, "a multiple of 5 (rate {rate})"),)

    assert cli.read_flags(Settings, ["--every=10", "--rate=1"]) == Settings(10, 1.0)
    for argv, message in [(["--every=0"], "--every=0: expected an integer >= 1"),
                          (["--every=1.5"], "--every=1.5: expected an integer >= 1"),
                          (["--rate=inf"], "--rate=inf: expected a number in (0, 1]"),
                          (["--rate=nan"], "--rate=nan: expected a number in (0, 1]"),
                          (["--mode="], "--mode=: expected one of a, b"),
                          (["--every=7"], "--every=7: expected a multiple of 5 (rate 0.1)")]:
        with pytest.raises(cli.FlagError) as error:
            cli.read_flags(Settings, argv)
        assert str(error.value) == message

    @dataclass
    class Undeclared:
        every: int = 5

    with pytest.raises(TypeError, match="Undeclared.every declares no range"):
        cli.check_flags(Undeclared())


def test_shared_initial_noise_and_group_sizes():
    sizes = torch.tensor([3, 2])
    x = minflow.initial_noise(sizes, (2,), shared=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x[0], x[2]) and torch.equal(x[3], x[4]) and not torch.equal(x[0], x[3])
    x = minflow.initial_noise(sizes, (2,), shared=False, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(x[0], x[1])
    assert minflow.allocate_groups(minflow.Algorithm(), 4, 32).tolist() == [8] * 4
    with pytest.raises(ValueError, match="does not split evenly"):
        minflow.allocate_groups(minflow.Algorithm(), 3, 32)


def test_short_ode_estimate_is_tweedie_at_one_substep_and_exact_for_straight_flows():
    m = torch.tensor([[1.0, -2.0]])
    x1 = torch.randn(5, 2)
    xt = 0.4 * m + 0.6 * x1   # t = 0.6 on the straight path from x1 to the point mass m
    velocity = lambda x, t: (x - m) / t  # noqa: E731  (the exact velocity of a point mass)
    torch.testing.assert_close(minflow.short_ode_x0(velocity, xt, 0.6, 1), minflow.tweedie_x0(xt, velocity(xt, 0.6), 0.6))
    torch.testing.assert_close(minflow.short_ode_x0(velocity, xt, 0.6, 5), m.expand(5, 2))


def test_intermediate_rewards_are_the_reward_of_each_states_short_ode_estimate():
    net, velocity = toy_velocity(2)
    traj = minflow.rollout(velocity, torch.randn(4, 2), minflow.sd3_sigmas(6), "ddim", 0.7)
    scored = []
    reward = lambda x, rows: scored.append(len(rows)) or -x.pow(2).sum(1) * (1 + rows)  # noqa: E731  (per trajectory)
    r = minflow.intermediate_rewards(lambda x, t, rows: velocity(x, t), traj, reward, substeps=2,
                                     final=reward(traj.xs[:, -1], torch.arange(4)))
    assert r.shape == (4, 7) and scored == [4, 6 * 4]  # the final reward, then every other state in one batch
    one_by_one = [reward(minflow.short_ode_x0(velocity, traj.xs[:, k], traj.sigmas[k], 2), torch.arange(4))
                  for k in range(6)] + [reward(traj.xs[:, -1], torch.arange(4))]
    torch.testing.assert_close(r, torch.stack(one_by_one, 1), rtol=1e-6, atol=1e-6)
    some = minflow.intermediate_rewards(lambda x, t, rows: velocity(x, t), traj, reward, 2,
                                        needed=torch.tensor([False, True] * 3 + [False]))
    assert some[:, [0, 2, 4, 6]].isnan().all()
    torch.testing.assert_close(some[:, [1, 3, 5]], r[:, [1, 3, 5]], rtol=1e-6, atol=1e-6)


def gaussian_markov_posterior_std(t, t_next):
    """Std of x_t' given x_t and x0 for x_t = (1 - t) x0 + t eps made Markov: from the joint
    covariance of (x_t', x_t), the forward step scaling x_t' by (1 - t) / (1 - t')."""
    scale = (1 - t) / (1 - t_next)
    cov = scale * t_next**2  # Cov(x_t', x_t | x0)
    return torch.sqrt(t_next**2 - cov**2 / t**2)


def test_ddim_posterior_schedule_is_the_markov_posterior_std_and_stochastic_at_one():
    g = torch.Generator().manual_seed(7)
    t = torch.rand(50, generator=g, dtype=torch.float64) * 0.98 + 0.01
    t_next = t * torch.rand(50, generator=g, dtype=torch.float64)
    a = 0.6
    torch.testing.assert_close(minflow.ddim_std(t, t_next, a, "posterior"), a * gaussian_markov_posterior_std(t, t_next))
    sigmas = minflow.sd3_sigmas(10)
    literal = minflow.step_std(sigmas[:-1], sigmas[1:], "ddim", a, "literal")
    posterior = minflow.step_std(sigmas[:-1], sigmas[1:], "ddim", a, "posterior")
    # The notes' words ("the most randomness at t = 1") against their formula (0 at t = 1).
    assert literal[0] == 0 and posterior[0] == pytest.approx(a * float(sigmas[1]))
    assert posterior[-1] == 0 and (posterior[:-1] > 0).all()
    assert minflow.trained_steps(posterior)[0] and not minflow.trained_steps(literal)[0]


def test_noise_weight_is_the_sdes_step_std_normalised_to_mean_one_on_trained_steps():
    # SuperFlow's weight w_k: sigma_t sqrt(dt) of the Flow-GRPO SDE, written out independently.
    for steps in (10, 28):
        sigmas = minflow.sd3_sigmas(steps).double()
        t, t_next = sigmas[:-1], sigmas[1:]
        one_minus_t = torch.where(t >= 1, 1 - t_next, 1 - t)
        expected_std = 0.7 * torch.sqrt(t / one_minus_t) * torch.sqrt(t - t_next)
        traj = minflow.rollout(lambda x, t: torch.zeros_like(x), torch.randn(3, 2), sigmas.float(), "flow_grpo", 0.7)
        torch.testing.assert_close(traj.stds.double(), expected_std, rtol=1e-5, atol=1e-7)
        trained = minflow.trained_steps(traj.stds)
        assert trained.sum() == steps - 1 and not trained[-1]
        w = minflow.noise_weighted_advantages(torch.ones(1), traj.stds, trained)[0]
        expected = torch.where(trained, expected_std, 0.0) / expected_std[trained].mean()
        torch.testing.assert_close(w.double(), expected, rtol=1e-5, atol=1e-6)
        assert w[trained].mean() == pytest.approx(1.0) and (w[1:steps - 1].diff() < 0).all()  # early steps weigh more


@pytest.mark.parametrize("spec,steps,trains", [
    ("flow_grpo", 1, False), ("flow_grpo", 2, True), ("stepwise_ddim", 3, False), ("stepwise_ddim", 4, True),
    ("stepwise_ddim:ddim_noise=posterior", 2, False), ("stepwise_ddim:ddim_noise=posterior", 3, True)])
def test_a_grid_that_trains_no_step_is_refused_in_one_line(spec, steps, trains):
    algo = cli.make_algorithm(spec)
    if trains:
        minflow.check_trains_something(algo, minflow.sd3_sigmas(steps))
        return
    with pytest.raises(ValueError) as error:
        minflow.check_trains_something(algo, minflow.sd3_sigmas(steps))
    assert str(error.value).startswith(f"--sampler={algo.sampler}: expected") and "\n" not in str(error.value)


def test_help_lists_every_field_with_its_default_range_and_comment():
    text = cli.help_text(minflow.Algorithm)
    for f in fields(minflow.Algorithm):
        assert f"--{f.name}={cli.show(f.default)}\n" in text, f.name
    assert "one of literal, posterior; the DDIM-inspired SDE's schedule" in text
    assert "an integer in [1, 64]; K uncertainty bins" in text
    with pytest.raises(SystemExit) as done:
        cli.read_flags(minflow.Algorithm, ["--help"])
    assert done.value.code == 0


def test_the_core_needs_only_torch_and_the_standard_library():
    import ast
    import sys
    tree = ast.parse(open(minflow.__file__).read())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported - set(sys.stdlib_module_names) == {"torch"}
