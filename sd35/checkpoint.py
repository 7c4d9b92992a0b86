"""Checkpoints: one folder per iteration, OUT/checkpoints/iter_000020/, with the LoRA the evaluation
scored (the EMA of the weights when it is on) in diffusers' format (LORA_FILE, for
pipe.load_lora_weights(folder)), the live LoRA and the optimiser's, tracker's and EMA's tensors
(STATE_FILE), in RUN_FILE what it belongs to (check_identity), the iteration and the rest of the
state as plain numbers, and in CHECKSUMS_FILE the sha256 of those three files, which --resume
verifies before any model loads. No pickle, so loading can never run code. A folder is written
under a temporary name, fsynced and renamed when complete: a kill at any moment, or a write that
fails (a full disk), leaves the previous checkpoints intact. The random state needs no saving:
every draw of iteration i comes from generators seeded with (seed, i, ...), so a resumed run
draws what an uninterrupted one would.
"""
import hashlib
import json
import os
import shutil
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file, save_file

import cli
from sd35.policy import LoraEMA  # first: importing sd35 quiets a transformers warning before diffusers loads
from diffusers import StableDiffusion3Pipeline  # noqa: E402
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402

LORA_FILE, STATE_FILE, RUN_FILE = "pytorch_lora_weights.safetensors", "trainer_state.safetensors", "run.json"
CHECKSUMS_FILE, BEST_FILE = "checksums.json", "best.json"


@dataclass
class TrainState:
    """What a checkpoint holds: the LoRA (in the transformer), the optimiser, the grad scaler, the
    prompt tracker and the EMA (either may be None)."""
    transformer: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    tracker: object = None
    ema: LoraEMA | None = None

    @property
    def params(self):
        return [p for group in self.optimizer.param_groups for p in group["params"]]


def capture(state, iteration):
    """What a checkpoint of `state` after `iteration` holds, copied to the CPU: its iteration, the evaluated
    LoRA (LORA_FILE's, under peft's names), STATE_FILE's tensors, the numbers for RUN_FILE and the LoRA's
    config. Taken after every iteration, so that a failure or a stop in the middle of the next one, with
    the weights part-updated, still saves this one."""
    def copy(tensor):
        return tensor.detach().to("cpu", copy=True).contiguous()
    names = [name for name, p in state.transformer.named_parameters() if p.requires_grad]  # state.params' order
    evaluated = state.ema.average if state.ema else state.params
    lora = get_peft_model_state_dict(state.transformer, state_dict={n: copy(t) for n, t in zip(names, evaluated)})
    tensors = {f"lora.{i}": copy(p) for i, p in enumerate(state.params)}
    tensors.update({f"optimizer.{i}.{k}": copy(v) for i, s in state.optimizer.state_dict()["state"].items()
                    for k, v in s.items()})
    tracker = state.tracker.state_dict() if state.tracker is not None else {}  # copies already
    tensors.update({f"tracker.{k}": v for k, v in tracker.items() if isinstance(v, torch.Tensor)})
    tensors.update({f"ema.{i}": copy(a) for i, a in enumerate(state.ema.average if state.ema else [])})
    numbers = {"scaler": state.scaler.state_dict(), "ema_steps": state.ema.steps if state.ema else None,
               "tracker": {k: v for k, v in tracker.items() if not isinstance(v, torch.Tensor)} if tracker else None}
    return SimpleNamespace(iteration=iteration, lora=lora, tensors=tensors, numbers=numbers,
                           adapter=state.transformer.peft_config["default"].to_dict())


def save(run_dir, snapshot, identity, keep=0):
    """Write a capture()d snapshot as checkpoint folder iter_N, then delete all but the `keep` newest
    checkpoints (0: keep all); returns its iteration."""
    (Path(run_dir) / "checkpoints").mkdir(exist_ok=True)  # not the run folder: one that vanished is not made anew
    with written(Path(run_dir) / "checkpoints" / f"iter_{snapshot.iteration:06d}") as tmp:
        save_lora(tmp, snapshot)
        save_file(snapshot.tensors, tmp / STATE_FILE)
        (tmp / RUN_FILE).write_text(json.dumps({**identity, "iteration": snapshot.iteration, **snapshot.numbers}))
        (tmp / CHECKSUMS_FILE).write_text(json.dumps({name: sha256(tmp / name) for name in CHECKSUMMED}))
    for old in checkpoints(run_dir)[keep:] if keep else []:  # only now that the new one is complete
        shutil.rmtree(old)
    return snapshot.iteration


