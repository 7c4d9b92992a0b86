"""sd35/train.py on the tiny pipeline: the same minflow functions, real diffusers, peft and
torch.distributed (gloo), all on CPU and offline."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import minflow
from PIL import Image
from sd35 import checkpoint, curves, data, models, policy, rewards
from sd35 import train as sd35_train
from sd35.curves import read_log
from sd35.ranks import Ranks
from sd35.rewards import reward_range

ROOT = Path(__file__).resolve().parents[1]
WITH_TEST_REWARDS = ROOT / "tests" / "sd35_with_test_rewards.py"
TINY = ["--model=tiny", "--num_steps=4", "--eval_num_steps=4", "--eval_images=4",
        "--prompts=general", "--reward=jpeg_compressibility", "--prompts_per_iter=2", "--group_size=4",
        "--train_batch=4", "--sample_batch=8"]
PROMPTS = ['a sign that reads "OPEN"', "a red bicycle", "a bowl of soup"]


def tiny_policy(lora_seed=None, rank=4):
    """The tiny pipeline with a LoRA; with lora_seed its B matrices are random (not zero), so
    the policy differs from the reference."""
    pipe = models.load_pipeline("tiny", torch.float32, "cpu")
    params = policy.add_lora(pipe.transformer, rank, 2 * rank)
    if lora_seed is not None:
        g = torch.Generator().manual_seed(lora_seed)
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return pipe, params


@pytest.mark.parametrize("guidance", [4.5, 1.0])
def test_minflow_ode_reproduces_the_pipeline(guidance):
    pipe = models.load_pipeline("tiny", torch.float32, "cpu")
    noise = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = pipe(prompt=PROMPTS, num_inference_steps=6, guidance_scale=guidance, height=64, width=64,
                    latents=noise.clone(), output_type="latent").images
    cond = policy.encode_prompts(pipe, PROMPTS, guidance, "cpu")
    velocity = policy.guided_velocity(pipe.transformer, cond, guidance, torch.float32, batch_size=2)
    traj = minflow.rollout(velocity, noise, minflow.sd3_sigmas(6), "ode")
    torch.testing.assert_close(traj.xs[:, -1], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["flow_grpo", "ddim"])
def test_on_policy_ratio_is_exactly_one_through_the_transformer(sampler):
    pipe, _ = tiny_policy(lora_seed=1)
    cond = policy.encode_prompts(pipe, PROMPTS, 4.5, "cpu")
    velocity = policy.guided_velocity(pipe.transformer, cond, 4.5, torch.float32)
    sigmas = minflow.sd3_sigmas(5)
    traj = minflow.rollout(velocity, torch.randn(3, 16, 8, 8), sigmas, sampler, 0.7, torch.Generator().manual_seed(0))
    ref_velocity = policy.reference_velocity(pipe.transformer,
                                             policy.guided_velocity(pipe.transformer, cond, 4.5, torch.float32))
    algo = minflow.Algorithm(sampler=sampler)
    for k in torch.nonzero(minflow.trained_steps(traj.stds))[:, 0]:
        rows = {"x": traj.xs[:, k], "x_next": traj.xs[:, k + 1], "t": sigmas[k], "t_next": sigmas[k + 1],
                "old_log_prob": traj.log_probs[:, k], "advantage": torch.ones(3)}
        _, stats = minflow.policy_loss(velocity, rows, algo, 1e-4, 0.1, ref_velocity)
        assert stats["ratio"] == 1.0 and stats["clipfrac"] == 0.0
        assert stats["kl"] > 0  # random LoRA: the policy is not the reference


def run(tmp_path, name, *args):
    out = tmp_path / name
    sd35_train.main([*TINY, f"--out={out}", *args])
    return out, [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def lora(out, iteration):
    return load_file(out / "checkpoints" / f"iter_{iteration:06d}" / checkpoint.LORA_FILE)


@pytest.mark.parametrize("algo", ["flow_grpo", "stepwise", "superflow"])
def test_one_iteration_of_each_algorithm_trains_and_logs(tmp_path, algo, capsys):
    out, logs = run(tmp_path, algo, f"--algo={algo}", "--iters=1", "--ema_every=1")  # the saved EMA moves at once
    assert logs[0].keys() == {"iteration", "eval_reward", "eval_reward_jpeg_compressibility"}  # the base model
    assert logs[0]["iteration"] == 0 and (out / "eval" / "iter_000000.png").exists()
    entry = logs[-1]
    for key in ("reward_mean", "reward_std", "zero_std_ratio", "ratio", "clipfrac", "approx_kl", "kl", "policy_loss",
                "grad_norm", "seconds_sampling", "seconds_reward", "seconds_training", "eval_reward"):
        assert torch.isfinite(torch.tensor(entry[key])), (key, entry[key])
    assert sum(entry["group_sizes"]) == 8 and entry["optimiser_steps"] >= 1
    assert abs(entry["ratio"] - 1) < 1e-3 and abs(entry["ratio_first"] - 1) < 1e-5  # the first step is on-policy
    assert len(entry["prompt_ids"]) == 2 and entry["distinct_prompts"] == 2
    if algo == "superflow":  # the tracker's view of the draw, and JPEG sizes have no fixed range
        assert entry["prompts_seen"] == 0 and entry["tracker_clipped"] == 0  # seen before this first draw
        assert 0 < entry["drawn_uncertainty"] <= 0.25 and "the running min..max" in capsys.readouterr().out
    b = [v for k, v in lora(out, 1).items() if "lora_B" in k]
    assert b and any(v.abs().max() > 0 for v in b)  # B starts at zero: any nonzero B means training moved it
    assert (out / "eval" / "iter_000001.png").exists() and (out / "curves.png").exists()


def test_the_tiny_model_samples_at_its_own_64_px_unless_told(tmp_path, capsys):
    out, _ = run(tmp_path, "default", "--eval_only")
    assert "resolution: 64 px (the model's default" in capsys.readouterr().out
    assert Image.open(out / "eval" / "iter_000000.png").size == (128, 128)  # 4 test images of 64 px, 2 x 2
    out, _ = run(tmp_path, "told", "--eval_only", "--resolution=32", "--eval_images=1")
    assert "resolution: 32 px\n" in capsys.readouterr().out
    assert Image.open(out / "eval" / "iter_000000.png").size == (32, 32)


def test_curves_are_redrawn_at_every_evaluation_and_by_the_standalone_command(tmp_path, monkeypatch, capsys):
    drawn = []
    real_draw = curves.draw
    monkeypatch.setattr(curves, "draw", lambda entries, path: (drawn.append(len(entries)), real_draw(entries, path)))
    out, logs = run(tmp_path, "curves", "--algo=superflow", "--iters=2", "--eval_every=1", "--eval_images=1")
    assert drawn == [1, 2, 3]  # after the log lines of the base model's evaluation and of each iteration
    figure = Image.open(out / "curves.png")
    assert figure.format == "PNG" and figure.size[0] > 1000
    curves.main([f"--log={out / 'log.jsonl'}", f"--png={tmp_path / 'home.png'}"])
    assert (tmp_path / "home.png").read_bytes() == (out / "curves.png").read_bytes()
    with pytest.raises(SystemExit) as stop:
        curves.main([f"--log={tmp_path / 'nothing.jsonl'}"])
    assert str(stop.value.code) == f"error: --log={tmp_path / 'nothing.jsonl'}: expected an existing log.jsonl file"


def test_resumed_superflow_run_ends_bitwise_equal_to_an_uninterrupted_one(tmp_path):
    flags = ["--algo=superflow", "--save_every=1", "--eval_every=0", "--lr=1e-2", "--ema_every=1"]
    whole, whole_logs = run(tmp_path, "whole", *flags, "--iters=3")
    part, _ = run(tmp_path, "part", *flags, "--iters=2")
    _, logs = run(tmp_path, "part", *flags, "--iters=3", "--resume")  # bare: the run in --out
    assert [e["iteration"] for e in logs if "iteration" in e] == [0, 1, 2, 3]
    assert [e.get("prompt_ids") for e in logs] == [e.get("prompt_ids") for e in whole_logs]
    a, b = lora(whole, 3), lora(part, 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], lora(whole, 2)[k]) for k in a)
    # Optimiser moments, the SuperFlow tracker (tensors and numbers) and the EMA too, bitwise.
    folders = [run_dir / "checkpoints" / "iter_000003" for run_dir in (whole, part)]
    state = [load_file(folder / checkpoint.STATE_FILE) for folder in folders]
    assert {k.split(".")[0] for k in state[0]} == {"lora", "optimizer", "tracker", "ema"}
    assert state[0].keys() == state[1].keys() and all(torch.equal(state[0][k], state[1][k]) for k in state[0])
    numbers = [json.loads((folder / checkpoint.RUN_FILE).read_text())["tracker"] for folder in folders]
    assert numbers[0] == numbers[1] and numbers[0]["fixed_range"] is False  # JPEG sizes: a running range
    assert int(state[0]["tracker.visits"].sum()) == 6  # 2 prompts an iteration, 3 iterations


@pytest.mark.parametrize("algo", ["flow_grpo", "stepwise"])
def test_scoring_in_workers_while_sampling_goes_on_gives_the_run_of_scoring_in_turn(tmp_path, monkeypatch, algo):
    # JPEG stands in for OCR, pooled as OCR is: its scores differ between images, so the
    # LoRA really trains. Chunks of 2 trajectories: each is scored in the workers while the
    # next samples (and, for Stepwise, while the clean estimates run).
    monkeypatch.setattr(rewards, "CPU_BOUND", ("jpeg_compressibility",))
    flags = [f"--algo={algo}", "--iters=2", "--eval_every=0", "--save_every=1", "--lr=1e-2", "--sample_batch=2",
             "--ema_every=1"]  # the saved (evaluated) LoRA moves each iteration
    in_turn, in_turn_logs = run(tmp_path, "in_turn", *flags, "--reward_workers=0")
    pooled, pooled_logs = run(tmp_path, "pooled", *flags, "--reward_workers=2")
    a, b = lora(in_turn, 2), lora(pooled, 2)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], lora(in_turn, 1)[k]) for k in a)
    for key in ("reward_mean", "reward_std", "reward_jpeg_compressibility", "policy_loss", "ratio", "kl"):
        assert [e.get(key) for e in pooled_logs] == [e.get(key) for e in in_turn_logs], key
    assert pooled_logs[1]["reward_std"] > 0


def test_the_tracker_range_of_a_reward_mix():
    assert reward_range({"ocr": 1.0}) == (0.0, 1.0) and reward_range({"pickscore": 1.0}) == (0.7, 1.0)
    assert reward_range({"ocr": 0.8, "pickscore": 0.2}) == pytest.approx((0.14, 1.0))
    assert reward_range({"ocr": -2.0, "pickscore": 0.5}) == pytest.approx((-1.65, 0.5))  # a negative weight: ends swap
    assert reward_range({"ocr": 1.0, "jpeg_compressibility": 0.0}) == (0.0, 1.0)  # a zero weight adds nothing
    assert reward_range({"ocr": 1.0, "jpeg_compressibility": 0.1}) is None  # a term without a range: a running range
    assert reward_range({"remote": 1.0}) is None and reward_range({"remote": 2.0}, (0.0, 1.0)) == (0.0, 2.0)
    assert rewards.RewardMix("remote", rewards.RewardOptions(remote_url="http://x", remote_range=(0.0, 1.0))).range \
        == (0.0, 1.0)


def test_the_tracker_tells_easy_from_hard_prompts_on_pickscores_range():
    # Three prompts scored where SD3.5-M's PickScores lie (hard, middling, easy), 8 samples each.
    means, ids, noise = torch.tensor([0.82, 0.88, 0.94]), torch.arange(3).repeat_interleave(8), torch.Generator()
    trackers = [minflow.PromptTracker(3, reward_range=r) for r in (reward_range({"pickscore": 1.0}), (0.0, 1.0))]
    for step in range(10):
        scores = means[ids] + 0.01 * torch.randn(len(ids), generator=noise.manual_seed(step))
        for tracker in trackers:
            tracker.update(ids, scores)
    declared, unit = (tracker.value(torch.arange(3)) for tracker in trackers)
    assert declared[2] - declared[0] > 0.3 and unit[2] - unit[0] < 0.15  # (0, 1) sees them nearly alike
    assert trackers[0].clipped == 0


def test_lora_ema_averages_every_few_steps_and_swaps_back():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = policy.LoraEMA([p], decay=0.9, every=2)
    with torch.no_grad():
        p.fill_(1.0)
    ema.step()
    assert torch.equal(ema.average[0], torch.zeros(3))  # not yet: one step of two
    ema.step()
    torch.testing.assert_close(ema.average[0], torch.full((3,), 0.1))
    with ema.applied():
        torch.testing.assert_close(p.detach(), torch.full((3,), 0.1))
    assert torch.equal(p.detach(), torch.ones(3))


def test_saved_lora_loads_with_diffusers_and_changes_the_output(tmp_path):
    out, _ = run(tmp_path, "lora", "--iters=2", "--lr=1e-2", "--eval_every=0", "--ema_decay=0")  # saved = live
    folder = out / "checkpoints" / "iter_000002"
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))

    def sample(pipe):
        return pipe(prompt=PROMPTS[:2], num_inference_steps=4, guidance_scale=4.5, height=64, width=64,
                    latents=noise.clone(), output_type="latent").images

    base = models.load_pipeline("tiny", torch.float32, "cpu")
    before = sample(base)
    base.load_lora_weights(folder)
    after = sample(base)
    assert (after - before).abs().max() > 1e-4
    # diffusers' loader and our own resume path give the same policy.
    ours, params = tiny_policy(rank=sd35_train.Config.lora_rank)
    opt = torch.optim.AdamW(params)
    identity = json.loads((folder / checkpoint.RUN_FILE).read_text())
    identity.pop("iteration")
    checkpoint.load(folder, checkpoint.TrainState(ours.transformer, opt, torch.amp.GradScaler("cpu", enabled=False)),
                    identity)
    torch.testing.assert_close(sample(ours), after)


def test_the_evaluation_grid_frames_each_image_by_its_reward():
    images = torch.full((3, 3, 64, 64), 0.5)
    framed = sd35_train.framed(images, torch.tensor([0.0, 0.5, 1.0]), (0.0, 1.0))
    assert framed.dtype == torch.uint8 and framed.shape == images.shape
    assert framed[0, :, 0, 0].tolist() == [255, 0, 0] and framed[2, :, 63, 5].tolist() == [0, 255, 0]
    assert framed[1, :, 10, 1].tolist() == [128, 128, 0]  # 64 px: a frame 2 pixels wide
    assert (framed[:, :, 2:62, 2:62] == 128).all()  # the images themselves untouched
    # A reward without a declared range: the span of the scores themselves.
    assert sd35_train.framed(images, torch.tensor([3.0, 5.0, 4.0]), None)[1, :, 0, 0].tolist() == [0, 255, 0]


def test_the_saved_lora_is_the_evaluated_one_and_diffusers_draws_the_evaluation_image(tmp_path):
    """With the EMA on, pipe.load_lora_weights(checkpoint) draws the trainer's own evaluation image
    from the evaluation's noise; the live weights, kept for resuming, draw another one."""
    out, _ = run(tmp_path, "ema", "--iters=2", "--lr=0.1", "--ema_every=1", "--ema_decay=0.5", "--eval_every=0")
    folder = out / "checkpoints" / "iter_000002"
    # The first of 2 x 2, inside the 2-pixel frame that shows its reward.
    tile = np.asarray(Image.open(out / "eval" / "iter_000002.png"))[2:62, 2:62].astype(int)
    noise = torch.randn((4, 16, 8, 8), generator=sd35_train.generator(0, "eval"))[:1]  # 4: --eval_images

    def draw(pipe):
        image = pipe(prompt=data.load_prompts("general")[1][0][0], latents=noise.clone(), num_inference_steps=4,
                     guidance_scale=4.5, height=64, width=64, output_type="np").images[0]
        return (image * 255).round().astype(int)[2:62, 2:62]

    pipe = models.load_pipeline("tiny", torch.float32, "cpu")
    pipe.load_lora_weights(folder)
    assert abs(draw(pipe) - tile).max() <= 1  # a rounding step at most (measured: 1)
    live, params = tiny_policy(rank=sd35_train.Config.lora_rank)
    identity = json.loads((folder / checkpoint.RUN_FILE).read_text())
    checkpoint.load(folder, checkpoint.TrainState(live.transformer, torch.optim.AdamW(params),
                                                  torch.amp.GradScaler("cpu", enabled=False)), identity)
    assert abs(draw(live) - tile).max() > 4  # (measured: 18)


