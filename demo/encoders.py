"""Tiny frozen encoders for the offline demo: a word-level tokenizer and a 2-layer T5, and a small
DINOv2 for REPA.

The real stages use ``google/t5-v1_1-xxl``.  The demo builds a T5EncoderModel of
the same class from a small config (random, frozen, seeded) and a tokenizer
whose vocabulary covers the demo captions, saves both with ``save_pretrained``
and everything downstream loads them back through ``from_pretrained`` -- the
same path a real hub id takes.  REPA's reference encoder is ``facebook/dinov2-base``;
the demo's is a ``Dinov2Model`` of the same class, 4 layers wide 64, trained on the demo's
own renders (``demo/assets/train_demo_encoder.py``, committed in ``demo/assets/demo_encoder``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import Dinov2Config, Dinov2Model, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from tristage.demo import synthetic

_EXTRA_WORDS = (
    "a an the of on in at is it this that there shows image picture photo illustration simple shape shapes "
    "features large small big tiny near top bottom left right centered center middle corner background "
    "colour color colored coloured and with one single plain solid bright dark light object drawing "
    "scene view , . ; : !"
)


def demo_vocabulary() -> list[str]:
    """Special tokens (T5's ids: pad 0, eos 1, unk 2), then every word the demo captions use."""
    words: set[str] = set(_EXTRA_WORDS.split())
    words.update(synthetic.COLOURS, synthetic.SHAPES, synthetic.BACKGROUNDS)
    for text in (*synthetic._TEMPLATES, *synthetic.POSITIONS.values()):
        words.update(w.lower() for w in re.findall(r"\w+|[^\w\s]", text) if "{" not in w and "}" not in w)
    return ["<pad>", "</s>", "<unk>", *sorted(words - {"{", "}"})]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level, lower-casing tokenizer that appends ``</s>`` like T5's."""
    vocab = {w: i for i, w in enumerate(demo_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=120
    )


def build_text_encoder(vocab_size: int, d_model: int = 64, seed: int = 0) -> T5EncoderModel:
    """A 2-layer T5 v1.1-style encoder (gated-GELU), randomly initialised from ``seed``."""
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=16,
        num_heads=4,
        d_ff=2 * d_model,
        num_layers=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def write_demo_text_encoder(out: Path) -> tuple[Path, Path]:
    """Save the demo tokenizer and T5 encoder; returns (tokenizer_dir, text_encoder_dir)."""
    tokenizer = build_tokenizer()
    tok_dir, enc_dir = out / "tokenizer", out / "text_encoder"
    tokenizer.save_pretrained(tok_dir)
    build_text_encoder(len(tokenizer)).save_pretrained(enc_dir)
    return tok_dir, enc_dir


def demo_vae_path() -> Path:
    """The committed demo VAE (trained once by ``demo/assets/train_demo_vae.py``)."""
    return Path(__file__).parent / "assets" / "demo_vae"


def write_encoders(root: Path, vae_channels: tuple[int, ...] = (16, 16, 32, 32)) -> dict[str, Path]:
    """A small random AutoencoderKL (factor 8, seeded) and the demo T5, saved for ``from_pretrained``: the
    encoders of the cache benchmark and of the cache and caption tests."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=vae_channels,
        norm_num_groups=8,
        latent_channels=4,
    ).save_pretrained(root / "vae")
    tokenizer, text_encoder = write_demo_text_encoder(root)
    return {"vae": root / "vae", "tokenizer": tokenizer, "text_encoder": text_encoder}


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DINOv2's preprocessing


def build_vision_encoder(
    hidden: int = 64, layers: int = 4, patch: int = 8, image_size: int = 64, seed: int = 0
) -> Dinov2Model:
    """A small ``Dinov2Model`` (DINOv2's class: CLS + patch tokens, final LayerNorm), random from ``seed``."""
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden,
        patch_size=patch,
        image_size=image_size,
    )
    torch.manual_seed(seed)
    return Dinov2Model(config).eval()


def save_vision_encoder(model: Dinov2Model, folder: Path) -> Path:
    """Weights plus the image processor's config (mean and std, as the hub's DINOv2 folders hold)."""
    from transformers import BitImageProcessorPil

    side = model.config.image_size
    model.save_pretrained(folder)
    processor = BitImageProcessorPil(
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        size={"shortest_edge": side},
        crop_size={"height": side, "width": side},
    )
    processor.save_pretrained(folder)
    return folder


def demo_vision_encoder_path() -> Path:
    """The committed demo REPA encoder (trained once by ``demo/assets/train_demo_encoder.py``)."""
    return Path(__file__).parent / "assets" / "demo_encoder"
