"""Checkpoints: one folder per iteration, OUT/checkpoints/iter_000020/, with the LoRA the evaluation
scored (the EMA of the weights when it is on) in diffusers' format (LORA_FILE, for
pipe.load_lora_weights(folder)), the live LoRA and the optimiser's, tracker's and EMA's tensors
(STATE_FILE) and, in RUN_FILE, what it belongs to (check_identity), the iteration and the rest of
the state as plain numbers. No pickle, so loading can never run code. A folder is written under a
temporary name, fsynced and renamed when complete: a kill at any moment leaves the previous
checkpoint intact. The random state needs no saving: every draw of iteration i comes from
generators seeded with (seed, i, ...), so a resumed run draws what an uninterrupted one would.
"""
import json
import os
import shutil
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


def save(run_dir, snapshot, identity):
    """Write a capture()d snapshot as checkpoint folder iter_N atomically; returns its iteration."""
    final = Path(run_dir) / "checkpoints" / f"iter_{snapshot.iteration:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # The adapter's config travels as metadata: without it diffusers' loader assumes
    # lora_alpha = rank and would apply the LoRA at the wrong scale.
    StableDiffusion3Pipeline.save_lora_weights(tmp, transformer_lora_layers=snapshot.lora,
                                               transformer_lora_adapter_metadata=snapshot.adapter)
    save_file(snapshot.tensors, tmp / STATE_FILE)
    (tmp / RUN_FILE).write_text(json.dumps({**identity, "iteration": snapshot.iteration, **snapshot.numbers}))
    for path in tmp.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    cli.fsync_dir(tmp)
    if final.exists():  # only when the same iteration is saved twice
        shutil.rmtree(final)
    os.replace(tmp, final)
    cli.fsync_dir(final.parent)
    return snapshot.iteration


def newest(path):
    """`path` if it is a complete checkpoint, else the highest-numbered one under path/checkpoints/, else None."""
    path = Path(path)
    if (path / RUN_FILE).exists():
        return path
    done = sorted(p for p in (path / "checkpoints").glob("iter_*") if p.suffix != ".tmp" and (p / RUN_FILE).exists())
    return done[-1] if done else None


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
