"""Fuzz of every flag of the toy (toy/train.py's Config, toy/tune.py's TuneConfig, toy/study.py's
StudyConfig) and of every axis of minflow.Algorithm (through the toy's `--algos=flow_grpo:AXIS=VALUE`).

Each hostile value (tests/flag_values.py) is either inside the flag's declared range, and then
one short toy iteration runs with it, or refused before any work: `setup(argv)` exits with one
line that names the flag (exit code 1 from the command line, checked in tests/test_toy.py), no
traceback, nothing written. The fields are read from the classes, so a new flag is fuzzed as
soon as it exists, and a flag without a declared range fails `test_every_flag_declares_a_range`.
"""
import json
import math
import os
import tempfile
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings

import cli
import minflow
from flag_values import EDGE_CASES, field_names, hostile_values, refusal_problems, undeclared
from toy import flow, study, train, tune

ROOT = Path(__file__).resolve().parents[1]
NEVER = Path(tempfile.gettempdir()) / f"minflow-fuzz-never-{os.getpid()}"  # an --out that must never appear
FUZZ = settings(max_examples=12, deadline=None, database=None)  # random values, on top of every edge case


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # the toy's tensors are too small for threads


@lru_cache(maxsize=None)
def small_base():
    """A briefly pretrained base model, never cached on disk: the fuzz needs a model, not a good one."""
    torch.manual_seed(0)
    return flow.pretrain(steps=30, batch=256, cache=False)


def outcome(setup, argv):
    """setup(argv) -> ('refused', message) or ('accepted', its result); checks nothing was written."""
    before = sorted(os.listdir(ROOT))
    try:
        result = setup(argv)
    except SystemExit as stop:
        assert isinstance(stop.code, str), stop.code  # sys.exit(message): exit status 1, message on stderr
        assert sorted(os.listdir(ROOT)) == before and not NEVER.exists()
        return "refused", stop.code
    assert sorted(os.listdir(ROOT)) == before and not NEVER.exists()
    return "accepted", result


@lru_cache(maxsize=None)
def one_iteration(cfg, entry, algo, lr):
    """One short toy iteration of `algo` under `cfg` (frozen dataclasses: cached per value)."""
    seed = int(cfg.seeds.split(",")[0])
    run = train.train(small_base(), algo, replace(cfg, iters=1, lr=lr), seed)
    assert len(run["curves"]) == 2 and sum(run["group_sizes"][0]) == cfg.trajectories, entry
    assert len(run["prompts"][0]) == cfg.prompts_per_iter
    return run["curves"][-1][1]


def run_toy(cfg, algos, chosen, entries=1):
    for entry in list(algos)[:entries]:
        one_iteration(cfg, entry, replace(algos[entry], noise_level=chosen[entry]["noise_level"]), chosen[entry]["lr"])


def test_every_flag_declares_a_range():
    for settings_class in (train.Config, tune.TuneConfig, study.StudyConfig, minflow.Algorithm):
        assert undeclared(settings_class) == [], settings_class

    @dataclass(frozen=True)
    class Grown(train.Config):  # what a new flag without flag(...) looks like
        workers: int = 2

    assert undeclared(Grown) == ["workers"]
    with pytest.raises(TypeError, match="workers declares no range"):
        Grown()


def test_the_declared_ranges_read_as_expected_values():
    assert cli.describe(train.Config.__dataclass_fields__["eval_every"].metadata["accepts"], int) == \
        "an integer in [1, 100000]"
    assert "comma-separated distinct integers" in train.seeds_range(None)
    assert "presets (flow_grpo, stepwise, stepwise_ddim, superflow" in train.algos_range(None)


def check_toy_flag(name, value):
    argv = [f"--{name}={value}"] + ([] if name == "out" else [f"--out={NEVER}"])
    verdict, result = outcome(train.setup, argv)
    if verdict == "refused":
        assert refusal_problems(result, name) == [], result
    else:
        cfg, algos, chosen = result
        run_toy(cfg, algos, chosen, entries=len(algos) if name == "algos" else 1)


