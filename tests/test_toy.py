"""The 2D toy end to end: the pool and its two rewards, every algorithm learns through the core's
loop, the tracker's baseline is read before its update, a configuration that trains nothing is
refused, tuning picks the best setting per reward, the claims follow their verdict rules on two
seed sets, the study writes its results file from results.json, and every command writes what
it promises, explains its flags, or stops in one line."""
import json
import math
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

import cli
import minflow
from toy import claims, flow, study, train, tune
from toy.train import Config

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the toy's tensors are too small for threads


@pytest.fixture(scope="module")
def base():
    return flow.pretrain()  # the main job's base model: pretrained once, then cached in toy/.cache


def test_the_pool_is_graded_and_the_bump_reward_is_exactly_zero_off_target():
    p = flow.own_mode_weights()
    assert len(p) == flow.NUM_PROMPTS == 32 and (p[1:] < p[:-1]).all()
    assert math.isclose(p[0], 0.9, rel_tol=1e-6) and math.isclose(p[-1], 0.02, rel_tol=1e-5)
    assert flow.target_mode(torch.tensor([0, 7, 8, 31])).tolist() == [0, 7, 0, 7]
    centre = flow.mode_centres()[3]
    at = lambda d: flow.reward((centre + torch.tensor([d, 0.0]))[None], torch.tensor([11]))[0].item()  # noqa: E731
    assert at(0.0) == pytest.approx(1.0) and at(0.7499) == pytest.approx(0.0, abs=1e-4)
    assert at(0.75) == 0.0 and at(1.0) == 0.0 and 0 < at(0.5) < at(0.25) < 1
    other_mode = flow.reward(flow.mode_centres()[4][None], torch.tensor([3]))
    assert other_mode.item() == 0.0  # a sample on a neighbouring mode scores exactly 0


def test_the_hit_reward_is_one_within_its_radius_of_the_target_mode_and_zero_elsewhere():
    centre, r = flow.mode_centres()[5], flow.HIT_RADIUS
    angles = torch.linspace(0, 2 * math.pi, 9)[:-1]
    ring = lambda d: centre + d * torch.stack([angles.cos(), angles.sin()], 1)  # noqa: E731
    prompts = torch.full((8,), 13)  # target mode 13 mod 8 = 5
    assert flow.reward(ring(0.0), prompts, "hit").tolist() == [1.0] * 8
    assert flow.reward(ring(0.999 * r), prompts, "hit").tolist() == [1.0] * 8
    assert flow.reward(ring(1.001 * r), prompts, "hit").tolist() == [0.0] * 8
    assert flow.reward(flow.mode_centres()[6][None], torch.tensor([13]), "hit").item() == 0.0  # wrong mode
    x = torch.randn(4096, 2) * 2
    hits, bumps = flow.reward(x, torch.arange(4096) % 32, "hit"), flow.reward(x, torch.arange(4096) % 32)
    assert set(hits.unique().tolist()) <= {0.0, 1.0} and 0 <= bumps.min() and bumps.max() <= 1  # both in [0, 1]
    assert (bumps[hits == 1] > 0.4).all()  # a hit is also near the bump's top


def test_base_model_learned_the_prompt_conditional_data(base):
    prompts = torch.arange(flow.NUM_PROMPTS).repeat_interleave(128)
    traj = minflow.rollout(lambda x, t: base(x, t, prompts), torch.randn(len(prompts), 2), minflow.sd3_sigmas(20), "ode")
    x = traj.xs[:, -1]
    on_ring = ((x.norm(dim=1) - flow.RADIUS).abs() < 0.5).float().mean()
    per_prompt = flow.reward(x, prompts).view(flow.NUM_PROMPTS, -1).mean(1)
    assert on_ring > 0.9
    assert per_prompt[0] > 0.5 and per_prompt[-1] < 0.1  # easy prompt solved, hard one not
    assert per_prompt[:8].mean() > 3 * per_prompt[-8:].mean()  # graded difficulty
    hit_rate = flow.reward(x, prompts, "hit").view(flow.NUM_PROMPTS, -1).mean(1)
    assert hit_rate[:8].mean() > 3 * hit_rate[-8:].mean()  # graded under the hit reward too