def keep_best(run_dir, state, iteration, eval_reward):
    """Keep the evaluated LoRA of `state` after `iteration` in run_dir/best/ (LORA_FILE, and BEST_FILE with
    the iteration and `eval_reward`) unless an earlier evaluation there scored at least as high; the state
    is copied off the device only then."""
    final = Path(run_dir) / "best"
    with suppress(OSError, ValueError, KeyError):
        if json.loads((final / BEST_FILE).read_text())["eval_reward"] >= eval_reward:
            return
    with written(final) as tmp:
        save_lora(tmp, capture(state, iteration))
        (tmp / BEST_FILE).write_text(json.dumps({"iteration": iteration, "eval_reward": eval_reward}))


def save_lora(folder, snapshot):
    # The adapter's config travels as metadata: without it diffusers' loader assumes
    # lora_alpha = rank and would apply the LoRA at the wrong scale.
    StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=snapshot.lora,
                                               transformer_lora_adapter_metadata=snapshot.adapter)


@contextmanager
def written(final):
    """A temporary folder to write the folder `final` in, fsynced and renamed to `final` when the block ends:
    a kill at any moment leaves the old folder or the new one (for an instant, the old one at final.old);
    a write that fails (a full disk) removes the temporary folder and leaves the old one as it was."""
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        for path in tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        cli.fsync_dir(tmp)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # a checkpoint saved again (after a corrupt one), or a better evaluation
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    cli.fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


CHECKSUMMED = (LORA_FILE, STATE_FILE, RUN_FILE)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify(folder):
    """None if every file of the checkpoint `folder` has the checksum its save recorded, else the first
    problem in one line: a flipped byte, a truncated or a deleted file."""
    try:
        recorded = json.loads((folder / CHECKSUMS_FILE).read_text())
    except (OSError, ValueError):
        return f"checkpoint {folder} has no readable {CHECKSUMS_FILE}"
    for name in CHECKSUMMED:
        if not (folder / name).is_file():
            return f"checkpoint {folder} lacks {name}"
        if sha256(folder / name) != recorded.get(name):
            return f"checkpoint {folder}: {name} does not match the checksum its save recorded"
    return None


def checkpoints(path):
    """The checkpoints at `path`, newest first: `path` itself if it is one, else path/checkpoints/iter_N
    (not a save's .tmp, nor an .old being replaced)."""
    path = Path(path)
    if (path / RUN_FILE).exists() or (path / CHECKSUMS_FILE).exists():
        return [path]
    return sorted((p for p in (path / "checkpoints").glob("iter_*") if p.name[5:].isdigit()), reverse=True)


def newest(path, skipped=None):
    """The newest checkpoint at `path` whose files verify, or None; the problem of each newer one is
    appended to the list `skipped`."""
    for folder in checkpoints(path):
        if (problem := verify(folder)) is None:
            return folder
        if skipped is not None:
            skipped.append(problem)
    return None


def check_identity(folder, identity):
    """Refuse (one line) a checkpoint made with other values of `identity`, the flags that decide what a
    checkpoint holds and how it is read, before any model loads; returns what its RUN_FILE holds."""
    saved = json.loads((Path(folder) / RUN_FILE).read_text())
    for key, value in identity.items():
        if saved.get(key) != value:
            raise ValueError(f"checkpoint {folder} was made with {key}={saved.get(key)!r}, this run has {value!r}")
    return saved


def load(folder, state, identity, evaluated_only=False):
    """Restore a checkpoint into the live objects of `state`, or with `evaluated_only` only its evaluated
    LoRA into the weights; returns the iteration to continue from. The optimiser keeps this run's
    param_groups (--lr, --weight_decay), and a grad scaler state only loads where one was saved (fp16)."""
    saved = check_identity(folder, identity)
    if evaluated_only:
        lora = {k.removeprefix("transformer."): v for k, v in load_file(folder / LORA_FILE).items()}
        if unexpected := set_peft_model_state_dict(state.transformer, lora).unexpected_keys:
            raise ValueError(f"checkpoint {folder} has LoRA weights this model lacks: {unexpected[:3]}")
        return saved["iteration"]
    tensors = load_file(folder / STATE_FILE)
    per_param = {i: {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"optimizer.{i}.")}
                 for i in range(len(state.params))}
    state.optimizer.load_state_dict({"state": per_param, "param_groups": state.optimizer.state_dict()["param_groups"]})
    if saved["scaler"]:
        state.scaler.load_state_dict(saved["scaler"])
    with torch.no_grad():
        for i, p in enumerate(state.params):
            p.copy_(tensors[f"lora.{i}"])
        for i, average in enumerate(state.ema.average if state.ema else []):
            average.copy_(tensors[f"ema.{i}"])
    if state.ema:
        state.ema.steps = saved["ema_steps"]
    if state.tracker is not None:
        state.tracker.load_state_dict({**saved["tracker"], **{k.removeprefix("tracker."): v for k, v in tensors.items()
                                                              if k.startswith("tracker.")}})
    return saved["iteration"]
