"""What happens when things go wrong: crashes, kills, bad flags, bad rewards, bad gradients,
unsafe files. One test per case of the README's failure table; all on CPU with the tiny model."""
import errno
import http.server
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cli
import minflow
import kill_soak
from sd35 import bench, checkpoint, models, rewards
from sd35.curves import read_log
from sd35 import train as sd35_train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model=tiny", "--resolution=64", "--num_steps=4", "--eval_num_steps=2", "--eval_images=2",
        "--prompts=general", "--reward=jpeg_compressibility", "--prompts_per_iter=2", "--group_size=4", "--eval_every=0"]


def main(out, *args):
    sd35_train.main([*TINY, f"--out={out}", *args])
    return read_log(out / "log.jsonl")


# ---------------------------------------------------------------------------------- crash safety


def test_atomic_write_leaves_the_old_file_when_the_rename_never_happens(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    cli.atomic_write(target, b"old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("killed before the rename")))
    with pytest.raises(OSError):
        cli.atomic_write(target, b"new, half written")
    assert target.read_bytes() == b"old"


def test_a_torn_log_line_is_ignored_on_resume(tmp_path):
    out = tmp_path / "run"
    main(out, "--iters=2")
    with open(out / "log.jsonl", "a") as f:
        f.write('{"iteration": 3, "reward_me')  # a kill in the middle of a write
    entries = main(out, "--iters=3", f"--resume={out}")
    assert [e["iteration"] for e in entries if "iteration" in e] == [0, 1, 2, 3]
    assert (out / "log.jsonl").read_text().endswith("}\n")


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    main(out, "--iters=2", "--save_every=1")
    (out / "checkpoints" / "iter_000003.tmp").mkdir()  # a save killed half way
    (out / "checkpoints" / "iter_000004").mkdir()  # not even a run.json
    assert checkpoint.newest(out).name == "iter_000002"
    entries = main(out, "--iters=3", f"--resume={out}")
    assert entries[-1]["iteration"] == 3 and checkpoint.newest(out).name == "iter_000003"


def test_short_kill_soak(tmp_path):
    report = kill_soak.soak(kill_soak.Settings(kills=2, iters=8, min_delay=2.0, max_delay=4.5, workdir=str(tmp_path)))
    assert report["problems"] == [] and report["lora_equal"]
    assert report["kills"] >= 1


def iteration_1_logged(proc, out):
    """Wait until the run in `out` has logged the base model's evaluation and its iteration 1."""
    deadline = time.time() + 300
    while not ((out / "log.jsonl").exists() and len(read_log(out / "log.jsonl")) >= 2):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first iteration"
        time.sleep(0.1)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_save_before_exiting(tmp_path, sig):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "sd35" / "train.py"), *TINY, "--iters=1000", "--save_every=0",
                             f"--out={out}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    iteration_1_logged(proc, out)
    proc.send_signal(sig)  # in iteration 2 or later: it is abandoned and the one before saved
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    reached = read_log(out / "log.jsonl")[-1]["iteration"]
    assert f"stopped by signal {int(sig)} after iteration {reached}; newest checkpoint: iteration {reached}" in stdout
    assert checkpoint.newest(out).name == f"iter_{reached:06d}" and reached >= 1


def test_ctrl_c_with_ocr_workers_saves_exits_0_and_leaves_no_process(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "sd35" / "train.py"), *TINY, "--prompts=ocr", "--reward=ocr",
                             "--group_size=2", "--reward_workers=2", "--iters=1000", "--save_every=0",
                             f"--out={out}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    iteration_1_logged(proc, out)
    os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C at a terminal: the whole process group, workers included
    _, stderr = proc.communicate(timeout=120)  # the output ends once every process holding it has
    assert proc.returncode == 0, stderr[-2000:]
    reached = read_log(out / "log.jsonl")[-1]["iteration"]
    assert checkpoint.newest(out).name == f"iter_{reached:06d}"
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)


def process_states():
    """{pid: (parent pid, state letter)} of every process, from /proc."""
    states = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:  # ended while we looked
            continue
        states[int(stat.parent.name)] = (int(parent), state)
    return states


