"""Stop latency: how long a tiny CPU training run takes from a stop signal to its saved checkpoint.

    python tests/stop_latency.py                      # 5 stops
    python tests/stop_latency.py --stops=10 --signal=SIGINT

Each run starts afresh, trains until its log holds --after iterations and gets the signal at a
random moment of the next one; it must exit 0 with the last completed iteration saved. Printed:
the seconds from the signal to that checkpoint (its folder renamed into place), then their
minimum, median and maximum. Exits non-zero if a run did not stop as it should.
"""
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
from cli import flag  # noqa: E402
from sd35 import checkpoint  # noqa: E402
from sd35.curves import read_log  # noqa: E402

TRAIN = Path(__file__).resolve().parents[1] / "sd35" / "train.py"
RUN = ["--model=tiny", "--reward=jpeg_compressibility", "--prompts_per_iter=4", "--eval_images=4", "--eval_num_steps=10",
       "--iters=100000", "--save_every=0"]


@dataclass
class Settings:
    stops: int = flag(5, "[1, 1000]")  # runs to start and stop
    after: int = flag(1, "[1, 1000]")  # iterations logged before the signal
    signal: str = flag("SIGTERM", ("SIGTERM", "SIGINT"))  # the stop signal
    seed: int = flag(0, "[0, 1e18]")  # seeds the moments of the signals
    workdir: str = flag("", "text")  # where the runs go ("" = a fresh temporary folder)


def stop_once(out, settings, rng):
    """Seconds from the signal to the saved checkpoint of one run, or a problem (a string)."""
    proc = subprocess.Popen([sys.executable, str(TRAIN), *RUN, f"--out={out}"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = out / "log.jsonl"
    while not (log.exists() and len(entries := read_log(log)) > settings.after):  # line 0: the base model
        if proc.poll() is not None:
            return f"{out.name}: the run ended before its iteration {settings.after}"
        time.sleep(0.05)
    last = entries[-1]
    time.sleep(rng.uniform(0, last["seconds_sampling"] + last["seconds_reward"] + last["seconds_training"]))
    signalled = time.time()
    proc.send_signal(getattr(signal, settings.signal))
    if proc.wait() != 0:
        return f"{out.name}: exit code {proc.returncode}"
    reached = read_log(log)[-1]["iteration"]
    if checkpoint.newest(out) is None or checkpoint.newest(out).name != f"iter_{reached:06d}":
        return f"{out.name}: the newest checkpoint is not the last logged iteration {reached}"
    return (out / "checkpoints").stat().st_mtime - signalled


def main(argv):
    try:
        settings = cli.read_flags(Settings, argv)
    except ValueError as error:
        sys.exit(f"error: {error}")
    rng, root = random.Random(settings.seed), Path(settings.workdir or tempfile.mkdtemp(prefix="stop-latency-"))
    results = [stop_once(root / f"run{i}", settings, rng) for i in range(settings.stops)]
    seconds = [r for r in results if not isinstance(r, str)]
    print("seconds from the signal to the checkpoint: " + ", ".join(f"{s:.2f}" for s in seconds))
    if seconds:
        print(f"min {min(seconds):.2f}, median {statistics.median(seconds):.2f}, max {max(seconds):.2f}")
    for problem in (r for r in results if isinstance(r, str)):
        print(f"PROBLEM {problem}")
    sys.exit(1 if len(seconds) < len(results) else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
