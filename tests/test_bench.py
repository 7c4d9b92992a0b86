"""sd35/bench.py: it runs end to end on the tiny pipeline (CPU, offline), its plain baseline
sampler agrees with minflow's, and its FLOP formula equals a count of the matmuls that a
forward pass really runs. No timing is asserted: only that the rates are positive numbers."""
import contextlib
import io
import math

import pytest
import torch
import torch.nn.functional as F

import minflow
from sd35 import bench, models, policy

TINY = ["--model=tiny", "--resolution=64", "--num_steps=4", "--repeats=1", "--warmup=0", "--group_size=2",
        "--train_batch=2", "--reward=ocr", "--sweep", "--sweep_batches=1,2", "--reward_workers=2"]
TABLES = ["Rollout:", "Same initial noise", "Rewards of final images", "Stepwise intermediate rewards",
          "Rollout and final OCR",
          "Training:", "Seconds per iteration, Stepwise against Flow-GRPO", "Transformer matmul FLOPs", "MFU against",
          "Sweep over", "Summary"]


def run_quietly(argv):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = bench.main(argv)
    return results, printed.getvalue()


@pytest.fixture(scope="module")
def tiny_run():
    return run_quietly(TINY)


def test_bench_prints_every_table_with_positive_finite_numbers(tiny_run):
    results, printed = tiny_run
    for title in TABLES:
        assert title in printed, title
    rates = {**results["throughput"], **results["mfu"]}
    assert {"rollout_images_per_s", "baseline_images_per_s", "rollout_ratio_to_baseline", "ocr_images_per_s",
            "stepwise_jpeg_compressibility_trajectories_per_s", "stepwise_ocr_trajectories_per_s",
            "train_checkpointing=on_beta=0.004_transitions_per_s", "peak_matmul_flops", "rollout_sampling",
            "train_checkpointing=off_beta=0_transitions_per_s", "ocr_images_per_s_1_workers",
            "ocr_images_per_s_2_workers", "stepwise_ocr_batched_trajectories_per_s",
            "stepwise_jpeg_compressibility_batched_iteration_ratio", "stepwise_ocr_iteration_ratio",
            "toy_stepwise_iteration_ratio", "ocr_images_per_s_2_separate_processes", "ocr_images_per_s_1_separate_processes",
            "rollout_ocr_overlap_speedup"} <= set(rates)
    assert len([k for k in rates if k.startswith("sweep_")]) == 2 * 2 * 2  # px x batches x checkpointing
    for name, value in rates.items():
        assert math.isfinite(value) and value > 0, (name, value)
    assert len(results["training"]) == 4  # checkpointing off/on x beta 0/0.004
    # Before: 4 states, one pass each (T' = 5 velocity calls over both trajectories, a decode).
    # After: ddim trains only step 1 of 4, so states 1 and 2 are needed: one pass of 4 rows.
    assert results["stepwise_ocr_calls"] == {"velocity": 4 * bench.SUBSTEPS, "decode": 4}
    assert results["stepwise_ocr_batched_calls"] == {"velocity": bench.SUBSTEPS, "decode": 1}


def test_bench_rollouts_agree_and_actually_moved(tiny_run):
    agreement = tiny_run[0]["agreement"]
    assert agreement["relative_max_diff"] < 1e-4 and agreement["agree"]
    assert agreement["log_prob_max_diff"] < 1e-4
    assert agreement["latent_movement"] > 0.5  # both really sampled: the latents left the noise


