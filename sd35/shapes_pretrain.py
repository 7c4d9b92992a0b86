"""Pretrain --model=shapes from scratch: its VAE on rendered shapes, then its MMDiT by rectified flow
on the train prompts of sd35/prompts/shapes (the test prompts' combinations are never shown); save
the diffusers folder with its loss curves, and evaluate it as sd35/train.py does at iteration 0.

    python sd35/shapes_pretrain.py                          # rebuilds sd35/shapes_model/
    python sd35/shapes_pretrain.py --out=runs/my_shapes     # elsewhere; then --model=runs/my_shapes
"""
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
from cli import flag, text_range  # noqa: E402
from sd35 import models, policy, shapes, train  # noqa: E402
from sd35.curves import read_log  # noqa: E402
from sd35.data import load_prompts  # noqa: E402
from toy import plots  # noqa: E402  (first: it chooses matplotlib's backend)
import matplotlib.pyplot as plt  # noqa: E402

SHIFT = 3.0  # SD3's timestep shift, as the saved scheduler and minflow.sd3_sigmas use it
JITTER = 0.02  # each render moves its shape by up to 2 % of the width


@dataclass
class Settings:
    out: str = flag(str(models.SHIPPED["shapes"]), text_range("a folder"))  # where the diffusers folder goes
    vae_steps: int = flag(4000, "[1, inf)")  # VAE optimiser steps (fewer round the corners that tell squares from circles)
    vae_batch: int = flag(8, "[1, inf)")  # images per VAE step (small batches learn more per image here)
    vae_lr: float = flag(6e-3, "(0, 1]")  # the VAE's peak AdamW learning rate (cosine decay)
    steps: int = flag(2000, "[1, inf)")  # transformer optimiser steps
    batch: int = flag(64, "[1, inf)")  # latents per transformer step
    renders: int = flag(16, "[1, inf)")  # renders of each train prompt, encoded once, that the transformer learns
    lr: float = flag(1e-3, "(0, 1]")  # the transformer's peak AdamW learning rate (cosine decay)
    cfg_dropout: float = flag(0.1, "[0, 1)")  # share of prompts swapped for the empty one: CFG's unconditional branch
    seed: int = flag(0, "[0, 1e18]")  # seeds the weights, the renders and the noise


def build(seed):
    """The untrained pipeline: shapes.configs() with random weights (the text encoders stay so: frozen
    random features of the words), word tokenizers, SD3's scheduler."""
    parts = models.build_parts(shapes.configs(), "cpu", torch.float32, seed)
    clip, t5 = (models.char_tokenizer(shapes.TEXT_LENGTH, bos, shapes.WORDS) for bos in (True, False))
    return StableDiffusion3Pipeline(**parts, scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), tokenizer=clip,
                                    tokenizer_2=clip, tokenizer_3=t5)


def optimise(module, steps, lr, loss_of, desc):
    """AdamW on `module` for `steps` steps of `loss_of()`, the learning rate on a cosine -> the losses."""
    module.requires_grad_(True).train()
    optimiser = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses = []
    for _ in (bar := tqdm(range(steps), desc=desc)):
        loss = loss_of()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    module.requires_grad_(False).eval()
    return losses


def train_vae(vae, s, generator):
    """Reconstruction (MSE) plus a small KL, as SD's VAEs weigh it, on any scene anywhere in its cell."""
    def loss_of():
        scenes = [torch.randint(len(k), (s.vae_batch,), generator=generator)
                  for k in (shapes.COLOURS, shapes.SHAPES, shapes.PLACES)]
        images = shapes.render(scenes, 64, generator, jitter=1 / 6) * 2 - 1
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        return torch.nn.functional.mse_loss(recon, images) + 1e-6 * posterior.kl().mean()
    return optimise(vae, s.vae_steps, s.vae_lr, loss_of, "VAE")


