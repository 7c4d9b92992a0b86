"""The shapes testbed: the reward's calibration, the shipped model (loaded by diffusers, its
documented base reward), pretraining, and the trainer on the shipped model with every algorithm."""
import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

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
    # Every image against every other prompt: a wrong colour, place or shape, or several.
    wrong = torch.stack([shapes.reward(truth, PROMPTS[i:] + PROMPTS[:i])[0] for i in range(1, len(PROMPTS))])
    assert wrong.max() <= 0.2
    assert torch.equal(shapes.reward(torch.zeros(3, 3, 64, 64), PROMPTS[:3])[0], torch.zeros(3))
    assert shapes.reward(torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0)), PROMPTS[:8])[0].max() <= 0.2


def test_the_reward_grades_a_shape_moved_part_of_the_way_and_logs_its_terms():
    prompt = ["a blue square in the middle"]
    near, far = (shapes.render(scenes(prompt), 64) for _ in range(2))
    near, far = (torch.roll(image, shift, dims=-1) for image, shift in ((near, 5), (far, 20)))  # 5 and 20 px right
    total, terms = RewardMix("shapes")(torch.cat([near, far]), prompt * 2)
    assert set(terms) == {"shapes", "shapes_colour", "shapes_place", "shapes_shape"}
    assert 0.2 < total[0] < 0.9 and total[1] == 0 and terms["shapes_colour"].min() == 1
    assert terms["shapes_shape"].min() == 1 and 0 < terms["shapes_place"][0] < 1
    with pytest.raises(RewardError, match="'a cat' is not a shapes prompt"):
        RewardMix("shapes")(near, ["a cat"])


def test_the_shipped_model_loads_with_diffusers_and_draws_the_test_prompts():
    pipe = StableDiffusion3Pipeline.from_pretrained(SHIPPED)
    test = [p for p, _ in load_prompts("shapes")[1]][:8]
    images = pipe(prompt=test, num_inference_steps=20, guidance_scale=shapes.TRAIN_DEFAULTS["guidance_scale"],
                  max_sequence_length=pipe.tokenizer_3.model_max_length, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (8, 3, 64, 64)
    assert shapes.reward(images, test)[1]["colour"].mean() > 0.5  # its colours are mostly right
    assert sum(p.numel() * p.element_size() for part in (pipe.transformer, pipe.vae) for p in part.parameters()) < 4e6


def test_the_shipped_model_reaches_its_documented_base_reward(tmp_path):
    documented = json.loads((SHIPPED / "pretraining.json").read_text())
    sd35_train.main(["--model=shapes", "--reward=shapes", "--prompts=shapes", "--eval_only", f"--out={tmp_path}"])
    measured = read_log(tmp_path / "log.jsonl")[-1]
    assert measured["eval_reward"] == pytest.approx(documented["eval_reward"], abs=0.01)
    assert 0.25 <= measured["eval_reward"] <= 0.6  # room for RL


def test_a_short_pretraining_lowers_both_losses_and_saves_a_loadable_pipeline(tmp_path):
    vae_losses, losses = shapes_pretrain.main([f"--out={tmp_path}", "--vae_steps=40", "--steps=40", "--batch=8"])
    assert sum(vae_losses[-10:]) < sum(vae_losses[:10]) and sum(losses[-10:]) < sum(losses[:10])
    record = json.loads((tmp_path / "pretraining.json").read_text())
    assert 0 <= record["eval_reward"] <= 1 and (tmp_path / "loss.png").exists() and (tmp_path / "samples.png").exists()
    assert StableDiffusion3Pipeline.from_pretrained(tmp_path).tokenizer_3.model_max_length == shapes.TEXT_LENGTH


@pytest.mark.parametrize("algo", ["flow_grpo", "stepwise", "superflow"])
def test_every_algorithm_trains_the_shipped_model(tmp_path, algo):
    sd35_train.main(["--model=shapes", "--reward=shapes", "--prompts=shapes", f"--algo={algo}", "--iters=1",
                     "--group_size=4", "--prompts_per_iter=2", "--num_steps=4", "--eval_images=4",
                     f"--out={tmp_path}"])
    base, trained = read_log(tmp_path / "log.jsonl")
    assert base["iteration"] == 0 and trained["iteration"] == 1
    assert {"reward_shapes_colour", "reward_shapes_place", "eval_reward_shapes_shape"} <= trained.keys()
    assert (tmp_path / "eval" / "iter_000001.png").exists()


def test_the_shapes_model_brings_its_defaults_and_flags_given_win():
    cfg, *_ = sd35_train.parse_args(["--model=shapes", "--reward=shapes", "--prompts=shapes", "--lr=0.5"])
    assert cfg.lr == 0.5 and all(getattr(cfg, k) == v for k, v in shapes.TRAIN_DEFAULTS.items() if k != "lr")
    assert sd35_train.parse_args(["--model=tiny"])[0].iters == sd35_train.Config.iters
