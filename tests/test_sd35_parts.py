"""Tests for the SD3.5 building blocks that need no real weights: tiny pipeline, rewards, prompt sets.

Everything runs offline on the CPU. Models that would come from the hub
(CLIP, PickScore) are replaced by a tiny random CLIP saved to a temporary
folder, so the real loading code still runs.
"""

import base64
import http.server
import importlib.metadata
import inspect
import io
import json
import re
import socket
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from PIL import Image, ImageDraw, ImageFont
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

import minflow
from sd35 import data, models, pixel_rewards, policy, rewards
from sd35.rewards import RewardError, RewardMix, RewardOptions, RewardServerError, RemoteReward


# --------------------------------------------------------------------------- tiny pipeline


@pytest.fixture(scope="module")
def pipe():
    return models.load_pipeline("tiny", torch.float32, "cpu")


def test_tiny_pipeline_same_seed_same_weights_other_seed_differs(pipe):
    torch.manual_seed(5)
    again, other = (models.build_parts(models.tiny_configs(), "cpu", torch.float32, seed) for seed in (0, 1))
    after = torch.randn(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.randn(3))  # the global generator is untouched
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        params = list(getattr(pipe, name).parameters())
        assert all(torch.equal(a, b) for a, b in zip(params, again[name].parameters())), name
        assert not all(torch.equal(a, b) for a, b in zip(params, other[name].parameters())), name


def test_tiny_pipeline_has_sd35_architecture(pipe):
    blocks = pipe.transformer.transformer_blocks
    dual = [block.attn2 is not None for block in blocks]
    assert any(dual) and not all(dual)  # dual attention in some layers only, as in SD3.5 (0-12 of 24)
    assert all(type(block.attn.norm_q).__name__ == "RMSNorm" for block in blocks)
    assert pipe.transformer.config.in_channels == pipe.vae.config.latent_channels == 16
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5305, 0.0609)
    assert pipe.scheduler.config.shift == 3.0
    assert not any(m.training for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3))
    real = models.SD35_MEDIUM_TRANSFORMER_CONFIG  # checked, not built: it has 2.2B parameters
    assert set(real) <= set(inspect.signature(SD3Transformer2DModel.__init__).parameters)
    assert real["dual_attention_layers"] == tuple(range(13)) and real["qk_norm"] == "rms_norm"


def test_tiny_pipeline_samples_latents_with_cfg(pipe):
    def sample():
        return pipe(
            ["a red cube", 'a sign that reads "HI"'],
            num_images_per_prompt=2,
            height=64,
            width=64,
            num_inference_steps=3,
            guidance_scale=4.5,  # > 1, so classifier-free guidance runs
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).images

    latents = sample()
    assert latents.shape == (4, 16, 8, 8)
    assert torch.isfinite(latents).all()
    assert torch.equal(latents, sample())  # eval mode: no dropout noise between calls


