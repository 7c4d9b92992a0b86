"""The shapes testbed: the reward's calibration, the shipped model (loaded by diffusers, its
documented base reward), pretraining, and the trainer on the shipped model with every algorithm."""
import json

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file

from sd35 import models, shapes, shapes_pretrain
from sd35 import train as sd35_train
from sd35.curves import read_log
from sd35.data import load_prompts
from sd35.rewards import RewardError, RewardMix

SHIPPED = models.SHIPPED["shapes"]
PROMPTS = [p for p, _ in load_prompts("shapes")[0] + load_prompts("shapes")[1]]


def scenes(prompts):
    return tuple(torch.tensor(v) for v in zip(*map(shapes.parse, prompts)))


def test_the_reward_is_calibrated_on_rendered_ground_truth_wrong_prompts_and_blanks():
    truth = shapes.render(scenes(PROMPTS), 64, torch.Generator().manual_seed(0), jitter=0.02)
    assert shapes.reward(truth, PROMPTS)[0].min() >= 0.95
    # Every image against the prompts nearest to its own: one thing wrong, the colour, the shape, or
    # the place (the next one in its row or column).
    colour, shape, place = scenes(PROMPTS)
    for wrong in ((colour + 1) % 4, shape, place), (colour, (shape + 1) % 3, place), (colour, (shape + 2) % 3, place), \
            (colour, shape, place // 3 * 3 + (place + 1) % 3), (colour, shape, (place + 3) % 9):
        texts = [f"a {list(shapes.COLOURS)[c]} {shapes.SHAPES[k]} {shapes.PLACES[p]}" for c, k, p in zip(*wrong)]
        assert shapes.reward(truth, texts)[0].max() <= 0.2, wrong
    assert torch.equal(shapes.reward(torch.zeros(3, 3, 64, 64), PROMPTS[:3])[0], torch.zeros(3))
    noise = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert shapes.reward(noise, PROMPTS[:8])[0].max() <= 0.2


def test_the_reward_grades_a_shape_moved_part_of_the_way_and_logs_its_terms():
    prompt = ["a blue square in the middle"]
    image = shapes.render(scenes(prompt), 64)
    near, far = (torch.roll(image, shift, dims=-1) for shift in (5, 20))  # 5 and 20 pixels to the right
    total, terms = RewardMix("shapes")(torch.cat([near, far]), prompt * 2)
    assert set(terms) == {"shapes", "shapes_colour", "shapes_place", "shapes_shape"}
    assert 0.2 < total[0] < 0.9 and total[1] == 0 and terms["shapes_colour"].min() > 0.95
    assert terms["shapes_shape"].min() > 0.95 and 0 < terms["shapes_place"][0] < 1
    with pytest.raises(RewardError, match="'a cat' is not a shapes prompt"):
        RewardMix("shapes")(near, ["a cat"])


def test_the_shipped_model_loads_with_diffusers_and_reaches_its_documented_base_reward(tmp_path):
    pipe = StableDiffusion3Pipeline.from_pretrained(SHIPPED)  # diffusers' own loader: safetensors, no remote code
    assert pipe.tokenizer_3.model_max_length == shapes.TEXT_LENGTH
    weights = [load_file(f) for f in SHIPPED.rglob("*.safetensors")]
    assert sum(t.numel() * t.element_size() for w in weights for t in w.values()) < 4e6
    assert not [f for f in SHIPPED.rglob("*") if f.suffix in (".bin", ".pt", ".pkl", ".ckpt")]
    documented = json.loads((SHIPPED / "pretraining.json").read_text())
    sd35_train.main(["--model=shapes", "--eval_only", f"--out={tmp_path}"])  # all 27 test prompts, fixed noise
    measured = read_log(tmp_path / "log.jsonl")[-1]
    assert measured["eval_reward"] == pytest.approx(documented["eval_reward"], abs=0.01)
    assert 0.25 <= measured["eval_reward"] <= 0.6  # room for RL
    assert measured["eval_reward_shapes_colour"] > 0.7  # its colours mostly right
    # Ground truth through its VAE and back: what any transformer on this VAE could at best reach.
    test = [p for p, _ in load_prompts("shapes")[1]]
    truth = shapes.render(scenes(test), 64, torch.Generator().manual_seed(0), jitter=0.02) * 2 - 1
    with torch.no_grad():
        back = pipe.vae.decode(pipe.vae.encode(truth).latent_dist.mode()).sample / 2 + 0.5
    assert shapes.reward(back.clamp(0, 1), test)[0].mean().item() == pytest.approx(0.640, abs=0.01)


def test_a_short_pretraining_lowers_both_losses(tmp_path):
    s = shapes_pretrain.Settings(vae_steps=30, vae_batch=4, steps=30, batch=8, renders=1, lr=3e-3)
    pipe, generator = shapes_pretrain.build(0), torch.Generator().manual_seed(0)
    vae_losses = shapes_pretrain.train_vae(pipe.vae, s, generator)
    losses = shapes_pretrain.train_transformer(pipe, s, generator)
    assert sum(vae_losses[-5:]) < sum(vae_losses[:5]) / 2 and sum(losses[-10:]) < sum(losses[:10])
    shapes_pretrain.loss_figure(vae_losses, losses, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 10_000


@pytest.mark.parametrize("algo", ["flow_grpo", "stepwise", "superflow"])
def test_every_algorithm_trains_the_shipped_model(tmp_path, algo):
    sd35_train.main(["--model=shapes", f"--algo={algo}", "--iters=1", "--group_size=4", "--prompts_per_iter=2",
                     "--num_steps=4", "--eval_num_steps=2", "--eval_images=4", f"--out={tmp_path}"])
    base, trained = read_log(tmp_path / "log.jsonl")
    assert base["iteration"] == 0 and trained["iteration"] == 1 and trained["grad_norm"] > 0
    assert {"reward_shapes_colour", "reward_shapes_place", "eval_reward_shapes_shape"} <= trained.keys()
    assert (tmp_path / "eval" / "iter_000001.png").exists()


def test_the_shapes_model_brings_its_defaults_and_flags_given_win():
    cfg, *_ = sd35_train.parse_args(["--model=shapes", "--lr=0.5"])
    assert cfg.lr == 0.5 and all(getattr(cfg, k) == v for k, v in shapes.TRAIN_DEFAULTS.items() if k != "lr")
    assert sd35_train.parse_args(["--model=tiny"])[0].iters == sd35_train.Config.iters
