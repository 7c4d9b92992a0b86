"""Kill soak: SIGKILL a tiny CPU training run at random moments, resume it every time, and check
that a kill never costs more than the work since the last checkpoint.

    python tests/kill_soak.py                       # 25 kills
    python tests/kill_soak.py --kills=100 --iters=120

A reference run goes uninterrupted; the same run is SIGKILLed after random delays and resumed
`kills` times, then left to finish. After every kill each complete checkpoint must load and
every log line but a torn last one must parse; the finished run must log each iteration once
and end with the reference's checkpoint (evaluated and live LoRA, optimiser, EMA), bitwise.
Exits non-zero if anything failed.
"""
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
from cli import flag  # noqa: E402
from sd35 import checkpoint  # noqa: E402

TRAIN = Path(__file__).resolve().parents[1] / "sd35" / "train.py"
RUN = ["--model=tiny", "--resolution=64", "--num_steps=4", "--eval_num_steps=2", "--eval_images=2", "--eval_every=3",
       "--prompts=general", "--reward=jpeg_compressibility", "--prompts_per_iter=2", "--group_size=4", "--save_every=1",
       "--algo=superflow"]


@dataclass
class Settings:
    kills: int = flag(25, "[0, 10000]")  # SIGKILLs to deliver before letting the run finish
    iters: int = flag(40, "[1, 100000]")  # iterations of the soaked run
    min_delay: float = flag(1.0, "[0, 3600]")  # seconds after a (re)start before the kill, drawn uniformly
    max_delay: float = flag(5.0, "[0, 3600]")  # (so kills land in start-up, sampling, training and checkpoint saves)
    seed: int = flag(0, "[0, 1e18]")  # seeds the kill delays
    workdir: str = flag("", "text")  # where the runs go ("" = a fresh temporary folder)

    RELATIONS = (("max_delay", lambda s: s.max_delay >= s.min_delay, "at least --min_delay={min_delay}"),)


def train(out, iters, resume):
    args = [sys.executable, str(TRAIN), *RUN, f"--iters={iters}", f"--out={out}"] + (["--resume"] if resume else [])
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def audit(out):
    """Problems a kill left behind: unreadable checkpoints, unparsable log lines. (A .tmp folder is a
    save the kill interrupted: invisible to --resume, replaced by the next save.)"""
    problems = []
    for folder in sorted(f for f in (out / "checkpoints").glob("iter_*") if f.suffix != ".tmp"):
        try:
            load_file(folder / checkpoint.LORA_FILE), load_file(folder / checkpoint.STATE_FILE)
            json.loads((folder / checkpoint.RUN_FILE).read_text())
        except Exception as error:  # noqa: BLE001 - any failure to read is what we are looking for
            problems.append(f"{folder.name}: {error}")
    lines = (out / "log.jsonl").read_text(errors="replace").split("\n")[:-1] if (out / "log.jsonl").exists() else []
    for number, line in enumerate(lines[:-1], 1):  # the last complete line may not be torn either
        try:
            json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"log.jsonl line {number} unparsable: {line[:60]!r}")
    return problems


def soak(settings):
    rng = random.Random(settings.seed)
    root = Path(settings.workdir or tempfile.mkdtemp(prefix="kill-soak-"))
    reference, soaked = root / "reference", root / "soaked"
    if train(reference, settings.iters, False).wait() != 0:
        raise SystemExit("the reference run failed")
    report = {"kills": 0, "resumes": 0, "kills_during_save": 0, "problems": []}
    for _ in range(settings.kills):
        proc = train(soaked, settings.iters, checkpoint.newest(soaked) is not None)
        report["resumes"] += checkpoint.newest(soaked) is not None
        time.sleep(rng.uniform(settings.min_delay, settings.max_delay))
        if proc.poll() is not None:  # finished before the kill: the soak is over early
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        report["kills"] += 1
        report["kills_during_save"] += any((soaked / "checkpoints").glob("*.tmp"))
        report["problems"] += audit(soaked)
    finish = train(soaked, settings.iters, checkpoint.newest(soaked) is not None)
    if finish.wait() != 0:
        report["problems"].append(f"the final resume failed: {finish.stderr.read()[-500:]}")
    entries = [json.loads(line) for line in (soaked / "log.jsonl").read_text().splitlines()]
    iterations = [e["iteration"] for e in entries if "iteration" in e]
    if iterations != list(range(settings.iters + 1)):  # 0: the base model's evaluation
        report["problems"].append(f"logged iterations {iterations}, expected 0..{settings.iters} once each")
    a, b = ({k: v for name in (checkpoint.LORA_FILE, checkpoint.STATE_FILE) for k, v in
             load_file(checkpoint.newest(run) / name).items()} for run in (reference, soaked))
    report["lora_equal"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if not report["lora_equal"]:
        report["problems"].append("the soaked run's final checkpoint differs from the uninterrupted run's")
    return report


def main(argv):
    try:
        settings = cli.read_flags(Settings, argv)
    except ValueError as error:
        sys.exit(f"error: {error}")
    report = soak(settings)
    print(f"kills {report['kills']} (during a checkpoint save: {report['kills_during_save']}), "
          f"resumes {report['resumes']}, final LoRA equal to the uninterrupted run's: {report['lora_equal']}")
    for problem in report["problems"]:
        print(f"PROBLEM {problem}")
    sys.exit(1 if report["problems"] else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