@pytest.mark.parametrize("guidance", [4.5, 1.0])
def test_plain_rollout_matches_minflow_with_two_passes_per_cfg_step(guidance):
    pipe = models.load_pipeline("tiny", torch.float32, "cpu")
    cond = policy.encode_prompts(pipe, ["a red bicycle", 'a sign that reads "OPEN"'], guidance, "cpu")
    noise, sigmas = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)), minflow.sd3_sigmas(4)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))

    velocity = policy.guided_velocity(pipe.transformer, cond, guidance, torch.float32)
    traj = minflow.rollout(velocity, noise, sigmas, "flow_grpo", 0.7, torch.Generator().manual_seed(1))
    ours_calls = len(calls)
    xs, log_probs = bench.plain_rollout(pipe.transformer, cond, noise, sigmas, guidance, 0.7,
                                        torch.Generator().manual_seed(1), torch.float32)

    assert ours_calls == 4 and len(calls) - ours_calls == (8 if guidance > 1 else 4)
    torch.testing.assert_close(xs, traj.xs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(log_probs, traj.log_probs, rtol=1e-4, atol=1e-4)
    assert (xs[:, -1] - noise).abs().max() > 0.5


def counted_flops(transformer, batch, latent_side, text_tokens, device, monkeypatch):
    """Run one forward pass and count what it multiplies: 2 x (output elements) x (inputs per
    output) for every nn.Linear and nn.Conv2d, 2 Lq Lk (d_qk + d_v) per head for every
    scaled_dot_product_attention call -> (linear and conv FLOPs, attention FLOPs)."""
    counts = {"layers": 0, "attention": 0}

    def linear(module, args, output):
        counts["layers"] += 2 * output.numel() * module.in_features

    def conv(module, args, output):
        kh, kw = module.kernel_size
        counts["layers"] += 2 * output.numel() * module.in_channels // module.groups * kh * kw

    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(q, k, v, *args, **kwargs):
        counts["attention"] += 2 * q.shape[:-1].numel() * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    hooks = [m.register_forward_hook(linear if isinstance(m, torch.nn.Linear) else conv)
             for m in transformer.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    c, dtype = transformer.config, transformer.dtype
    with torch.no_grad(), torch.device(device):
        transformer(hidden_states=torch.randn(batch, c.in_channels, latent_side, latent_side, dtype=dtype),
                    timestep=torch.full((batch,), 500.0),
                    pooled_projections=torch.randn(batch, c.pooled_projection_dim, dtype=dtype),
                    encoder_hidden_states=torch.randn(batch, text_tokens, c.joint_attention_dim, dtype=dtype))
    for hook in hooks:
        hook.remove()
    return counts["layers"], counts["attention"]


@pytest.mark.parametrize("latent_side", [8, 16])
def test_flop_formula_equals_the_matmuls_run_by_the_tiny_transformer(latent_side, monkeypatch):
    transformer = models.load_pipeline("tiny", torch.float32, "cpu").transformer
    layers, attention = counted_flops(transformer, 3, latent_side, bench.SD3_TEXT_TOKENS, "cpu", monkeypatch)
    parts = bench.transformer_flops(transformer.config, latent_side, bench.SD3_TEXT_TOKENS)
    # Nothing differs: the formula counts exactly these matmuls. What it leaves out (norms,
    # activations, softmax, LoRA) is not an nn.Linear, nn.Conv2d or attention call here.
    assert 3 * parts["attention QK^T and AV"] == attention
    assert 3 * (sum(parts.values()) - parts["attention QK^T and AV"]) == layers


def test_flop_formula_and_random_builder_on_the_real_sd35_medium_shapes(monkeypatch):
    # On the meta device nothing is allocated or computed, yet every layer runs with its shapes.
    transformer, vae = bench.random_sd35m("meta", torch.bfloat16)
    assert 2.2e9 < sum(p.numel() for p in transformer.parameters()) < 2.3e9
    assert transformer.dtype == vae.dtype == torch.bfloat16
    image = vae.decode(torch.zeros(1, 16, 64, 64, device="meta", dtype=torch.bfloat16), return_dict=False)[0]
    assert image.shape == (1, 3, 512, 512)  # the VAE decodes 8x, as the real one does
    layers, attention = counted_flops(transformer, 2, 64, bench.SD3_TEXT_TOKENS, "meta", monkeypatch)
    parts = bench.transformer_flops(transformer.config, 64, bench.SD3_TEXT_TOKENS)
    assert 2 * parts["attention QK^T and AV"] == attention
    assert 2 * (sum(parts.values()) - parts["attention QK^T and AV"]) == layers


def test_sd35m_random_path_runs_on_a_shrunken_config(monkeypatch):
    # The same code as the real sd35m-random (random embeddings of SD3's shapes, no text
    # encoders), with a transformer and VAE small enough for a CPU.
    monkeypatch.setattr(bench, "SD35_MEDIUM_TRANSFORMER_CONFIG", {
        **bench.SD35_MEDIUM_TRANSFORMER_CONFIG, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8,
        "caption_projection_dim": 16, "dual_attention_layers": (0,)})
    monkeypatch.setattr(bench, "SD35_VAE_CONFIG", {
        **bench.SD35_VAE_CONFIG, "block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4})
    results, printed = run_quietly(["--model=sd35m-random", "--resolution=64", "--num_steps=2", "--repeats=1",
                                    "--warmup=0", "--group_size=2", "--train_batch=2"])
    assert "random embeddings of the real shapes" in printed
    assert results["agreement"]["agree"] and results["throughput"]["rollout_images_per_s"] > 0


def test_bad_flags_stop_with_one_line():
    for argv, message in ((["--model=sdxl"], "--model=sdxl: expected one of tiny, sd35m-random"),
                          (["--resolution=100"], "multiple of 16"), (["--sweep_batches=1,x"], "--sweep_batches"),
                          (["--steps=3"], "unknown flag --steps")):
        with pytest.raises(SystemExit) as stop:
            bench.main(argv)
        assert message in str(stop.value) and "\n" not in str(stop.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sd35m_random_on_gpu_in_bf16():
    results, printed = run_quietly(["--model=sd35m-random", "--resolution=256", "--num_steps=2", "--repeats=1",
                                    "--warmup=1", "--group_size=1", "--train_batch=1"])
    assert results["agreement"]["agree"], results["agreement"]
    assert all(math.isfinite(v) and v > 0 for v in {**results["throughput"], **results["mfu"]}.values())
    assert "text encoders not built here" in printed
