"""Typed run configuration: defaults <- YAML <- ``key=value`` overrides.

Every key is declared with a one-line meaning (nanoGPT-style): here, or beside its owner
(``data/config.py``: source, cache and encoders; ``train/diffusion/objective.py``: the loss).  Unknown
keys, wrong types and missing paths are reported as one line that names the
key and the file, before any heavy work starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tristage.data.config import CaptionConfig, ConfigError, DataConfig, EncoderConfig, check_choice
from tristage.train.diffusion.objective import ObjectiveConfig
from tristage.train.models.masking import MaskConfig
from tristage.train.models.sizes import SIZES

LR_SCHEDULES = ("constant", "cosine")  # optim.lr_schedule (train/training/lr_schedules.py FACTORS)
# train.parallelism: DDP, or FSDP2 re-sharding the weights after the forward or not (train/training/fsdp.py)
PARALLELISMS = ("ddp", "fsdp", "fsdp_grad_op")
SHARDED_PARALLELISMS = ("fsdp", "fsdp_grad_op")  # the ones that shard weights, grads, AdamW and EMA


@dataclass
class RunConfig:
    dir: str = MISSING  # output folder of this stage run (checkpoints/, final/, logs)
    name: str = "stage"  # human name of the stage, used for tracker runs and summaries


@dataclass
class ModelConfig:
    family: str = "pixart"  # "dit" (stage 1, class-conditional) or "pixart" (stages 2-3, text-conditional)
    size: str = "XL/2"  # transformer size from train/models/sizes.py SIZES
    sample_size: int = 32  # latent side of the base resolution (pixels / 8); sets the pos-embed base
    in_channels: int = 4  # VAE latent channels
    num_classes: int = 1000  # stage 1: class count; id num_classes is the null class used for CFG
    class_embed_std: float = 0.02  # stage 1: init std of the class table (DiT: 0.02; the CPU demo: 1.0)
    caption_channels: int = 4096  # stage 2-3: T5 feature width (4096 for T5-XXL)
    caption_embed_std: float = 0.02  # init std of the new caption MLP (PixArt: 0.02; the narrow demo T5: 0.1)
    interpolation_scale: float | None = None  # pos table; null: max(sample_size // 64, 1), 2 only at 1024 px
    freq_shift: int = 1  # stage 1 timestep sinusoid shift: 1 diffusers / DiTPipeline, 0 the official DiT
    use_additional_conditions: bool = False  # PixArt-MS resolution / aspect-ratio micro-conditions
    gradient_checkpointing: bool = False  # recompute block activations in backward to save memory
    checkpoint_blocks: int = -1  # with gradient_checkpointing: leading blocks to recompute (-1 = all)
    attention_backend: str = "sdpa"  # "sdpa" (PyTorch fused attention) or "xformers" (optional extra)


@dataclass
class OptimConfig:
    lr: float = 2e-5  # AdamW learning rate (PixArt: 2e-5)
    weight_decay: float = 3e-2  # AdamW weight decay (PixArt: 3e-2)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    eps: float = 1e-10  # AdamW epsilon (PixArt: 1e-10; DiT: torch's 1e-8)
    warmup_steps: int = 1000  # linear warm-up steps
    lr_schedule: str = "constant"  # after warm-up: "constant" (PixArt) or "cosine" (to 0 at train.max_steps)
    grad_clip: float | None = 0.01  # max global grad norm (PixArt: 0.01); null = no clipping (DiT)
    auto_lr: bool = True  # sqrt-scale lr by global batch / 256 (PixArt's auto_lr; DiT: off)


@dataclass
class TrainConfig:
    max_steps: int = 300_000  # optimizer steps for the stage
    seed: int = 0  # seeds model init, data order and noise
    mixed_precision: str = "bf16"  # "no" | "fp16" | "bf16"
    grad_accum: int = 1  # micro-batches of data.batch_size per optimizer step (all-reduce on the last)
    ema_decay: float = 0.9999  # EMA of the weights (exported as final/), constant from an initial copy
    ema_warmup: bool = False  # decay min(ema_decay, (1 + step) / (10 + step)): for short runs (not official)
    log_every: int = 50  # steps between metric logs (host syncs only happen here)
    max_time: float | None = None  # seconds from the agreed start (all ranks started); past it: save, exit 0
    max_nonfinite: int = 10  # consecutive non-finite steps before saving and stopping
    nonfinite_check: str = "step"  # NaN guard: "step" (host sync per step) or "log" (sync-free; nonfinite.py)
    compile: bool = False  # torch.compile each transformer block (slow first steps, faster after)
    allow_tf32: bool = True  # TF32 matmuls and convolutions on CUDA (Ampere and newer)
    parallelism: str = "ddp"  # ddp | fsdp (weights, grads, AdamW, EMA sharded) | fsdp_grad_op (fsdp.py)
    mask: MaskConfig | None = None  # token masking (MaskDiT / MicroDiT, train/models/masking.py); null: off

    def __post_init__(self) -> None:
        # YAML reads an unquoted `no` (accelerate's word, e.g. `train.mixed_precision=no`) as false, and
        # OmegaConf then stores the string "False": both mean no mixed precision.
        if self.mixed_precision in ("False", "false"):
            self.mixed_precision = "no"

    @property
    def sharded(self) -> bool:
        """Whether ``parallelism`` shards the model (FSDP), and so the checkpoints (DCP)."""
        return self.parallelism in SHARDED_PARALLELISMS


@dataclass
class CheckpointConfig:
    every: int = 2000  # steps between full-state checkpoints
    keep_last: int = 3  # complete checkpoints kept on disk
    on_error: str = "raise"  # a failed save (disk full, I/O error): "raise" (stop) or "continue" training


@dataclass
class TrackingConfig:
    mode: str = "offline"  # offline (W&B offline) | online | tensorboard | disabled
    project: str = "tristage"  # W&B project
    run_name: str | None = None  # tracker run name (default: run.name)
    tags: list[str] = field(default_factory=list)  # tracker tags, e.g. the stage


@dataclass
class ValidationConfig:
    every: int = 5000  # steps between validation sample grids (0 = never)
    prompts: list[str] = field(default_factory=list)  # stage 2-3 validation prompts
    class_labels: list[int] = field(default_factory=list)  # stage 1 validation classes
    seed: int = 0  # fixed sampling seed
    steps: int = 20  # DPM-Solver++ steps
    guidance: float = 4.5  # classifier-free guidance scale


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)  # where this stage writes
    init_from: str | None = None  # previous stage's final/ (weights only), a released weights file, or null
    init_from_weights: str = "ema"  # from a training checkpoint (DiT train.py, PixArt): its "ema" or "model"
    resume: str = "auto"  # auto | latest | none | <checkpoint path>
    model: ModelConfig = field(default_factory=ModelConfig)  # transformer
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # diffusion loss
    data: DataConfig = field(default_factory=DataConfig)  # raw source, cache and loader
    encoders: EncoderConfig = field(default_factory=EncoderConfig)  # frozen VAE and T5
    caption: CaptionConfig = field(default_factory=CaptionConfig)  # `tristage caption`: VLM re-captioning
    optim: OptimConfig = field(default_factory=OptimConfig)  # AdamW and schedule
    train: TrainConfig = field(default_factory=TrainConfig)  # loop settings
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # full-state saves
    tracking: TrackingConfig = field(default_factory=TrackingConfig)  # W&B / TensorBoard
    validation: ValidationConfig = field(default_factory=ValidationConfig)  # sample grids

    def __post_init__(self) -> None:
        # Keys whose range is the model's depth (model.size's); an unknown size is the builder's error.
        if self.model.size in SIZES:
            depth = SIZES[self.model.size].num_layers
            for option in (self.objective.repa, self.train.mask):
                if option is not None:
                    option.check_depth(depth)


def _one_line(path: str, err: OmegaConfBaseException, source: str | None = None) -> ConfigError:
    """``path[:line]: key 'a.b': reason``; the line is looked up in ``source`` (the YAML text)."""
    key = getattr(err, "full_key", None) or "?"
    line = _line_of(source, key) if source is not None else None
    where = f"{path}:{line}" if line else path
    reason = str(err).splitlines()[0]
    return ConfigError(f"{where}: key '{key}': {reason}")


def _line_of(source: str, key: str) -> int | None:
    """The 1-based line of dotted ``key`` (or of its deepest present parent) in YAML ``source``."""
    node, line = yaml.compose(source), None
    for part in re.sub(r"\[.*?\]", "", key).split("."):
        if not isinstance(node, yaml.MappingNode):
            break
        found = [(k, v) for k, v in node.value if k.value == part]
        if not found:
            break
        line, node = found[0][0].start_mark.line + 1, found[0][1]
    return line


def _read_yaml(path: str) -> tuple[DictConfig, str]:
    """The file as a DictConfig (and its text); syntax errors, duplicate keys and a top level that is
    not a mapping are one line naming the file and, where the parser knows it, the line."""
    source = Path(path).read_text()
    try:
        root = yaml.compose(source)
        if root is not None and not isinstance(root, yaml.MappingNode):
            kind = "list" if isinstance(root, yaml.SequenceNode) else "single value"
            raise ConfigError(
                f"{path}: the top level must be a mapping of sections (run:, model:, ...), not a {kind}"
            )
        loaded = OmegaConf.load(path)  # OmegaConf's loader refuses duplicate keys
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    return loaded, source


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Merge defaults <- YAML file <- ``key=value`` overrides into a typed :class:`Config`."""
    path = str(path)
    if not Path(path).is_file():
        raise ConfigError(f"{path}: config file not found")
    loaded, source = _read_yaml(path)
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, loaded)
    except OmegaConfBaseException as err:
        raise _one_line(path, err, source) from None
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _one_line(f"{path} (command-line override)", err) from None
    except ConfigError as err:  # a section's __post_init__ check: it names the key, we add the file
        raise ConfigError(f"{path}: {err}") from None
    return cfg


