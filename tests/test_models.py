"""sd35/models.py: the parts of sd35m-random have SD3.5-Medium's published sizes (built on the
meta device, nothing allocated), the memory estimate equals the bytes of a real tiny model,
its LoRA and its optimiser state, and --mixed_precision is decided in one place."""
import pytest
import torch
from transformers import CLIPConfig, CLIPModel

import minflow
from sd35 import models, policy

M = 1e6


def test_sd35m_random_parts_have_the_published_sizes():
    # Published sizes: OpenCLIP's docs/model_profile.csv gives the text towers of ViT-L-14
    # (123.65 M) and ViT-bigG-14 (694.66 M); the SD3 paper (Esser et al., arXiv:2403.03206)
    # calls T5 v1.1 XXL's encoder the 4.7B-parameter T5; Stability AI's SD3.5-Medium card gives
    # its MMDiT-X as 2.5 B parameters, while diffusers' SD3Transformer2DModel of the
    # repository's transformer/config.json counts 2.24 B (hence the range); the 16-channel VAE
    # of vae/config.json counts 83.8 M in diffusers' AutoencoderKL.
    parts = models.build_parts(models.sd35m_configs(), "meta", torch.bfloat16)
    count = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    assert 2.24e9 <= count["transformer"] <= 2.5e9
    assert round(count["text_encoder"] / M, 2) == 123.65
    assert round(count["text_encoder_2"] / M, 2) == 694.66
    assert 4.70e9 <= count["text_encoder_3"] <= 4.80e9
    assert 80 * M <= count["vae"] <= 88 * M
    assert all(p.device.type == "meta" for part in parts.values() for p in part.parameters())
    image = parts["vae"].decode(torch.zeros(1, 16, 64, 64, device="meta", dtype=torch.bfloat16), return_dict=False)[0]
    assert image.shape == (1, 3, 512, 512)  # 8x, as the real VAE


def test_float16_keeps_t5_feed_forward_outputs_in_float32_as_from_pretrained_does():
    parts = models.build_parts(models.sd35m_configs(), "meta", torch.float16)
    dtypes = {name: p.dtype for name, p in parts["text_encoder_3"].named_parameters()}
    assert {d for n, d in dtypes.items() if ".wo." in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if ".wo." not in n} == {torch.float16}
    assert {p.dtype for p in models.build_parts(models.sd35m_configs(), "meta", torch.bfloat16)[
        "text_encoder_3"].parameters()} == {torch.bfloat16}


def estimate(resolution=64, train_batch=1, keep=False, dtype=torch.float32, **plan):
    return dict(models.memory_estimate("tiny", dtype, models.MemoryPlan(resolution, train_batch, 4, keep, **plan)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_memory_estimate_equals_the_bytes_of_the_real_tiny_model(dtype):
    rows = estimate(64, 2, True, dtype, trajectories=3, num_steps=4, rewards=("pickscore", "ocr"))
    pipe = models.load_pipeline("tiny", dtype, "cpu")
    real = {name: sum(p.numel() * p.element_size() for p in getattr(pipe, name).parameters())
            for name in models.PARTS}
    weights = {k: v for k, v in rows.items() if "weights" in k and "LoRA" not in k}
    assert sorted(weights.values()) == sorted(real.values())
    assert rows[f"transformer weights ({str(dtype).removeprefix('torch.')})"] == real["transformer"]
    assert rows["VAE weights (float32)"] == real["vae"]  # whatever the dtype: it decodes in float32
    assert rows["transformer position-embedding buffer"] == models.weight_bytes(pipe.transformer.buffers()) > 0
    assert rows["pickscore reward model (float32)"] == 4 * 986_109_441 and not any("ocr" in k for k in rows)
    # The states of 3 trajectories of 4 steps as a rollout keeps them, and the noise of each step.
    x = torch.randn(3, 16, 8, 8)
    traj = minflow.rollout(lambda x, t: -x, x, minflow.sd3_sigmas(4), "flow_grpo", 0.7)
    assert rows["trajectories: 3 x 4 steps (states, noise)"] == traj.xs.nbytes + 4 * x.nbytes
    # LoRA, gradients and AdamW's moments, counted on the real optimiser after one step.
    lora = policy.add_lora(pipe.transformer, 4, 8)
    opt = torch.optim.AdamW(lora)
    sum(p.sum() for p in lora).backward()
    opt.step()
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for k, t in s.items() if k != "step")
    grads = sum(p.grad.numel() * p.grad.element_size() for p in lora)
    copies = models.weight_bytes(lora) // 2 if dtype == torch.float16 else 0  # autocast's half copies
    lora_row = [v for k, v in rows.items() if k.startswith("LoRA r4: fp32 weights, gradients, AdamW moments")]
    assert lora_row == [models.weight_bytes(lora) + grads + state + copies]


def test_the_reward_models_parameter_counts_are_their_architectures():
    # openai/clip-vit-large-patch14 and laion/CLIP-ViT-H-14-laion2B-s32B-b79K (PickScore's base), from
    # their config.json files; the counts must not drift from what the rewards load.
    def count(text, vision, projection):
        with torch.device("meta"):
            model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection))
        return sum(p.numel() for p in model.parameters())

    layers = lambda width, depth, heads: dict(hidden_size=width, intermediate_size=4 * width,  # noqa: E731
                                              num_hidden_layers=depth, num_attention_heads=heads)
    vision = dict(patch_size=14, image_size=224)
    assert models.REWARD_MODEL_PARAMETERS == {
        "clipscore": count(layers(768, 12, 12), {**layers(1024, 24, 16), **vision}, 768),
        "pickscore": count(layers(1024, 24, 16), {**layers(1280, 32, 16), **vision}, 1024)}