@pytest.mark.parametrize("mixed_precision", models.MIXED_PRECISION)
def test_the_vae_decodes_in_float32_under_every_mixed_precision(mixed_precision):
    dtype = models.autocast_dtype(mixed_precision, "cpu") or torch.float32
    vae = models.load_pipeline("tiny", dtype, "cpu").vae  # as the trainer loads it
    seen = []
    hooks = [m.register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
             for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # even inside the transformer's autocast region
        images = policy.decode(vae, torch.randn(2, 16, 8, 8), batch_size=1)
    for hook in hooks:
        hook.remove()
    assert seen and set(seen) == {(torch.float32, torch.float32)} and images.dtype == torch.float32


@pytest.mark.parametrize("shift", [3.0, 1.0])
def test_the_sigma_grid_is_the_pipelines_own_scheduler_grid(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(10)
    torch.testing.assert_close(policy.sigma_grid(scheduler, 10), scheduler.sigmas, rtol=0, atol=1e-6)


def test_char_tokenizer_wraps_with_special_tokens_and_pads():
    clip_tok = models.char_tokenizer(77, add_bos=True)
    ids = clip_tok("Hi!", padding="max_length", max_length=77).input_ids
    assert ids[:5] == [models.BOS_ID, models.VOCAB["h"], models.VOCAB["i"], models.VOCAB["!"], models.EOS_ID]
    assert len(ids) == 77 and set(ids[5:]) == {models.PAD_ID}
    assert models.char_tokenizer(512, add_bos=False)("é").input_ids == [models.UNK_ID, models.EOS_ID]


# --------------------------------------------------------------------------- text and image helpers


def image_with_text(text: str, size=(320, 128)) -> torch.Tensor:
    """Black text, large, on a white background, as a [3, H, W] tensor in [0, 1]."""
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((12, 30), text, fill="black", font=ImageFont.load_default(size=56))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def test_levenshtein_and_ocr_similarity():
    assert pixel_rewards.levenshtein("kitten", "sitting") == 3
    assert pixel_rewards.levenshtein("", "abc") == pixel_rewards.levenshtein("abc", "") == 3
    assert pixel_rewards.levenshtein("same", "same") == 0
    assert pixel_rewards.ocr_similarity("Open  late", "OPEN LATE") == 1.0  # case and spaces ignored
    assert pixel_rewards.ocr_similarity("OPEN", "OPEN LATE") == 0.5  # 4 of 8 characters missing
    assert pixel_rewards.ocr_similarity("a completely different long text", "OPEN") == 0.0  # clipped at 0


def test_to_pil_round_trips_pixels():
    images = torch.rand(2, 3, 5, 7)
    pil = rewards.to_pil(images)
    assert pil[1].size == (7, 5)
    back = torch.from_numpy(np.array(pil[1])).permute(2, 0, 1).float() / 255
    assert torch.allclose(back, images[1], atol=1 / 255)


# --------------------------------------------------------------------------- OCR


def test_the_installed_opencv_is_the_headless_build():
    # GPU servers seldom have libGL, which the desktop build links and needs to import at all.
    import cv2
    assert re.search(r"GUI:\s+NONE", cv2.getBuildInformation())
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("opencv-python")


@pytest.fixture(scope="module")
def ocr():
    return rewards.REWARDS["ocr"](RewardOptions())


def test_ocr_reads_rendered_word_and_not_a_blank_image(ocr):
    word, other_word = image_with_text("HELLO"), image_with_text("QUIZ")
    blank = torch.ones_like(word)
    scores = ocr(
        torch.stack([word, other_word, blank]),
        ['a sign that says "hello"', 'a sign that says "hello"', "a blank sign"],
        [{}, {}, {"text": "HELLO"}],  # target from the quotes, or from metadata
    )
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert scores[0] > 0.8
    assert scores[1] < 0.3  # wrong word: at most one letter in common
    assert scores[2] < 0.1


def test_ocr_without_target_text_names_the_prompt(ocr, monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "ocr", lambda options: ocr)
    with pytest.raises(RewardError, match="^reward 'ocr' failed on prompt 'a cat without quotes': no target text"):
        RewardMix("ocr")(torch.ones(1, 3, 32, 32), ["a cat without quotes"], [{}])


def test_an_ocr_failure_in_the_mix_names_the_prompt(ocr, monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "ocr", lambda options: ocr)
    with pytest.raises(RewardError, match=r"^reward 'ocr' failed on prompt 'a blank sign': the target text is empty"):
        RewardMix("ocr")(torch.ones(2, 3, 32, 32), ['a sign that says "hi"', "a blank sign"], [{}, {"text": " "}])


# --------------------------------------------------------------------------- spec parsing


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("ocr=0.8,pickscore=0.2", {"ocr": 0.8, "pickscore": 0.2}),
        ("ocr", {"ocr": 1.0}),
        (" ocr = 0.5 , jpeg_compressibility ", {"ocr": 0.5, "jpeg_compressibility": 1.0}),
        ("jpeg_compressibility=-1e-1", {"jpeg_compressibility": -0.1}),
    ],
)
def test_parse_reward_spec_accepts(spec, expected):
    assert rewards.parse_reward_spec(spec) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            "ocrr",
            "unknown reward 'ocrr' in --reward; "
            "expected one of: clipscore, jpeg_compressibility, ocr, pickscore, remote",
        ),
        ("ocr=", "weight '' for reward 'ocr' in --reward is not a finite number"),
        ("ocr=abc", "weight 'abc' for reward 'ocr'"),
        ("ocr=inf", "weight 'inf' for reward 'ocr' in --reward is not a finite number"),
        ("ocr,ocr=2", "reward 'ocr' appears twice"),
        ("", "empty entry in --reward ''"),
        ("ocr,,pickscore", "empty entry"),
    ],
)
def test_parse_reward_spec_rejects_with_one_clear_line(spec, message):
    with pytest.raises(ValueError) as error:
        rewards.parse_reward_spec(spec)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_mix_validates_spec_and_options_before_building_any_reward(monkeypatch):
    built = []
    monkeypatch.setitem(rewards.REWARDS, "ocr", lambda options: built.append("ocr"))
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        RewardMix("ocr,nope")
    with pytest.raises(ValueError, match="'remote' needs a reward server URL"):
        RewardMix("ocr,remote")
    assert built == []


