"""Every flag of sd35's commands declares what it accepts, and hostile values get either that
or one line that names the flag: sd35/train.py (its Config and the minflow.Algorithm axes it
takes as flags), tests/kill_soak.py, sd35/bench.py and sd35/curves.py.

A value is "accepted" when the command's own parser returns settings holding it; then the
command would run, which these tests do not do. A refused value must make `main` exit with
one line (exit code 1: SystemExit with a message), naming the flag, with no traceback, before
any model or data loads (the loaders are patched to fail the test) and with no file written.
"""
import contextlib
import tempfile
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

import cli
import minflow
from flag_values import EDGE_CASES, field_names, hostile_values, refusal_problems, undeclared
import kill_soak
from sd35 import bench, curves, models
from sd35 import train as sd35_train

COMMANDS = {  # name -> (settings classes whose fields are its flags, parser, main)
    "train": ((sd35_train.Config, minflow.Algorithm), sd35_train.parse_args, sd35_train.main),
    "kill_soak": ((kill_soak.Settings,), lambda argv: cli.read_flags(kill_soak.Settings, argv), kill_soak.main),
    "bench": ((bench.Settings,), lambda argv: cli.read_flags(bench.Settings, argv), bench.main),
    "curves": ((curves.Settings,), lambda argv: cli.read_flags(curves.Settings, argv), curves.main),
}
FIELDS = [(command, name) for command, (classes, _, _) in COMMANDS.items() for cls in classes for name in field_names(cls)]


def test_every_flag_declares_its_range():
    for classes, _, _ in COMMANDS.values():
        for cls in classes:
            assert undeclared(cls) == [], f"{cls.__name__}: declare these with cli.flag"
    # A Config field named like an algorithm axis would never receive its flag.
    assert not set(field_names(sd35_train.Config)) & {f.name for f in fields(minflow.Algorithm)}


def test_the_defaults_are_accepted():
    for command, (_, parse, _) in COMMANDS.items():
        argv = ["--log=" + __file__] if command == "curves" else []  # curves' default log need not exist here
        parse(argv)


def fail_if_called(what):
    def fail(*args, **kwargs):
        pytest.fail(f"{what} ran for a refused flag")
    return fail


@pytest.fixture
def nothing_heavy_runs(monkeypatch):
    for module, name in [(models, "load_pipeline"), (models, "transformer_config"), (bench, "Bench"),
                         (kill_soak, "soak"), (curves, "draw"), (sd35_train, "RewardMix")]:
        monkeypatch.setattr(module, name, fail_if_called(f"{module.__name__}.{name}"))


def check(command, name, value):
    """`--name=value` given to `command`: accepted into its settings, or refused in one line."""
    _, parse, main = COMMANDS[command]
    with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder):
        out = Path(folder) / "out"
        out.mkdir()
        (out / "keep.txt").write_text("earlier output")
        argv = {"train": [f"--out={out}"], "curves": [f"--log={__file__}"]}.get(command, []) + [f"--{name}={value}"]
        try:
            parse(argv)
            return  # accepted: inside the declared range
        except ValueError:
            pass
        with pytest.raises(SystemExit) as stop:
            main(argv)
        message = stop.value.code
        assert isinstance(message, str), f"--{name}={value}: exit code {message!r}, expected a message (exit code 1)"
        assert refusal_problems(message, name) == [], (message, refusal_problems(message, name))
        assert "Traceback" not in message
        assert sorted(p.name for p in Path(folder).rglob("*")) == ["keep.txt", "out"], f"--{name}={value} wrote files"


@pytest.mark.parametrize("command", COMMANDS)
def test_edge_values_for_every_flag(command, nothing_heavy_runs):
    for cmd, name in FIELDS:
        if cmd == command:
            for value in EDGE_CASES:
                check(command, name, value)


@pytest.mark.parametrize("command,name", FIELDS)
@settings(max_examples=15, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=hostile_values())
def test_hostile_values_for_every_flag(command, name, value, nothing_heavy_runs):
    check(command, name, value)


@pytest.mark.parametrize("argv,message", [
    (["--iters=-5"], "error: --iters=-5: expected an integer >= 0"),
    (["--guidance_scale=nan"], "error: --guidance_scale=nan: expected a number in [1, 100]"),
    (["--lora_rank=0"], "error: --lora_rank=0: expected an integer >= 1"),
    (["--eval_every=x"], "error: --eval_every=x: expected an integer >= 0"),
    (["--ema_decay=1"], "error: --ema_decay=1.0: expected a number in [0, 1)"),
    (["--reward=remote"], "error: --reward_url=: expected a reward server's URL with --reward=remote"),
    (["--group_min=30"], "error: --group_min=30: expected at most --group_max=24"),
    (["--report_to=mlflow"], "error: --report_to=mlflow: expected one of none, tensorboard, wandb"),
])
def test_the_reported_cases_are_one_line_each(tmp_path, argv, message, nothing_heavy_runs):
    """The cases measured on the old trainer: a peft traceback after the model loaded
    (lora_rank=0), a whole iteration on NaN guidance, and one line listing seven
    constraints without naming the flag (iters=-5)."""
    with pytest.raises(SystemExit) as stop:
        sd35_train.main([f"--out={tmp_path / 'out'}", *argv])
    assert stop.value.code == message
    assert not (tmp_path / "out").exists()


def test_help_lists_every_flag_with_its_default_and_exits_0(capsys):
    for command, (classes, _, main) in COMMANDS.items():
        with pytest.raises(SystemExit) as stop:
            main(["--help"])
        assert stop.value.code in (0, None), command
        text = capsys.readouterr().out
        for cls in classes:
            for f in fields(cls):
                assert f"--{f.name}=" in text, (command, f.name)
                assert f.name not in cli.field_comments(cls) or cli.field_comments(cls)[f.name] in text, (command, f.name)


def test_a_tracker_whose_package_is_missing_is_refused_before_any_model_loads(tmp_path, monkeypatch, nothing_heavy_runs):
    monkeypatch.setattr(sd35_train.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit) as stop:
        sd35_train.main([f"--out={tmp_path / 'out'}", "--report_to=wandb"])
    assert stop.value.code == "error: --report_to=wandb: expected a tracker whose package is installed (pip install wandb)"
