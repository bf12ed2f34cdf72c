"""Typed run configuration: defaults <- YAML <- ``key=value`` overrides.

Every key is declared with a one-line meaning (nanoGPT-style): here, or beside its owner
(``data/config.py``: source, cache and encoders; ``train/diffusion/config.py``: the loss).  Each section
checks its own values where it is declared (``__post_init__``, torchtitan-style, with the helpers of
``tristage/checks.py``): every choice against its list, which lives here beside the key and which the
component reads its table keys from, and every number against its range.  ``load_config`` runs those
checks once, as it builds the typed config, and nothing checks them again later.  Unknown keys, wrong
types and bad values are one line that names the key and the file, before any heavy work starts; the
checks that need the filesystem or the installed packages (paths exist, xformers installed) are the
pre-flight ``check_*_paths`` below, which each command runs once.

This module imports neither torch nor any component: loading a config stays light.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tristage.checks import at_least, check_choice, in_range, positive, seed
from tristage.data.config import CaptionConfig, DataConfig, EncoderConfig
from tristage.errors import ConfigError
from tristage.train.diffusion.config import ObjectiveConfig
from tristage.train.models.sizes import SIZES

# The choice lists, beside the keys; each component keys its table by them (tests/unit/test_config.py).
MODEL_FAMILIES = ("dit", "pixart")  # model.family (train/families.py FAMILIES)
# model.attention_backend -> the package it needs (looked up with find_spec at pre-flight, never imported)
ATTENTION_BACKENDS: dict[str, str | None] = {"sdpa": None, "xformers": "xformers"}
LR_SCHEDULES = ("constant", "cosine")  # optim.lr_schedule (train/training/lr_schedules.py FACTORS)
MIXED_PRECISIONS = ("no", "fp16", "bf16")  # train.mixed_precision (accelerate's)
NONFINITE_CHECKS = ("step", "log")  # train.nonfinite_check (train/training/nonfinite.py GUARDS)
# train.parallelism: DDP, or FSDP2 re-sharding the weights after the forward or not (train/training/fsdp.py)
PARALLELISMS = ("ddp", "fsdp", "fsdp_grad_op")
SHARDED_PARALLELISMS = ("fsdp", "fsdp_grad_op")  # the ones that shard weights, grads, AdamW and EMA
ON_ERROR = ("raise", "continue")  # checkpoint.on_error (train/training/checkpointer.py Checkpointer._failed)
TRACKING_MODES = ("offline", "online", "tensorboard", "disabled")  # tracking.mode (tracking.py MODES)
INIT_FROM_WEIGHTS = ("ema", "model")  # init_from_weights (train/conversion/keymap.py WEIGHTS_CHOICES)


@dataclass
class RunConfig:
    dir: str = MISSING  # output folder of this stage run (checkpoints/, final/, logs)
    name: str = "stage"  # human name of the stage, used for tracker runs and summaries
    lock_timeout: float = 120.0  # s without heartbeat before another host's run.dir / unit lock is taken over

    def __post_init__(self) -> None:
        positive("run.lock_timeout", self.lock_timeout)


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

    def __post_init__(self) -> None:
        check_choice("model.family", self.family, MODEL_FAMILIES)
        check_choice("model.size", self.size, SIZES)
        check_choice("model.attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        for key in ("sample_size", "in_channels", "num_classes", "caption_channels"):
            at_least(f"model.{key}", getattr(self, key), 1)
        positive("model.class_embed_std", self.class_embed_std)
        positive("model.caption_embed_std", self.caption_embed_std)
        if self.interpolation_scale is not None:
            positive("model.interpolation_scale", self.interpolation_scale)
        in_range("model.freq_shift", self.freq_shift, 0, 1)
        at_least("model.checkpoint_blocks", self.checkpoint_blocks, -1)  # -1: all blocks


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

    def __post_init__(self) -> None:
        positive("optim.lr", self.lr)
        at_least("optim.weight_decay", self.weight_decay, 0.0)
        if len(self.betas) != 2:
            raise ConfigError(f"key 'optim.betas': must be [beta1, beta2], got {list(self.betas)}")
        for i, beta in enumerate(self.betas):
            in_range(f"optim.betas[{i}]", beta, 0.0, 1.0, open_high=True)
        positive("optim.eps", self.eps)
        at_least("optim.warmup_steps", self.warmup_steps, 0)
        check_choice("optim.lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if self.grad_clip is not None:
            positive("optim.grad_clip", self.grad_clip)


MASK_MODES = ("random", "deferred")  # train.mask.mode (train/models/masking.py)


@dataclass
class MaskConfig:
    """``train.mask``: drop a share of the patch tokens during (part of) training; null = off."""

    ratio: float = 0.5  # share of each image's patch tokens dropped (MaskDiT: 0.5; MicroDiT: 0.75)
    until_step: int | None = None  # steps below this are masked, later ones not (null: the whole run)
    mode: str = "random"  # "random" (MaskDiT: drop after the patch embedding) | "deferred" (MicroDiT)
    mixer_blocks: int = 1  # deferred: leading transformer blocks that see every token (the patch-mixer)

    def __post_init__(self) -> None:
        in_range("train.mask.ratio", self.ratio, 0.0, 1.0, open_high=True)  # the share dropped
        if self.until_step is not None:
            at_least("train.mask.until_step", self.until_step, 0)
        check_choice("train.mask.mode", self.mode, MASK_MODES)
        at_least("train.mask.mixer_blocks", self.mixer_blocks, 1)

    def check_depth(self, depth: int) -> None:
        """Deferred masking needs a block after the mixer (the model's depth comes from model.size)."""
        if self.mode == "deferred" and self.mixer_blocks >= depth:
            raise ConfigError(
                f"key 'train.mask.mixer_blocks': {self.mixer_blocks} leaves no masked block in a model of "
                f"depth {depth}; use 1 to {depth - 1}"
            )

    def active(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) trains masked."""
        return self.until_step is None or step < self.until_step


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
        for key in ("max_steps", "grad_accum", "log_every", "max_nonfinite"):
            at_least(f"train.{key}", getattr(self, key), 1)
        seed("train.seed", self.seed)
        in_range("train.ema_decay", self.ema_decay, 0.0, 1.0)
        if self.max_time is not None:
            positive("train.max_time", self.max_time)
        check_choice("train.mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        check_choice("train.nonfinite_check", self.nonfinite_check, NONFINITE_CHECKS)
        check_choice("train.parallelism", self.parallelism, PARALLELISMS)
        if self.sharded and self.mixed_precision == "fp16":
            raise ConfigError("key 'train.mixed_precision': fp16 is not supported with FSDP; use bf16")

    @property
    def sharded(self) -> bool:
        """Whether ``parallelism`` shards the model (FSDP), and so the checkpoints (DCP)."""
        return self.parallelism in SHARDED_PARALLELISMS


@dataclass
class CheckpointConfig:
    every: int = 2000  # steps between full-state checkpoints
    keep_last: int = 3  # complete checkpoints kept on disk
    on_error: str = "raise"  # a failed save (disk full, I/O error): "raise" (stop) or "continue" training
    keep_best: bool = False  # keep the checkpoint of the lowest val/loss in checkpoints/best (not rotated)

    def __post_init__(self) -> None:
        at_least("checkpoint.every", self.every, 1)
        at_least("checkpoint.keep_last", self.keep_last, 1)
        check_choice("checkpoint.on_error", self.on_error, ON_ERROR)


@dataclass
class TrackingConfig:
    mode: str = "offline"  # offline (W&B offline) | online | tensorboard | disabled
    project: str = "tristage"  # W&B project
    run_name: str | None = None  # tracker run name (default: run.name)
    tags: list[str] = field(default_factory=list)  # tracker tags, e.g. the stage

    def __post_init__(self) -> None:
        check_choice("tracking.mode", self.mode, TRACKING_MODES)


@dataclass
class ValidationConfig:
    every: int = 5000  # steps between validation sample grids (0 = never)
    prompts: list[str] = field(default_factory=list)  # stage 2-3 validation prompts
    class_labels: list[int] = field(default_factory=list)  # stage 1 validation classes
    seed: int = 0  # fixed sampling seed
    steps: int = 20  # DPM-Solver++ steps
    guidance: float = 4.5  # classifier-free guidance scale
    loss_every: int = 0  # steps between validation losses on the held-out split (data.val_*; 0 = never)
    loss_timesteps: int = 8  # timesteps of the validation loss, equidistant over the training range
    loss_seed: int = 0  # seeds the fixed noise of each held-out sample at each timestep
    metrics_every: int = 0  # steps between sample metrics (0 = never)
    metrics: list[str] = field(default_factory=list)  # clip_score | fid | a scorer in tristage.scorers
    metrics_prompts: list[str] = field(default_factory=list)  # stage 2-3: prompts generated for the metrics
    metrics_class_labels: list[int] = field(default_factory=list)  # stage 1: classes generated for them
    metrics_per_prompt: int = 4  # images generated per prompt or class (seed: validation.seed + image index)
    fid_feature_extractor: str | None = None  # fid: image model folder or hub id (e.g. facebook/dinov2-base)
    clip_model: str | None = None  # clip_score: CLIP folder or hub id (e.g. openai/clip-vit-large-patch14)

    def __post_init__(self) -> None:
        for key in ("every", "loss_every", "metrics_every"):
            at_least(f"validation.{key}", getattr(self, key), 0)  # 0 = never
        for key in ("steps", "loss_timesteps", "metrics_per_prompt"):
            at_least(f"validation.{key}", getattr(self, key), 1)
        for key in ("class_labels", "metrics_class_labels"):
            for i, label in enumerate(getattr(self, key)):
                at_least(f"validation.{key}[{i}]", label, 0)
        seed("validation.seed", self.seed)
        seed("validation.loss_seed", self.loss_seed)
        at_least("validation.guidance", self.guidance, 0.0)
        self._check_metrics()

    def _check_metrics(self) -> None:
        """Metrics named when they are on; each with the model it needs."""
        if self.metrics_every and not self.metrics:
            raise ConfigError(
                "key 'validation.metrics': name the metrics to compute every metrics_every steps"
            )
        needs = {
            "fid": ("fid_feature_extractor", self.fid_feature_extractor),
            "clip_score": ("clip_model", self.clip_model),
        }
        for metric, (key, value) in needs.items():
            if metric in self.metrics and value is None:
                raise ConfigError(
                    f"key 'validation.{key}': the {metric} metric needs it (a folder or hub id)"
                )


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
        """What one section cannot check alone: values that must agree across sections."""
        check_choice("init_from_weights", self.init_from_weights, INIT_FROM_WEIGHTS)
        for i, label in enumerate(self.validation.class_labels):
            in_range(f"validation.class_labels[{i}]", label, 0, self.model.num_classes - 1)
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
    except ConfigError as err:  # a section's __post_init__ check: it names the key, we add where it was set
        raise ConfigError(f"{_origin(path, overrides, str(err))}: {err}") from None
    return cfg


def _origin(path: str, overrides: list[str] | tuple[str, ...], message: str) -> str:
    """Where the key a check names was set: the file, or the command line when an override set it."""
    named = re.match(r"key '([\w.]+)", message)
    given = {item.split("=", 1)[0].lstrip("+") for item in overrides}
    return f"{path} (command-line override)" if named and named.group(1) in given else path


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what runs/<stage>/config.yaml holds)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config so `tristage train PATH` reruns the stage."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(to_yaml(cfg))
