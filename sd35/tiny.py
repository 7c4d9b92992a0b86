"""A tiny Stable Diffusion 3.5 pipeline described in code (sd35/models.py builds it with random
weights): the structure of SD3.5-Medium (three text encoders, an MMDiT with dual-attention blocks
and RMS q/k-norm, a 16-channel VAE, a shifted flow-matching scheduler) without its weights, for
tests and CPU runs. Its per-character tokenizers also serve sd35m-random, whose text encoders have
no trained vocabulary to match. The comments say which sizes must agree.
"""
import string

from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, PreTrainedTokenizerFast, T5Config

# Token ids shared by all three tokenizers. CLIP pools the hidden state at the first EOS token;
# transformers treats eos_token_id == 2 as a legacy config and pools at the largest token id
# instead, so EOS must not be id 2.
SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(len(SPECIAL_TOKENS))
# Prompts are lowercased before tokenising, so lowercase letters suffice.
CHARACTERS = string.ascii_lowercase + string.digits + string.punctuation + " "
VOCAB = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
CLIP_TOKENS = dict(pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID)
T5_TOKENS = dict(pad_token_id=PAD_ID, eos_token_id=EOS_ID)

CLIP_MAX_LENGTH = 77  # SD3 pads both CLIP prompts to exactly 77 tokens
T5_MAX_LENGTH = 512  # the pipeline refuses max_sequence_length above 512 anyway


def char_tokenizer(max_length: int, add_bos: bool) -> PreTrainedTokenizerFast:
    """A lowercase, one-token-per-character tokenizer built in memory: <eos> ends each sequence,
    CLIP-style ones (add_bos) start with <bos>, <pad> pads on the right (to max_length if asked)."""
    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # Every single character is its own "word" for the WordLevel model.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # join characters back without spaces
    template = "<bos> $A <eos>" if add_bos else "$A <eos>"
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<bos>", BOS_ID), ("<eos>", EOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="right",
                                   model_max_length=max_length)


def assemble(transformer, vae, text_encoder, text_encoder_2, text_encoder_3):
    """An SD3 pipeline of the given parts, the per-character tokenizers and SD3.5's scheduler."""
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3.5's timestep shift
        text_encoder=text_encoder, tokenizer=char_tokenizer(CLIP_MAX_LENGTH, add_bos=True),
        text_encoder_2=text_encoder_2, tokenizer_2=char_tokenizer(CLIP_MAX_LENGTH, add_bos=True),
        text_encoder_3=text_encoder_3, tokenizer_3=char_tokenizer(T5_MAX_LENGTH, add_bos=False))


def configs():
    """{part: config} of a tiny SD3.5-shaped pipeline (under 100k parameters): an MMDiT of 2 heads
    x 8 and 3 layers (2 dual), a 4-level VAE (8x) with 16 latent channels, so that a 64-pixel
    image is 8x8 latents, 4x4 = 16 image tokens; CLIP widths 8 and 16 stand in for 768 and 1280."""
    clip = dict(vocab_size=len(VOCAB), num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH,
                num_hidden_layers=2, projection_dim=8, **CLIP_TOKENS)  # SD3 reads the penultimate hidden state
    return {
        "transformer": dict(
            sample_size=8,  # default latent side: 8 latents = 64 pixels
            patch_size=2, in_channels=16, out_channels=16, num_layers=3, num_attention_heads=2, attention_head_dim=8,
            joint_attention_dim=32,  # text tokens arrive at T5's width, which must be >= the CLIP widths' sum
            caption_projection_dim=16,  # heads x head_dim: text and image tokens share the width
            pooled_projection_dim=16,  # the two CLIP projections side by side
            pos_embed_max_size=32,  # supports latents up to 64 (512 px): 32 patches a side
            dual_attention_layers=(0, 1), qk_norm="rms_norm"),
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=16,
            # Four levels give the real VAE's 8x downsampling (2 ** (levels - 1)).
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
            use_quant_conv=False, use_post_quant_conv=False,
            scaling_factor=1.5305, shift_factor=0.0609),  # the real SD3.5 VAE's normalisation
        "text_encoder": CLIPTextConfig(hidden_size=8, intermediate_size=16, **clip),
        "text_encoder_2": CLIPTextConfig(hidden_size=16, intermediate_size=32, **clip),
        "text_encoder_3": T5Config(vocab_size=len(VOCAB), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   **T5_TOKENS),
    }
