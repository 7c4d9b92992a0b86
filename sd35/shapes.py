"""The shapes testbed, in the spirit of GenEval: prompts such as "a red circle in the top left",
their rendered ground truth, a rule-based reward that checks colour, place and shape, and the
configuration of `--model=shapes`, SD3.5-Medium's architecture at a size a laptop trains in minutes.

Images live in [0, 1] coordinates (x to the right, y down), so everything here works at any
resolution. Every shape is drawn in a box of half-side HALF around its place's centre.
"""
import math

import torch
from transformers import CLIPTextConfig, T5Config

from sd35 import models

COLOURS = {"red": (0.86, 0.16, 0.16), "green": (0.16, 0.71, 0.24), "blue": (0.2, 0.31, 0.9),
           "yellow": (0.9, 0.82, 0.16)}
BACKGROUND = (0.0, 0.0, 0.0)
SHAPES = ("circle", "square", "triangle")
# A 3 x 3 grid of places, row by row from the top left.
PLACES = ("in the top left", "at the top", "in the top right", "on the left", "in the middle", "on the right",
          "in the bottom left", "at the bottom", "in the bottom right")
HALF = 0.11
WORDS = sorted({w for phrase in (*COLOURS, *SHAPES, *PLACES, "a") for w in phrase.split()})
TEXT_LENGTH = 10  # tokens: "a yellow triangle in the bottom right" is 7 words, with <bos> and <eos>

# The reward's tolerances, in image widths or IoU: a place within TOLERANCE of the target counts
# fully and credit falls to 0 over RAMP (a neighbouring place is a third of the width away);
# the shape's IoU must beat the best other shape's by MARGIN for full credit, which a rendered
# circle does against a square of the same box (pi/4 apart: 0.21).
TOLERANCE, RAMP, MARGIN, COLOUR_DISTANCE = 0.03, 0.15, 0.15, 0.15
# Each shape's centroid below its box centre: the triangle (apex up) has a third of its height below.
CENTROID_DROP = torch.tensor([0.0, 0.0, HALF / 3])
AREAS = torch.tensor([math.pi, 4.0, 2.0]) * HALF**2  # of each shape, in image widths squared


def parse(text):
    """A prompt -> (colour, shape, place) indices, or a ValueError naming what is missing."""
    words = text.lower().split()
    colour = [i for i, c in enumerate(COLOURS) if c in words]
    shape = [i for i, s in enumerate(SHAPES) if s in words]
    place = [i for i, p in enumerate(PLACES) if " ".join(words).endswith(p)]
    if len(colour) != 1 or len(shape) != 1 or len(place) != 1:
        raise ValueError(f"{text!r} is not a shapes prompt; expected e.g. 'a red circle {PLACES[0]}'")
    return colour[0], shape[0], place[0]


