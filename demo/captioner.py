"""A tiny LLaVA for offline tests and the caption benchmark: CLIP vision tower + Llama + chat template.

The real captioning step uses ``llava-hf/llava-1.5-7b-hf`` (PixArt-alpha §2.2). This
builds a ``LlavaForConditionalGeneration`` of the same class (and a LLaVA-NeXT) from small configs
(random, seeded), a word-level tokenizer over the demo vocabulary with a LLaVA-1.5
style chat template, and a ``LlavaProcessor``; ``save_pretrained`` writes them to
one folder that ``tristage caption`` loads back through ``from_pretrained`` -- the
same path a hub id takes.  Its captions are random words, which is all the
pipeline tests need: real text in the reader's id form.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from tristage.demo.encoders import demo_vocabulary

IMAGE_SIDE, PATCH = 32, 8  # tests: 16 image tokens per image
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), as a Jinja chat template.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %} {% else %}ASSISTANT: "
    "{% for item in message['content'] %}{{ item['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: LLaVA's special tokens, then the demo words and the prompt's words."""
    words = [w for w in demo_vocabulary() if w not in ("<pad>", "</s>", "<unk>")]
    extra = ["user", "assistant", "describe", "its", "style", "very", "detailed", "manner", "original"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*SPECIALS, *words, *extra]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


@dataclass(frozen=True)
class TinyShape:
    """Sizes of the tiny LLaVA (the tests' default; the benchmark makes it wider)."""

    width: int = 64  # Llama hidden size (the CLIP tower is half as wide)
    layers: int = 2  # layers of the Llama and of the CLIP tower
    image_side: int = IMAGE_SIDE  # the processor's resize/crop side and the tower's image size
    patch: int = PATCH  # CLIP patch side: (image_side / patch)^2 image tokens


def _configs(tokenizer: PreTrainedTokenizerFast, shape: TinyShape) -> dict:
    """The tower, language model and wiring shared by the LLaVA and LLaVA-NeXT configs."""
    vision = CLIPVisionConfig(
        hidden_size=shape.width // 2,
        intermediate_size=shape.width,
        num_hidden_layers=shape.layers,
        num_attention_heads=2,
        image_size=shape.image_side,
        patch_size=shape.patch,
        projection_dim=shape.width // 2,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.width,
        intermediate_size=2 * shape.width,
        num_hidden_layers=shape.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
    )
    return {
        "vision_config": vision,
        "text_config": text,
        "image_token_index": tokenizer.convert_tokens_to_ids("<image>"),
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
    }


def _processor_kwargs(tokenizer: PreTrainedTokenizerFast, shape: TinyShape) -> dict:
    return {
        "tokenizer": tokenizer,
        "patch_size": shape.patch,
        "vision_feature_select_strategy": "default",
        "num_additional_image_tokens": 1,  # CLIP's CLS token, dropped by the "default" strategy
        "chat_template": CHAT_TEMPLATE,
    }


def _save(model, processor, tokenizer: PreTrainedTokenizerFast, out: str | Path) -> Path:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return Path(out)


def write_captioner(out: str | Path, shape: TinyShape = TinyShape(), seed: int = 0) -> Path:
    """Save a tiny LLaVA(-1.5) model + processor to ``out`` (loadable with ``from_pretrained``)."""
    tokenizer = build_tokenizer()
    side = shape.image_side
    images = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor = LlavaProcessor(image_processor=images, **_processor_kwargs(tokenizer, shape))
    configs = _configs(tokenizer, shape)
    torch.manual_seed(seed)
    return _save(LlavaForConditionalGeneration(LlavaConfig(**configs)).eval(), processor, tokenizer, out)


def write_next_captioner(out: str | Path, shape: TinyShape = TinyShape(), seed: int = 0) -> Path:
    """Save a tiny LLaVA-NeXT: "anyres" tiles, so an image's token count depends on its size."""
    tokenizer = build_tokenizer()
    side = shape.image_side
    grid = [[side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    images = LlavaNextImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}, image_grid_pinpoints=grid
    )
    processor = LlavaNextProcessor(image_processor=images, **_processor_kwargs(tokenizer, shape))
    configs = _configs(tokenizer, shape)
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(LlavaNextConfig(**configs, image_grid_pinpoints=grid)).eval()
    return _save(model, processor, tokenizer, out)