@pytest.mark.parametrize("algo,reward,gain", [
    ("flow_grpo", "bump", 0.1), ("stepwise", "bump", 0.1), ("stepwise_ddim", "bump", 0.1), ("superflow", "bump", 0.1),
    ("stepwise:group_sizing=bins:prompt_sampling=variance", "bump", 0.1),
    ("flow_grpo:noise_level=0.5", "hit", 0.05), ("superflow:noise_level=0.5", "hit", 0.1),  # the 0/1 reward learns slower
])
def test_each_algorithm_raises_the_eval_reward(base, algo, reward, gain):
    cfg = Config(iters=50, eval_every=50, tuned=False, lr=1e-3, reward=reward)
    run = train.train(base, cli.make_algorithm(algo), cfg, seed=0)
    before, after = run["curves"][0][1], run["curves"][-1][1]
    assert run["curves"][-1][0] == 50 * cfg.trajectories
    assert after > before + gain, (algo, reward, before, after)
    assert all(sum(s) == cfg.trajectories and len(s) == cfg.prompts_per_iter for s in run["group_sizes"])
    drawn = torch.tensor(run["prompts"])
    assert drawn.max() < flow.NUM_PROMPTS and len(drawn.unique()) > cfg.prompts_per_iter  # the pool is used


def test_a_wide_group_size_range_reaches_single_trajectory_groups_under_the_tracker(base):
    run = train.train(base, cli.make_algorithm("superflow:group_min=1"), Config(iters=6, eval_every=6, tuned=False), 0)
    sizes = torch.tensor(run["group_sizes"][1:])  # after the tracker's first update
    assert (sizes.sum(1) == 128).all() and sizes.min() < 8 < sizes.max()


def test_the_tracker_baseline_is_read_before_its_update(base, monkeypatch):
    """A spy tracker records the order of calls; the advantages must see the value from before
    the iteration's update (which would differ had the toy updated first)."""
    events, seen = [], []
    real_tracker, real_advantages = minflow.new_tracker, minflow.step_advantages

    class Spy:
        def __init__(self, tracker):
            self.tracker = tracker

        def baseline(self, ids):
            value = self.tracker.baseline(ids)
            events.append(("baseline", value.clone()))
            return value

        def update(self, ids, rewards):
            events.append(("update", None))
            self.tracker.update(ids, rewards)

        def __getattr__(self, name):
            return getattr(self.tracker, name)

    def spy_advantages(*args, **kwargs):
        seen.append(kwargs["baseline"] if "baseline" in kwargs else args[5])
        return real_advantages(*args, **kwargs)

    monkeypatch.setattr(minflow, "new_tracker", lambda *a, **k: Spy(real_tracker(*a, **k)))
    monkeypatch.setattr(minflow, "step_advantages", spy_advantages)
    train.train(base, cli.make_algorithm("superflow"), Config(iters=3, eval_every=3, tuned=False), seed=0)
    assert [kind for kind, _ in events] == ["baseline", "update"] * 3
    for (_, before_update), used in zip(events[::2], seen):
        assert torch.equal(used, before_update)
    assert not torch.equal(events[2][1], events[0][1])  # the updates did change the baseline


@pytest.mark.parametrize("argv", [["--algos=superflow:noise_level=0"], ["--algos=stepwise:noise_level=0"],
                                  ["--algos=stepwise_ddim", "--num_steps=2"], ["--num_steps=1"],
                                  ["--algos=flow_grpo,stepwise_ddim:ddim_noise=posterior", "--num_steps=2"]])
def test_a_configuration_that_trains_nothing_is_refused_before_any_work(argv, tmp_path):
    with pytest.raises(SystemExit) as stop:
        train.setup(argv + [f"--out={tmp_path / 'never'}"])
    assert "trains nothing" in stop.value.code and "\n" not in stop.value.code and "--algos=" in stop.value.code
    assert not (tmp_path / "never").exists()
    algo = cli.make_algorithm("stepwise_ddim")
    with pytest.raises(ValueError, match="^--sampler=ddim: expected"):  # the loop refuses it too, without a command
        train.train(flow.ToyVelocity(), algo, Config(tuned=False, num_steps=3, algos="flow_grpo"), 0)