def train_transformer(pipe, s, generator):
    """Rectified flow on the train prompts: x_t = (1 - t) x0 + t noise, the transformer predicts
    noise - x0, t logit-normal then shifted as SD3 trains; a prompt is dropped for the empty one
    with probability cfg_dropout, so that classifier-free guidance has an unconditional model."""
    prompts = [p for p, _ in load_prompts("shapes")[0]]
    index = torch.arange(len(prompts)).repeat(s.renders)
    scenes = torch.tensor([shapes.parse(p) for p in prompts])[index]
    with torch.no_grad():  # the data, encoded once
        bank = torch.cat([pipe.vae.encode(shapes.render(part.T, 64, generator, jitter=JITTER) * 2 - 1)
                          .latent_dist.sample(generator) for part in scenes.split(256)])
    # Latents of unit variance around their mean: the job of the VAE's shift and scaling factors.
    pipe.vae.register_to_config(shift_factor=bank.mean().item(), scaling_factor=1 / bank.std().item())
    bank = (bank - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    cond = policy.encode_prompts(pipe, prompts, guidance_scale=2.0, device="cpu")  # with the empty prompt's

    def loss_of():
        rows = torch.randint(len(index), (s.batch,), generator=generator)
        x0, pick = bank[rows], index[rows]
        u = torch.sigmoid(torch.randn(s.batch, generator=generator))[:, None, None, None]
        t = SHIFT * u / (1 + (SHIFT - 1) * u)
        noise = torch.randn(x0.shape, generator=generator)
        drop = torch.rand(s.batch, generator=generator) < s.cfg_dropout
        v = pipe.transformer(hidden_states=(1 - t) * x0 + t * noise, timestep=t.flatten() * 1000,
                             encoder_hidden_states=torch.where(drop[:, None, None], cond.negative_embeds,
                                                               cond.embeds[pick]),
                             pooled_projections=torch.where(drop[:, None], cond.negative_pooled, cond.pooled[pick]),
                             return_dict=False)[0]
        return torch.nn.functional.mse_loss(v, noise - x0)
    return optimise(pipe.transformer, s.steps, s.lr, loss_of, "transformer")


def loss_figure(vae_losses, losses, path):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, values, title in zip(axes, (vae_losses, losses), ("VAE: reconstruction MSE", "MMDiT: flow-matching MSE")):
        ax.plot(values, alpha=0.3)
        ax.plot(np.convolve(values, np.ones(50) / 50, mode="valid"), label="mean of 50 steps")
        ax.set(yscale="log", xlabel="step", title=title)
    axes[0].legend()
    plots.save(fig, path)


def main(argv):
    try:
        s = cli.read_flags(Settings, argv)
    except ValueError as error:
        sys.exit(f"error: {error}")
    start, out = time.perf_counter(), Path(s.out)
    generator = torch.Generator().manual_seed(s.seed)
    pipe = build(s.seed)
    vae_losses, losses = train_vae(pipe.vae, s, generator), train_transformer(pipe, s, generator)
    pipe.save_pretrained(out)
    seconds = time.perf_counter() - start
    loss_figure(vae_losses, losses, out / "loss.png")
    with tempfile.TemporaryDirectory() as folder:  # the held-out evaluation sd35/train.py logs at iteration 0
        train.main([f"--model={out}", "--eval_only", f"--out={folder}", *(f"--{k}={v}" for k, v in
                    shapes.TRAIN_DEFAULTS.items() if k.startswith(("eval_", "guidance", "reward", "prompts")))])
        base = read_log(Path(folder) / "log.jsonl")[-1]
        shutil.copy(Path(folder) / "eval" / "iter_000000.png", out / "samples.png")
    record = {"command": " ".join(["python sd35/shapes_pretrain.py", *argv]), "seconds": round(seconds),
              "torch_threads": torch.get_num_threads(), **{k: round(v, 4) for k, v in base.items() if "reward" in k}}
    cli.atomic_write(out / "pretraining.json", (json.dumps(record, indent=1) + "\n").encode())
    print(f"trained in {seconds:.0f} s; held-out reward {base['eval_reward']:.3f} (colour "
          f"{base['eval_reward_shapes_colour']:.3f}, place {base['eval_reward_shapes_place']:.3f}, shape "
          f"{base['eval_reward_shapes_shape']:.3f}); wrote {out}")
    return vae_losses, losses


if __name__ == "__main__":
    main(sys.argv[1:])