# --------------------------------------------------------------------------- mixing


def mean_brightness(images, prompts, metadata):
    return images.mean(dim=(1, 2, 3))


def test_mix_is_the_weighted_sum_of_its_terms(monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "brightness", lambda options: mean_brightness)
    flat = torch.full((3, 64, 64), 0.5)
    noise = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.stack([flat, noise])
    prompts = ["flat grey", "noise"]

    total, terms = RewardMix("jpeg_compressibility=0.5,brightness=2")(images, prompts)

    jpeg = rewards.REWARDS["jpeg_compressibility"](RewardOptions())(images, prompts, [{}, {}])
    assert set(terms) == {"jpeg_compressibility", "brightness"}
    assert torch.equal(terms["jpeg_compressibility"], jpeg)
    assert torch.allclose(terms["brightness"], images.mean(dim=(1, 2, 3)))
    assert torch.allclose(total, 0.5 * jpeg + 2 * images.mean(dim=(1, 2, 3)))
    assert jpeg[0] > jpeg[1] and (jpeg < 0).all()  # a flat image compresses far better than noise


def test_mix_errors_name_the_reward_and_the_prompt(monkeypatch):
    def broken(images, prompts, metadata):
        if "a cat" in prompts:
            raise ZeroDivisionError("boom")
        return torch.zeros(len(prompts))

    def batch_only(images, prompts, metadata):
        if len(prompts) > 1:
            raise MemoryError("batch too large")
        return torch.zeros(len(prompts))

    monkeypatch.setitem(rewards.REWARDS, "broken", lambda options: broken)
    monkeypatch.setitem(rewards.REWARDS, "batch_only", lambda options: batch_only)
    monkeypatch.setitem(rewards.REWARDS, "wrong_shape", lambda options: lambda i, p, m: torch.zeros(len(p), 1))
    images = torch.zeros(3, 3, 8, 8)
    with pytest.raises(RewardError, match=r"^reward 'broken' failed on prompt 'a cat': boom$"):
        RewardMix("broken")(images, ["a dog", "a cat", "a cow"])
    with pytest.raises(RewardError, match=r"batch of 3 starting with prompt 'a dog', though not on any one image"):
        RewardMix("batch_only")(images, ["a dog", "a cat", "a cow"])
    images = torch.zeros(2, 3, 8, 8)
    with pytest.raises(RewardError, match=r"'wrong_shape' returned shape \[2, 1\].*expected \[2\]"):
        RewardMix("wrong_shape")(images, ["a dog", "a cat"])


def test_pooled_scores_equal_serial_scores_and_a_dead_worker_stops_cleanly():
    # Rendered words, a blank, noise (JPEG): few small images, since each OCR call costs ~0.1 s.
    images = torch.stack([image_with_text("HELLO"), image_with_text("QUIZ"), torch.ones(3, 128, 320),
                          torch.rand(3, 128, 320)])
    prompts = ['a sign that says "hello"', 'a sign that says "quiz"', 'a sign that says "open"', 'a sign "x"']
    spec = "ocr=0.5,jpeg_compressibility=0.01"
    serial_total, serial_terms = RewardMix(spec)(images, prompts)
    mix = RewardMix(spec, workers=2)
    try:
        pending = mix.submit(images, prompts)  # returns before the workers are done
        total, terms = pending.result()
        assert torch.equal(total, serial_total) and terms.keys() == serial_terms.keys()
        assert all(torch.equal(terms[k], serial_terms[k]) for k in terms)
        assert terms["ocr"][0] > 0.8  # the workers really read the text
        with pytest.raises(RewardError, match="'ocr'.*'a cat without quotes'"):
            mix(images[:1], ["a cat without quotes"])
        # Kill a worker while it has work: the pool breaks, and the caller gets a RewardError
        # naming the reward and a prompt instead of waiting forever.
        pending = mix.submit(images.repeat(8, 1, 1, 1), prompts * 8)
        mix.pool.processes[0].kill()
        started = time.monotonic()
        with pytest.raises(RewardError, match=r"reward 'ocr' failed on prompt .*worker process died"):
            pending.result()
        assert time.monotonic() - started < 60
        # Work submitted after the death gets the same error from its result, not from submitting.
        with pytest.raises(RewardError, match=r"reward 'ocr' failed on prompt 'a sign that says \"hello\"'.*died"):
            mix.submit(images, prompts).result()
    finally:
        mix.close()