def test_tuning_picks_the_best_setting_per_reward_and_the_main_job_reads_it(base, tmp_path):
    out = tmp_path / "tuned.json"
    tune.main(["--algos=flow_grpo,stepwise:noise_level=0.5", "--seeds=0", "--lrs=1e-4,3e-3", "--noise_levels=0.7,1",
               "--wider=0.5", "--iters=3", "--workers=1", f"--write={out}"])
    saved = json.loads(out.read_text())
    assert set(saved["table"]) == set(saved["chosen"]) == {"bump", "hit"}
    for reward, table in saved["table"].items():
        grid = {(r["lr"], r["noise_level"]) for r in table["flow_grpo"]}
        assert {(lr, a) for lr in (1e-4, 3e-3) for a in (0.7, 1.0)} <= grid <= \
            {(lr, a) for lr in (1e-4, 3e-3) for a in (0.5, 0.7, 1.0)}
        start = [r for r in table["flow_grpo"] if r["noise_level"] != 0.5]
        best = max(start, key=lambda r: r["mean"])
        widened = [r for r in table["flow_grpo"] if r["noise_level"] == 0.5]
        assert len(widened) == (best["noise_level"] == 0.7)  # widened only from the low edge, by one point
        assert all(r["lr"] == best["lr"] for r in widened)  # at the best learning rate
        assert [r["noise_level"] for r in table["stepwise:noise_level=0.5"]] == [0.5, 0.5]  # its own level kept
        for entry, rows in table.items():
            best = max(rows, key=lambda r: r["mean"])
            assert (saved["chosen"][reward][entry]["lr"], saved["chosen"][reward][entry]["noise_level"]) == \
                (best["lr"], best["noise_level"])
    for reward in ("bump", "hit"):
        cfg = Config(algos="flow_grpo,superflow,flow_grpo:baseline=tracker", reward=reward)
        settings = train.tuned_settings(cfg, train.parse_algos(cfg.algos), out)
        fg = saved["chosen"][reward]["flow_grpo"]
        assert settings["flow_grpo"] == {"lr": fg["lr"], "source": "tuned as flow_grpo", "noise_level": fg["noise_level"]}
        assert settings["flow_grpo:baseline=tracker"] == settings["flow_grpo"]  # an axis move keeps its parent's
        assert settings["superflow"] == {"lr": cfg.lr, "noise_level": 0.7, "source": "--lr"}
    untuned = train.tuned_settings(replace(cfg, tuned=False), train.parse_algos(cfg.algos), out)
    assert {s["source"] for s in untuned.values()} == {"untuned"}


@pytest.mark.parametrize("text", ["[]", "not json", '{"chosen": []}', '{"chosen": {"bump": {"flow_grpo": 1}}}',
                                  '{"chosen": {"bump": {"flow_grpo": {"lr": 1e-3, "noise_level": 5}}}}'])
def test_a_broken_tuning_file_is_refused_in_one_line(tmp_path, text):
    (tmp_path / "tuned.json").write_text(text)
    cfg = Config(algos="flow_grpo")
    with pytest.raises(cli.FlagError, match="^--tuned=true: ") as error:
        train.tuned_settings(cfg, train.parse_algos(cfg.algos), tmp_path / "tuned.json")
    assert "\n" not in str(error.value)