def test_workers_end_with_a_trainer_killed_while_they_start(tmp_path):
    # The reward mix's owner stands in for the trainer: it starts two OCR workers, has them score
    # one image and is SIGKILLed at random moments of their start-up (a second or more of imports).
    trainer = ("import torch\nfrom sd35.rewards import RewardMix\nmix = RewardMix('ocr', workers=2)\n"
               "mix.submit(torch.zeros(1, 3, 32, 32), ['\"x\"'])\nprint('started', flush=True)\ninput()")
    rng = random.Random(0)
    for delay in [0.0] + [rng.uniform(0.0, 1.5) for _ in range(2)]:
        proc = subprocess.Popen([sys.executable, "-c", trainer], cwd=ROOT, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert proc.stdout.readline() == b"started\n"
        children = [pid for pid, (parent, _) in process_states().items() if parent == proc.pid]
        time.sleep(delay)
        proc.kill()
        proc.wait()
        reader = threading.Thread(target=proc.stdout.read, daemon=True)  # returns at end of file
        reader.start()
        reader.join(timeout=5)
        assert not reader.is_alive(), f"killed after {delay:.2f} s: its output stayed open"
        deadline = time.time() + 5
        while (left := [pid for pid in children if process_states().get(pid, (0, "Z"))[1] != "Z"]) and \
                time.time() < deadline:  # a zombie holds no memory and no files
            time.sleep(0.05)
        assert children and not left, f"killed after {delay:.2f} s: processes {left} outlived the trainer"


# ---------------------------------------------------------------------------------- bad input


@pytest.fixture
def no_model_loads(monkeypatch):
    """Bad input must be caught before any weights load."""
    monkeypatch.setattr(models, "load_pipeline", lambda *a: pytest.fail("a model loaded before the input was checked"))


def prompt_folder(path, train_bytes):
    path.mkdir()
    (path / "train.txt").write_bytes(train_bytes)
    (path / "test.txt").write_text("a cat\n")


@pytest.mark.parametrize("args,message", [
    (["--lr=fast"], "--lr=fast: expected a number in (0, 1]"),
    (["--learning_rate=1"], "unknown flag --learning_rate"),
    (["--algo=dpo"], "--algo=dpo: expected a preset (flow_grpo, stepwise, stepwise_ddim, superflow"),
    (["--sampler=heun"], "--sampler=heun: expected one of flow_grpo, ddim, cps"),
    (["--reward=ocrr"], "--reward=ocrr: expected rewards from clipscore, jpeg_compressibility, ocr"),
    (["--reward=ocr=0.5=1"], "--reward=ocr=0.5=1: expected rewards from"),
    (["--prompts={tmp}/missing"], "--prompts={tmp}/missing: expected a shipped set (general, ocr, shapes) or a folder"),
    (["--prompts={tmp}/empty"], "--prompts={tmp}/empty: {tmp}/empty/train.txt holds no prompts"),
    (["--prompts={tmp}/latin1"], "--prompts={tmp}/latin1: {tmp}/latin1/train.txt is not UTF-8"),
    (["--group_size=1"], "--group_size=1: expected an integer >= 2"),
    (["--resolution=100"], "--resolution=100: expected 0 (the model's own default) or a positive multiple of 16"),
    (["--resolution=1024"], "--resolution=1024 needs 64 patches a side; this model takes at most 32 (512 px)"),
    (["--sampler=ddim", "--num_steps=2"], "--sampler=ddim: expected a sampler with a trained step on this 2-step grid"),
    (["--guidance_scale=nan"], "--guidance_scale=nan: expected a number in [1, 100]"),
    (["--lora_rank=0"], "--lora_rank=0: expected an integer >= 1"),
    (["--device=gpu"], "--device=gpu: expected empty, cpu, cuda or cuda:N"),
    (["--device=cuda:99"], "--device=cuda:99: needs cuda:99; this machine has "),
    (["--resume={tmp}/nothing"], "--resume={tmp}/nothing: no complete checkpoint there"),
    (["--resume"], "--resume={tmp}/out: no complete checkpoint there"),  # bare: the run in --out, which has none
    (["--out={tmp}/a-file/run"], "a-file"),
])
def test_bad_input_stops_early_in_one_line_and_loses_nothing(tmp_path, no_model_loads, args, message):
    (tmp_path / "a-file").write_text("not a folder")
    prompt_folder(tmp_path / "empty", b"\n\n")
    prompt_folder(tmp_path / "latin1", "caf\xe9 sign\n".encode("latin-1"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier output")
    args, message = [a.replace("{tmp}", str(tmp_path)) for a in args], message.replace("{tmp}", str(tmp_path))
    with pytest.raises(SystemExit) as stop:
        sd35_train.main([*TINY, f"--out={out}", *args])
    text = str(stop.value.code)
    assert text.startswith("error: ") and "\n" not in text and message in text, text
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"] and (out / "keep.txt").read_text() == "earlier output"


def test_a_budget_smaller_than_the_ranks(tmp_path, monkeypatch, no_model_loads):
    monkeypatch.setenv("WORLD_SIZE", "16")
    with pytest.raises(SystemExit, match=r"^error: --prompts_per_iter=2: expected group_size x prompts_per_iter \(now 8\) "
                                         r"to be at least the 16 ranks$"):
        sd35_train.main([*TINY, f"--out={tmp_path / 'out'}"])


def test_choose_device_for_every_case():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    for flag, count, local_rank, expected in [
            ("", 0, None, cpu), ("", 2, None, cuda), ("cpu", 2, None, cpu), ("cuda", 1, None, cuda),
            ("cuda:1", 2, None, torch.device("cuda", 1)), ("", 0, 1, cpu), ("cpu", 8, 3, cpu),
            ("", 8, 3, torch.device("cuda", 3)), ("cuda", 8, 3, torch.device("cuda", 3))]:
        assert models.choose_device(flag, count, local_rank) == expected, (flag, count, local_rank)
    for flag, count, local_rank, message in [
            ("cuda", 0, None, "--device=cuda: needs cuda:0; this machine has 0 CUDA device(s)"),
            ("cuda:0", 0, 1, "--device=cuda:0: under torchrun each rank uses cuda:LOCAL_RANK"),
            ("cuda:2", 2, None, "--device=cuda:2: needs cuda:2; this machine has 2 CUDA device(s)"),
            ("cuda:1", 8, 0, "--device=cuda:1: under torchrun each rank uses cuda:LOCAL_RANK; pass --device=cuda and "
                             "choose the GPUs with CUDA_VISIBLE_DEVICES"),
            ("", 2, 2, "--device=cuda: needs cuda:2 for LOCAL_RANK=2 (one GPU a rank); this machine has 2 CUDA "
                       "device(s)")]:
        with pytest.raises(ValueError) as refused:
            models.choose_device(flag, count, local_rank)
        assert str(refused.value).startswith(message)


def test_a_device_that_is_not_here_is_refused_in_one_line_by_the_bench(capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--device=cuda:99"])
    assert str(stop.value.code).startswith("error: --device=cuda:99: needs cuda:99; this machine has ")


def test_resuming_with_flags_that_change_what_a_checkpoint_holds(tmp_path, monkeypatch):
    """Each flag that decides what a checkpoint holds or how it is read: refused in one line before any
    model loads, or resumed as asked (another --mixed_precision, a new --lr and --weight_decay)."""
    out, flags = tmp_path / "run", ["--algo=superflow", "--iters=2", f"--resume={tmp_path / 'run'}"]
    main(out, "--iters=1", "--algo=superflow", "--mixed_precision=no")
    with monkeypatch.context() as patched:
        patched.setattr(models, "load_pipeline", lambda *a: pytest.fail("a model loaded before the checkpoint was checked"))
        for flag, message in [("--model=stabilityai/stable-diffusion-3.5-large", "model='tiny', this run has"),
                              ("--lora_rank=4", "lora_rank=32, this run has 4"),
                              ("--lora_alpha=32", "lora_alpha=64, this run has 32"),
                              ("--algo=stepwise", "made with algorithm="), ("--noise_level=0.5", "made with algorithm="),
                              ("--ema_decay=0", "ema_decay=0.9, this run has 0.0"),
                              ("--ema_every=4", "ema_every=8, this run has 4"),
                              ("--prompts=ocr", "tracked_prompts='60 prompts, sha256 "),
                              ("--reward=ocr", "tracked_reward={'jpeg_compressibility': 1.0}, this run has {'ocr': 1.0}")]:
            with pytest.raises(SystemExit) as stop:
                main(out, *flags, flag)
            assert str(stop.value.code).startswith(f"error: checkpoint {out}") and message in str(stop.value.code)
    seen, real_load = {}, checkpoint.load

    def load_and_look(folder, state, *args, **kwargs):
        iteration = real_load(folder, state, *args, **kwargs)
        seen.update(state.optimizer.param_groups[0], scale=state.scaler.get_scale())
        return iteration
    monkeypatch.setattr(checkpoint, "load", load_and_look)
    entries = main(out, *flags, "--mixed_precision=fp16", "--lr=1e-3", "--weight_decay=0.02")
    assert entries[-1]["iteration"] == 2 and checkpoint.newest(out).name == "iter_000002"
    assert seen["lr"] == 1e-3 and seen["weight_decay"] == 0.02 and seen["scale"] == 2.0 ** 16  # a fresh scaler


# ---------------------------------------------------------------------------------- bad data at run time


def register(monkeypatch, name, fn):
    monkeypatch.setitem(rewards.REWARDS, name, lambda options: fn)


def test_nan_rewards_are_dropped_and_counted(tmp_path, monkeypatch):
    def sometimes_nan(images, prompts, metadata):
        scores = images.mean((1, 2, 3))
        scores[0] = float("nan")
        scores[-1] = float("inf")
        return scores
    register(monkeypatch, "sometimes_nan", sometimes_nan)
    entries = main(tmp_path / "run", "--iters=2", "--reward=sometimes_nan")
    assert [e["dropped_samples"] for e in entries[1:3]] == [2, 2]  # entry 0: the base model's evaluation
    assert all(torch.isfinite(torch.tensor(e["reward_mean"])) for e in entries[1:3])


def test_an_iteration_of_only_nan_rewards_stops_the_run(tmp_path, monkeypatch, capsys):
    register(monkeypatch, "all_nan", lambda images, prompts, metadata: torch.full((len(prompts),), float("nan")))
    with pytest.raises(SystemExit) as stop:
        main(tmp_path / "run", "--iters=3", "--reward=all_nan")
    assert stop.value.code == 1
    assert "iteration 1: every reward is NaN or infinite" in capsys.readouterr().err


def test_a_failing_reward_names_itself_and_the_prompt_and_keeps_the_work_done(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}

    def flaky(images, prompts, metadata):  # scores the base model and two iterations, then fails for good
        calls["n"] += 1
        if calls["n"] > 3:
            raise ConnectionError("model server gone")
        return images.mean((1, 2, 3))
    register(monkeypatch, "flaky", flaky)
    with pytest.raises(SystemExit) as stop:
        main(tmp_path / "run", "--iters=5", "--reward=flaky", "--save_every=0")
    err = capsys.readouterr().err
    assert stop.value.code == 1 and re.search(r"error: reward 'flaky' failed on prompt '.+': model server gone", err)
    assert checkpoint.newest(tmp_path / "run").name == "iter_000002"  # the two good iterations are kept


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_reward_server_that_is_down_gives_a_clear_error(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(SystemExit):
        main(tmp_path / "run", "--iters=1", "--reward=remote", f"--reward_url=http://127.0.0.1:{port}/score")
    err = capsys.readouterr().err
    assert "reward 'remote' failed" in err and f"127.0.0.1:{port}" in err


def two_ranks(records, out, *args, env=None):
    """sd35/train.py with the test rewards under torchrun on 2 CPU ranks, started (a Popen); each rank
    records its pid in `records`, and that it destroyed its process group."""
    records.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(ROOT / "tests" / "sd35_with_test_rewards.py"), *TINY, f"--out={out}", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "RECORD_DIR": str(records), **(env or {})})


def ended_cleanly(records):
    """Both ranks destroyed their process group, exited and were reaped by torchrun."""
    assert sorted(p.name for p in records.iterdir()) == ["destroyed-0", "destroyed-1", "pid-0", "pid-1"]
    for rank in (0, 1):
        with pytest.raises(ProcessLookupError):
            os.kill(int((records / f"pid-{rank}").read_text()), 0)


def test_a_reward_failing_on_one_rank_ends_every_rank_cleanly(tmp_path):
    """Under torchrun, rank 1's reward fails: both ranks save what is done, destroy the process
    group, and exit 1; no rank is left waiting in a collective, and no process is left."""
    records, out = tmp_path / "records", tmp_path / "run"
    proc = two_ranks(records, out, "--reward=fails_on_rank_1", "--iters=3")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-3000:]
    assert re.search(r"^error: rank 1: reward 'fails_on_rank_1' failed on prompt '.+': rank 1 lost its reward "
                     r"server \(newest checkpoint: none\)$", stderr, re.M)
    assert 'sd35/train.py", line' not in stderr  # no traceback from a rank
    ended_cleanly(records)


def test_any_failure_on_one_rank_ends_every_rank_with_the_completed_iterations_saved(tmp_path):
    """Rank 1 runs out of memory in iteration 2's training passes, while rank 0 trains on: both end at
    the optimiser step's agreement, rank 0 saves iteration 1 (not due with --save_every=10) and prints
    one line naming rank 1 and its error; the traceback is in the file that line names."""
    records, out = tmp_path / "records", tmp_path / "run"
    proc = two_ranks(records, out, "--iters=3", "--save_every=10", env={"OOM_ON_RANK_1_AT": "2"})
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr[-3000:]
    line = re.search(r"^error: rank 1: OutOfMemoryError: CUDA out of memory\. Tried to allocate 2\.00 GiB \(injected "
                     r"on rank 1\) \(traceback: (.+)\) \(newest checkpoint: iteration 1\)$", stderr, re.M)
    assert line and "raise torch.OutOfMemoryError" in Path(line[1]).read_text()
    assert 'sd35/train.py", line' not in stderr  # no traceback from a rank (torchrun's agent prints its own)
    assert checkpoint.newest(out).name == "iter_000001"
    assert [e.get("iteration") for e in read_log(out / "log.jsonl")] == [0, 1, None]  # and the error line
    ended_cleanly(records)


class HangsOnItsThirdRequest(http.server.BaseHTTPRequestHandler):
    """A reward server: /score scores each image by its PNG's size; /hang answers its first two requests
    (rank 1's evaluation of the base model and its share of iteration 1), then never again."""

    def do_POST(self):
        images = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["images"]
        self.server.hangs += self.path == "/hang"
        if self.path == "/hang" and self.server.hangs > 2:
            self.server.released.wait()  # connected, and silent until the test ends
            return
        reply = json.dumps({"scores": [len(png) % 97 / 97 for png in images]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_a_reward_server_that_hangs_for_one_rank_ends_every_rank_with_the_completed_iterations(tmp_path):
    """Rank 1's server stops answering in iteration 2: --reward_timeout ends each of its 3 tries, then both
    ranks stop at the next agreement, iteration 1 saved, with one line naming the rank and the server."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HangsOnItsThirdRequest)
    server.hangs, server.released = 0, threading.Event()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    records, out = tmp_path / "records", tmp_path / "run"
    try:
        proc = two_ranks(records, out, "--reward=remote", f"--reward_url={url}/score", "--reward_timeout=1",
                         "--iters=3", env={"RANK_1_REWARD_URL": f"{url}/hang"})
        _, stderr = proc.communicate(timeout=300)
    finally:
        server.released.set()
        server.shutdown()
    assert proc.returncode == 1, stderr[-3000:]
    assert re.search(rf"^error: rank 1: reward 'remote' failed on prompt '.+' \(first of 4\): reward server {url}/hang "
                     r"failed after 3 attempts \(last error: no answer within 1\.0 s\); is it running\? "
                     r"\(newest checkpoint: iteration 1\)$", stderr, re.M), stderr[-3000:]
    assert 'sd35/train.py", line' not in stderr
    assert checkpoint.newest(out).name == "iter_000001" and server.hangs == 2 + 3
    ended_cleanly(records)


def test_a_stop_signal_to_one_rank_stops_both_at_the_same_point(tmp_path):
    records, out = tmp_path / "records", tmp_path / "run"
    proc = two_ranks(records, out, "--iters=1000", "--save_every=0")
    iteration_1_logged(proc, out)
    os.kill(int((records / "pid-1").read_text()), signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    reached = read_log(out / "log.jsonl")[-1]["iteration"]
    assert f"stopped by signal 15 after iteration {reached}; newest checkpoint: iteration {reached}" in stdout
    assert checkpoint.newest(out).name == f"iter_{reached:06d}"
    ended_cleanly(records)


def test_a_rank_killed_outright_leaves_rank_0_to_save_the_completed_iterations(tmp_path):
    """SIGKILL rank 1: with gloo, rank 0 notices at its next collective, saves the last completed
    iteration and says so in one line (torchrun's own report follows, as the killed rank failed)."""
    records, out = tmp_path / "records", tmp_path / "run"
    proc = two_ranks(records, out, "--iters=1000", "--save_every=0")
    iteration_1_logged(proc, out)
    os.kill(int((records / "pid-1").read_text()), signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    reached = [e["iteration"] for e in read_log(out / "log.jsonl") if "iteration" in e][-1]
    assert re.search(rf"^error: rank 0 cannot reach the other ranks: .+ \(newest checkpoint: iteration {reached}\)$",
                     stderr, re.M) and proc.returncode != 0
    assert checkpoint.newest(out).name == f"iter_{reached:06d}" and (records / "destroyed-0").exists()


def test_a_failure_or_a_stop_in_the_middle_of_the_optimisation_saves_the_iteration_before(tmp_path, monkeypatch,
                                                                                         capsys):
    """Iteration 2 ends after its first optimiser step changed the weights: what is saved is iteration 1,
    bitwise as an uninterrupted run saves it."""
    flags = ["--lr=1e-2", "--ema_every=1", "--save_every=10"]
    main(tmp_path / "whole", *flags, "--iters=1")
    real_clip, real_pass = torch.nn.utils.clip_grad_norm_, sd35_train.train_pass
    for ending in ("failure", "stop"):
        steps = []

        def cut_short(*args):
            if len(steps) == 3:  # iteration 1 took its 2 optimiser steps, iteration 2 its first
                if ending == "failure":
                    raise torch.OutOfMemoryError("CUDA out of memory (injected)")
                os.kill(os.getpid(), signal.SIGTERM)
            return real_pass(*args)
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: steps.append(1) or real_clip(*a, **k))
        monkeypatch.setattr(sd35_train, "train_pass", cut_short)
        if ending == "failure":
            with pytest.raises(SystemExit) as stop:
                main(tmp_path / ending, *flags, "--iters=3")
            assert stop.value.code == 1
            assert re.search(r"^error: OutOfMemoryError: CUDA out of memory \(injected\) \(traceback: .+error-rank0.txt\) "
                             r"\(newest checkpoint: iteration 1\)$", capsys.readouterr().err, re.M)
        else:
            main(tmp_path / ending, *flags, "--iters=3")
            assert "stopped by signal 15 after iteration 1; newest checkpoint: iteration 1" in capsys.readouterr().out
        assert len(steps) == 3 and checkpoint.newest(tmp_path / ending).name == "iter_000001"
        for name in (checkpoint.LORA_FILE, checkpoint.STATE_FILE):
            a, b = (load_file(tmp_path / run / "checkpoints" / "iter_000001" / name) for run in ("whole", ending))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (ending, name)
        logged = [e.get("iteration") for e in read_log(tmp_path / ending / "log.jsonl")]
        assert logged == ([0, 1, None] if ending == "failure" else [0, 1])  # None: the line of the error


def test_nan_gradients_are_skipped_then_stop_the_run(tmp_path, monkeypatch, capsys):
    real = minflow.policy_loss

    def nan_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss * float("nan"), stats
    monkeypatch.setattr(sd35_train.minflow, "policy_loss", nan_loss)
    with pytest.raises(SystemExit) as stop:
        main(tmp_path / "run", "--iters=10", "--max_bad_steps=3", "--save_every=1", "--ema_decay=0")  # saved = live
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "3 optimiser steps in a row had a NaN or infinite gradient" in err
    entries = read_log(tmp_path / "run" / "log.jsonl")
    assert entries[1]["skipped_steps"] == [True, True]
    lora = load_file(checkpoint.newest(tmp_path / "run") / checkpoint.LORA_FILE)
    assert all((v == 0).all() for k, v in lora.items() if "lora_B" in k)  # skipped steps never touched the weights


# ---------------------------------------------------------------------------------- full disks, corrupt files

FAULT_FLAGS = ["--iters=2", "--save_every=1", "--lr=1e-2", "--ema_every=1", "--eval_every=1", "--keep_best"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A run of 2 iterations with a checkpoint after each, met by no fault: what every resumed run must equal."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    return out, main(out, *FAULT_FLAGS)


def test_the_best_evaluation_is_kept_loadable_with_its_iteration_and_reward(uninterrupted):
    out, entries = uninterrupted
    rewards_seen = [e["eval_reward"] for e in entries]
    best = json.loads((out / "best" / checkpoint.BEST_FILE).read_text())
    assert best == {"iteration": rewards_seen.index(max(rewards_seen)), "eval_reward": max(rewards_seen)}
    lora = load_file(out / "best" / checkpoint.LORA_FILE)
    if best["iteration"]:
        kept = load_file(out / "checkpoints" / f"iter_{best['iteration']:06d}" / checkpoint.LORA_FILE)
        assert lora.keys() == kept.keys() and all(torch.equal(lora[k], kept[k]) for k in lora)
    else:  # the base model's LoRA, in no checkpoint: B starts at zero
        assert all((v == 0).all() for k, v in lora.items() if "lora_B" in k)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("best")) == ["best"]


def corrupt(run, case):
    """Damage checkpoint iteration 2 of `run` as `case` says -> the line that names the damage."""
    folder = run / "checkpoints" / "iter_000002"
    if case == "flipped byte":
        data = bytearray((folder / checkpoint.STATE_FILE).read_bytes())
        data[len(data) // 2] ^= 1
        (folder / checkpoint.STATE_FILE).write_bytes(data)
        return f"checkpoint {folder}: {checkpoint.STATE_FILE} does not match the checksum its save recorded"
    if case == "truncated file":
        os.truncate(folder / checkpoint.LORA_FILE, 1000)
        return f"checkpoint {folder}: {checkpoint.LORA_FILE} does not match the checksum its save recorded"
    (folder / checkpoint.RUN_FILE).unlink()
    return f"checkpoint {folder} lacks {checkpoint.RUN_FILE}"


def fill_the_disk_at_iteration_2(monkeypatch, run):
    """The trainer's state file of iteration 2 gets half written, then the disk is full (injected: no
    small filesystem can be mounted here)."""
    real = checkpoint.save_file

    def half_then_full(tensors, path):
        real(tensors, path)
        if "iter_000002" in str(path):
            os.truncate(path, os.path.getsize(path) // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(checkpoint, "save_file", half_then_full)
    return rf"\[Errno 28\] No space left on device: '{run}/checkpoints/iter_000002\.tmp/trainer_state\.safetensors'"


def unmount_after_iteration_1(monkeypatch, run):
    """The run folder vanishes once iteration 1 is saved, as a network filesystem that unmounts does; it is
    moved away, a real fault even as root (a read-only folder is not: root writes there anyway)."""
    real = checkpoint.save

    def save_then_vanish(run_dir, snapshot, *args):
        saved = real(run_dir, snapshot, *args)
        if saved == 1:
            run.rename(run.with_name("unmounted"))
        return saved
    monkeypatch.setattr(checkpoint, "save", save_then_vanish)
    return rf"\[Errno 2\] No such file or directory: '{run}/.+'"


@pytest.mark.parametrize("case", ["flipped byte", "truncated file", "deleted file", "full disk", "folder gone"])
def test_a_fault_loses_nothing_written_and_resume_ends_bitwise_equal(tmp_path, uninterrupted, monkeypatch, capsys,
                                                                     case):
    """A checkpoint damaged on disk is named and refused before any model loads, and --resume falls back
    to the newest that verifies; a write that fails (a full disk, the folder gone) stops the run in one
    line naming the newest checkpoint, removes its partial folder and damages nothing. Either way the
    resumed run (keeping one checkpoint) ends bitwise equal to the uninterrupted one."""
    whole, run = uninterrupted[0], tmp_path / "run"
    if case in ("full disk", "folder gone"):
        with monkeypatch.context() as patched:
            error = (fill_the_disk_at_iteration_2 if case == "full disk" else unmount_after_iteration_1)(patched, run)
            with pytest.raises(SystemExit) as stop:
                main(run, *FAULT_FLAGS)
        assert re.search(rf"^error: {error} \(newest checkpoint: iteration 1\)$", capsys.readouterr().err, re.M)
        assert stop.value.code == 1
        if case == "folder gone":  # mounted again
            run.with_name("unmounted").rename(run)
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["iter_000001"]
        assert checkpoint.verify(run / "checkpoints" / "iter_000001") is None
        assert [e.get("iteration") for e in read_log(run / "log.jsonl")][:2] == [0, 1]
    else:
        shutil.copytree(whole, run)
        problem = corrupt(run, case)
        bad = run / "checkpoints" / "iter_000002"
        with monkeypatch.context() as patched, pytest.raises(SystemExit) as stop:
            patched.setattr(models, "load_pipeline", lambda *a: pytest.fail("a model loaded before the check"))
            main(run, *FAULT_FLAGS, f"--resume={bad}")
        assert str(stop.value.code) == f"error: --resume={bad}: no checkpoint there verifies: {problem}"
    main(run, *FAULT_FLAGS, "--resume", "--keep_checkpoints=1")
    assert [p.name for p in checkpoint.checkpoints(run)] == ["iter_000002"]  # iteration 1 deleted once 2 was saved
    if case not in ("full disk", "folder gone"):
        assert f"{problem}; resuming from the newest checkpoint that verifies, {run / 'checkpoints' / 'iter_000001'}\n" \
            in capsys.readouterr().out
    for name in (checkpoint.LORA_FILE, checkpoint.STATE_FILE):
        a, b = (load_file(r / "checkpoints" / "iter_000002" / name) for r in (whole, run))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# A process that saves checkpoints with --keep_checkpoints=2 in a loop: for each line read, it forks a
# saver, prints its pid and, once it is killed, "reaped" (one import of the packages for all the kills).
SAVER = """
import os, sys, torch
from types import SimpleNamespace
from sd35 import checkpoint
def snapshot(iteration):
    return SimpleNamespace(iteration=iteration, lora={"a.lora_A.weight": torch.full((4, 1000), float(iteration))},
                           tensors={"state": torch.full((1_000_000,), float(iteration))}, numbers={}, adapter={})
checkpoint.save(sys.argv[1], snapshot(1), {}, keep=2)
for line in sys.stdin:
    if (pid := os.fork()) == 0:
        iteration = int(checkpoint.newest(sys.argv[1]).name[5:])
        while True:
            iteration = checkpoint.save(sys.argv[1], snapshot(iteration + 1), {}, keep=2)
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


def test_a_kill_during_saves_with_retention_always_leaves_a_complete_checkpoint(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    saver = subprocess.Popen([sys.executable, "-c", SAVER, str(run)], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rng, reached = random.Random(0), []
    for _ in range(5):
        saver.stdin.write("save\n")
        saver.stdin.flush()
        pid = int(saver.stdout.readline())
        time.sleep(rng.uniform(0.05, 0.5))  # each save takes about 0.05 s: most kills land in one
        os.kill(pid, signal.SIGKILL)
        assert saver.stdout.readline() == "reaped\n"
        listed = checkpoint.checkpoints(run)
        assert checkpoint.newest(run) is not None and 1 <= len(listed) <= 3, listed  # 2 kept, 1 maybe half deleted
        reached.append(int(checkpoint.newest(run).name[5:]))
    saver.stdin.close()
    saver.wait(timeout=60)
    assert reached == sorted(reached) and reached[-1] > 5 and len(checkpoint.checkpoints(run)) <= 3, reached


# ---------------------------------------------------------------------------------- security


def test_no_unsafe_loading_or_shell_anywhere_in_the_package():
    sources = [ROOT / "minflow.py", *ROOT.glob("toy/*.py"), *ROOT.glob("sd35/*.py")]
    for path in sources:
        text = path.read_text()
        for pattern, why in [(r"\bimport pickle\b|\bpickle\.", "pickle"), (r"torch\.save\(", "torch.save writes pickle"),
                             (r"torch\.load\((?![^)]*weights_only=True)", "torch.load without weights_only=True"),
                             (r"trust_remote_code\s*=\s*True", "trust_remote_code"), (r"shell\s*=\s*True", "a shell"),
                             (r"os\.system\(|os\.popen\(", "a shell"), (r"all_gather_object|broadcast_object_list", "pickle on the wire")]:
            assert not re.search(pattern, text), f"{path.name}: {why}"
