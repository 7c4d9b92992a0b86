"""The one place that builds or loads a model (load_pipeline), what it will cost in accelerator
memory before any weight loads (memory_estimate), and the one decision of --mixed_precision.
Two models are described in code and built with random weights: "tiny", the structure of
SD3.5-Medium (three text encoders, an MMDiT with dual-attention blocks and RMS q/k-norm, a
16-channel VAE, a shifted flow-matching scheduler) at toy sizes, for tests and CPU runs, and
"sd35m-random", that architecture at its real sizes (speed and memory do not depend on weight
values). Both tokenize per character: their text encoders have no trained vocabulary to match.
The comments say which sizes must agree."""
import re
import string
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast, T5Config,
                          T5EncoderModel)

from cli import text_range
from sd35 import policy
from sd35.rewards import REWARD_MODEL_PARAMETERS

SHIPPED = {"shapes": Path(__file__).parent / "shapes_model"}  # pretrained models in the repository (sd35/shapes.py)
MODEL = text_range("tiny, sd35m-random, shapes, a local diffusers folder or a hub id (owner/name)",
                   lambda v: v in ("tiny", "sd35m-random", *SHIPPED) or v != "" and Path(v).is_dir()
                   or re.fullmatch(r"[\w.-]+/[\w.-]+", v) is not None)
MIXED_PRECISION = ("auto", "fp16", "bf16", "no")  # the --mixed_precision flag's range
RESOLUTION = text_range("0 (the model's own default) or a positive multiple of 16 (VAE 8x, patch 2)",
                        lambda v: isinstance(v, int) and v >= 0 and v % 16 == 0)  # the --resolution flag's range

# Token ids shared by all three tokenizers. CLIP pools the hidden state at the first EOS token;
# transformers treats eos_token_id == 2 as a legacy config and pools at the largest token id
# instead, so EOS must not be id 2.
SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(len(SPECIAL_TOKENS))
# Prompts are lowercased before tokenising, so lowercase letters suffice.
CHARACTERS = string.ascii_lowercase + string.digits + string.punctuation + " "
VOCAB = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
CLIP_MAX_LENGTH = 77  # SD3 pads both CLIP prompts to exactly 77 tokens
T5_MAX_LENGTH = 512  # the pipeline refuses max_sequence_length above 512 anyway
TEXT_TOKENS = CLIP_MAX_LENGTH + 256  # CLIP's 77 and T5's 256 (policy.encode_prompts)
# What the tokenizers fix in the text encoders' configs.
CLIP_TOKENS = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                   max_position_embeddings=CLIP_MAX_LENGTH)
T5_TOKENS = dict(pad_token_id=PAD_ID, eos_token_id=EOS_ID)


