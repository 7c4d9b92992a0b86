"""sd35/train.py on the tiny pipeline: the same minflow functions, real diffusers, peft and
torch.distributed (gloo), all on CPU and offline."""
import gc
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import minflow
from PIL import Image
from sd35 import checkpoint, curves, policy, rewards
from sd35 import train as sd35_train
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
    pipe = policy.load_pipeline("tiny", torch.float32, "cpu")
    params = policy.add_lora(pipe.transformer, rank, 2 * rank)
    if lora_seed is not None:
        g = torch.Generator().manual_seed(lora_seed)
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return pipe, params


@pytest.mark.parametrize("guidance", [4.5, 1.0])
def test_minflow_ode_reproduces_the_pipeline(guidance):
    pipe = policy.load_pipeline("tiny", torch.float32, "cpu")
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
    reference = policy.guided_velocity(pipe.transformer, cond, 4.5, torch.float32)

    def ref_velocity(x, t):
        with policy.adapter_disabled(pipe.transformer):
            return reference(x, t)

    for k in torch.nonzero(minflow.trained_steps(traj.stds))[:, 0]:
        _, stats = minflow.policy_loss(velocity, traj.xs[:, k], traj.xs[:, k + 1], sigmas[k], sigmas[k + 1],
                                       traj.log_probs[:, k], torch.ones(3), sampler, 0.7, 1e-4, 0.1, ref_velocity)
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
    out, logs = run(tmp_path, algo, f"--algo={algo}", "--iters=1")
    entry = logs[-1]
    for key in ("reward_mean", "reward_std", "zero_std_ratio", "ratio", "clipfrac", "approx_kl", "kl", "policy_loss",
                "grad_norm", "seconds_sampling", "seconds_reward", "seconds_training", "eval_reward"):
        assert torch.isfinite(torch.tensor(entry[key])), (key, entry[key])
    assert sum(entry["group_sizes"]) == 8 and entry["optimiser_steps"] >= 1
    assert abs(entry["ratio"] - 1) < 1e-3
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
    assert drawn == [1, 2]  # after the log line of each iteration, as each evaluates
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
    assert [e["iteration"] for e in logs if "iteration" in e] == [1, 2, 3]
    assert [e["prompt_ids"] for e in logs] == [e["prompt_ids"] for e in whole_logs]
    a, b = lora(whole, 3), lora(part, 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], lora(whole, 2)[k]) for k in a)
    # Optimiser moments, the SuperFlow tracker (tensors and numbers) and the EMA too, bitwise.
    folders = [run_dir / "checkpoints" / "iter_000003" for run_dir in (whole, part)]
    state = [load_file(folder / checkpoint.STATE_FILE) for folder in folders]
    assert {k.split(".")[0] for k in state[0]} == {"optimizer", "tracker", "ema"}
    assert state[0].keys() == state[1].keys() and all(torch.equal(state[0][k], state[1][k]) for k in state[0])
    numbers = [json.loads((folder / checkpoint.RUN_FILE).read_text())["tracker"] for folder in folders]
    assert numbers[0] == numbers[1] and numbers[0]["kind"] == "beta"
    assert int(state[0]["tracker.visits"].sum()) == 6  # 2 prompts an iteration, 3 iterations


@pytest.mark.parametrize("algo", ["flow_grpo", "stepwise"])
def test_scoring_in_workers_while_sampling_goes_on_gives_the_run_of_scoring_in_turn(tmp_path, monkeypatch, algo):
    # JPEG stands in for OCR, pooled as OCR is: its scores differ between images, so the
    # LoRA really trains. Chunks of 2 trajectories: each is scored in the workers while the
    # next samples (and, for Stepwise, while the clean estimates run).
    monkeypatch.setattr(rewards, "CPU_BOUND", ("jpeg_compressibility",))
    flags = [f"--algo={algo}", "--iters=2", "--eval_every=0", "--save_every=1", "--lr=1e-2", "--sample_batch=2"]
    in_turn, in_turn_logs = run(tmp_path, "in_turn", *flags, "--reward_workers=0")
    pooled, pooled_logs = run(tmp_path, "pooled", *flags, "--reward_workers=2")
    a, b = lora(in_turn, 2), lora(pooled, 2)
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], lora(in_turn, 1)[k]) for k in a)
    for key in ("reward_mean", "reward_std", "reward_jpeg_compressibility", "policy_loss", "ratio", "kl"):
        assert [e[key] for e in pooled_logs] == [e[key] for e in in_turn_logs], key
    assert pooled_logs[0]["reward_std"] > 0


