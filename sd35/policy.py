"""The SD3.5 policy as minflow sees it, a velocity function: a peft LoRA on the transformer's
joint-attention projections is the trainable policy, the adapter switched off the reference for the
KL term. Model plumbing, and the batching that lets scoring overlap sampling: the rollout in chunks
and the intermediate rewards in passes. The RL math stays in minflow.py."""
import gc
import hashlib
import json
import math
import os
import socket
import struct
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig
from safetensors import safe_open

import cli
import minflow

# The joint-attention projections of every MMDiT block: image-stream q/k/v/out and the text
# stream's add_*_proj / to_add_out (the dual-attention blocks' attn2 is left frozen).
LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
T5_TOKENS = 256  # T5 tokens a prompt, as Flow-GRPO (CLIP's 77 come on top)
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def add_lora(transformer, rank, alpha):
    """Attach a fresh LoRA (gaussian A, zero B: the policy starts as the reference), its weights
    in float32 whatever the base weights' dtype, for stable Adam updates."""
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGETS))
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


class LoraEMA:
    """A moving average of the LoRA weights, updated every `every` optimiser steps and evaluated in
    their place (Flow-GRPO's default): the recent policy, not the last noisy step. `applied()` swaps
    it in for a while; training samples with the live weights."""

    def __init__(self, params, decay=0.9, every=8):
        self.params, self.decay, self.every = params, decay, every
        self.average = [p.detach().clone() for p in params]
        self.steps = 0

    @torch.no_grad()
    def step(self):  # after each optimiser step that changed the weights
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


def sigma_grid(scheduler, num_steps):
    """minflow's sigma grid of `num_steps` steps with the shift of the pipeline's own scheduler."""
    return minflow.sd3_sigmas(num_steps, scheduler.config.shift, scheduler.config.num_train_timesteps)


def reference_velocity(transformer, velocity):
    """The reference policy: `velocity`, a function of `transformer`, with the LoRA switched off."""
    def reference(*args):
        transformer.disable_adapters()
        try:
            return velocity(*args)
        finally:
            transformer.enable_adapters()
    return reference


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

    def apply(self, fn):
        return PromptEmbeddings(*(None if t is None else fn(t) for t in
                                  (self.embeds, self.pooled, self.negative_embeds, self.negative_pooled)))


@torch.no_grad()
def encode_prompts(pipe, prompts, guidance_scale, device):
    """Embed the prompts without gradients; the empty negative prompt only with CFG. T5 sees T5_TOKENS
    tokens, or fewer where the model's tokenizer says so (a model trained on short prompts)."""
    cfg, max_sequence_length = guidance_scale > 1, min(T5_TOKENS, pipe.tokenizer_3.model_max_length)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompts, prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=cfg,
        negative_prompt=[""] * len(prompts) if cfg else None, max_sequence_length=max_sequence_length)
    return PromptEmbeddings(embeds, pooled, negative[:1] if cfg else None, negative_pooled[:1] if cfg else None)


class PromptBank:
    """The conditioning of a fixed list of prompts, `bank(index) -> PromptEmbeddings` on `device`.
    Without a `folder` the text encoders encode each request. With one, every prompt is embedded
    once into a safetensors file there, named by a hash of the model, the prompts and the dtype:
    local rank 0 of each node writes it unless an earlier run did, every rank reads the rows it
    needs, and the text encoders leave the accelerator. Host memory holds a batch of rows at a
    time, however many prompts there are; nothing is pinned, since nothing is copied asynchronously."""

    def __init__(self, pipe, prompts, guidance_scale, device, batch_size, folder=None, model=""):
        self.pipe, self.prompts, self.guidance_scale, self.device, self.rows = pipe, prompts, guidance_scale, device, None
        if folder is None:
            return
        key = json.dumps([model, prompts, str(pipe.transformer.dtype), T5_TOKENS]).encode()
        self.path = Path(folder) / f"prompt-embeddings-{hashlib.sha256(key).hexdigest()[:16]}.safetensors"
        if int(os.environ.get("LOCAL_RANK", 0)) == 0 and not self.path.exists():
            write_embeddings(pipe, prompts + [""], device, batch_size, self.path)  # "": CFG's negative prompt
        if dist.is_initialized():
            dist.barrier()  # the other ranks wait for the file
        table = safe_open(self.path, "pt")
        self.rows, self.shape = table.get_slice("rows"), [int(n) for n in table.metadata()["embeds"].split(",")]
        self.negative = self.read([len(prompts)]) if guidance_scale > 1 else (None, None)
        for name in TEXT_ENCODERS:
            setattr(pipe, name, None)
        gc.collect()
        torch.cuda.empty_cache()  # a no-op where CUDA never started

    def read(self, index):
        """(embeds, pooled) of the prompts `index` from the file, a read a row."""
        rows = torch.cat([self.rows[i:i + 1] for i in index])
        return rows[:, :self.shape[0] * self.shape[1]].unflatten(1, self.shape), rows[:, self.shape[0] * self.shape[1]:]

    def __call__(self, index):
        if self.rows is None:
            return encode_prompts(self.pipe, [self.prompts[i] for i in index.tolist()], self.guidance_scale, self.device)
        return PromptEmbeddings(*self.read(index.tolist()), *self.negative).apply(lambda t: t.to(self.device))


