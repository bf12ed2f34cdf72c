"""The data side's typed config: raw source, feature cache and loader, frozen encoders, re-captioning.

These sections sit beside the code that reads them, so ``data/`` never imports ``train/``;
``train/config.py`` composes them into the run's ``Config`` (YAML keys ``data:``, ``encoders:``,
``caption:``).  Each checks its own values in ``__post_init__`` (``tristage/checks.py``): every choice
against its list here, every number against its range, once, when the config is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from tristage.checks import at_least, check_choice, in_range, positive, seed
from tristage.errors import ConfigError

# data.source.kind: the raw readers (data/sources.py SOURCES, keyed by these names)
SOURCE_KINDS = ("imagenet_wds", "imagenet_folders", "sam_llava", "aesthetic_folder", "aesthetic_wds", "wds")
NULL_CAPTIONS = ("t5_empty", "buffer")  # data.null_caption (train/training/null_caption.py)
ON_DAMAGED = ("stop", "skip")  # data.on_damaged (data/features.py FeatureLoader._intact_rows)
FEATURE_DTYPES = ("bfloat16", "float16", "float32")  # encoders.feature_dtype (data/cache.py DTYPES)
# encoders.text_feature_dtype (data/text_codec.py TEXT_CODECS)
TEXT_FEATURE_DTYPES = ("bfloat16", "float16", "float32", "float8_e4m3fn")


@dataclass
class SourceConfig:
    kind: str = MISSING  # raw reader, a key of data.sources.SOURCES: imagenet_wds, imagenet_folders, ...
    paths: list[str] = field(
        default_factory=list
    )  # shard globs, tar files or folders; s3:// gs:// pipe: for tars
    captions: str | None = None  # id -> caption (JSON/JSONL/tar/ID.txt dir): sam_llava; wds: over its own
    metadata: str | None = None  # aesthetic_folder: JSONL or parquet with file, caption, aesthetic_score
    synsets: str | None = None  # imagenet: "synset name" lines; line order = class index
    min_aesthetic: float = 0.0  # aesthetic sets: keep only images scoring above this (scores are >= 0)
    alpha_background: list[int] = field(default_factory=lambda: [255, 255, 255])  # RGB under transparent px

    def __post_init__(self) -> None:
        check_choice("data.source.kind", self.kind, SOURCE_KINDS)
        at_least("data.source.min_aesthetic", self.min_aesthetic, 0.0)
        bg = self.alpha_background
        if len(bg) != 3 or not all(0 <= v <= 255 for v in bg):
            raise ConfigError(f"key 'data.source.alpha_background': must be 3 values in [0, 255], got {bg}")


@dataclass
class DataConfig:
    source: SourceConfig = field(default_factory=SourceConfig)  # where the raw images come from
    cache_dir: str = MISSING  # feature shards + manifest of `tristage cache`: a folder, s3:// or gs:// URL
    resolution: int = 256  # base pixel resolution of the bucket table
    multi_aspect: bool = False  # bucket by aspect ratio (PixArt tables) instead of a square crop
    batch_size: int = 32  # per-process micro-batch (global batch = batch_size * processes * train.grad_accum)
    shuffle_buffer: int = 1000  # samples held for shuffling
    cond_dropout: float = 0.1  # caption/class dropout for classifier-free guidance
    null_caption: str = "t5_empty"  # dropped captions become t5_empty (T5("")) | buffer (the official null)
    on_damaged: str = "stop"  # a cached sample failing its checksum: "stop" the run, or "skip" and count it
    remote_cache_dir: str | None = None  # local folder for copies of s3:// / gs:// shards (null: TMPDIR)
    remote_cache_gb: float = 50.0  # per-process size cap of that folder; least recently used shards go first
    val_fraction: float = 0.0  # share of the source held out for validation, by a hash of each sample's key
    val_max_samples: int = 1000  # most held-out samples validation reads (those with the lowest key hashes)
    val_paths: list[str] = field(default_factory=list)  # the source's own validation paths, not val_fraction

    def __post_init__(self) -> None:
        at_least("data.resolution", self.resolution, 8)  # one latent pixel of the VAE's factor 8
        at_least("data.batch_size", self.batch_size, 1)
        at_least("data.shuffle_buffer", self.shuffle_buffer, 1)
        in_range("data.cond_dropout", self.cond_dropout, 0.0, 1.0)
        check_choice("data.null_caption", self.null_caption, NULL_CAPTIONS)
        check_choice("data.on_damaged", self.on_damaged, ON_DAMAGED)
        positive("data.remote_cache_gb", self.remote_cache_gb)
        in_range("data.val_fraction", self.val_fraction, 0.0, 1.0, open_high=True)
        at_least("data.val_max_samples", self.val_max_samples, 1)
        if self.val_paths and self.val_fraction > 0:
            raise ConfigError(
                "key 'data.val_paths': the validation split is either the source's own paths or a "
                f"held-out share (data.val_fraction={self.val_fraction}); set data.val_fraction=0"
            )
        if (self.val_paths or self.val_fraction > 0) and "://" in str(self.cache_dir):
            raise ConfigError(
                f"key 'data.cache_dir': a validation split (data.val_fraction, data.val_paths) needs a "
                f"local cache folder for now, got {self.cache_dir}"
            )


@dataclass
class EncoderConfig:
    vae: str = "stabilityai/sd-vae-ft-ema"  # AutoencoderKL hub id or local folder (frozen)
    text_encoder: str | None = "google/t5-v1_1-xxl"  # T5 encoder hub id or folder; null for stage 1
    tokenizer: str | None = "google/t5-v1_1-xxl"  # tokenizer hub id or folder
    max_tokens: int = 120  # T5 token budget (captions are truncated to this)
    feature_dtype: str = "bfloat16"  # dtype of the cached VAE posterior mean and std
    text_feature_dtype: str = "bfloat16"  # cached T5: bfloat16 | float16 | float32 | float8_e4m3fn (scaled)
    batch_size: int = 16  # images per encoder forward in the cache pass

    def __post_init__(self) -> None:
        at_least("encoders.max_tokens", self.max_tokens, 1)
        at_least("encoders.batch_size", self.batch_size, 1)
        check_choice("encoders.feature_dtype", self.feature_dtype, FEATURE_DTYPES)
        check_choice("encoders.text_feature_dtype", self.text_feature_dtype, TEXT_FEATURE_DTYPES)


# PixArt-alpha §2.2: SAM images re-captioned by LLaVA with this prompt.
PAPER_CAPTION_PROMPT = "Describe this image and its style in a very detailed manner"
CAPTION_DTYPES = ("auto", "bfloat16", "float16", "float32")  # caption.dtype choices


@dataclass
class CaptionConfig:
    model: str = "llava-hf/llava-1.5-7b-hf"  # VLM hub id or folder: LLaVA, LLaVA-NeXT, any image-text-to-text
    prompt: str = PAPER_CAPTION_PROMPT  # the instruction given with every image
    max_new_tokens: int = 256  # caption length budget in generated tokens
    batch_size: int = 16  # images per generate() call
    sort_window: int = 8  # batches read ahead and sorted by image size, so a batch pads little
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | bfloat16 | float16 | float32
    do_sample: bool = False  # false: greedy (reproducible); true: sample with temperature and top_p
    temperature: float = 0.7  # sampling temperature (do_sample only)
    top_p: float = 0.9  # nucleus sampling mass (do_sample only)
    seed: int = 0  # sampling seed; unit i samples from seed + i, so a rerun repeats it
    hint: bool = False  # give the reader's existing caption (alt-text) to the model as a hint
    hint_prompt: str = "{prompt}. An existing caption, which may be wrong: {hint}"  # prompt with a hint
    output: str | None = None  # caption JSONL to write ({"id", "caption"} per line); parts in OUTPUT.parts/

    def __post_init__(self) -> None:
        at_least("caption.max_new_tokens", self.max_new_tokens, 1)
        at_least("caption.batch_size", self.batch_size, 1)
        at_least("caption.sort_window", self.sort_window, 1)
        check_choice("caption.dtype", self.dtype, CAPTION_DTYPES)
        positive("caption.temperature", self.temperature)
        in_range("caption.top_p", self.top_p, 0.0, 1.0, open_low=True)
        seed("caption.seed", self.seed)
        if "{prompt}" not in self.hint_prompt or "{hint}" not in self.hint_prompt:
            raise ConfigError("key 'caption.hint_prompt': must contain {prompt} and {hint}")
