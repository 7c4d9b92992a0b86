"""Checkpoints: one folder per iteration, OUT/checkpoints/iter_000020/, with the LoRA in diffusers'
format (LORA_FILE, for pipe.load_lora_weights(folder)), the optimiser's, tracker's and EMA's tensors
(STATE_FILE) and, in RUN_FILE, what it belongs to (model, LoRA rank, algorithm), the iteration and
the rest of the state as plain numbers. No pickle, so loading can never run code. A folder is
written under a temporary name, fsynced and renamed when complete: a kill at any moment leaves the
previous checkpoint intact. The random state needs no saving: every draw of iteration i comes from
generators seeded with (seed, i, ...), so a resumed run draws what an uninterrupted one would.
"""
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

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


def save(run_dir, iteration, state, identity):
    """Write checkpoint `iteration` atomically; returns its folder."""
    final = Path(run_dir) / "checkpoints" / f"iter_{iteration:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # The adapter's config travels as metadata: without it diffusers' loader assumes
    # lora_alpha = rank and would apply the LoRA at the wrong scale.
    StableDiffusion3Pipeline.save_lora_weights(
        tmp, transformer_lora_layers=get_peft_model_state_dict(state.transformer),
        transformer_lora_adapter_metadata=state.transformer.peft_config["default"].to_dict())
    opt = state.optimizer.state_dict()
    tensors = {f"optimizer.{i}.{k}": v.contiguous() for i, s in opt["state"].items() for k, v in s.items()}
    tracker = state.tracker.state_dict() if state.tracker is not None else {}
    tensors.update({f"tracker.{k}": v for k, v in tracker.items() if isinstance(v, torch.Tensor)})
    tensors.update({f"ema.{i}": a.contiguous() for i, a in enumerate(state.ema.average if state.ema else [])})
    save_file(tensors, tmp / STATE_FILE)
    numbers = {"param_groups": opt["param_groups"], "scaler": state.scaler.state_dict(),
               "tracker": {k: v for k, v in tracker.items() if not isinstance(v, torch.Tensor)} if state.tracker else None,
               "ema_steps": state.ema.steps if state.ema else None}
    (tmp / RUN_FILE).write_text(json.dumps({**identity, "iteration": iteration, **numbers}))
    for path in tmp.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    cli.fsync_dir(tmp)
    if final.exists():  # only when the same iteration is saved twice
        shutil.rmtree(final)
    os.replace(tmp, final)
    cli.fsync_dir(final.parent)
    return final


def newest(path):
    """`path` if it is a complete checkpoint, else the highest-numbered one under path/checkpoints/, else None."""
    path = Path(path)
    if (path / RUN_FILE).exists():
        return path
    done = sorted(p for p in (path / "checkpoints").glob("iter_*") if p.suffix != ".tmp" and (p / RUN_FILE).exists())
    return done[-1] if done else None


def check_identity(folder, identity):
    """Refuse (one line) a checkpoint of another model, LoRA rank or algorithm, before any model loads."""
    saved = json.loads((Path(folder) / RUN_FILE).read_text())
    for key, value in identity.items():
        if saved.get(key) != value:
            raise ValueError(f"checkpoint {folder} was made with {key}={saved.get(key)!r}, this run has {value!r}")


def load(folder, state, identity):
    """Restore a checkpoint into the live objects of `state`; returns the iteration to continue from."""
    check_identity(folder, identity)
    saved = json.loads((folder / RUN_FILE).read_text())
    lora = {k.removeprefix("transformer."): v for k, v in load_file(folder / LORA_FILE).items()}
    if unexpected := set_peft_model_state_dict(state.transformer, lora).unexpected_keys:
        raise ValueError(f"checkpoint {folder} has LoRA weights this model lacks: {unexpected[:3]}")
    tensors = load_file(folder / STATE_FILE)
    per_param = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    state.optimizer.load_state_dict({"state": per_param, "param_groups": saved["param_groups"]})
    state.scaler.load_state_dict(saved["scaler"])
    if state.tracker is not None:
        state.tracker.load_state_dict({**saved["tracker"], **{k.removeprefix("tracker."): v for k, v in tensors.items()
                                                              if k.startswith("tracker.")}})
    if state.ema is not None and saved["ema_steps"] is not None:  # a run saved without EMA starts it afresh
        for i, average in enumerate(state.ema.average):
            average.copy_(tensors[f"ema.{i}"])
        state.ema.steps = saved["ema_steps"]
    return saved["iteration"]
