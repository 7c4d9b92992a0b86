"""The 2D toy end to end: every algorithm learns, and the main job writes what it promises."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tqdm import tqdm

import minflow
from toy import flow
from toy.train import Config, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base():
    return flow.pretrain()


def test_base_model_learned_the_prompt_conditional_data(base):
    prompts = torch.arange(flow.NUM_PROMPTS).repeat_interleave(256)
    traj = minflow.rollout(lambda x, t: base(x, t, prompts), torch.randn(len(prompts), 2), minflow.sd3_sigmas(20), "ode")
    x = traj.xs[:, -1]
    on_ring = ((x.norm(dim=1) - flow.RADIUS).abs() < 0.5).float().mean()
    per_prompt = flow.reward(x, prompts).view(flow.NUM_PROMPTS, -1).mean(1)
    assert on_ring > 0.9
    assert per_prompt[0] > 0.5 and per_prompt[-1] < 0.1  # easy prompt solved, hard one not


@pytest.mark.parametrize("algo", ["flow_grpo", "stepwise", "superflow", "stepwise:group_sizes=variance"])
def test_each_algorithm_raises_the_eval_reward(base, algo):
    cfg = Config(iters=25, eval_every=25)
    run = train(base, minflow.make_algorithm(algo), cfg, seed=0, progress=tqdm(disable=True))
    before, after = run["curve"][0][1], run["curve"][-1][1]
    assert run["curve"][-1][0] == 25 * cfg.trajectories
    assert after > before + 0.1, (algo, before, after)
    assert all(sum(s) == cfg.trajectories for s in run["group_sizes"])


def run_main(*args):
    return subprocess.run([sys.executable, str(ROOT / "toy" / "train.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_main_job_writes_results_and_figures(tmp_path):
    out = tmp_path / "run"
    proc = run_main("--algos=flow_grpo,superflow", "--seeds=0,1", "--iters=4", "--eval_every=2", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    curves = results["curves"]
    assert set(curves) == {"flow_grpo", "superflow"} and set(curves["superflow"]) == {"0", "1"}
    assert [p[0] for p in curves["flow_grpo"]["0"]] == [0, 256, 512]
    assert curves["flow_grpo"]["0"][0][1] == curves["superflow"]["1"][0][1]  # the same base model and eval noise
    assert "flow_grpo" in proc.stdout and "superflow" in proc.stdout
    for name in ("reward_curves.png", "samples.png", "gains.png", "group_sizes.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,message", [
    (["--iters=ten"], "bad value for --iters: 'ten'; expected int"),
    (["--algo=flow_grpo"], "unknown flag --algo;"),
    (["--algos=flow_grpo,ppo"], "unknown algorithm 'ppo'"),
    (["--algos=superflow:sampler=sde"], "unknown sampler 'sde'"),
    (["--seeds=a"], "bad --seeds 'a'"),
])
def test_bad_flags_fail_in_one_line_before_any_work(tmp_path, args, message):
    proc = run_main(*args, f"--out={tmp_path / 'never'}")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [f"error: {proc.stderr.strip().removeprefix('error: ')}"]
    assert message in proc.stderr
    assert not (tmp_path / "never").exists()