def check_algorithm_axis(name, value):
    verdict, result = outcome(train.setup, [f"--algos=flow_grpo:{name}={value}", f"--out={NEVER}"])
    if verdict == "refused":
        assert refusal_problems(result, "algos") == [], result
        if not set(",:") & set(value):  # a ',' or ':' inside the value starts another entry or axis
            assert refusal_problems(result, name) == [], result
    else:
        run_toy(*result)


def check_tune_flag(name, value):
    verdict, result = outcome(tune.setup, [f"--{name}={value}"])
    if verdict == "refused":
        assert refusal_problems(result, name) == [], result
        return
    # Accepted: one iteration of one grid point of the first entry, as the tuner would run it.
    first = {k: getattr(result, k).split(",")[0] for k in ("algos", "rewards", "seeds", "lrs", "noise_levels")}
    small = replace(result, iters=1, workers=1, wider=first["noise_levels"], **first)  # no widening: one point
    table, chosen = tune.tune(small, small_base())
    assert list(chosen[first["rewards"]]) == [first["algos"]] and len(table[first["rewards"]][first["algos"]]) == 1


def check_study_flag(name, value):
    """Refused in one line naming the flag, or a checked StudyConfig whose every part has a
    tuned setting (the study itself is too long to run per value; tests/test_toy.py runs it)."""
    where = {"out": [f"--write={NEVER}/r.md"], "write": [f"--out={NEVER}"]}.get(name, [f"--out={NEVER}",
                                                                                         f"--write={NEVER}/r.md"])
    verdict, result = outcome(study.setup, [f"--{name}={value}"] + where)
    if verdict == "refused":
        assert refusal_problems(result, name) == [], result
    else:
        assert isinstance(result, study.StudyConfig) and study.plan(result, result.rewards.split(",")[0])


CHECKS = {"toy": (train.Config, check_toy_flag), "algorithm": (minflow.Algorithm, check_algorithm_axis),
          "tune": (tune.TuneConfig, check_tune_flag), "study": (study.StudyConfig, check_study_flag)}
FIELDS = [(kind, name) for kind, (cls, _) in CHECKS.items() for name in field_names(cls)]


@pytest.mark.parametrize("kind,name", FIELDS)
def test_every_edge_case(kind, name):
    for value in EDGE_CASES:
        CHECKS[kind][1](name, value)


@pytest.mark.parametrize("kind,name", FIELDS)
@FUZZ
@given(value=hostile_values())
def test_random_values(kind, name, value):
    CHECKS[kind][1](name, value)


def bound_values(accepts, kind):
    """Each declared interval's ends, just past them, and just inside the lower end, as flag strings."""
    if not isinstance(accepts, str) or accepts == "text":
        return [str(a).lower() for a in accepts] if isinstance(accepts, tuple) else []
    lo, hi = (float(v) for v in accepts[1:-1].split(","))
    step = 1 if kind is int else 1e-9
    ends = [lo - step, lo, lo + step] + ([hi, hi + step] if math.isfinite(hi) else [])
    return [str(int(v)) if kind is int else repr(v) for v in ends]


@pytest.mark.parametrize("kind,name", FIELDS)
def test_declared_bounds_and_just_past_them(kind, name):
    f = {f.name: f for f in fields(CHECKS[kind][0])}[name]
    for value in bound_values(f.metadata["accepts"], cli.field_type(f)):
        CHECKS[kind][1](name, value)


@pytest.mark.parametrize("flag", ["--trajectories=4096", "--eval_samples=1024", "--num_steps=100", "--eval_steps=200",
                                  "--iters=100000", "--minibatches=1024", "--prompts_per_iter=32", "--eval_every=100000",
                                  "--shift=10", "--shift=0.1", "--lr=1", "--clip_range=10", "--beta=100",
                                  "--grad_clip=1000000", "--num_steps=4", "--eval_steps=1", "--reward=hit"])
def test_the_largest_and_smallest_accepted_values_run_one_iteration(flag):
    verdict, result = outcome(train.setup, [flag, f"--out={NEVER}"])
    assert verdict == "accepted", result
    run_toy(*result)


