"""The intermediate rewards as sd35/policy.py batches them (passes of a chosen size, r_0 once
per shared-noise group, scored elsewhere and gathered later) against their definition,
minflow.intermediate_rewards, one batch of every needed state."""
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import minflow
from sd35 import policy
from toy import flow


def conditioned_toy(seed=0):
    """A small prompt-conditioned velocity (the toy's MLP), evaluated per row."""
    torch.manual_seed(seed)
    return flow.ToyVelocity(width=32, depth=2).eval()


def batched(model, prompts, traj, substeps, needed=None, groups=None, batch_size=None, scored=None):
    """The trainer's way: every pass scored (in `scored`, the row counts), then the table."""
    velocity = lambda x, t, rows: model(x, t, prompts[rows])  # noqa: E731
    passes = [(b, k, flow.reward(x0, prompts[b])) for b, k, x0 in
              policy.clean_estimate_passes(velocity, traj, substeps, needed, groups, batch_size)]
    if scored is not None:
        scored += [len(b) for b, _, _ in passes]
    return policy.reward_table(traj.xs.shape[1], passes, flow.reward(traj.xs[:, -1], prompts), groups)


def definition(model, prompts, traj, substeps, needed=None):
    return minflow.intermediate_rewards(lambda x, t, rows: model(x, t, prompts[rows]), traj,
                                        lambda x0, rows: flow.reward(x0, prompts[rows]), substeps, needed)


@pytest.mark.parametrize("sampler", minflow.SAMPLERS)
@pytest.mark.parametrize("batch_size", [None, 5])
def test_batched_passes_equal_the_definition(sampler, batch_size):
    model = conditioned_toy()
    prompts = torch.arange(3).repeat_interleave(4)
    traj = minflow.rollout(lambda x, t: model(x, t, prompts), torch.randn(12, 2), minflow.sd3_sigmas(6), sampler,
                           0.7, torch.Generator().manual_seed(1))
    got, expected = batched(model, prompts, traj, 3, batch_size=batch_size), definition(model, prompts, traj, 3)
    if batch_size is None:  # one pass of every state, as the definition batches it: the same arithmetic
        assert torch.equal(got, expected)
    else:  # other pass sizes change how the CPU blocks the matrix products: the last bits only
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_only_needed_states_are_estimated_and_the_rest_cannot_leak_into_advantages():
    algo = minflow.PRESETS["stepwise_ddim"]
    model = conditioned_toy(1)
    sizes = torch.tensor([4, 4, 4])
    group_ids = torch.repeat_interleave(torch.arange(3), sizes)
    traj = minflow.rollout(lambda x, t: model(x, t, group_ids), minflow.initial_noise(sizes, (2,), True),
                           minflow.sd3_sigmas(10), algo.sampler, algo.noise_level, torch.Generator().manual_seed(2))
    full = definition(model, group_ids, traj, algo.substeps)
    needed = minflow.needed_states(traj.stds)
    assert needed.tolist() == [False] + [True] * 8 + [False, False]  # ddim: steps 1..7 trained
    scored = []
    part = batched(model, group_ids, traj, algo.substeps, needed, group_ids, scored=scored)
    assert sum(scored) == 8 * 12
    assert part[:, ~needed][:, :-1].isnan().all()  # every state not needed but the final one, r_T
    torch.testing.assert_close(part[:, needed], full[:, needed], rtol=1e-6, atol=1e-6)
    assert torch.equal(definition(model, group_ids, traj, algo.substeps, needed)[:, needed], full[:, needed])
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
    needed = torch.tensor([True, False, False, False, False])
    passes = list(policy.clean_estimate_passes(lambda x, t, rows: model(x, t, group_ids[rows]), traj, 2, needed,
                                               group_ids))
    assert torch.cat([b for b, _, _ in passes]).tolist() == [0, 3]  # the first trajectory of each group
    r = batched(model, group_ids, traj, 2, needed, group_ids)
    torch.testing.assert_close(r[:, 0], definition(model, group_ids, traj, 2)[:, 0], rtol=1e-6, atol=1e-6)
    assert r[:, 1:-1].isnan().all()


def test_passes_scored_elsewhere_and_gathered_later_give_the_same_table():
    """The trainer submits each pass to a pool as it comes and builds the table from the
    results at the end: the same numbers as scoring each pass in turn."""
    model = conditioned_toy(3)
    sizes = torch.tensor([3, 3])
    prompts = torch.repeat_interleave(torch.arange(2), sizes)
    traj = minflow.rollout(lambda x, t: model(x, t, prompts), minflow.initial_noise(sizes, (2,), True),
                           minflow.sd3_sigmas(5), "ddim", 0.7, ddim_noise="posterior")
    direct = batched(model, prompts, traj, 2, groups=prompts, batch_size=4)
    with ThreadPoolExecutor(1) as pool:
        final = pool.submit(flow.reward, traj.xs[:, -1], prompts)
        pending = [(b, k, pool.submit(flow.reward, x0, prompts[b])) for b, k, x0 in policy.clean_estimate_passes(
            lambda x, t, rows: model(x, t, prompts[rows]), traj, 2, groups=prompts, batch_size=4)]
        later = policy.reward_table(traj.xs.shape[1], [(b, k, f.result()) for b, k, f in pending], final.result(),
                                    prompts)
    assert torch.equal(direct, later) and not math.isnan(float(direct.sum()))
    assert torch.equal(direct[:3, 0], direct[:1, 0].expand(3))  # r_0 shared by the group