def test_evaluating_a_checkpoint_scores_what_its_run_scored_whatever_the_ema_flags(tmp_path):
    out, logs = run(tmp_path, "run", "--iters=1", "--lr=1e-2", "--ema_decay=0")
    _, evaluated = run(tmp_path, "eval", "--eval_only", f"--resume={out}")  # --ema_decay=0.9 by default
    assert evaluated[-1]["eval_reward"] == logs[-1]["eval_reward"] != logs[0]["eval_reward"]  # not the base model
    png = [folder / "eval" / "iter_000001.png" for folder in (out, tmp_path / "eval")]
    assert png[0].read_bytes() == png[1].read_bytes()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args, nproc=2, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_torchrun_three_ranks_take_unequal_shares_train_and_stay_in_sync(tmp_path):
    out = tmp_path / "ddp"
    proc = torchrun(ROOT / "sd35" / "train.py", *TINY, "--algo=stepwise", "--iters=2", "--eval_every=1", f"--out={out}",
                    nproc=3)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e.get("iteration") for e in logs[:3]] == [0, 1, 2] and logs[-1] == {"ranks_in_sync": True}
    assert "8 trajectories per iteration, 3 rank(s) x 2-3 (3 on the first 2, 2 on the rest)" in proc.stdout  # 8 = 3 + 3 + 2
    assert (out / "checkpoints" / "iter_000002" / checkpoint.LORA_FILE).exists()


