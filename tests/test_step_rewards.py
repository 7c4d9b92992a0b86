"""Batched intermediate rewards (minflow.intermediate_rewards) against the state-by-state definition."""
import math

import pytest
import torch

import minflow
from toy import flow


def conditioned_toy(seed=0):
    """A small prompt-conditioned velocity (the toy's MLP) and its reward, both per row."""
    torch.manual_seed(seed)
    model = flow.ToyVelocity(width=32, depth=2).eval()
    return model


def state_by_state(velocity, traj, reward, substeps):
    """The definition, one state at a time over whole trajectories: r_k = R(x0_hat_k)."""
    rewards = [reward(minflow.short_ode_x0(velocity, traj.xs[:, k], traj.sigmas[k], substeps))
               for k in range(traj.xs.shape[1] - 1)]
    return torch.stack(rewards + [reward(traj.xs[:, -1])], 1)


@pytest.mark.parametrize("sampler", minflow.SAMPLERS)
@pytest.mark.parametrize("batch_size", [12, 5])
def test_batched_rewards_equal_the_state_by_state_definition(sampler, batch_size):
    model = conditioned_toy()
    prompts = torch.arange(3).repeat_interleave(4)
    traj = minflow.rollout(lambda x, t: model(x, t, prompts), torch.randn(12, 2), minflow.sd3_sigmas(6), sampler,
                           0.7, torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = state_by_state(lambda x, t: model(x, t, prompts), traj, lambda x: flow.reward(x, prompts), 3)
    got = minflow.intermediate_rewards(lambda x, t, rows: model(x, t, prompts[rows]), traj,
                               lambda x, rows: flow.reward(x, prompts[rows]), 3, batch_size=batch_size)
    if batch_size == 12:  # one state per pass, as the definition batches it: the same arithmetic
        assert torch.equal(got, expected)
    else:  # other pass sizes change how the CPU blocks the matrix products: the last bits only
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_only_needed_states_are_estimated_and_the_rest_cannot_leak_into_advantages():
    algo = minflow.PRESETS["stepwise_ddim"]
    model = conditioned_toy(1)
    sizes = torch.tensor([4, 4, 4])
    group_ids = torch.repeat_interleave(torch.arange(3), sizes)
    prompts = group_ids
    traj = minflow.rollout(lambda x, t: model(x, t, prompts), minflow.initial_noise(sizes, (2,), True),
                           minflow.sd3_sigmas(10), algo.sampler, algo.noise_level, torch.Generator().manual_seed(2))
    scored = []

    def reward(x, rows):
        scored.append(len(rows))
        return flow.reward(x, prompts[rows])

    full = minflow.intermediate_rewards(lambda x, t, rows: model(x, t, prompts[rows]), traj, reward, algo.substeps)
    scored.clear()
    needed = minflow.needed_states(traj.stds)
    assert needed.tolist() == [False] + [True] * 8 + [False, False]  # ddim: steps 1..7 trained
    part = minflow.intermediate_rewards(lambda x, t, rows: model(x, t, prompts[rows]), traj, reward, algo.substeps,
                                needed=needed, groups=group_ids)
    assert sum(scored) == 8 * 12
    assert part[:, ~needed].isnan().all()
    torch.testing.assert_close(part[:, needed], full[:, needed], rtol=1e-6, atol=1e-6)
    a_full = minflow.step_advantages(algo, full[:, -1], group_ids, traj.stds, full)
    a_part = minflow.step_advantages(algo, full[:, -1], group_ids, traj.stds, part)
    assert a_part.isfinite().all() and a_part.abs().sum() > 0
    torch.testing.assert_close(a_part, a_full, rtol=1e-5, atol=1e-5)


def test_shared_initial_state_is_scored_once_per_group():
    model = conditioned_toy(2)
    sizes = torch.tensor([3, 5])
    group_ids = torch.repeat_interleave(torch.arange(2), sizes)
    traj = minflow.rollout(lambda x, t: model(x, t, group_ids), minflow.initial_noise(sizes, (2,), True),
                           minflow.sd3_sigmas(4), "flow_grpo", 0.7, torch.Generator().manual_seed(3))
    rows_scored = []

    def reward(x, rows):
        rows_scored.append(rows.clone())
        return flow.reward(x, group_ids[rows])

    needed = torch.tensor([True, False, False, False, False])
    r = minflow.intermediate_rewards(lambda x, t, rows: model(x, t, group_ids[rows]), traj, reward, 2, needed=needed,
                             groups=group_ids)
    assert torch.cat(rows_scored).tolist() == [0, 3]  # the first trajectory of each group
    expected = state_by_state(lambda x, t: model(x, t, group_ids), traj, lambda x: flow.reward(x, group_ids), 2)
    torch.testing.assert_close(r[:, 0], expected[:, 0], rtol=1e-6, atol=1e-6)
    assert r[:, 1:].isnan().all()


def test_passes_scored_elsewhere_and_gathered_later_give_the_same_table():
    """A trainer that overlaps scoring iterates the passes itself, submits each to a pool, and
    builds the table from the results at the end: the same numbers as scoring in turn."""
    from concurrent.futures import ThreadPoolExecutor
    model = conditioned_toy(3)
    sizes = torch.tensor([3, 3])
    prompts = torch.repeat_interleave(torch.arange(2), sizes)
    traj = minflow.rollout(lambda x, t: model(x, t, prompts), minflow.initial_noise(sizes, (2,), True),
                           minflow.sd3_sigmas(5), "ddim", 0.7, ddim_noise="posterior")
    velocity = lambda x, t, rows: model(x, t, prompts[rows])  # noqa: E731
    direct = minflow.intermediate_rewards(velocity, traj, lambda x, rows: flow.reward(x, prompts[rows]), 2,
                                          groups=prompts, batch_size=4)
    with ThreadPoolExecutor(1) as pool:
        final = pool.submit(flow.reward, traj.xs[:, -1], prompts)
        pending = [(b, k, pool.submit(flow.reward, x0, prompts[b]))
                   for b, k, x0 in minflow.clean_estimate_passes(velocity, traj, 2, groups=prompts, batch_size=4)]
        later = minflow.reward_table(traj.xs.shape[1], [(b, k, f.result()) for b, k, f in pending], final.result(),
                                     prompts)
    assert torch.equal(direct, later) and not math.isnan(float(direct.sum()))
    assert torch.equal(direct[:3, 0], direct[:1, 0].expand(3))  # r_0 shared by the group
