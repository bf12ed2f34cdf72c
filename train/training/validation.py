"""Validation sample grids: every ``validation.every`` steps rank 0 samples with the EMA weights.

The pipeline is the one export saves: the family's builder (``train/models/pipelines.py``) around
the live transformer.  A class-conditional family (stage 1, DiT) samples ``validation.class_labels``;
a text family (stages 2-3, PixArt) samples ``validation.prompts``, whose T5 features the cache pass
computed on the accelerator (``data/cache.py`` write_validation_prompts): no T5 is loaded here, so no
rank runs T5-XXL on its CPU while the others wait, and none holds its ~9 GB next to training.  Sampling
uses a fixed seed and a forked RNG, so validation never changes the training run's random stream.  The
grid goes to ``run.dir/validation/step_NNNNNNN.png`` and to the tracker (W&B image).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from tristage.train.config import Config
from tristage.train.diffusion.repa import without_projector
from tristage.train.families import Family, family_of
from tristage.train.inference.grid import grid
from tristage.train.models.pipelines import scheduler_for
from tristage.train.training import fsdp


@dataclass
class Validator:
    """Rank 0's validation state: the frozen VAE (loaded on first use) and the prompts' cached T5 features."""

    cfg: Config
    vae: torch.nn.Module | None = None
    cached: tuple[torch.Tensor, ...] | None = None  # the cache pass's prompt and T5("") features + masks
    prompt_embeds: tuple[torch.Tensor, ...] | None = None  # what the pipeline gets (the run's null)
    null_buffer: torch.Tensor | None = None  # data.null_caption: buffer -- the null training drops to
    written: list[Path] = field(default_factory=list)
    family: Family = field(init=False)  # the run's model family: its pipeline and conditioning

    def __post_init__(self) -> None:
        self.family = family_of(self.cfg.model.family)
        if self.cfg.validation.every > 0 and self.family.needs_text and self._conditions():
            self.cached = load_prompt_features(self.cfg)  # at start-up: a missing or stale file fails early

    def due(self, step: int) -> bool:
        every = self.cfg.validation.every
        return every > 0 and step % every == 0 and bool(self._conditions())

    def _conditions(self) -> list:
        v = self.cfg.validation
        return list(v.prompts) if self.family.needs_text else list(v.class_labels)

    def maybe_run(self, step: int, accelerator, model: torch.nn.Module, ema) -> Path | None:
        """Sample, save and log the grid when ``step`` is a validation step (rank 0; others wait)."""
        if not self.due(step):
            return None
        path = None
        main = accelerator.is_main_process
        with whole_ema_model(model, ema, main, accelerator.device) as sampler:
            if main:
                with torch.random.fork_rng(devices=_cuda_devices(sampler)):
                    images = self.sample(sampler)
                path = Path(self.cfg.run.dir) / "validation" / f"step_{step:07d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                grid(images, columns=len(images)).save(path)
                self.written.append(path)
                log_image(accelerator, path, step, self._conditions())
        accelerator.wait_for_everyone()
        return path

    @torch.no_grad()
    def sample(self, model: torch.nn.Module) -> list[Image.Image]:
        # No text parts: a text family is given the cached prompt features (no T5 is loaded here).
        pipe = self.family.pipeline(model, self._vae(model.device), scheduler_for(self.cfg.objective))
        pipe.set_progress_bar_config(disable=True)
        v = self.cfg.validation
        g = torch.Generator().manual_seed(v.seed)
        common = {"guidance_scale": v.guidance, "num_inference_steps": v.steps, "generator": g}
        if not self.family.needs_text:
            return pipe(list(v.class_labels), **common).images
        embeds, mask, null, null_mask = self._embeddings(model.device)
        side = self.cfg.data.resolution  # model.sample_size may be a pos-embed base only (the demo's)
        return pipe(
            prompt_embeds=embeds,
            prompt_attention_mask=mask,
            negative_prompt=None,  # the pipeline's default "" would clash with the embeddings
            negative_prompt_embeds=null,
            negative_prompt_attention_mask=null_mask,
            height=side,
            width=side,
            use_resolution_binning=False,
            **common,
        ).images

    def _vae(self, device: torch.device) -> torch.nn.Module:
        from diffusers import AutoencoderKL

        if self.vae is None:
            self.vae = AutoencoderKL.from_pretrained(self.cfg.encoders.vae).eval().requires_grad_(False)
        return self.vae.to(device)

    def _embeddings(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(prompt features, mask, null features, mask): the cache pass's, with the run's null."""
        if self.prompt_embeds is None:
            embeds, mask, empty, empty_mask = self.cached or load_prompt_features(self.cfg)
            self.prompt_embeds = (embeds, mask, *self._null(empty, empty_mask, mask))
        return tuple(t.to(device) for t in self.prompt_embeds)

    def _null(self, empty: torch.Tensor, empty_mask: torch.Tensor, prompt_mask: torch.Tensor) -> tuple:
        """T5("") with its mask, or the buffer's rows under each prompt's own mask (official sampling)."""
        if self.null_buffer is None:
            return empty, empty_mask
        tokens = prompt_mask.shape[1]
        return self.null_buffer[:tokens].to(empty.dtype).expand(len(empty), -1, -1), prompt_mask