# model.attention_backend -> the package it needs (looked up with find_spec: nothing is imported here).
ATTENTION_BACKENDS: dict[str, str | None] = {"sdpa": None, "xformers": "xformers"}
NONFINITE_CHECKS = ("step", "log")  # train.nonfinite_check choices (train/nonfinite.py GUARDS)
MIXED_PRECISIONS = ("no", "fp16", "bf16")  # train.mixed_precision choices (accelerate's)


def check_train_options(cfg: Config, path: str) -> None:
    """Choices a training run makes at start-up: each must be known (and the attention backend installed)."""
    _check_attention_backend(cfg.model.attention_backend, path)
    _check_choice(path, "train.nonfinite_check", cfg.train.nonfinite_check, NONFINITE_CHECKS)
    _check_choice(path, "train.mixed_precision", cfg.train.mixed_precision, MIXED_PRECISIONS)
    _check_choice(path, "optim.lr_schedule", cfg.optim.lr_schedule, LR_SCHEDULES)
    _check_choice(path, "train.parallelism", cfg.train.parallelism, PARALLELISMS)
    if cfg.train.sharded and cfg.train.mixed_precision == "fp16":
        raise ConfigError(f"{path}: key 'train.mixed_precision': fp16 is not supported with FSDP; use bf16")
    if cfg.train.grad_accum < 1:
        raise ConfigError(f"{path}: key 'train.grad_accum': must be >= 1 (micro-batches per optimizer step)")
    if cfg.model.checkpoint_blocks < -1:
        raise ConfigError(f"{path}: key 'model.checkpoint_blocks': must be >= -1 (-1 = all blocks)")
    _check_choice(path, "init_from_weights", cfg.init_from_weights, INIT_FROM_WEIGHTS)
    _check_choice(path, "checkpoint.on_error", cfg.checkpoint.on_error, ON_ERROR)