def test_text_encoders_are_left_out_when_freed_and_activations_and_decoding_grow_linearly():
    kept, freed = estimate(keep=True), estimate(keep=False)
    assert len(kept) == len(freed) + 3 and not any("text encoder" in name for name in freed)
    activations = [estimate(64, b)[f"activations: micro-batch {b} x 2 (CFG), 64 px"] for b in (1, 2, 3)]
    assert activations[0] > 0 and activations[2] - activations[1] == activations[1] - activations[0] > 0
    assert estimate(128)["activations: micro-batch 1 x 2 (CFG), 128 px"] > activations[0]  # 4x the image tokens
    decoding = [estimate(decode_batch=n)[f"VAE decode of {n} images, at its widest"] for n in (1, 2)]
    assert decoding[1] == 2 * decoding[0] > 64 * 64 * 3 * 4  # wider than the float32 image it makes


def test_activations_count_fused_attention_not_the_attention_matrix():
    # At 512 px one row of SD3.5-M attends over 1024 + 333 tokens in 24 joint attentions and
    # over the 1024 image tokens in 13 dual ones: the math kernel's [L, L] weights for 24
    # heads would cost more than everything else together; fused kernels keep a log-sum-exp.
    transformer = models.build_parts(models.sd35m_configs(), "meta", torch.float16)["transformer"]
    for p in policy.add_lora(transformer, 32, 64):
        p.data = p.data.half()
    saved = models.activation_bytes(transformer, 512, 1, torch.float16)
    tokens, heads, d, layers = 1024 + models.TEXT_TOKENS, 24, 1536, 24
    attention_weights = 2 * heads * (layers * tokens**2 + 13 * 1024**2)
    assert layers * tokens * d * 2 < saved < attention_weights


def test_memory_estimate_of_an_uncached_hub_id_is_none_and_a_folder_is_read(tmp_path):
    plan = models.MemoryPlan(64, 1, 4, True)
    assert models.memory_estimate("nobody-here/no-such-model", torch.float16, plan) is None
    assert models.memory_estimate(str(tmp_path), torch.float16, plan) is None
    pipe = models.load_pipeline("tiny", torch.float32, "cpu")
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    from_folder = models.memory_estimate(str(tmp_path), torch.float32, plan)
    assert from_folder == models.memory_estimate("tiny", torch.float32, plan)


def test_memory_table_totals_the_rows_against_the_device():
    rows = [("weights", 3 * 2**30), ("activations", 2**29)]
    table = models.format_memory_table(rows, device_bytes=7 * 2**30)
    assert "3.50 GiB" in table and "of 7.00 GiB here (50 %)" in table
    assert "here" not in models.format_memory_table(rows)


def test_autocast_dtype_is_the_one_mixed_precision_decision():
    assert models.autocast_dtype("auto", "cuda") == torch.float16
    assert models.autocast_dtype("auto", torch.device("cuda:1")) == torch.float16
    assert models.autocast_dtype("auto", "cpu") is None
    assert models.autocast_dtype("bf16", "cuda") == torch.bfloat16 and models.autocast_dtype("fp16", "cpu") == torch.float16
    assert models.autocast_dtype("no", "cuda") is None
    with pytest.raises(ValueError, match="--mixed_precision=fp8: expected one of auto, fp16, bf16, no"):
        models.autocast_dtype("fp8", "cuda")


def test_model_flag_range():
    for accepted in ("tiny", "sd35m-random", "stabilityai/stable-diffusion-3.5-medium", "."):
        assert models.MODEL(accepted) is None
    for refused in ("", "sdxl", "a/b/c", None):
        assert "hub id" in models.MODEL(refused)


def test_load_pipeline_tiny_is_frozen_and_transformer_config_needs_no_weights():
    pipe = models.load_pipeline("tiny", torch.float32, "cpu")
    assert not any(p.requires_grad for name in models.PARTS for p in getattr(pipe, name).parameters())
    config = models.transformer_config("tiny")
    assert config == {key: pipe.transformer.config[key] for key in config} and "sample_size" in config
    assert models.transformer_config("sd35m-random")["num_layers"] == 24


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sd35m_random_loads_on_the_gpu_and_encodes_a_prompt():
    pipe = models.load_pipeline("sd35m-random", torch.float16, "cuda")
    count = sum(p.numel() for name in models.PARTS for p in getattr(pipe, name).parameters())
    assert 7.8e9 < count < 8.0e9
    cond = policy.encode_prompts(pipe, ["a red bicycle"], 4.5, "cuda")
    assert cond.embeds.shape == (1, models.TEXT_TOKENS, 4096) and torch.isfinite(cond.embeds).all()