@torch.no_grad()
def write_embeddings(pipe, prompts, device, batch_size, path):
    """Embed `prompts` batch by batch into a safetensors file of one row a prompt (its token
    embeddings, then its pooled embedding), under a temporary name renamed once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")  # nodes may share the folder
    with open(temporary, "wb") as f:
        for start in range(0, len(prompts), batch_size):
            part = encode_prompts(pipe, prompts[start:start + batch_size], 1.0, device)
            rows = torch.cat([part.embeds.flatten(1), part.pooled], 1).cpu()
            if start == 0:  # the header: the shape of the whole table, known from the first batch
                table = {"dtype": SAFETENSORS_DTYPES[rows.dtype], "shape": [len(prompts), rows.shape[1]],
                         "data_offsets": [0, len(prompts) * rows[0].nbytes]}
                embeds = ",".join(map(str, part.embeds.shape[1:]))
                header = json.dumps({"__metadata__": {"embeds": embeds}, "rows": table}).encode()
                header += b" " * (-len(header) % 8)
                f.write(struct.pack("<Q", len(header)) + header)
            f.write(rows.view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    cli.fsync_dir(path.parent)


def guided_velocity(model, cond, guidance_scale, dtype, batch_size=None, autocast=None):
    """minflow's `velocity(x, t, traj_index)` for the transformer `model` under CFG,
    v = v_uncond + w (v_text - v_uncond), both branches in one batch as diffusers does, in forward
    passes of at most `batch_size` rows; traj_index picks each row's prompt in `cond` (default row
    i, prompt i). t is sigma (the transformer wants sigma * 1000); float32 out for minflow's math."""
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

    def velocity(x, t, traj_index=None):
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(x.shape[0])
        rows = (torch.arange(x.shape[0]) if traj_index is None else traj_index).to(cond.embeds.device)
        step = batch_size or x.shape[0]
        return torch.cat([forward(x[i:i + step], t[i:i + step], rows[i:i + step]) for i in range(0, x.shape[0], step)])

    return velocity