def load_prompt_features(cfg: Config) -> tuple[torch.Tensor, ...]:
    """``validation.prompts``' T5 features from the cache folder (data/cache.py write_validation_prompts);
    a missing or outdated file is one line that says to rerun the cache pass -- never a T5 forward here."""
    import json

    from safetensors import safe_open

    from tristage.data.cache_format import VALIDATION_PROMPTS
    from tristage.data.features import CacheError

    path = Path(cfg.data.cache_dir) / VALIDATION_PROMPTS
    if not path.is_file():
        raise CacheError(
            f"{path}: missing; run `tristage cache` with this config to encode validation.prompts"
        )
    with safe_open(str(path), framework="pt") as stored:
        if json.loads(stored.metadata()["prompts"]) != list(cfg.validation.prompts):
            raise CacheError(
                f"{path}: holds other validation.prompts; rerun `tristage cache` with this config"
            )
        embeds, mask = stored.get_tensor("embeds"), stored.get_tensor("mask")  # (P + 1, L, C), (P + 1, L)
    n = len(cfg.validation.prompts)
    return embeds[:n], mask[:n], embeds[n:].expand_as(embeds[:n]), mask[n:].expand_as(mask[:n])


@contextmanager
def ema_weights(model: torch.nn.Module, ema):
    """The EMA weights in ``model`` (eval mode) for the duration; the raw weights after."""
    raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
    was_training = model.training
    ema.copy_to(model)
    model.eval()
    try:
        yield model
    finally:
        model.load_state_dict(raw)
        model.train(was_training)


@contextmanager
def whole_ema_model(model: torch.nn.Module, ema, is_main: bool, device: torch.device):
    """The EMA weights in a whole (unsharded) model on the main process (None elsewhere).

    Unsharded: ``model`` itself, EMA swapped in for the duration (and a REPA projector, which the EMA
    does not hold and inference never uses, detached: ``final/`` and the pipelines never see it).
    Sharded (FSDP): every rank takes part in gathering the EMA, one tensor at a time, into a plain copy
    on the main process (built from the model's config), so sampling and ``save_pretrained`` see
    ordinary tensors and no rank waits on a collective the others never enter."""
    if not fsdp.is_sharded(model):
        if not is_main:
            yield None
            return
        with without_projector(model), ema_weights(model, ema):
            yield model
        return
    weights = fsdp.gather_full(ema.state_dict(), is_main)
    yield fsdp.whole_copy(model, weights).to(device).eval() if is_main else None


def _cuda_devices(model: torch.nn.Module) -> list[int]:
    device = next(model.parameters()).device
    return [device.index or 0] if device.type == "cuda" else []


def log_image(accelerator, path: Path, step: int, conditions: list) -> None:
    """The grid as a W&B image (with the conditions as caption) or a TensorBoard image."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            caption = " | ".join(str(c) for c in conditions)
            tracker.log({"validation/grid": wandb.Image(str(path), caption=caption), "train/step": step})
        elif tracker.name == "tensorboard":
            array = np.asarray(Image.open(path).convert("RGB"))
            tracker.writer.add_image("validation/grid", array, step, dataformats="HWC")