def test_the_committed_tuning_covers_every_study_entry_on_other_seeds():
    saved = json.loads(train.TUNED.read_text())
    assert set(saved["chosen"]) == set(flow.REWARDS)
    for reward, chosen in saved["chosen"].items():
        assert set(chosen) == set(tune.TUNED_ALGOS.split(","))
        for entry in [*study.STUDY_ALGOS.split(","), *study.AXIS_ALGOS.split(","), *train.DEFAULT_ALGOS.split(",")]:
            assert train.tuned_source(entry, chosen) is not None, entry
        start = {(float(lr), float(a)) for lr in saved["tune_config"]["lrs"].split(",")
                 for a in saved["tune_config"]["noise_levels"].split(",")}
        wider = {float(a) for a in saved["tune_config"]["wider"].split(",")}
        for rows in saved["table"][reward].values():  # one starting grid, widened only by --wider's levels
            grid = {(r["lr"], r["noise_level"]) for r in rows}
            assert start <= grid and {a for _, a in grid - start} <= wider
    tuned_seeds = {int(s) for s in saved["tune_config"]["seeds"].split(",")}
    reported = {int(s) for s in f"{Config().seeds},{study.StudyConfig.second_seeds}".split(",")}
    assert tuned_seeds == {0, 1, 2} and not tuned_seeds & reported
    assert saved["budget"]["iters"] <= Config().iters  # a tuning may be cut shorter than the runs, never longer
    assert saved["budget"] == {"iters": saved["tune_config"]["iters"], "trajectories": Config().trajectories,
                               "prompts_per_iter": Config().prompts_per_iter}


def synthetic_results(finals, seeds=(3, 4, 5), zero_std=None):
    """Results as train.collect writes them, with straight-line curves from 0.2 to each final reward."""
    cfg = {"iters": 10, "trajectories": 10, "eval_every": 5}
    curves = {n: {s: [[0, 0.2], [50, 0.2 + (f + d) / 2 - 0.1], [100, f + d]] for s, d in zip(seeds, (-0.01, 0, 0.01))}
              for n, f in finals.items()}
    return {"config": cfg, "curves": curves,
            "clock": {n: {s: [[x / 100, r] for x, r in c] for s, c in runs.items()} for n, runs in curves.items()},
            "seconds": {n: {s: 1.0 for s in seeds} for n in finals},
            "zero_std_ratio": {n: {s: [(zero_std or {}).get(n, 0.1)] * cfg["iters"] for s in seeds} for n in finals},
            "settings": {n: {"noise_level": 0.7} for n in finals}}


SAMPLERS = {"injected_std": {"0.7": {"ddim": 0.5, "ddim posterior": 0.6, "flow_grpo": 1.4}},
            "rewards": {"0.7": {"ode": [0.2] * 3, "ddim": [0.2, 0.21, 0.19], "ddim posterior": [0.2] * 3,
                                "flow_grpo": [0.1, 0.11, 0.09]}}}


def test_claims_follow_their_verdict_rules():
    assert claims.compare([1.0, 1.1, 0.9], [0.5, 0.6, 0.4], 1)[2] == "holds"
    assert claims.compare([1.0, 1.1, 0.9], [0.5, 0.6, 0.4], -1)[2] == "does not hold"
    assert claims.compare([1.0, 2.0, 0.0], [0.9, 1.9, -0.1], 1)[2] == "does not hold"  # within the spread
    assert claims.compare([1.0], [0.5], 1)[2] == "not testable here"
    results = synthetic_results({"flow_grpo": 0.6, "stepwise": 0.7, claims.PER_STEP: 0.7, "stepwise_ddim": 0.5,
                                 "superflow": 0.8, claims.NO_CREDIT: 0.5}, zero_std={"superflow": 0.05})
    rows = {r["claim"]: r for r in claims.evaluate(claims.Runs(results, {3, 4, 5}, None, SAMPLERS))}
    verdict = {claim: r["verdict"] for claim, r in rows.items()}
    assert verdict["higher reward per trajectory sampled (sample efficiency)"] == "holds"
    assert verdict["the DDIM-inspired SDE gives cleaner samples"] == "holds"
    assert verdict["... while keeping enough stochasticity to learn"] == "holds"
    assert "stepwise_ddim" in rows["... while keeping enough stochasticity to learn"]["measured"]  # the ddim SDE's
    assert verdict["joint gain normalisation beats per-step normalisation"] == "does not hold"  # equal
    assert verdict["higher final reward than Flow-GRPO (+1.7-16 %)"] == "holds"
    assert verdict["removing step-level advantage re-estimation costs reward"] == "holds"
    assert verdict["fewer wasted samples"] == "holds"
    assert verdict["removing dynamic sampling brings late-training collapse"] == "not testable here"
    assert claims.NO_SAMPLING in rows["removing dynamic sampling brings late-training collapse"]["measured"]
    # flow_grpo's final 0.6 is reached by superflow's straight line at 6/7 of the way (at 100: 0.8), i.e. beyond 56.3 %
    assert verdict["reaches Flow-GRPO's final reward with 5.4-56.3 % of its steps"] == "does not hold"
    assert all(set(r) == {"paper", "claim", "metric", "measured", "value", "spread", "verdict", "note"} for r in rows.values())
    assert len(rows) == len(claims.CLAIMS) == 12