@torch.no_grad()
def decode(vae, latents, batch_size=None):
    """Latents -> images [B, 3, H, W] in [0, 1], float32, in chunks of `batch_size`, in the VAE's
    own dtype (float32, see models.load_pipeline) even inside an autocast region."""
    images = []
    with torch.autocast(latents.device.type, enabled=False):
        for chunk in latents.split(batch_size or latents.shape[0]):
            z = chunk.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
            images.append((vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(images)


@torch.no_grad()
def image_statistics(images):
    """Cheap alarms for reward hacking, [B] each: mean luma, the shares of near-black and near-white
    pixels, and of pixels on an edge (a luma step to a neighbour above a tenth of the range)."""
    luma = (images.float() * torch.tensor([0.299, 0.587, 0.114], device=images.device)[:, None, None]).sum(1)
    edges = torch.zeros_like(luma, dtype=torch.bool)
    edges[:, :, 1:] |= (luma[:, :, 1:] - luma[:, :, :-1]).abs() > 0.1
    edges[:, 1:, :] |= (luma[:, 1:, :] - luma[:, :-1, :]).abs() > 0.1
    share = lambda mask: mask.float().mean((1, 2)).cpu()  # noqa: E731
    return {"image_brightness": luma.mean((1, 2)).cpu(), "image_black_share": share(luma < 0.05),
            "image_white_share": share(luma > 0.95), "image_edge_density": share(edges)}


def rollout_in_chunks(velocity, x, sigmas, algo, generator, chunk, score):
    """`minflow.rollout` under `algo`'s sampler, `chunk` trajectories at a time, handing each chunk's
    final states to `score(x_T, traj_index)` at once (it may return a future: the next chunk samples
    meanwhile) -> (the Trajectory, [(traj_index, what score returned)]). The steps' noise is drawn
    for the whole batch first, as `minflow.rollout` draws it, so the trajectories are its own."""
    noise = torch.stack([torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
                         for _ in sigmas[1:]])
    parts, scores = [], []
    for rows in torch.arange(x.shape[0]).split(chunk):
        part = minflow.rollout(lambda x, t: velocity(x, t, rows), x[rows.to(x.device)], sigmas, algo.sampler,
                               algo.noise_level, noise=noise[:, rows.to(x.device)], ddim_noise=algo.ddim_noise)
        parts.append(part)
        scores.append((rows, score(part.xs[:, -1], rows)))
    xs, log_probs = torch.cat([p.xs for p in parts]), torch.cat([p.log_probs for p in parts])
    return minflow.Trajectory(xs, log_probs, parts[0].stds, parts[0].sigmas), scores


def _first_of_each_group(groups):
    """(the first trajectory of each group [num_groups], the group of each trajectory [B])."""
    _, group_of = torch.unique(torch.as_tensor(groups).cpu(), return_inverse=True)
    B = len(group_of)
    return torch.full((int(group_of.max()) + 1,), B).scatter_reduce_(0, group_of, torch.arange(B), "amin"), group_of


@torch.no_grad()
def clean_estimate_passes(velocity, traj, substeps=5, needed=None, groups=None, batch_size=None):
    """minflow.intermediate_rewards' short-ODE clean estimates, batched for the trainer: every
    needed non-final state of every trajectory, `batch_size` (trajectory, state) rows a pass
    (default: all) -> yields (traj_index [n], state_index [n], x0), to be scored while the next
    pass runs. A pass mixes trajectories and times, so `velocity(x, t, traj_index)` gets one t
    per row and each row's trajectory (its prompt). With `groups` [B] (a group shares x_1),
    state 0 is estimated once a group."""
    B, S = traj.xs.shape[:2]
    needed = torch.ones(S, dtype=torch.bool) if needed is None else torch.as_tensor(needed, dtype=torch.bool)
    first = torch.arange(B) if groups is None else _first_of_each_group(groups)[0]
    states = needed[:-1].nonzero()[:, 0].tolist()
    traj_index = torch.cat([first if k == 0 else torch.arange(B) for k in states] or [torch.zeros(0, dtype=torch.long)])
    state_index = torch.cat([torch.full((len(first) if k == 0 else B,), k) for k in states] or [traj_index])
    rows_per_pass = batch_size or max(len(traj_index), 1)
    for i in range(0, len(traj_index), rows_per_pass):
        b, k = traj_index[i:i + rows_per_pass], state_index[i:i + rows_per_pass]
        x = traj.xs[b.to(traj.xs.device), k.to(traj.xs.device)]
        yield b, k, minflow.short_ode_x0(lambda x, t: velocity(x, t, b), x, traj.sigmas[k].to(x.device), substeps)


def reward_table(num_states, scored, final, groups=None):
    """The [B, T+1] table of r_k, as minflow.intermediate_rewards returns it, from the scored
    passes [(traj_index, state_index, rewards)] and the final rewards [B]; states never scored
    stay NaN. With `groups`, r_0 is copied group-wide."""
    table = torch.full((len(final), num_states), math.nan)
    table[:, -1] = final.float().cpu()
    for b, k, r in scored:
        table[b, k] = torch.as_tensor(r).float().cpu()
    if groups is not None:
        first, group_of = _first_of_each_group(groups)
        table[:, 0] = table[first[group_of], 0]
    return table
