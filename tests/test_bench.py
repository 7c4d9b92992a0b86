"""sd35/bench.py: it runs end to end on the tiny pipeline (CPU, offline) and on the sd35m-random
path with shrunken configs, and its FLOP count equals both the matmuls that a forward pass
really runs and docs/sd35.md's formula. No timing is asserted: only that the rates are positive numbers."""
import contextlib
import io
import math
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

import cli
from sd35 import bench, models

TINY = ["--model=tiny", "--resolution=64", "--num_steps=4", "--repeats=1", "--warmup=0", "--group_size=2",
        "--train_batch=2"]
TABLES = ["Estimated accelerator memory", "Speed: a rollout of 2", "Scoring workers",
          "sd35/train.py, the second of 2 iterations: 2 trajectories of 4 steps"]


def run_quietly(argv):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = bench.main(argv)
    return results, printed.getvalue()


@pytest.fixture(scope="module")
def tiny_run():
    return run_quietly([*TINY, "--trainer=true"])  # the GPU check's CPU form


def test_bench_prints_every_table_with_positive_finite_numbers(tiny_run):
    results, printed = tiny_run
    for title in TABLES:
        assert title in printed, title
    rates = {k: v for k, v in results.items() if isinstance(v, (int, float))} | results["mfu"]
    assert {"rollout_images_per_s", "peak_matmul_flops", "train_checkpointing=on_beta=0.004",
            "train_checkpointing=off_beta=0", "train_checkpointing=off_beta=0.004", "train_checkpointing=on_beta=0",
            "rollout, sampling", "training, checkpointing on, beta 0.004"} <= set(rates)
    for name, value in rates.items():
        assert math.isfinite(value) and value > 0, (name, value)
    assert 0 < results["worker_start_s"] < 120 and 50 * 2**20 < results["worker_resident_bytes"] < 2**31
    for algo in bench.TRAINER_ALGOS:  # the trainer's own log's seconds; no peak memory on a CPU
        assert results[f"trainer_{algo}"]["seconds"] > 0 and results[f"trainer_{algo}"]["peak_memory_bytes"] is None
    estimate = printed[printed.index("Estimated"):printed.index("tiny on cpu")]
    assert "activations: micro-batch 2 x 2 (CFG), 64 px" in estimate and "text encoder" not in estimate


def test_bench_uses_the_trainers_mixed_precision_decision():
    assert bench.Settings().mixed_precision == "auto"
    assert models.autocast_dtype("auto", "cuda") == torch.float16  # the trainer's choice, not bf16


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