@pytest.mark.parametrize("sampler", minflow.SAMPLERS)
def test_a_rollout_in_chunks_is_the_whole_rollout_and_scores_each_chunk_before_the_next_samples(sampler):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 2))

    def velocity(x, t):  # a row-independent stand-in for the transformer
        return net(torch.cat([x, torch.as_tensor(t, dtype=torch.float32).expand(x.shape[0])[:, None]], 1))

    sigmas, x = minflow.sd3_sigmas(6), torch.randn(10, 2)
    whole = minflow.rollout(velocity, x, sigmas, sampler, 0.7, torch.Generator().manual_seed(3))
    events = []

    def chunk_velocity(x, t, rows):
        events.append(("sample", rows.tolist()))
        return velocity(x, t)

    def score(x_final, rows):
        events.append(("score", rows.tolist()))
        return x_final.sum(1)

    algo = types.SimpleNamespace(sampler=sampler, noise_level=0.7, ddim_noise="literal")
    chunked, scores = policy.rollout_in_chunks(chunk_velocity, x, sigmas, algo, torch.Generator().manual_seed(3), 4,
                                               score)
    assert torch.equal(chunked.xs, whole.xs) and torch.equal(chunked.log_probs, whole.log_probs)
    assert torch.equal(chunked.stds, whole.stds) and torch.equal(chunked.sigmas, whole.sigmas)
    chunks = [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    # Each chunk samples all 6 steps, then is scored, before the next chunk samples at all.
    assert events == [e for rows in chunks for e in [("sample", rows)] * 6 + [("score", rows)]]
    assert [rows.tolist() for rows, _ in scores] == chunks
    assert torch.equal(torch.cat([s for _, s in scores]), whole.xs[:, -1].sum(1))


def test_image_statistics_tell_black_white_flat_and_busy_images_apart():
    black, white, grey = torch.zeros(3, 8, 8), torch.ones(3, 8, 8), torch.full((3, 8, 8), 0.5)
    stripes = torch.zeros(3, 8, 8)
    stripes[:, :, ::2] = 1  # a luma step at every column
    stats = policy.image_statistics(torch.stack([black, white, grey, stripes]))
    torch.testing.assert_close(stats["image_brightness"], torch.tensor([0.0, 1.0, 0.5, 0.5]))
    assert stats["image_black_share"].tolist() == [1.0, 0.0, 0.0, 0.5]
    assert stats["image_white_share"].tolist() == [0.0, 1.0, 0.0, 0.5]
    assert stats["image_edge_density"].tolist() == [0.0, 0.0, 0.0, 7 / 8]  # every column but the first


# --------------------------------------------------------------------------- CLIP and PickScore loading


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random 2-layer CLIP with its tokenizer and image processor, saved like a hub checkpoint."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    text_config = dict(
        vocab_size=len(models.VOCAB),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        pad_token_id=models.PAD_ID,
        bos_token_id=models.BOS_ID,
        eos_token_id=models.EOS_ID,
    )
    vision_config = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=8)
    CLIPModel(config).save_pretrained(folder)
    models.char_tokenizer(77, add_bos=True).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


def test_clipscore_and_pickscore_load_and_score(tiny_clip_dir):
    options = RewardOptions(clip_model=tiny_clip_dir, pickscore_model=tiny_clip_dir, pickscore_processor=tiny_clip_dir)
    mix = RewardMix("clipscore,pickscore", options)
    images = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    _total, terms = mix(images, ["a cat", "a dog on a skateboard", "x"])

    for name in ("clipscore", "pickscore"):
        assert terms[name].shape == (3,) and torch.isfinite(terms[name]).all()
    assert (terms["clipscore"].abs() <= 1).all()  # a cosine
    # Same model in both: PickScore is the cosine times logit_scale / 26.
    logit_scale = mix.rewards["pickscore"].model.logit_scale.exp().item()
    assert torch.allclose(terms["pickscore"], terms["clipscore"] * logit_scale / 26, atol=1e-5)
    assert terms["clipscore"].unique().numel() == 3  # each image is paired with its own prompt


