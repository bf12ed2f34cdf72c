"""A tiny LLaVA for offline tests and the caption benchmark: CLIP vision tower + Llama + chat template.

The real captioning step uses ``llava-hf/llava-1.5-7b-hf`` (PixArt-alpha §2.2). This
builds a ``LlavaForConditionalGeneration`` of the same class from small configs
(random, seeded), a word-level tokenizer over the demo vocabulary with a LLaVA-1.5
style chat template, and a ``LlavaProcessor``; ``save_pretrained`` writes them to
one folder that ``tristage caption`` loads back through ``from_pretrained`` -- the
same path a hub id takes.  Its captions are random words, which is all the
pipeline tests need: real text in the reader's id form.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from tristage.demo.encoders import demo_vocabulary

IMAGE_SIDE, PATCH = 32, 8  # 16 image tokens per image
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


def build_model(
    vocab_size: int, image_token_id: int, pad_id: int, seed: int = 0
) -> LlavaForConditionalGeneration:
    """CLIP tower (2 layers, width 32) + Llama (2 layers, width 64), seeded."""
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIDE,
        patch_size=PATCH,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=pad_id,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def write_captioner(out: str | Path, seed: int = 0) -> Path:
    """Save a tiny LLaVA model + processor to ``out`` (loadable with ``from_pretrained``)."""
    out = Path(out)
    tokenizer = build_tokenizer()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIDE}, crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE,
    )
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    model = build_model(len(tokenizer), image_id, tokenizer.pad_token_id, seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