def test_two_ranks_draw_the_same_prompts_and_track_the_same_as_one_rank(tmp_path):
    """With a reward of the prompt alone, rewards cannot depend on how samples are split over
    ranks; so the tracker, and with it every prioritised draw and every group size, must be
    the one-rank run's, bitwise."""
    flags = [*TINY, "--algo=superflow", "--reward=by_prompt", "--iters=2", "--eval_every=0", "--eval_images=1"]
    one = subprocess.run([sys.executable, str(WITH_TEST_REWARDS), *flags, f"--out={tmp_path / 'one'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    two = torchrun(WITH_TEST_REWARDS, *flags, f"--out={tmp_path / 'two'}")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    logs = [read_log(tmp_path / name / "log.jsonl")[1:3] for name in ("one", "two")]
    draws = [[(e["prompt_ids"], e["group_sizes"]) for e in run_logs] for run_logs in logs]
    assert draws[0] == draws[1]
    assert draws[0][0][0] != draws[0][1][0]  # the draws do change between iterations
    state = [load_file(tmp_path / name / "checkpoints" / "iter_000002" / checkpoint.STATE_FILE) for name in ("one", "two")]
    tracker = [{k: v for k, v in s.items() if k.startswith("tracker.")} for s in state]
    assert tracker[0].keys() == tracker[1].keys() and all(torch.equal(tracker[0][k], tracker[1][k]) for k in tracker[0])


def _gradient_step(rank, world, port, result_path):
    """One optimiser step (SGD, lr 1) of sd35_train.optimise on a fixed global batch of 64
    trajectories, with this rank's share of it; rank 0 saves the parameter change."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ranks = Ranks("cpu", result_path.parent)
    ranks.start()
    pipe, params = tiny_policy(lora_seed=2)
    n = 64
    cond = policy.encode_prompts(pipe, [PROMPTS[i % 3] for i in range(n)], 4.5, "cpu")
    velocity = policy.guided_velocity(pipe.transformer, cond, 4.5, torch.float32)
    traj = minflow.rollout(velocity, torch.randn(n, 16, 8, 8, generator=torch.Generator().manual_seed(3)),
                           minflow.sd3_sigmas(3), "flow_grpo", 0.7, torch.Generator().manual_seed(4))
    adv = torch.randn(n, 3, generator=torch.Generator().manual_seed(5)) * minflow.trained_steps(traj.stds)
    adv[1::5] = 0  # samples without signal: their rows are skipped, so the ranks hold unequal row counts
    mine = ranks.share(n)
    local = minflow.Trajectory(traj.xs[mine], traj.log_probs[mine], traj.stds, traj.sigmas)
    cfg = sd35_train.Config(minibatches=1, train_batch=16, grad_clip=1e9, beta=0.05, guidance_scale=4.5,
                            group_size=8, prompts_per_iter=n // 8)
    run = sd35_train.Run(cfg, minflow.Algorithm(), pipe, torch.float32, None, ranks, None, None, [], [])
    before = [p.detach().clone() for p in params]
    state = checkpoint.TrainState(pipe.transformer, torch.optim.SGD(params, lr=1.0),
                                  torch.amp.GradScaler("cpu", enabled=False))
    sd35_train.optimise(run, 0, state, local, cond.select(torch.arange(n)[mine]), adv)
    if rank == 0:
        save_file({str(i): b - p.detach() for i, (b, p) in enumerate(zip(before, params))}, result_path)
    dist.destroy_process_group()


def test_gradients_from_ranks_with_unequal_shares_equal_one_rank_on_the_same_global_batch(tmp_path):
    """64 trajectories over 3 ranks (22, 21, 21) and over 2: the update is one rank's."""
    changes = {}
    for world in (1, 2, 3):
        mp.spawn(_gradient_step, args=(world, free_port(), tmp_path / f"{world}.safetensors"), nprocs=world, join=True)
        changes[world] = list(load_file(tmp_path / f"{world}.safetensors").values())
    assert any(g.abs().max() > 0 for g in changes[1])
    for world in (2, 3):
        for a, b in zip(changes[1], changes[world]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_rank_shares_cover_the_budget_and_differ_by_at_most_one(monkeypatch):
    for world, total in [(3, 64), (8, 12), (5, 5), (1, 7)]:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        ranks = Ranks("cpu", ".")
        shares = [ranks.share(total, r) for r in range(world)]
        assert [s.start for s in shares[1:]] == [s.stop for s in shares[:-1]] and shares[-1].stop == total
        sizes = [s.stop - s.start for s in shares]
        assert shares[0].start == 0 and max(sizes) - min(sizes) <= 1


def test_existing_runs_are_never_overwritten_or_resumed_wrongly(tmp_path):
    out, logs = run(tmp_path, "run", "--iters=1", "--eval_every=0")
    before = (out / "log.jsonl").read_bytes()
    with pytest.raises(SystemExit, match="already holds a run; pass --resume to continue it"):
        sd35_train.main([*TINY, f"--out={out}", "--iters=1"])
    for flag, message in [("--lora_rank=8", "lora_rank=32, this run has 8"), ("--algo=superflow", "made with algorithm=")]:
        with pytest.raises(SystemExit, match=message):
            sd35_train.main([*TINY, f"--out={out}", "--iters=2", f"--resume={out}", flag])
    with pytest.raises(SystemExit, match=f"^error: --resume={tmp_path / 'fresh'}: no complete checkpoint there$"):
        sd35_train.main([*TINY, f"--out={tmp_path / 'fresh'}", "--iters=1", "--resume"])
    _, evaluated = run(tmp_path, "run", "--eval_only", f"--resume={out}")
    assert (out / "log.jsonl").read_bytes().startswith(before) and "eval_reward" in evaluated[-1]



def test_prompts_embedded_once_give_the_rewards_of_encoding_every_iteration(tmp_path, monkeypatch):
    """--text_encoders=free embeds every prompt at start-up and drops the encoders; keep encodes
    each iteration's prompts as they come. On CPU in float32 the runs agree bitwise."""
    built = []
    real_bank = policy.PromptBank
    monkeypatch.setattr(policy, "PromptBank", lambda pipe, *a: built.append(pipe) or real_bank(pipe, *a))
    flags = ["--algo=stepwise", "--iters=2", "--eval_every=1", "--save_every=2", "--lr=1e-2", "--ema_decay=0"]
    _, free = run(tmp_path, "free", *flags)
    assert all(getattr(built[-1], name) is None for name in policy.TEXT_ENCODERS)
    _, keep = run(tmp_path, "keep", *flags, "--text_encoders=keep")
    assert all(getattr(built[-1], name) is not None for name in policy.TEXT_ENCODERS)
    for key in ("reward_mean", "reward_std", "policy_loss", "kl", "eval_reward"):
        assert [e.get(key) for e in free] == [e.get(key) for e in keep], key
    a, b = lora(tmp_path / "free", 2), lora(tmp_path / "keep", 2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tensorboard_holds_the_logged_scalars_and_the_eval_grid(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    out, logs = run(tmp_path, "tb", "--iters=2", "--eval_every=1", "--eval_images=1", "--report_to=tensorboard")
    events = event_accumulator.EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    for key in ("reward_mean", "kl", "image_edge_density", "eval_reward", "grad_norm"):
        logged = [(e["iteration"], e[key]) for e in logs if key in e]
        read = [(s.step, s.value) for s in events.Scalars(key)]
        assert read == [(i, pytest.approx(v, rel=1e-6)) for i, v in logged], key
    assert [image.step for image in events.Images("eval_grid")] == [0, 1, 2]


def test_a_resumed_run_continues_its_tensorboard_log_and_a_failure_is_recorded(tmp_path, monkeypatch):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    flags = ["--eval_every=0", "--eval_images=1", "--report_to=tensorboard", "--save_every=1", "--iters=2"]
    out, _ = run(tmp_path, "tb", *flags)
    shutil.rmtree(out / "checkpoints" / "iter_000002")  # as if killed after logging iteration 2, before saving it
    run(tmp_path, "tb", *flags, "--resume")
    monkeypatch.setitem(rewards.REWARDS, "unreachable", lambda options: (_ for _ in ()).throw(
        ConnectionError("the reward's hub is unreachable")))  # fails while the model loads
    with pytest.raises(SystemExit):
        run(tmp_path, "tb", *flags, "--iters=3", "--resume", "--reward=unreachable")
    events = event_accumulator.EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert [s.step for s in events.Scalars("reward_mean")] == [1, 2]  # iteration 2 once: its rerun
    assert [s.step for s in events.Scalars("eval_reward")] == [0, 2]
    assert b"the reward's hub is unreachable" in events.Tensors("error/text_summary")[-1].tensor_proto.string_val[0]


def test_wandb_offline_continues_its_run_on_resume_and_records_a_failure(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    flags = ["--eval_images=1", "--report_to=wandb", "--save_every=1"]
    out, logs = run(tmp_path, "wb", *flags, "--iters=1")
    monkeypatch.setattr(sd35_train, "optimise", lambda *a: (_ for _ in ()).throw(RuntimeError("a bug in iteration 2")))
    with pytest.raises(SystemExit):
        run(tmp_path, "wb", *flags, "--iters=2", "--resume")
    wandb.teardown()  # wandb's service writes the run's last records on its own time
    runs = sorted((out / "wandb").glob("offline-run-*"))
    run_id = (out / curves.WANDB_ID_FILE).read_text()
    assert len(runs) == 2 and all(folder.name.endswith(f"-{run_id}") for folder in runs)
    assert b"a bug in iteration 2" in next(runs[-1].glob("*.wandb")).read_bytes()  # in the run's summary


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sd35m_random_trains_three_iterations_at_512_px_on_a_gpu(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "sd35" / "train.py"), "--model=sd35m-random",
                           "--reward=jpeg_compressibility", "--iters=3", f"--out={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=3600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resolution: 512 px" in proc.stdout
    assert [e["iteration"] for e in read_log(tmp_path / "run" / "log.jsonl")] == [1, 2, 3]