# --------------------------------------------------------------------------- remote reward


class RewardHandler(http.server.BaseHTTPRequestHandler):
    """A fake reward server. Path /score answers len(prompt) + metadata bonus + mean pixel value of the PNG."""

    def do_POST(self):
        self.server.hits[self.path] = self.server.hits.get(self.path, 0) + 1
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status, reply = 200, b""
        if self.path == "/score":
            scores = []
            for prompt, meta, png in zip(request["prompts"], request["metadata"], request["images"]):
                image = Image.open(io.BytesIO(base64.b64decode(png)))
                mean_pixel = np.asarray(image.convert("L")).mean() / 255
                scores.append(len(prompt) + meta.get("bonus", 0) + mean_pixel)
            reply = json.dumps({"scores": scores}).encode()
        elif self.path == "/wrong-count":
            reply = json.dumps({"scores": [1.0]}).encode()
        elif self.path == "/not-json":
            reply = b"<html>oops</html>"
        elif self.path == "/too-big":
            reply = json.dumps({"scores": [0.0] * 1000}).encode()
        elif self.path == "/unavailable":
            status = 503
        elif self.path == "/slow":
            time.sleep(1.0)
            reply = json.dumps({"scores": [0.0] * len(request["prompts"])}).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (/slow)
            pass

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture(scope="module")
def server():
    """The fake reward server on 127.0.0.1, serving from a daemon thread until the module's tests end."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RewardHandler)  # port 0: any free port
    server.hits = {}  # path -> number of requests
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_remote_reward_scores_each_image_with_its_prompt(server):
    images = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)])
    scores = RemoteReward(server.url + "/score")(images, ["ab", "abcd"], [{}, {"bonus": 10}])
    assert scores.dtype == torch.float32
    assert torch.allclose(scores, torch.tensor([2.0 + 0.0, 4.0 + 10 + 1.0]))


@pytest.mark.parametrize(
    "path, message",
    [
        ("/wrong-count", "returned 1 scores for 2 images"),
        ("/not-json", "did not reply with JSON"),
        ("/too-big", "sent more than 100 bytes"),
    ],
)
def test_remote_reward_rejects_bad_replies(server, path, message):
    remote = RemoteReward(server.url + path, max_response_bytes=100)
    with pytest.raises(RewardServerError, match=message):
        remote(torch.zeros(2, 3, 8, 8), ["a", "b"], [{}, {}])


def test_remote_reward_retries_server_errors_then_gives_up(server):
    remote = RemoteReward(server.url + "/unavailable", attempts=3, backoff_s=0.01)
    with pytest.raises(RewardServerError, match="failed after 3 attempts.*HTTP 503"):
        remote(torch.zeros(1, 3, 8, 8), ["a"], [{}])
    assert server.hits["/unavailable"] == 3


def test_remote_reward_times_out_on_a_slow_server(server):
    remote = RemoteReward(server.url + "/slow", timeout_s=0.2, attempts=2, backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(RewardServerError, match=r"failed after 2 attempts \(last error: no answer within 0.2 s\)"):
        remote(torch.zeros(1, 3, 8, 8), ["a"], [{}])
    assert time.monotonic() - start < 2


def test_remote_reward_reports_a_server_that_is_down():
    with socket.socket() as probe:  # find a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    remote = RemoteReward(f"http://127.0.0.1:{port}/score", timeout_s=0.5, attempts=3, backoff_s=0.01)
    start = time.monotonic()
    with pytest.raises(RewardServerError, match="failed after 3 attempts.*is it running"):
        remote(torch.zeros(1, 3, 8, 8), ["a"], [{}])
    assert time.monotonic() - start < 3


def test_remote_failure_through_the_mix_names_reward_and_prompt(server):
    mix = RewardMix("remote", RewardOptions(remote_url=server.url + "/not-json"))
    with pytest.raises(RewardError, match=r"reward 'remote' failed on prompt 'a red bus'.*did not reply with JSON"):
        mix(torch.zeros(1, 3, 8, 8), ["a red bus"], [{}])


# --------------------------------------------------------------------------- prompt sets


def test_shipped_prompt_sets_load():
    ocr_train, ocr_test = data.load_prompts("ocr")
    assert len(ocr_train) >= 50 and len(ocr_test) >= 12
    for prompt, metadata in ocr_train + ocr_test:
        assert f'"{metadata["text"]}"' in prompt  # the OCR target is the quoted text
    assert not {m["text"] for _, m in ocr_train} & {m["text"] for _, m in ocr_test}

    general_train, general_test = data.load_prompts("general")
    assert len(general_train) >= 50 and len(general_test) >= 12
    assert all(metadata == {} and prompt for prompt, metadata in general_train + general_test)
    assert not {p for p, _ in general_train} & {p for p, _ in general_test}


def test_load_prompts_from_txt_and_jsonl_folders(tmp_path):
    (tmp_path / "train.txt").write_text("  a cat  \n\n\na dog\n", encoding="utf-8")
    (tmp_path / "test.jsonl").write_text(
        '{"prompt": "a sign reading \\"HI\\"", "text": "HI", "seed": 3}\n\n{"prompt": "café"}\n', encoding="utf-8"
    )
    train, test = data.load_prompts(tmp_path)
    assert train == [("a cat", {}), ("a dog", {})]
    assert test == [('a sign reading "HI"', {"text": "HI", "seed": 3}), ("café", {})]


def write_split(folder, name, content: bytes):
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(content)


@pytest.mark.parametrize(
    "files, message",
    [
        ({}, "is neither a folder nor a shipped set"),
        ({"train.txt": b"a cat\n"}, "has neither test.txt and test.jsonl"),
        (
            {"train.txt": b"a\n", "train.jsonl": b'{"prompt": "a"}\n', "test.txt": b"b\n"},
            "has both train.txt and train.jsonl",
        ),
        ({"train.txt": b"\n  \n", "test.txt": b"b\n"}, "train.txt holds no prompts"),
        ({"train.txt": b"caf\xe9\n", "test.txt": b"b\n"}, "train.txt is not UTF-8 text"),
        ({"train.txt": b"a\n", "test.jsonl": b'{"prompt": "a"}\n{"prompt": "b",}\n'}, "test.jsonl:2: invalid JSON"),
        (
            {"train.txt": b"a\n", "test.jsonl": b'{"text": "HI"}\n'},
            'test.jsonl:1: expected an object with a non-empty "prompt"',
        ),
    ],
)
def test_load_prompts_rejects_bad_input_with_one_line(tmp_path, files, message):
    folder = tmp_path / "set"
    for name, content in files.items():
        write_split(folder, name, content)
    with pytest.raises(ValueError) as error:
        data.load_prompts(folder)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------- prompt embeddings


def memory_bytes(key):
    """VmRSS (resident now) or VmHWM (the peak since the last reset) of this process."""
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


def test_prompt_embeddings_are_written_once_read_by_the_row_and_reused(tmp_path):
    prompts = [f'a sign that reads "{i}" on a {("red", "green", "blue")[i % 3]} wall' for i in range(2000)]
    pipe, reference = (models.load_pipeline("tiny", torch.float32, "cpu") for _ in range(2))
    expected = policy.encode_prompts(reference, [prompts[1999], prompts[7], prompts[7]], 4.5, "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2000 prompts take seconds on one thread, far more on a busy machine's two
    try:
        Path("/proc/self/clear_refs").write_text("5")  # restart the peak's count
        before = memory_bytes("VmRSS")
        bank = policy.PromptBank(pipe, prompts, 4.5, "cpu", 32, tmp_path, "tiny")
        picked = bank(torch.tensor([1999, 7, 7]))
        peak, table = memory_bytes("VmHWM") - before, bank.path.stat().st_size
    finally:
        torch.set_num_threads(threads)
    assert table > 80e6 and peak < table / 3, (peak, table)  # 2001 rows of 333 x 32 + 16 floats
    for name in ("embeds", "pooled", "negative_embeds", "negative_pooled"):
        torch.testing.assert_close(getattr(picked, name), getattr(expected, name), rtol=0, atol=1e-6)
    # A second run finds the file: its text encoders are gone, and nothing is written again.
    written = bank.path.stat().st_mtime_ns
    again = policy.PromptBank(pipe, prompts, 4.5, "cpu", 32, tmp_path, "tiny")
    assert torch.equal(again(torch.tensor([7])).embeds, picked.embeds[1:2]) and bank.path.stat().st_mtime_ns == written
    other = policy.PromptBank(reference, prompts[:10], 4.5, "cpu", 32, tmp_path, "tiny")
    assert other.path != bank.path and len(list(tmp_path.iterdir())) == 2
