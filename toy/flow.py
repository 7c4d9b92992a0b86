"""The 2D toy task: a conditional flow on a ring of Gaussian modes, pretrained by flow matching.

A pool of 32 "prompts" shares 8 modes on a ring (radius 2, std 0.15). Prompt c targets mode
c mod 8: its data put weight p_c on that mode and spread the rest evenly over the other 7,
with p_c graded geometrically from 0.9 (prompt 0, already solved) down to 0.02 (prompt 31,
hard), so every mode has an easy, two middling and a hard prompt. Two rewards ask for points
on the target mode, both in [0, 1] (the range SuperFlow's tracker is told):
  bump  a Gaussian bump of width 0.25, shifted and rescaled so that it is 1 at the centre and
        exactly 0 beyond 3 widths (0.75, half-way to the next mode): continuous, a stand-in
        for OCR- and preference-like rewards;
  hit   1 within 0.3 of the target mode's centre (two mode stds), else 0: a success reward,
        a stand-in for GenEval-like checks, whose mean is a success rate.
A sample on a wrong mode scores exactly 0 under both, as an unreadable word does under OCR,
so a group can carry no signal at all (zero_std_ratio), the waste SuperFlow's sampling is
meant to avoid.

Early denoising steps choose the mode (composition), late steps place the point (detail), and
the prompts differ in how uncertain their reward is: each paper's idea has something to act
on. The pretrained model is cached on disk, keyed by its settings, so reruns skip pretraining.
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

NUM_MODES, NUM_PROMPTS = 8, 32  # modes on the ring; prompts in the pool
RADIUS, MODE_STD, REWARD_WIDTH, REWARD_CUT, HIT_RADIUS = 2.0, 0.15, 0.25, 3.0, 0.3
REWARDS = ("bump", "hit")
CACHE = Path(__file__).resolve().parent / ".cache"


def mode_centres():
    angle = 2 * math.pi * torch.arange(NUM_MODES) / NUM_MODES
    return RADIUS * torch.stack([angle.cos(), angle.sin()], 1)


def target_mode(prompts):
    return torch.as_tensor(prompts) % NUM_MODES


def own_mode_weights(p_easy=0.9, p_hard=0.02):
    """p_c, geometric from easy (prompt 0) to hard (prompt 31): 0.90, 0.80, 0.70, ..., 0.02."""
    return p_easy * (p_hard / p_easy) ** (torch.arange(NUM_PROMPTS) / (NUM_PROMPTS - 1))


def sample_data(prompts, generator=None):
    """Clean samples x0 of each prompt's mixture -> [B, 2]."""
    p = own_mode_weights()[prompts]
    probs = ((1 - p) / (NUM_MODES - 1))[:, None].repeat(1, NUM_MODES)
    probs[torch.arange(len(prompts)), target_mode(prompts)] = p
    modes = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return mode_centres()[modes] + MODE_STD * torch.randn(len(prompts), 2, generator=generator)


def reward(x, prompts, kind="bump"):
    """bump: R(x | c) = max(0, (exp(-d^2 / 2w^2) - exp(-k^2 / 2)) / (1 - exp(-k^2 / 2))), d the
    distance to the target mode, w = REWARD_WIDTH, k = REWARD_CUT: the Gaussian bump minus its
    value at k widths, so it is continuous, 1 at the centre and exactly 0 from d = k w on.
    hit: R(x | c) = 1 if d < HIT_RADIUS else 0."""
    d2 = ((x.float() - mode_centres()[target_mode(prompts)]) ** 2).sum(1)
    if kind == "hit":
        return (d2 < HIT_RADIUS**2).float()
    floor = math.exp(-REWARD_CUT**2 / 2)
    return ((torch.exp(-d2 / (2 * REWARD_WIDTH**2)) - floor) / (1 - floor)).clamp_min(0)


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
    settings = dict(steps=steps, batch=batch, lr=lr, width=width, depth=depth, seed=seed, prompts=NUM_PROMPTS,
                    modes=NUM_MODES)
    path = CACHE / f"base-{hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]}.safetensors"
    torch.manual_seed(seed)
    model = ToyVelocity(width, depth)
    if cache and path.exists():
        model.load_state_dict(load_file(path))
        return model.eval()
    gen = torch.Generator().manual_seed(seed)
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