def char_tokenizer(max_length: int, add_bos: bool, words=None) -> PreTrainedTokenizerFast:
    """A lowercase tokenizer built in memory, a token per character (or per word of `words`): <eos> ends
    each sequence, CLIP-style ones (add_bos) start with <bos>, <pad> pads on the right (to max_length if asked)."""
    vocab = VOCAB if words is None else {token: i for i, token in enumerate(SPECIAL_TOKENS + list(words))}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # Every single character (or word) is its own "word" for the WordLevel model.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated") if words is None \
        else pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Fuse() if words is None else decoders.WordPiece()  # join characters, or words with spaces
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>" if add_bos else "$A <eos>",
                                                       special_tokens=[("<bos>", BOS_ID), ("<eos>", EOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="right",
                                   model_max_length=max_length)


# stabilityai/stable-diffusion-3.5-medium, transformer/config.json and vae/config.json.
SD35_MEDIUM_TRANSFORMER_CONFIG = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
    num_attention_heads=24, attention_head_dim=64, joint_attention_dim=4096,
    pooled_projection_dim=2048, caption_projection_dim=1536, pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
SD35_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305,
    shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
# OpenAI CLIP ViT-L/14's and OpenCLIP ViT-bigG/14's text towers, T5 v1.1 XXL's encoder.
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768,
              num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu")
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280,
              num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")
PARTS = {"transformer": SD3Transformer2DModel, "vae": AutoencoderKL,
         "text_encoder": CLIPTextModelWithProjection, "text_encoder_2": CLIPTextModelWithProjection,
         "text_encoder_3": T5EncoderModel}
TEXT_ENCODERS = {"text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G", "text_encoder_3": "T5"}


def sd35m_configs():
    return {"transformer": SD35_MEDIUM_TRANSFORMER_CONFIG, "vae": SD35_VAE_CONFIG,
            "text_encoder": CLIPTextConfig(**CLIP_L, **CLIP_TOKENS),
            "text_encoder_2": CLIPTextConfig(**CLIP_G, **CLIP_TOKENS),
            "text_encoder_3": T5Config(**T5_XXL, **T5_TOKENS)}


def tiny_configs():
    """{part: config} of a tiny SD3.5-shaped pipeline (under 100k parameters): an MMDiT of 2 heads
    x 8 and 3 layers (2 dual), a 4-level VAE (8x) with 16 latent channels, so that a 64-pixel
    image is 8x8 latents, 4x4 = 16 image tokens; CLIP widths 8 and 16 stand in for 768 and 1280."""
    clip = dict(vocab_size=len(VOCAB), num_attention_heads=2, num_hidden_layers=2, projection_dim=8,
                **CLIP_TOKENS)  # SD3 reads the penultimate hidden state
    return {
        "transformer": dict(
            sample_size=8,  # default latent side: 8 latents = 64 pixels
            patch_size=2, in_channels=16, out_channels=16, num_layers=3, num_attention_heads=2, attention_head_dim=8,
            joint_attention_dim=32,  # text tokens arrive at T5's width, which must be >= the CLIP widths' sum
            caption_projection_dim=16,  # heads x head_dim: text and image tokens share the width
            pooled_projection_dim=16,  # the two CLIP projections side by side
            pos_embed_max_size=32,  # supports latents up to 64 (512 px): 32 patches a side
            dual_attention_layers=(0, 1), qk_norm="rms_norm"),
        # SD3.5's VAE (four levels: 8x downsampling; its latent normalisation) at toy widths.
        "vae": {**SD35_VAE_CONFIG, "block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4},
        "text_encoder": CLIPTextConfig(hidden_size=8, intermediate_size=16, **clip),
        "text_encoder_2": CLIPTextConfig(hidden_size=16, intermediate_size=32, **clip),
        "text_encoder_3": T5Config(vocab_size=len(VOCAB), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   **T5_TOKENS),
    }


CONFIGS = {"tiny": tiny_configs, "sd35m-random": sd35m_configs}  # the models described in code


def autocast_dtype(mixed_precision, device):
    """--mixed_precision -> the autocast dtype, None for plain float32. "auto" is fp16 on CUDA
    (its finer mantissa keeps the log-probs of sampling and training closer than bf16's) and
    float32 elsewhere."""
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"--mixed_precision={mixed_precision}: expected one of {', '.join(MIXED_PRECISION)}")
    if mixed_precision == "auto":
        mixed_precision = "fp16" if torch.device(device).type == "cuda" else "no"
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "no": None}[mixed_precision]


def choose_device(flag, cuda_count, local_rank=None):
    """--device -> the torch.device to run on, given this machine's CUDA device count and, under torchrun,
    LOCAL_RANK: "" takes CUDA where there is some; under torchrun each rank takes cuda:LOCAL_RANK (which
    GPUs is CUDA_VISIBLE_DEVICES's job). A ValueError of one line for a device this machine lacks."""
    if flag == "cpu" or (flag == "" and cuda_count == 0):
        return torch.device("cpu")
    if local_rank is not None and ":" in flag:
        raise ValueError(f"--device={flag}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device=cuda and "
                         "choose the GPUs with CUDA_VISIBLE_DEVICES")
    index = int(flag.partition(":")[2] or 0) if local_rank is None else local_rank
    if index >= cuda_count:
        rank = "" if local_rank is None else f" for LOCAL_RANK={local_rank} (one GPU a rank)"
        raise ValueError(f"--device={flag or 'cuda'}: needs cuda:{index}{rank}; this machine has {cuda_count} CUDA "
                         "device(s)")
    return torch.device("cuda", index)


def freeze(module, dtype):
    """`module` frozen, in eval mode; in float16, as transformers' from_pretrained does, the modules
    its class names in _keep_in_fp32_modules (T5's feed-forward outputs, which overflow float16)
    are float32."""
    names = getattr(module, "_keep_in_fp32_modules", None) or () if dtype == torch.float16 else ()
    for sub in (sub for name, sub in module.named_modules() if name.rsplit(".", 1)[-1] in names):
        sub.float()
    return module.requires_grad_(False).eval()