def _check_attention_backend(backend: str, path: str) -> None:
    """model.attention_backend must be known, and its package installed (found, not imported)."""
    import importlib.util

    if backend not in ATTENTION_BACKENDS:
        raise ConfigError(
            f"{path}: key 'model.attention_backend': unknown backend {backend!r}; "
            f"choose one of {', '.join(ATTENTION_BACKENDS)}"
        )
    package = ATTENTION_BACKENDS[backend]
    if package is not None and importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"{path}: key 'model.attention_backend': {backend} is not installed "
            f"(pip install 'tristage[{package}]'), or use sdpa"
        )


ON_ERROR = ("raise", "continue")  # checkpoint.on_error (train/training/checkpointer.py Checkpointer._failed)
INIT_FROM_WEIGHTS = ("ema", "model")  # init_from_weights (train/conversion/keymap.py WEIGHTS_CHOICES)


def _check_choice(path: str, key: str, value: str, choices: tuple[str, ...]) -> None:
    try:
        check_choice(key, value, choices)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def check_train_paths(cfg: Config, path: str, has_checkpoint: bool) -> None:
    """Paths a training run reads must exist (init_from only matters without a checkpoint)."""
    if cfg.init_from is not None and not has_checkpoint:
        require_exists(path, "init_from", cfg.init_from)
        _require_model_folder(path, Path(cfg.init_from))
    require_exists(path, "data.cache_dir", cfg.data.cache_dir)