def test_a_verdict_that_differs_between_the_seed_sets_is_unstable():
    same = synthetic_results({"flow_grpo": 0.6, "superflow": 0.8})
    flipped = synthetic_results({"flow_grpo": 0.8, "superflow": 0.6}, seeds=(6, 7, 8))
    both = {k: {n: {**same[k][n], **flipped[k][n]} for n in same[k]} if isinstance(same[k], dict) and k != "config"
            and k != "settings" else same[k] for k in same}
    per_set = [claims.evaluate(claims.Runs(both, seeds, None, SAMPLERS)) for seeds in ({3, 4, 5}, {6, 7, 8})]
    rows = {r["claim"]: r for r in claims.combine(per_set)}
    higher = rows["higher final reward than Flow-GRPO (+1.7-16 %)"]
    assert [s["verdict"] for s in higher["sets"]] == ["holds", "does not hold"] and higher["verdict"] == "unstable"
    assert rows["fewer wasted samples"]["verdict"] == "does not hold"  # the same on both sets
    assert rows["joint gain normalisation beats per-step normalisation"]["verdict"] == "not testable here"
    assert claims.combine([per_set[0], per_set[0]])[len(claims.CLAIMS) - 4]["verdict"] == "holds"


def merged(*parts):
    """Several synthetic_results on disjoint seeds as one, as a study's two seed sets are."""
    return {k: {n: {s: v for p in parts for s, v in p[k][n].items()} for n in parts[0][k]}
            if k in ("curves", "clock", "seconds", "zero_std_ratio") else parts[0][k] for k in parts[0]}


def synthetic_study():
    """A saved study (results.json) made by hand, with both rewards, long runs and the axis study,
    so that every part of the results file is drawn; its keys are strings, as read from the file."""
    rewards = {}
    for reward, superflow in (("bump", 0.8), ("hit", 0.5)):
        runs = {"flow_grpo": 0.6, "stepwise": 0.7, claims.PER_STEP: 0.65, "stepwise_ddim": 0.55, "superflow": superflow,
                claims.NO_CREDIT: 0.6, claims.NO_SAMPLING: 0.7}
        parts = {part: merged(synthetic_results(finals), synthetic_results(finals, seeds=(6, 7, 8)))
                 for part, finals in (("runs", runs), ("long", {"superflow": 0.7, claims.NO_SAMPLING: 0.6}))}
        parts["axes"] = synthetic_results({"flow_grpo:baseline=tracker": 0.63, "superflow:baseline=group": superflow - 0.02})
        for results in parts.values():
            results["settings"] = {n: {"lr": 1e-3, "noise_level": 0.7, "source": f"tuned as {n.split(':')[0]}"}
                                   for n in results["curves"]}
        parts["axes"]["settings"]["superflow:baseline=group"] = {"lr": 3e-4, "noise_level": 1.0, "source": "--lr"}
        per_set = [claims.evaluate(claims.Runs(parts["runs"], seeds, parts["long"], SAMPLERS))
                   for seeds in ({3, 4, 5}, {6, 7, 8})]
        rewards[reward] = {**parts, "samplers": SAMPLERS, "claims": claims.combine(per_set)}
    table = {"flow_grpo": [{"lr": 1e-3, "noise_level": a, "mean": m} for a, m in ((0.5, 0.61), (0.7, 0.6))],
             "superflow": [{"lr": 1e-3, "noise_level": 0.7, "mean": 0.7}]}
    chosen = {"flow_grpo": {"lr": 1e-3, "noise_level": 0.5}, "superflow": {"lr": 1e-3, "noise_level": 0.7}}
    return json.loads(json.dumps({
        "command": "python toy/study.py --test", "config": {"seeds": "3,4,5", "second_seeds": "6,7,8", "long_iters": 3},
        "rewards": rewards, "machine": "a test machine", "hardware": "a test machine, one thread a run", "seconds": 12.3,
        "tuning": {"command": "python toy/tune.py --test", "workers": 2, "seconds": 4.5,
                   "table": {"bump": table, "hit": table}, "chosen": {"bump": chosen, "hit": chosen}}}))