def centre(place):
    """[..., 2] (x, y) centre of places [...]: the middle of their cell of the 3 x 3 grid."""
    return torch.stack([place % 3, place // 3], -1).float() / 3 + 1 / 6


def masks(shape, box_centre, side, supersample=1):
    """Coverage [B, side, side] in [0, 1] of shapes [B] with their boxes centred at [B, 2];
    supersampling anti-aliases the edges."""
    n = side * supersample
    grid = (torch.arange(n) + 0.5) / n
    dx = (grid[None, None, :] - box_centre[:, 0, None, None]).abs()
    dy = grid[None, :, None] - box_centre[:, 1, None, None]
    inside = torch.stack([dx**2 + dy**2 <= HALF**2, (dx <= HALF) & (dy.abs() <= HALF),
                          (dy <= HALF) & (2 * dx <= dy + HALF)], 1)[torch.arange(len(shape)), shape]
    return torch.nn.functional.avg_pool2d(inside[:, None].float(), supersample)[:, 0]


def render(parsed, side, generator=None, jitter=0.0):
    """Images [B, 3, side, side] of (colour, shape, place) index tensors [B] each, every box centre
    moved by up to `jitter` (image widths) at random."""
    colour, shape, place = parsed
    offset = (torch.rand(len(shape), 2, generator=generator) * 2 - 1) * jitter
    cover = masks(shape, centre(place) + offset, side, supersample=4)[:, None]
    palette = torch.tensor(list(COLOURS.values()))[colour][:, :, None, None]
    return cover * palette + (1 - cover) * torch.tensor(BACKGROUND)[:, None, None]


def reward(images, prompts, metadata=None):
    """--reward=shapes: (total, {"colour", "place", "shape"}), each [B] in [0, 1], of images [B, 3, H, W]
    against their prompts. The object is each pixel's share of the prompt's colour (against the
    background; a pixel far from every mix of the two counts 0): colour = its area against the target
    shape's, up to 1; place = how near its centroid is to the target's; shape = how much better the
    target shape's outline fits it than any other shape's. total = colour x place x shape: a wrong
    colour, place or shape each scores 0."""
    colour, shape, place = (torch.tensor(v) for v in zip(*map(parse, prompts)))
    images, side, n = images.detach().float().cpu(), images.shape[-1], len(prompts)
    background = torch.tensor(BACKGROUND)[None, :, None, None]
    ink = torch.tensor(list(COLOURS.values()))[colour][:, :, None, None] - background
    share = (((images - background) * ink).sum(1, keepdim=True) / (ink**2).sum(1, keepdim=True)).clamp(0, 1)
    near = (images - background - share * ink).square().sum(1, keepdim=True) <= COLOUR_DISTANCE**2
    obj = (share * near)[:, 0]
    area, grid = obj.sum((1, 2)), (torch.arange(side) + 0.5) / side
    centroid = torch.stack([(obj.sum(1) * grid).sum(1), (obj.sum(2) * grid).sum(1)], -1) / area.clamp(1e-6)[:, None]
    drop = lambda k: torch.stack([torch.zeros(n), CENTROID_DROP[k]], -1)  # noqa: E731
    outlines = [masks(torch.full_like(shape, k), centroid - drop(torch.full_like(shape, k)), side, 2)
                for k in range(len(SHAPES))]
    fits = torch.stack([torch.minimum(o, obj).sum((1, 2)) / torch.maximum(o, obj).sum((1, 2)).clamp(min=1e-6)
                        for o in outlines], 1)
    others = fits.scatter(1, shape[:, None], -1.0).max(1).values
    found = area > 0.5  # at least half a pixel of the colour
    distance = (centroid - centre(place) - drop(shape)).norm(dim=-1)
    terms = {"colour": (area / (AREAS[shape] * side**2)).clamp(max=1),
             "place": (1 - (distance - TOLERANCE) / RAMP).clamp(0, 1) * found,
             "shape": ((fits[torch.arange(n), shape] - others) / MARGIN).clamp(0, 1) * found}
    return terms["colour"] * terms["place"] * terms["shape"], terms


def configs():
    """{part: config} of --model=shapes: SD3.5-Medium's parts (three text encoders, an MMDiT with
    dual-attention blocks and RMS q/k-norm, a 16-channel 8x VAE) at laptop sizes, with prompts of
    TEXT_LENGTH tokens a word each."""
    tokens = dict(models.CLIP_TOKENS, max_position_embeddings=TEXT_LENGTH,
                  vocab_size=len(models.SPECIAL_TOKENS) + len(WORDS))
    clip = dict(num_attention_heads=2, num_hidden_layers=2, **tokens)
    return {
        "transformer": dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=4,
                            num_attention_heads=4, attention_head_dim=16, joint_attention_dim=64,
                            caption_projection_dim=64, pooled_projection_dim=32, pos_embed_max_size=8,
                            dual_attention_layers=(0, 1), qk_norm="rms_norm"),
        "vae": {**models.SD35_VAE_CONFIG, "block_out_channels": (8, 8, 8, 8), "layers_per_block": 1,
                "norm_num_groups": 4, "sample_size": 64},
        "text_encoder": CLIPTextConfig(hidden_size=16, intermediate_size=32, projection_dim=16, **clip),
        "text_encoder_2": CLIPTextConfig(hidden_size=32, intermediate_size=64, projection_dim=16, **clip),
        "text_encoder_3": T5Config(vocab_size=tokens["vocab_size"], d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                   num_heads=4, **models.T5_TOKENS),
    }


# sd35/train.py's defaults for --model=shapes, under any flag given: its size, not SD3.5's, sets the costs.
# No CFG: this model's images fall apart under guidance above 1. 256 trajectories (32 prompts x 8)
# per optimiser step at lr 3e-4: a step's policy gradient over 1,024 latent dimensions is mostly
# noise, and bigger batches make fewer, steadier steps; per trajectory, 64 a step learn about as
# fast here (docs/sd35.md).
TRAIN_DEFAULTS = dict(reward="shapes", prompts="shapes", out="runs/shapes", iters=100, num_steps=8, eval_num_steps=20,
                      eval_every=10, eval_images=0, group_size=8, prompts_per_iter=32, minibatches=1, train_batch=32,
                      sample_batch=64, lr=3e-4, beta=0.0, ema_decay=0.0, guidance_scale=1.0, save_every=50)