# Each axis's declared values and bounds, on a preset where the axis matters: accepted, and one
# iteration runs.
AXIS_VALUES = [f"flow_grpo:sampler={s}" for s in minflow.SDE_SAMPLERS] + [
    "flow_grpo:noise_level=2", "stepwise:noise_level=2", "stepwise_ddim:noise_level=2", "superflow:sampler=ddim",
    "superflow:sampler=cps", "flow_grpo:sampler=ddim:ddim_noise=posterior", "stepwise_ddim:ddim_noise=posterior",
    "flow_grpo:shared_noise=true", "flow_grpo:prompt_sampling=variance", "flow_grpo:group_sizing=bins",
    "flow_grpo:baseline=tracker", "flow_grpo:advantage_std=global", "flow_grpo:step_credit=gains",
    "flow_grpo:step_credit=noise", "stepwise:gain_norm=per_step", "stepwise:substeps=1", "stepwise:substeps=100",
    "superflow:bins=1", "superflow:bins=64:group_max=64", "superflow:group_max=10000", "superflow:group_min=1",
    "superflow:group_min=1:group_max=1", "superflow:group_min=24:group_max=24", "flow_grpo:group_sizing=bins:bins=64",
    "superflow:rho=0", "superflow:rho=0.999", "superflow:sampling_eps=10", "superflow:sampling_eps=1e-9",
    "stepwise:group_sizing=bins:prompt_sampling=variance",
]


@pytest.mark.parametrize("entry", AXIS_VALUES)
def test_each_axis_value_runs_one_toy_iteration(entry):
    verdict, result = outcome(train.setup, [f"--algos={entry}", "--tuned=false", f"--out={NEVER}"])
    assert verdict == "accepted", result
    cfg, algos, chosen = result
    assert torch.isfinite(torch.tensor(one_iteration(cfg, entry, algos[entry], cfg.lr)))


@pytest.mark.parametrize("argv,names", [
    (["--algos=superflow:group_min=25"], ["algos", "group_min"]),
    (["--algos=flow_grpo:noise_level=0"], ["algos", "noise_level"]),  # nothing to train
    (["--algos=stepwise_ddim", "--num_steps=2"], ["algos", "num_steps"]),
    (["--num_steps=1"], ["algos", "num_steps"]),
    (["--trajectories=7"], ["trajectories", "prompts_per_iter"]),
    (["--prompts_per_iter=3"], ["trajectories", "prompts_per_iter"]),
    (["--algos=stepwise:baseline=tracker"], ["algos", "baseline"]),
    (["--algos=flow_grpo,flow_grpo"], ["algos"]),
    (["--seeds=3,3"], ["seeds"]),
])
def test_relations_between_flags_are_refused_naming_each_flag(argv, names):
    verdict, message = outcome(train.setup, argv + [f"--out={NEVER}"])
    assert verdict == "refused"
    for name in names:
        assert refusal_problems(message, name) == [], message


def test_tune_and_study_refuse_a_write_path_they_cannot_use():
    for bad in ["toy", "", "/dev/null/x"]:
        verdict, message = outcome(tune.setup, [f"--write={bad}"])
        assert verdict == "refused" and refusal_problems(message, "write") == [], (bad, message)
        verdict, message = outcome(study.setup, [f"--write={bad}", f"--out={NEVER}"])
        assert verdict == "refused" and refusal_problems(message, "write") == [], (bad, message)


def test_study_refuses_seed_sets_that_overlap_and_a_missing_tuning_file():
    verdict, message = outcome(study.setup, ["--seeds=1,2", "--second_seeds=2,3", f"--out={NEVER}"])
    assert verdict == "refused" and refusal_problems(message, "second_seeds") == [] and "--seeds=1,2" in message
    verdict, message = outcome(study.setup, ["--tuning=toy/none.json", f"--out={NEVER}"])
    assert verdict == "refused" and refusal_problems(message, "tuning") == [], message


def test_study_refuses_a_tuning_file_without_its_command_and_time(tmp_path):
    saved = json.loads((ROOT / "toy" / "tuned.json").read_text())
    del saved["seconds"]
    (tmp_path / "tuned.json").write_text(json.dumps(saved))
    verdict, message = outcome(study.setup, [f"--tuning={tmp_path / 'tuned.json'}", f"--out={NEVER}"])
    assert verdict == "refused" and refusal_problems(message, "tuning") == [] and "'seconds'" in message, message