def _require_model_folder(cfg_path: str, init_from: Path) -> None:
    """A folder ``init_from`` must hold a model: config.json in it or in its transformer/."""
    if init_from.is_dir() and not any(
        (init_from / sub / "config.json").is_file() for sub in ("", "transformer")
    ):
        raise ConfigError(
            f"{cfg_path}: key 'init_from': {init_from} holds no model "
            "(no config.json in it or in its transformer/)"
        )


def check_cache_paths(cfg: Config, path: str) -> None:
    """Raw sources and local encoder folders must exist before the cache pass loads anything."""
    check_source_paths(cfg, path)
    for key in ("vae", "text_encoder", "tokenizer"):
        value = getattr(cfg.encoders, key)
        if value is not None and _looks_local(value):
            require_exists(path, f"encoders.{key}", value)


def check_source_paths(cfg: Config, path: str, skip: str | None = None) -> None:
    """Every raw source path must match something (``skip``: a path written, not read, by this pass)."""
    import glob

    for i, pattern in enumerate(cfg.data.source.paths):
        if not glob.glob(pattern):
            raise ConfigError(f"{path}: key 'data.source.paths[{i}]': matches nothing: {pattern}")
    if not cfg.data.source.paths:
        raise ConfigError(f"{path}: key 'data.source.paths': no source paths given")
    for key in ("captions", "metadata", "synsets"):
        value = getattr(cfg.data.source, key)
        if value is not None and value != skip:
            require_exists(path, f"data.source.{key}", value)


def check_caption_paths(cfg: Config, path: str) -> None:
    """The caption pass needs an output path, raw images and (if local) the model folder.

    ``data.source.captions`` may name the output itself (the stage-2 config reads what this pass
    writes), so it need not exist yet.
    """
    if cfg.caption.output is None:
        raise ConfigError(f"{path}: key 'caption.output': set the caption JSONL to write")
    check_source_paths(cfg, path, skip=cfg.caption.output)
    if _looks_local(cfg.caption.model):
        require_exists(path, "caption.model", cfg.caption.model)


def _looks_local(name: str) -> bool:
    """Hub ids are "org/name"; anything absolute, relative-dotted or deeper is a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or Path(name).exists()


def require_exists(cfg_path: str, key: str, value: str | None) -> None:
    """One-line error when the path behind ``key`` is missing."""
    if value is None or not Path(value).exists():
        raise ConfigError(f"{cfg_path}: key '{key}': path does not exist: {value}")


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what runs/<stage>/config.yaml holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config so `tristage train PATH` reruns the stage."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_yaml(cfg))
