"""The 2D toy task: a conditional flow on a ring of Gaussian modes, pretrained by flow matching.

K "prompts" share 8 modes on a ring (radius 2, std 0.15). Prompt c puts weight p_c on its own
mode c and spreads the rest evenly over the others, with p_c from 0.9 (already solved) down
to 0.02 (hard). The reward exp(-|x - mu_c|^2 / (2 0.25^2)) asks for points on mode c. Early
denoising steps choose the mode (composition), late steps place the point (detail), and the
prompts differ in how uncertain their reward is: each paper's idea has something to act on.
The pretrained model is cached on disk, keyed by its settings, so reruns skip pretraining.
"""
import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn
from tqdm import tqdm

import cli

NUM_PROMPTS = 8
RADIUS, MODE_STD, REWARD_WIDTH = 2.0, 0.15, 0.25
CACHE = Path(__file__).resolve().parent / ".cache"


def mode_centres():
    angle = 2 * math.pi * torch.arange(NUM_PROMPTS) / NUM_PROMPTS
    return RADIUS * torch.stack([angle.cos(), angle.sin()], 1)


def own_mode_weights(p_easy=0.9, p_hard=0.02):
    """p_c, geometric from easy to hard: 0.90 0.52 0.30 0.17 0.10 0.06 0.03 0.02."""
    return p_easy * (p_hard / p_easy) ** (torch.arange(NUM_PROMPTS) / (NUM_PROMPTS - 1))


def sample_data(prompts, generator=None):
    """Clean samples x0 of each prompt's mixture -> [B, 2]."""
    p = own_mode_weights()[prompts]
    probs = ((1 - p) / (NUM_PROMPTS - 1))[:, None].repeat(1, NUM_PROMPTS)
    probs[torch.arange(len(prompts)), prompts] = p
    modes = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return mode_centres()[modes] + MODE_STD * torch.randn(len(prompts), 2, generator=generator)


def reward(x, prompts):
    """R(x | c) = exp(-|x - mu_c|^2 / (2 w^2)) in [0, 1]."""
    d2 = ((x.float() - mode_centres()[prompts]) ** 2).sum(1)
    return torch.exp(-d2 / (2 * REWARD_WIDTH**2))


class ToyVelocity(nn.Module):
    """v(x, t, prompt): a residual MLP over x, Fourier features of t and a prompt embedding."""

    def __init__(self, width=128, depth=3, num_freqs=8):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(num_freqs).float())
        self.inp = nn.Linear(2 + 2 * num_freqs, width)
        self.prompt = nn.Embedding(NUM_PROMPTS, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(width, width)) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(width, 2))

    def forward(self, x, t, prompts):
        t = torch.as_tensor(t, dtype=torch.float32).expand(x.shape[0])[:, None] * self.freqs
        h = self.inp(torch.cat([x, t.sin(), t.cos()], 1)) + self.prompt(prompts)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def pretrain(steps=4000, batch=1024, lr=2e-3, width=128, depth=3, seed=0, cache=True):
    """Flow matching: regress v = eps - x0 at x_t = (1 - t) x0 + t eps, t ~ U(0, 1)."""
    settings = dict(steps=steps, batch=batch, lr=lr, width=width, depth=depth, seed=seed)
    path = CACHE / f"base-{hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]}.safetensors"
    model = ToyVelocity(width, depth)
    if cache and path.exists():
        model.load_state_dict(load_file(path))
        return model.eval()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ToyVelocity(width, depth)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in tqdm(range(steps), desc="pretrain base flow", leave=False):
        prompts = torch.randint(NUM_PROMPTS, (batch,), generator=gen)
        x0, eps = sample_data(prompts, gen), torch.randn(batch, 2, generator=gen)
        t = torch.rand(batch, generator=gen)
        xt = (1 - t[:, None]) * x0 + t[:, None] * eps
        loss = ((model(xt, t, prompts) - (eps - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    if cache:
        CACHE.mkdir(exist_ok=True)
        cli.atomic_write(path, save(model.state_dict()))
    return model.eval()
