"""Checkpoints: one folder per iteration, `OUT/checkpoints/iter_000020/`, holding

    pytorch_lora_weights.safetensors   the LoRA in diffusers' format: pipe.load_lora_weights(folder)
    trainer_state.safetensors          the optimiser's, the SuperFlow tracker's and the LoRA EMA's tensors
    run.json                           what the checkpoint belongs to (model, LoRA rank, algorithm),
                                       the iteration, and the rest of the state as plain numbers

No pickle anywhere: tensors go to safetensors, everything else to JSON, so loading a
checkpoint can never run code. A folder is written under a temporary name, fsynced, and
renamed when complete, so a kill at any moment leaves the previous checkpoint intact and no
half-written one that looks complete (`newest` only sees renamed folders). The random state
needs no saving: every random draw of iteration i comes from generators seeded with
(seed, i, rank), so a resumed run draws exactly what an uninterrupted one would.
"""
import json
import os
import shutil
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

import cli

LORA_FILE, STATE_FILE, RUN_FILE = "pytorch_lora_weights.safetensors", "trainer_state.safetensors", "run.json"


def _flatten(optimizer, tracker, ema):
    """Optimiser, tracker and EMA state -> (tensors for safetensors, numbers for JSON)."""
    state = optimizer.state_dict()
    tensors = {f"optimizer.{i}.{k}": v.contiguous() for i, s in state["state"].items() for k, v in s.items()}
    if tracker is not None:
        tensors.update({f"tracker.{k}": v for k, v in tracker.state_dict().items() if isinstance(v, torch.Tensor)})
    if ema is not None:
        tensors.update({f"ema.{i}": a.contiguous() for i, a in enumerate(ema.average)})
    return tensors, {"param_groups": state["param_groups"], "tracker": None if tracker is None else
                     {k: v for k, v in tracker.state_dict().items() if not isinstance(v, torch.Tensor)},
                     "ema_steps": None if ema is None else ema.steps}


def save(run_dir, iteration, transformer, optimizer, scaler, tracker, ema, identity):
    """Write checkpoint `iteration` atomically; returns its folder."""
    final = Path(run_dir) / "checkpoints" / f"iter_{iteration:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # The adapter's config travels as metadata: without it diffusers' loader assumes
    # lora_alpha = rank and would apply the LoRA at the wrong scale.
    StableDiffusion3Pipeline.save_lora_weights(
        tmp, transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
    tensors, numbers = _flatten(optimizer, tracker, ema)
    save_file(tensors, tmp / STATE_FILE)
    (tmp / RUN_FILE).write_text(json.dumps({**identity, "iteration": iteration, "scaler": scaler.state_dict(), **numbers}))
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
    """The newest complete checkpoint: `path` itself if it is one, else the highest-numbered one
    under `path/checkpoints/`; None if there is none."""
    path = Path(path)
    if (path / RUN_FILE).exists():
        return path
    done = sorted(p for p in (path / "checkpoints").glob("iter_*") if p.suffix != ".tmp" and (p / RUN_FILE).exists())
    return done[-1] if done else None


def check_identity(folder, identity):
    """Refuse (one line) a checkpoint made for another model, LoRA rank or algorithm; cheap,
    so it runs before any model loads."""
    saved = json.loads((Path(folder) / RUN_FILE).read_text())
    for key, value in identity.items():
        if saved.get(key) != value:
            raise ValueError(f"checkpoint {folder} was made with {key}={saved.get(key)!r}, this run has {value!r}")


def load(folder, transformer, optimizer, scaler, tracker, ema, identity):
    """Restore a checkpoint into the live objects; returns the iteration to continue from."""
    check_identity(folder, identity)
    saved = json.loads((folder / RUN_FILE).read_text())
    lora = {k.removeprefix("transformer."): v for k, v in load_file(folder / LORA_FILE).items()}
    result = set_peft_model_state_dict(transformer, lora)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint {folder} has LoRA weights this model lacks: {result.unexpected_keys[:3]}")
    tensors = load_file(folder / STATE_FILE)
    per_param = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            per_param.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": saved["param_groups"]})
    scaler.load_state_dict(saved["scaler"])
    if tracker is not None:
        tracker.load_state_dict({**saved["tracker"], **{k.removeprefix("tracker."): v for k, v in tensors.items()
                                                        if k.startswith("tracker.")}})
    if ema is not None and saved["ema_steps"] is not None:  # a run saved without EMA starts it afresh
        for i, average in enumerate(ema.average):
            average.copy_(tensors[f"ema.{i}"])
        ema.steps = saved["ema_steps"]
    return saved["iteration"]
