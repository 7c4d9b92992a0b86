"""The SD3.5 policy as minflow sees it: a velocity function.

A diffusers StableDiffusion3Pipeline supplies the parts; a peft LoRA on the transformer's
joint-attention projections is the trainable policy; the same transformer with the adapter
switched off is the reference policy for the KL term. Everything here is model plumbing:
the RL math stays in minflow.py.
"""
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from peft import LoraConfig

import minflow

# The joint-attention projections of every MMDiT block: image-stream q/k/v/out and the text
# stream's add_*_proj / to_add_out (the dual-attention blocks' attn2 is left frozen).
LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


def add_lora(transformer, rank, alpha):
    """Attach a fresh LoRA (gaussian A, zero B: the policy starts equal to the reference);
    its weights stay in float32 whatever the base weights' dtype, for stable Adam updates."""
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGETS))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


class LoraEMA:
    """An exponential moving average of the LoRA weights, evaluated in their place (Flow-GRPO's
    default: decay 0.9, one update every 8 optimiser steps): evaluation then reflects the
    recent policy rather than the last noisy step. Training always samples with the live
    weights; only `applied()` swaps the average in, and swaps the live weights back after."""

    def __init__(self, params, decay=0.9, every=8):
        self.params, self.decay, self.every = params, decay, every
        self.average = [p.detach().clone() for p in params]
        self.steps = 0

    @torch.no_grad()
    def step(self):
        """Call after each optimiser step that changed the weights."""
        self.steps += 1
        if self.steps % self.every == 0:
            for average, p in zip(self.average, self.params):
                average.lerp_(p.detach(), 1 - self.decay)

    @contextmanager
    @torch.no_grad()
    def applied(self):
        live = [p.detach().clone() for p in self.params]
        for p, average in zip(self.params, self.average):
            p.copy_(average)
        try:
            yield
        finally:
            for p, weights in zip(self.params, live):
                p.copy_(weights)


@contextmanager
def adapter_disabled(transformer):
    """The reference policy: the same weights with the LoRA switched off."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


@dataclass
class PromptEmbeddings:
    """Text conditioning, one row per prompt; `select(index)` gives one row per sample."""
    embeds: torch.Tensor  # [P, L, D] joint CLIP + T5 token embeddings
    pooled: torch.Tensor  # [P, 2048] pooled CLIP embeddings
    negative_embeds: torch.Tensor | None  # [1, L, D] the empty prompt, for CFG (None without CFG)
    negative_pooled: torch.Tensor | None

    def select(self, index):
        index = index.to(self.embeds.device)
        return PromptEmbeddings(self.embeds[index], self.pooled[index], self.negative_embeds, self.negative_pooled)


@torch.no_grad()
def encode_prompts(pipe, prompts, guidance_scale, device, max_sequence_length=256):
    """Embed the prompts once, without gradients; the empty negative prompt only with CFG."""
    cfg = guidance_scale > 1
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=cfg,
        negative_prompt=[""] * len(prompts) if cfg else None, max_sequence_length=max_sequence_length)
    if not cfg:
        return PromptEmbeddings(embeds, pooled, None, None)
    return PromptEmbeddings(embeds, pooled, negative[:1], negative_pooled[:1])


def guided_velocity(model, cond, guidance_scale, dtype, batch_size=None, autocast=None):
    """minflow's `velocity(x, t)` for the transformer `model` (plain or DDP-wrapped) under
    classifier-free guidance v = v_uncond + w (v_text - v_uncond), with the unconditional and
    conditional branches in one batch as diffusers does. t is sigma (0-d or [B]); the
    transformer wants sigma * 1000. Returns float32, so minflow's step math runs in float32.
    Inputs larger than `batch_size` rows run in chunks (each chunk is one forward pass).
    `velocity(x, t, rows)` says which of `cond`'s prompts x's rows belong to (default: row i
    to prompt i), the form minflow.step_rewards and rollout_in_chunks call with."""
    cfg = guidance_scale > 1
    autocast = autocast or nullcontext

    def forward(x, t, rows):
        embeds, pooled = cond.embeds[rows], cond.pooled[rows]
        if cfg:
            n = x.shape[0]
            x, t = torch.cat([x, x]), torch.cat([t, t])
            embeds = torch.cat([cond.negative_embeds.expand(n, -1, -1), embeds])
            pooled = torch.cat([cond.negative_pooled.expand(n, -1), pooled])
        with autocast():
            out = model(hidden_states=x.to(dtype), timestep=t * 1000, encoder_hidden_states=embeds,
                        pooled_projections=pooled, return_dict=False)[0].float()
        if not cfg:
            return out
        uncond, text = out.chunk(2)
        return uncond + guidance_scale * (text - uncond)

    def velocity(x, t, rows=None):
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])
        rows = torch.arange(x.shape[0]) if rows is None else rows
        rows = rows.to(cond.embeds.device)
        step = batch_size or x.shape[0]
        return torch.cat([forward(x[i:i + step], t[i:i + step], rows[i:i + step]) for i in range(0, x.shape[0], step)])

    return velocity


@torch.no_grad()
def decode(vae, latents, batch_size=None):
    """Latents -> images [B, 3, H, W] in [0, 1], float32, in chunks of `batch_size`."""
    step = batch_size or latents.shape[0]
    images = []
    for chunk in latents.split(step):
        z = chunk.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images.append((vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(images)


def step_noise(shape, steps, generator=None, device=None):
    """The noise `minflow.rollout` draws, drawn beforehand -> [steps, *shape]: the same calls
    in the same order (one per step), so the same values on any device."""
    return torch.stack([torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
                        for _ in range(steps)])


def rollout_in_chunks(velocity, x, sigmas, sampler, noise_level, generator, chunk, score):
    """`minflow.rollout`, `chunk` trajectories at a time, handing each chunk's final states to
    `score(x_T, rows)` as soon as they exist -> (the whole batch's Trajectory, [(rows, what
    score returned)] in chunk order). `score` may return a future: the next chunk is then
    sampled while this one is scored elsewhere (the trainer's OCR workers), and the caller
    collects the results when it needs them. `velocity(x, t, rows)` is told which
    trajectories it moves (to pick their prompts).

    The steps' noise is drawn for the whole batch before the first chunk, exactly as
    `minflow.rollout` draws it, so the trajectories do not depend on the chunk: they are
    bitwise `minflow.rollout`'s when the velocity splits its forward passes at the same rows
    (the trainer's does, with chunk = its forward batch)."""
    noise = step_noise(x.shape, len(sigmas) - 1, generator, x.device)
    parts, scores = [], []
    for rows in torch.arange(x.shape[0]).split(chunk):
        part = minflow.rollout(lambda x, t: velocity(x, t, rows), x[rows.to(x.device)], sigmas, sampler,
                               noise_level, noise=noise[:, rows.to(x.device)])
        parts.append(part)
        scores.append((rows, score(part.xs[:, -1], rows)))
    xs, log_probs = torch.cat([p.xs for p in parts]), torch.cat([p.log_probs for p in parts])
    return minflow.Trajectory(xs, log_probs, parts[0].stds, parts[0].sigmas), scores