def formula_flops(config, latent_side, text_tokens):
    """docs/sd35.md's sum for one row, written out by hand: d = heads x head_dim, N image and M
    text tokens, L layers of which D dual, a [m, k] by [k, n] matmul counting 2 m n k."""
    c = config
    d, p = c["num_attention_heads"] * c["attention_head_dim"], c["patch_size"]
    n, m, layers = (latent_side // p) ** 2, text_tokens, c["num_layers"]
    dual = sum(1 for i in set(c["dual_attention_layers"]) if i < layers)

    def lin(rows, fan_in, fan_out):
        return 2 * rows * fan_in * fan_out

    projections = layers * (4 * lin(n, d, d) + 3 * lin(m, d, d)) + (layers - 1) * lin(m, d, d) + dual * 4 * lin(n, d, d)
    mlps = layers * 2 * lin(n, d, 4 * d) + (layers - 1) * 2 * lin(m, d, 4 * d)
    attention = layers * 4 * (n + m) ** 2 * d + dual * 4 * n**2 * d
    adaln = (layers - dual) * lin(1, d, 6 * d) + dual * lin(1, d, 9 * d) + (layers - 1) * lin(1, d, 6 * d)
    adaln += 2 * lin(1, d, 2 * d)  # the last text stream's and the output norm's
    embeddings = lin(n, c["in_channels"] * p * p, d) + lin(n, d, p * p * c["out_channels"])
    embeddings += lin(m, c["joint_attention_dim"], c["caption_projection_dim"])
    embeddings += lin(1, 256, d) + lin(1, c["pooled_projection_dim"], d) + 2 * lin(1, d, d)  # time, pooled text
    return projections + mlps + attention + adaln + embeddings


@pytest.mark.parametrize("latent_side", [8, 16])
def test_flop_count_equals_the_matmuls_run_by_the_tiny_transformer(latent_side, monkeypatch):
    transformer = models.load_pipeline("tiny", torch.float32, "cpu").transformer
    layers, attention = counted_flops(transformer, 3, latent_side, models.TEXT_TOKENS, "cpu", monkeypatch)
    flops = bench.transformer_flops(transformer.config, 8 * latent_side)
    # Nothing differs: what the count leaves out (norms, activations, softmax, LoRA) is not an
    # nn.Linear, nn.Conv2d or attention call here.
    assert 3 * flops == layers + attention
    assert flops == formula_flops(transformer.config, latent_side, models.TEXT_TOKENS)


def test_flop_count_on_the_real_sd35_medium_shapes(monkeypatch):
    # On the meta device nothing is allocated or computed, yet every layer runs with its shapes.
    transformer = models.build_parts(models.sd35m_configs(), "meta", torch.bfloat16)["transformer"]
    assert 2.2e9 < sum(p.numel() for p in transformer.parameters()) < 2.3e9
    layers, attention = counted_flops(transformer, 2, 64, models.TEXT_TOKENS, "meta", monkeypatch)
    assert 2 * bench.transformer_flops(transformer.config, 512) == layers + attention
    # docs/sd35.md's figures: 0.91, 2.44 and 11.25 TFLOP a row at 256, 512 and 1024 px.
    for pixels, tera in ((256, 0.91), (512, 2.44), (1024, 11.25)):
        flops = bench.transformer_flops(transformer.config, pixels)
        assert flops == formula_flops(transformer.config, pixels // 8, models.TEXT_TOKENS)
        assert round(flops / 1e12, 2) == tera


def test_sd35m_random_path_runs_on_a_shrunken_config(monkeypatch):
    # The same code as the real sd35m-random (real text encoders, built in code), with every
    # part small enough for a CPU.
    for name, small in (("SD35_MEDIUM_TRANSFORMER_CONFIG", dict(num_layers=2, num_attention_heads=2,
                                                               attention_head_dim=8, caption_projection_dim=16,
                                                               dual_attention_layers=(0,))),
                        ("SD35_VAE_CONFIG", dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                                 norm_num_groups=4)),
                        ("CLIP_L", dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                        num_attention_heads=2, projection_dim=8)),
                        ("CLIP_G", dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, projection_dim=16)),
                        ("T5_XXL", dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4))):
        monkeypatch.setattr(models, name, {**getattr(models, name), **small})
    monkeypatch.setitem(models.SD35_MEDIUM_TRANSFORMER_CONFIG, "joint_attention_dim", 32)
    monkeypatch.setitem(models.SD35_MEDIUM_TRANSFORMER_CONFIG, "pooled_projection_dim", 24)
    results, printed = run_quietly(["--model=sd35m-random", "--resolution=64", "--num_steps=2", "--repeats=1",
                                    "--warmup=0", "--group_size=2", "--train_batch=2"])
    assert "sd35m-random on cpu (float32), 64 px" in printed and "Estimated accelerator memory" in printed
    assert results["rollout_images_per_s"] > 0 and results["train_checkpointing=off_beta=0.004"] > 0


def test_bad_flags_stop_with_one_line():
    for argv, message in ((["--model=sd x"], "--model=sd x: expected tiny, sd35m-random"),
                          (["--resolution=100"], "multiple of 16"), (["--resolution=1024"], "needs 64 patches a side; this model takes at most 32 (512 px)"),
                          (["--mixed_precision=fp8"], "--mixed_precision"), (["--steps=3"], "unknown flag --steps")):
        with pytest.raises(SystemExit) as stop:
            bench.main(argv)
        assert message in str(stop.value) and "\n" not in str(stop.value)


def test_help_lists_every_flag_with_its_comment(capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--help"])
    assert stop.value.code == 0
    printed, comments = capsys.readouterr().out, cli.field_comments(bench.Settings)
    for field in fields(bench.Settings):
        assert f"--{field.name}=" in printed and comments[field.name] in printed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sd35m_random_on_gpu_in_fp16():
    results, printed = run_quietly(["--model=sd35m-random", "--resolution=256", "--num_steps=2", "--repeats=1",
                                    "--warmup=1", "--group_size=1", "--train_batch=1"])
    assert "(float16)" in printed and "of " in printed
    assert all(math.isfinite(v) and v > 0 for v in results["mfu"].values())