def build_parts(configs, device, dtype, seed=None):
    """{part: config} -> {part: frozen eval module} of random weights made directly on `device` in
    `dtype` (no float32 copy is cast; on "meta" nothing is allocated). With `seed`, from a forked
    RNG so seeded (the global one is untouched)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(devices=[], enabled=seed is not None), torch.device(device):
            if seed is not None:
                torch.manual_seed(seed)
            parts = {name: PARTS[name].from_config(c) if name in ("transformer", "vae")
                     else PARTS[name](c) for name, c in configs.items()}
    finally:
        torch.set_default_dtype(previous)
    return {name: freeze(module, dtype) for name, module in parts.items()}


def load_pipeline(model, dtype, device) -> StableDiffusion3Pipeline:
    """A model described in code (CONFIGS) with random weights, else a local diffusers folder or a
    hub id through from_pretrained; every part frozen, eval, in `dtype`, but the VAE in float32.
    tiny is built on the CPU from seed 0, so every device and run gets the same weights;
    sd35m-random is made on `device`.
    Those described in code get the per-character tokenizers and SD3.5's scheduler."""
    model = str(SHIPPED.get(model, model))  # a shipped model is a folder in the repository
    if model in CONFIGS:
        seed = 0 if model == "tiny" else None
        parts = build_parts(CONFIGS[model](), "cpu" if seed == 0 else device, dtype, seed)
        pipe = StableDiffusion3Pipeline(
            **parts, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3.5's timestep shift
            tokenizer=char_tokenizer(CLIP_MAX_LENGTH, add_bos=True),
            tokenizer_2=char_tokenizer(CLIP_MAX_LENGTH, add_bos=True),
            tokenizer_3=char_tokenizer(T5_MAX_LENGTH, add_bos=False)).to(device)
    else:
        pipe = StableDiffusion3Pipeline.from_pretrained(model, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    # SD3's VAE can decode silent garbage in half precision, and every reward would score it
    # (Flow-GRPO keeps its VAE in float32 too); it is a small share of the memory.
    pipe.vae.float()  # not .to(dtype): diffusers warns on that for every model
    for name in PARTS:
        freeze(getattr(pipe, name), dtype)
    return pipe


def transformer_config(model):
    """The transformer's config alone (for a hub id, its small JSON file), to check flags before loading."""
    model = str(SHIPPED.get(model, model))  # a shipped model is a folder in the repository
    if model in CONFIGS:
        return dict(CONFIGS[model]()["transformer"])
    return SD3Transformer2DModel.load_config(model, subfolder="transformer")


def part_configs(model):
    """{part: config} of `model` without its weights; None when a hub id's config files are not
    in the local cache (nothing is downloaded)."""
    model = str(SHIPPED.get(model, model))  # a shipped model is a folder in the repository
    if model in CONFIGS:
        return CONFIGS[model]()
    folder = Path(model)
    if not folder.is_dir():
        from huggingface_hub import try_to_load_from_cache
        index = try_to_load_from_cache(model, "model_index.json") if MODEL(model) is None else None
        folder = Path(index).parent if isinstance(index, str) else folder
    if not all((folder / name / "config.json").is_file() for name in PARTS):
        return None
    return {name: cls.load_config(folder / name) if name in ("transformer", "vae")
            else cls.config_class.from_json_file(folder / name / "config.json")
            for name, cls in PARTS.items()}


class FusedAttentionSaves(torch.autograd.Function):
    """scaled_dot_product_attention on the meta device, saving what the fused CUDA kernels keep for
    backward (q, k, v, the output, a float32 log-sum-exp per query), not the math kernel's weights."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out


def meta_forward(transformer, resolution, rows, dtype):
    """One forward pass of `transformer` on the meta device, of `rows` rows at `resolution` px with
    TEXT_TOKENS text tokens: every layer runs at its real shapes, nothing is allocated or computed."""
    c, side = transformer.config, resolution // 8
    with torch.device("meta"):
        transformer(hidden_states=torch.empty(rows, c.in_channels, side, side, dtype=dtype),
                    timestep=torch.empty(rows), return_dict=False,
                    pooled_projections=torch.empty(rows, c.pooled_projection_dim, dtype=dtype),
                    encoder_hidden_states=torch.empty(rows, TEXT_TOKENS, c.joint_attention_dim, dtype=dtype))


def activation_bytes(transformer, resolution, rows, dtype):
    """Bytes autograd saves for backward in one forward of `transformer` (on the meta device, LoRA
    attached) of `rows` rows at `resolution` px: each storage once, no weights."""
    weights, saved = {p.untyped_storage()._cdata for p in transformer.parameters()}, {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return tensor  # the graph keeps it through the forward, so no storage address is reused

    fused = mock.patch.object(F, "scaled_dot_product_attention",
                              lambda q, k, v, *args, **kwargs: FusedAttentionSaves.apply(q, k, v))
    with fused, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        meta_forward(transformer, resolution, rows, dtype)
    return sum(saved.values())


def resolution(model, requested):
    """--resolution -> (pixels, the model's default: its own, at most Flow-GRPO's 512 px); a
    ValueError of one line when the model's position embeddings hold fewer patches a side."""
    config = transformer_config(model)
    default = min(512, config["sample_size"] * 8)
    side, largest = (requested or default) // 8 // config["patch_size"], config["pos_embed_max_size"]
    if side > largest:
        raise ValueError(f"--resolution={requested} needs {side} patches a side; this model takes at most "
                         f"{largest} ({largest * 8 * config['patch_size']} px)")
    return requested or default, default


def weight_bytes(params):
    return sum(p.numel() * p.element_size() for p in params)


@dataclass
class MemoryPlan:
    """What a run holds besides the model's weights, for memory_estimate."""
    resolution: int
    train_batch: int  # transitions per forward-backward
    lora_rank: int
    keep_text_encoders: bool = False
    trajectories: int = 0  # sampled on this rank per iteration
    num_steps: int = 10
    decode_batch: int = 1  # images the VAE decodes at once
    rewards: tuple = ()  # the reward mix's names: those with a model keep it on the device


def widest_forward_bytes(module, forward):
    """The largest input plus output of any leaf module of `module` while `forward()` runs on the
    meta device: the working memory of a no-grad pass at its widest point."""
    widest = []

    def record(leaf, args, out):
        widest.append(sum(t.nbytes for t in args if torch.is_tensor(t)) + out.nbytes)

    hooks = [m.register_forward_hook(record) for m in module.modules() if not [*m.children()]]
    with torch.no_grad(), torch.device("meta"):
        forward()
    for hook in hooks:
        hook.remove()
    return max(widest)


def memory_estimate(model, dtype, plan):
    """[(part, bytes)] the trainer holds on the accelerator, from the configs alone (None when
    they cannot be read without a download): the weights in `dtype` (text encoders only if kept)
    with the transformer's position-embedding buffer, the float32 VAE and reward models, the float32
    LoRA with its gradients, AdamW's two moments and autocast's copies, the sampled trajectories,
    what one micro-batch saves for backward (2 x train_batch rows: CFG's two branches) and the VAE
    decode's working memory. Not counted: sampling's transient buffers, backward's temporaries,
    gradient checkpointing, fragmentation, the CUDA context and NCCL's buffers."""
    configs = part_configs(model)
    if configs is None:
        return None
    parts = build_parts(configs, "meta", dtype)
    transformer, vae, latent = parts["transformer"], parts["vae"].float(), plan.resolution // 8
    rows = [(f"transformer weights ({str(dtype)[6:]})", weight_bytes(transformer.parameters())),
            ("transformer position-embedding buffer", weight_bytes(transformer.buffers()))]
    rows += [(f"{label} text encoder weights", weight_bytes(parts[name].parameters()))
             for name, label in TEXT_ENCODERS.items() if plan.keep_text_encoders]
    rows.append(("VAE weights (float32)", weight_bytes(vae.parameters())))
    rows += [(f"{name} reward model (float32)", 4 * REWARD_MODEL_PARAMETERS[name])
             for name in plan.rewards if name in REWARD_MODEL_PARAMETERS]
    lora, half = policy.add_lora(transformer, plan.lora_rank, plan.lora_rank), dtype != torch.float32
    rows.append((f"LoRA r{plan.lora_rank}: fp32 weights, gradients, AdamW moments" + ", half copies" * half,
                 int((4 + half / 2) * weight_bytes(lora))))
    channels = transformer.config.in_channels
    rows.append((f"trajectories: {plan.trajectories} x {plan.num_steps} steps (states, noise)",
                 (2 * plan.num_steps + 1) * plan.trajectories * channels * latent**2 * 4))
    for p in lora:  # on the accelerator autocast runs them in `dtype`
        p.data = p.data.to(dtype)
    activations = activation_bytes(transformer, plan.resolution, 2 * plan.train_batch, dtype)
    rows.append((f"activations: micro-batch {plan.train_batch} x 2 (CFG), {plan.resolution} px", activations))
    latents = (plan.decode_batch, channels, latent, latent)
    return rows + [(f"VAE decode of {plan.decode_batch} images, at its widest",
                    widest_forward_bytes(vae, lambda: vae.decode(torch.empty(latents))))]


def size(n):
    unit = max(u for u in range(4) if n >= 1024**u or u == 0)
    return f"{n / 1024**unit:.{2 if unit == 3 else 1}f} {('B', 'KiB', 'MiB', 'GiB')[unit]}"


def format_memory_table(rows, device_bytes=None) -> str:
    """A short table of the estimate, the total against the device's memory when known."""
    if rows is None:
        return "memory estimate: skipped (the model's config files are not in the local Hugging Face cache)"
    total, width = sum(b for _, b in rows), max(len(name) for name, _ in rows)
    lines = ["Estimated accelerator memory, before loading (sd35/models.py: memory_estimate)"]
    lines += [f"  {name:<{width}}  {size(b):>10}" for name, b in rows + [("total", total)]]
    if device_bytes:
        lines[-1] += f"  of {size(device_bytes)} here ({100 * total / device_bytes:.0f} %)"
    return "\n".join(lines)