def test_the_results_file_and_tables_are_pinned_to_the_text_the_docs_quote():
    """The study's results file, its tables and the tuning grid, byte for byte as they were when
    toy/RESULTS.md and the README were written (tests/study_report.md), and the committed
    tuning's grids exactly as toy/RESULTS.md prints them."""
    assert study.report(synthetic_study()) == (ROOT / "tests" / "study_report.md").read_text()
    tuned, written = json.loads(train.TUNED.read_text()), (ROOT / "toy" / "RESULTS.md").read_text()
    for reward in flow.REWARDS:
        assert tune.markdown(tuned["table"][reward], tuned["chosen"][reward]) in written


def run_main(*args, script="train.py"):
    return subprocess.run([sys.executable, str(ROOT / "toy" / script), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_main_job_writes_results_and_figures(base, tmp_path):
    out = tmp_path / "run"
    proc = run_main("--algos=flow_grpo,superflow", "--seeds=3,4", "--iters=4", "--eval_every=2", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    curves = results["curves"]
    assert set(curves) == {"flow_grpo", "superflow"} and set(curves["superflow"]) == {"3", "4"}
    assert [p[0] for p in curves["flow_grpo"]["3"]] == [0, 256, 512]
    assert curves["flow_grpo"]["3"][0][1] == curves["superflow"]["4"][0][1]  # the same base model and eval noise
    assert len(results["prompts"]["superflow"]["3"]) == 4 and len(results["zero_std_ratio"]["flow_grpo"]["4"]) == 4
    assert results["settings"]["flow_grpo"]["source"] == "tuned as flow_grpo"
    assert results["config"]["reward"] == "bump" and set(results["table"]) == {"flow_grpo", "superflow"}
    assert "flow_grpo" in proc.stdout and "superflow" in proc.stdout and "final reward" in proc.stdout
    for name in ("reward_curves.png", "samples.png", "prompts.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_study_writes_its_results_file_from_results_json(base, tmp_path):
    tuned = tmp_path / "tuned.json"
    chosen = {e: {"lr": 1e-3, "noise_level": 0.7} for e in ("flow_grpo", "superflow", "stepwise_ddim")}
    tuned.write_text(json.dumps({"command": "python toy/tune.py --test", "chosen": {"bump": chosen, "hit": chosen},
                                 "tune_config": {"workers": 1}, "seconds": 1.0,
                                 "table": {r: {e: [{"lr": 1e-3, "noise_level": 0.7, "mean": 0.5}] for e in chosen}
                                           for r in ("bump", "hit")}}))
    out, md = tmp_path / "out", tmp_path / "doc" / "RESULTS.md"
    study.main(["--algos=flow_grpo,superflow,superflow_no_dynamic_sampling,stepwise_ddim", "--axis_study=false",
                "--seeds=3,4", "--second_seeds=5,6", "--iters=2", "--long_iters=3", "--long_eval_every=1",
                "--workers=1", f"--tuning={tuned}", f"--out={out}", f"--write={md}"])
    saved = json.loads((out / "results.json").read_text())
    assert md.read_text() == study.report(saved)  # the results file is exactly what results.json gives
    assert set(saved["rewards"]) == {"bump", "hit"} and saved["hardware"] and saved["seconds"] > 0
    for reward, parts in saved["rewards"].items():
        assert set(parts["runs"]["curves"]["superflow"]) == {"3", "4", "5", "6"}
        assert set(parts["long"]["curves"]) == {"superflow", "superflow_no_dynamic_sampling"}
        assert [p[0] for p in parts["long"]["curves"]["superflow"]["5"]] == [0, 128, 256, 384]
        assert parts["runs"]["config"]["reward"] == reward and len(parts["claims"]) == len(claims.CLAIMS)
        collapse = next(r for r in parts["claims"] if "collapse" in r["claim"])
        assert len(collapse["sets"]) == 2 and collapse["sets"][0]["verdict"] != "not testable here"
        assert (md.parent / "figures" / f"study_{reward}_runs.png").read_bytes()[:4] == b"\x89PNG"
    text = md.read_text()
    assert text.count("_Command: `python toy/study.py --algos=") >= 5 and "python toy/tune.py --test" in text
    for row in saved["rewards"]["hit"]["claims"]:
        assert f"| {row['paper']} | {row['claim']} |" in text


@pytest.mark.parametrize("script,settings", [("train.py", train.Config), ("tune.py", tune.TuneConfig),
                                             ("study.py", study.StudyConfig)])
def test_help_names_every_flag_and_exits_0(script, settings):
    proc = run_main("--help", script=script)
    assert proc.returncode == 0 and proc.stderr == ""
    for f in fields(settings):
        assert f"--{f.name}=" in proc.stdout, f.name
    assert run_main("-h", script=script).stdout == proc.stdout


@pytest.mark.parametrize("script,args,message", [
    # the four flags that gave tracebacks before their ranges were declared
    ("train.py", ["--eval_every=0"], "--eval_every=0: expected an integer in [1, 100000]"),
    ("train.py", ["--trajectories=7"], "--trajectories=7: expected a multiple of --prompts_per_iter=8"),
    ("train.py", ["--minibatches=0"], "--minibatches=0: expected an integer in [1, 1024]"),
    ("train.py", ["--lr=nan"], "--lr=nan: expected a number in (0, 1]"),
    ("train.py", ["--algos=superflow:sampler=sde"], "--algos=superflow:sampler=sde: --sampler=sde: expected one of"),
    ("train.py", ["--reward=ocr"], "--reward=ocr: expected one of bump, hit"),
    ("train.py", ["--algos=stepwise_ddim", "--num_steps=1"], "--algos=stepwise_ddim: stepwise_ddim trains nothing"),
    ("tune.py", ["--lrs=1e-3,0"], "--lrs=1e-3,0: expected comma-separated distinct values, each a number in (0, 1]"),
    ("tune.py", ["--noise_levels=0,0.7"], "--noise_levels=0,0.7: --algos="),
    ("tune.py", ["--algos=flow_grpo:noise_level=0"], "--algos=flow_grpo:noise_level=0: flow_grpo:noise_level=0 trains"),
    ("study.py", ["--second_seeds=3,8"], "--second_seeds=3,8: expected seeds disjoint from --seeds=3,4,5,6,7"),
])
def test_bad_flags_fail_in_one_line_with_exit_code_1_before_any_work(tmp_path, script, args, message):
    never = tmp_path / "never"
    where = {"train.py": [f"--out={never}"], "tune.py": [f"--write={never}/t.json"],
             "study.py": [f"--out={never}", f"--write={never}/r.md"]}[script]
    proc = run_main(*args, *where, script=script)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(f"error: {message}")
    assert "Traceback" not in proc.stderr and not never.exists()


def test_runs_in_worker_processes_give_the_same_logs_as_in_process(base):
    jobs = [(cli.make_algorithm(a), Config(iters=2, eval_every=1, tuned=False), seed)
            for a, seed in (("flow_grpo", 3), ("superflow", 4))]
    here, there = train.run_jobs(base, jobs), train.run_jobs(base, jobs, workers=2)
    assert [log["curves"] for log in here] == [log["curves"] for log in there]
    assert [log["group_sizes"] for log in here] == [log["group_sizes"] for log in there]
