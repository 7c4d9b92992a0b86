"""Checkpoints: one folder per iteration, `OUT/checkpoints/iter_000020/`, holding

    pytorch_lora_weights.safetensors   the LoRA in diffusers' format: pipe.load_lora_weights(folder)
    trainer_state.pt                   optimiser, grad scaler, SuperFlow tracker, iteration (tensors
                                       and numbers only, read back with torch.load(weights_only=True))
    run.json                           what the checkpoint belongs to: model, LoRA rank, algorithm

A folder is written under a temporary name and renamed when complete, so a crash while saving
leaves the previous checkpoint intact and no half-written one that looks complete. The random
state needs no saving: every random draw of iteration i comes from generators seeded with
(seed, i, rank), so resuming at iteration i draws exactly what an uninterrupted run would.
"""
import json
import os
import shutil
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

LORA_FILE, STATE_FILE, RUN_FILE = "pytorch_lora_weights.safetensors", "trainer_state.pt", "run.json"


def _fsync_tree(folder):
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(run_dir, iteration, transformer, optimizer, scaler, tracker, identity):
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
    torch.save({"iteration": iteration, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "tracker": None if tracker is None else tracker.state_dict()}, tmp / STATE_FILE)
    (tmp / RUN_FILE).write_text(json.dumps({**identity, "iteration": iteration}, indent=1))
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def newest(path):
    """The newest complete checkpoint: `path` itself if it is one, else the highest-numbered one
    under `path/checkpoints/`; None if there is none."""
    path = Path(path)
    if (path / RUN_FILE).exists():
        return path
    done = sorted(p for p in (path / "checkpoints").glob("iter_*") if p.suffix != ".tmp" and (p / RUN_FILE).exists())
    return done[-1] if done else None


def load(folder, transformer, optimizer, scaler, tracker, identity):
    """Restore a checkpoint into the live objects; returns the iteration to continue from.
    Refuses (one line) a checkpoint made for another model, LoRA rank or algorithm."""
    saved = json.loads((folder / RUN_FILE).read_text())
    for key, value in identity.items():
        if saved.get(key) != value:
            raise ValueError(f"checkpoint {folder} was made with {key}={saved.get(key)!r}, this run has {value!r}")
    lora = {k.removeprefix("transformer."): v for k, v in load_file(folder / LORA_FILE).items()}
    result = set_peft_model_state_dict(transformer, lora)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint {folder} has LoRA weights this model lacks: {result.unexpected_keys[:3]}")
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if tracker is not None:
        tracker.load_state_dict(state["tracker"])
    return state["iteration"]