def test_the_tracker_range_of_a_reward_mix():
    assert reward_range({"ocr": 1.0}) == (0.0, 1.0) and reward_range({"pickscore": 1.0}) == (0.0, 1.0)
    assert reward_range({"ocr": 0.8, "pickscore": 0.2}) == pytest.approx((0.0, 1.0))
    assert reward_range({"ocr": -2.0, "pickscore": 0.5}) == (-2.0, 0.5)  # a negative weight swaps the ends
    assert reward_range({"ocr": 1.0, "jpeg_compressibility": 0.0}) == (0.0, 1.0)  # a zero weight adds nothing
    assert reward_range({"ocr": 1.0, "clipscore": 0.1}) is None  # one term without a range: a running range


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
    out, _ = run(tmp_path, "lora", "--iters=2", "--lr=1e-2", "--eval_every=0")
    folder = out / "checkpoints" / "iter_000002"
    noise = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))

    def sample(pipe):
        return pipe(prompt=PROMPTS[:2], num_inference_steps=4, guidance_scale=4.5, height=64, width=64,
                    latents=noise.clone(), output_type="latent").images

    base = policy.load_pipeline("tiny", torch.float32, "cpu")
    before = sample(base)
    base.load_lora_weights(folder)
    after = sample(base)
    assert (after - before).abs().max() > 1e-4
    # diffusers' loader and our own resume path give the same policy.
    ours, params = tiny_policy(rank=sd35_train.Config.lora_rank)
    opt = torch.optim.AdamW(params)
    identity = json.loads((folder / checkpoint.RUN_FILE).read_text())
    identity.pop("iteration")
    checkpoint.load(folder, ours.transformer, opt, torch.amp.GradScaler("cpu", enabled=False), None, None, identity)
    torch.testing.assert_close(sample(ours), after)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script, *args, nproc=2, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_torchrun_two_ranks_train_and_stay_in_sync(tmp_path):
    out = tmp_path / "ddp"
    proc = torchrun(ROOT / "sd35" / "train.py", *TINY, "--algo=stepwise", "--iters=2", "--eval_every=1", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e.get("iteration") for e in logs[:2]] == [1, 2] and logs[-1] == {"ranks_in_sync": True}
    assert "2 rank(s) x 4 samples = 8 per iteration" in proc.stdout
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
    logs = [sd35_train.read_log(tmp_path / name / "log.jsonl")[:2] for name in ("one", "two")]
    draws = [[(e["prompt_ids"], e["group_sizes"]) for e in run_logs] for run_logs in logs]
    assert draws[0] == draws[1]
    assert draws[0][0][0] != draws[0][1][0]  # the draws do change between iterations
    state = [load_file(tmp_path / name / "checkpoints" / "iter_000002" / checkpoint.STATE_FILE) for name in ("one", "two")]
    tracker = [{k: v for k, v in s.items() if k.startswith("tracker.")} for s in state]
    assert tracker[0].keys() == tracker[1].keys() and all(torch.equal(tracker[0][k], tracker[1][k]) for k in tracker[0])


def _gradient_step(rank, world, port, result_path):
    """One optimiser step (SGD, lr 1) of sd35_train.optimise on a fixed global batch of 6
    trajectories, with this rank's share of it; rank 0 saves the parameter change."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ranks = sd35_train.Ranks("cpu")
    ranks.start()
    pipe, params = tiny_policy(lora_seed=2)
    prompts = PROMPTS * 2
    cond = policy.encode_prompts(pipe, prompts, 4.5, "cpu")
    velocity = policy.guided_velocity(pipe.transformer, cond, 4.5, torch.float32)
    traj = minflow.rollout(velocity, torch.randn(6, 16, 8, 8, generator=torch.Generator().manual_seed(3)),
                           minflow.sd3_sigmas(4), "flow_grpo", 0.7, torch.Generator().manual_seed(4))
    adv = torch.randn(6, 4, generator=torch.Generator().manual_seed(5)) * minflow.trained_steps(traj.stds)
    adv[1] = 0  # a sample without signal: its rows are skipped, so the ranks hold unequal row counts
    mine = ranks.share(6)
    local = minflow.Trajectory(traj.xs[mine], traj.log_probs[mine], traj.stds, traj.sigmas)
    cfg = sd35_train.Config(minibatches=1, train_batch=2, grad_clip=1e9, beta=0.05, guidance_scale=4.5)
    algo = minflow.Algorithm()
    model = torch.nn.parallel.DistributedDataParallel(pipe.transformer)
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1.0)
    sd35_train.optimise(0, cfg, algo, model, pipe.transformer, params, local, cond.select(torch.arange(6)[mine]),
                        adv[mine], opt, torch.amp.GradScaler("cpu", enabled=False), torch.float32, None, ranks)
    if rank == 0:
        save_file({str(i): b - p.detach() for i, (b, p) in enumerate(zip(before, params))}, result_path)
    # Free DDP before its process group, as sd35/train.py does: a Reducer freed after the group
    # can deadlock with gloo's thread (pytorch/pytorch#56297); CI once hung here that way.
    del model
    gc.collect()
    dist.destroy_process_group()


def test_gradients_from_two_ranks_equal_one_rank_on_the_same_global_batch(tmp_path):
    mp.spawn(_gradient_step, args=(1, free_port(), tmp_path / "one.safetensors"), nprocs=1, join=True)
    mp.spawn(_gradient_step, args=(2, free_port(), tmp_path / "two.safetensors"), nprocs=2, join=True)
    one, two = (list(load_file(tmp_path / name).values()) for name in ("one.safetensors", "two.safetensors"))
    assert any(g.abs().max() > 0 for g in one)
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


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

