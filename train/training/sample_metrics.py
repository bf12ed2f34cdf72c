"""Sample metrics during training (``validation.metrics_every``), shared by every rank.

The images: each of ``validation.metrics_prompts`` (text stages; the cache pass stores their T5
features, so no rank loads T5) or ``validation.metrics_class_labels`` (stage 1), ``metrics_per_prompt``
times.  Image ``j`` is drawn from seed ``validation.seed + j``, so it is the same image whichever rank
draws it.  Every rank generates one contiguous share (sizes differ by at most one) with the EMA weights
through the stage's pipeline (DPM-Solver++, ``validation.steps`` and ``guidance``): no rank waits while
another generates alone.  Each rank then measures its own share -- FID features
(``validation.fid_feature_extractor``), the CLIP score's sums (``validation.clip_model``, torchmetrics'
``CLIPScore``) and each image scorer's per-image scores (``train/inference/scorers.py``) -- and
rank 0 gathers them: FID through torchmetrics against the statistics of the held-out split, the mean
CLIP score, the mean of each scorer (``val/fid``, ``val/clip_score``, ``val/<scorer>``).

The FID reference is the held-out split as the model can at best draw it: the VAE's reconstructions of its
cached latents (the VAE's own error is not in the figure).  All ranks decode and measure a share once
per run; rank 0 keeps the statistics in ``run.dir/eval/fid_reference.npz`` (reused on resume).  With a
few hundred images FID is biased upwards: a trend within a run, not a figure to compare with papers.
``run.dir/eval/step_NNNNNNN.json`` records each evaluation's values and every rank's share and times.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object

from tristage.data.fingerprint import fingerprint
from tristage.data.val_split import ValSplit, has_split, split_data
from tristage.train.config import Config, ConfigError
from tristage.train.families import Family, feature_encoders
from tristage.train.inference import evaluate
from tristage.train.inference.extractors import BUILT_IN, ImageFeatures, clip_scorer
from tristage.train.inference.scorers import image_scorer_names, load_image_scorer
from tristage.train.models.pipelines import scheduler_for
from tristage.train.training.validation import load_prompt_features, null_condition

REFERENCE = "fid_reference.npz"  # in run.dir/eval/


def share(items: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous share of ``items`` (sizes differ by at most one)."""
    return range(items * rank // world, items * (rank + 1) // world)


class SampleMetrics:
    """The sample metrics of one run: its conditions, extractors and scorers, all loaded at start-up."""

    def __init__(self, cfg: Config, accelerator, family: Family, null_buffer=lambda: None):
        from diffusers import AutoencoderKL

        v = cfg.validation
        self.cfg, self.accelerator, self.family, self.null_buffer = cfg, accelerator, family, null_buffer
        self.conditions = list(v.metrics_prompts) if family.needs_text else list(v.metrics_class_labels)
        if not self.conditions:
            key = "metrics_prompts" if family.needs_text else "metrics_class_labels"
            raise ConfigError(f"key 'validation.{key}': the sample metrics need what to generate")
        self.count = len(self.conditions) * v.metrics_per_prompt
        self.scorers = {name: image_scorer(name) for name in v.metrics if name not in BUILT_IN}
        self.features = ImageFeatures(v.fid_feature_extractor) if "fid" in v.metrics else None
        self.clip = clip_scorer(v.clip_model) if "clip_score" in v.metrics else None
        self.split = self._split() if self.features is not None else None
        self.embeds = load_prompt_features(cfg, self.conditions) if family.needs_text else None
        self.vae = AutoencoderKL.from_pretrained(cfg.encoders.vae).eval().requires_grad_(False)
        self.reference: dict | None = None  # the FID statistics of the held-out split

    def _split(self) -> ValSplit:
        if not has_split(self.cfg.data) or self.count < 2:
            raise ConfigError(
                "key 'validation.metrics': fid needs a held-out split (data.val_fraction or data.val_paths) "
                "and at least 2 generated images"
            )
        return ValSplit(self.cfg.data, fingerprint(split_data(self.cfg.data), feature_encoders(self.cfg)))

    def texts(self, indices: range) -> list[str]:
        """What CLIP reads for images ``indices``: the prompt, or the class's name (stage 1)."""
        names = class_names(self.cfg) if not self.family.needs_text else {}
        found = [self.conditions[j // self.cfg.validation.metrics_per_prompt] for j in indices]
        return [str(names.get(str(c), c)) for c in found]

    @torch.no_grad()
    def run(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        """Every rank generates and measures its share; rank 0 returns the values (the others ``{}``)."""
        if self.features is not None and self.reference is None:
            self.reference = self._reference_statistics()
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        mine, start = share(self.count, rank, world), time.time()
        images = self.generate(model, mine)
        record = {"rank": rank, "images": len(images), "start": start, "end": time.time()}
        record.update(self.measure(images, mine))
        return self.combine(gather_object([record]), step)

    def generate(self, model: torch.nn.Module, indices: range) -> list:
        """Images ``indices`` (PIL), in batches of ``data.batch_size``, each from its own seed."""
        pipe = self.family.pipeline(model, self.vae.to(model.device), scheduler_for(self.cfg.objective))
        pipe.set_progress_bar_config(disable=True)
        v, images, size = self.cfg.validation, [], self.cfg.data.batch_size
        devices = [model.device.index or 0] if model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the training run's random stream is left alone
            for lo in range(indices.start, indices.stop, size):
                chunk = range(lo, min(lo + size, indices.stop))
                generators = [torch.Generator().manual_seed(v.seed + j) for j in chunk]
                common = {
                    "guidance_scale": v.guidance,
                    "num_inference_steps": v.steps,
                    "generator": generators,
                }
                images += pipe(**self._conditioning(chunk, model.device), **common).images
        return images

    def _conditioning(self, chunk: range, device: torch.device) -> dict:
        """The pipeline's condition arguments for images ``chunk``: class ids, or cached T5 features."""
        rows = [j // self.cfg.validation.metrics_per_prompt for j in chunk]
        if not self.family.needs_text:
            return {"class_labels": [self.conditions[r] for r in rows]}
        embeds, mask, empty, empty_mask = (t[rows] for t in self.embeds)
        null, null_mask = null_condition(empty, empty_mask, mask, self.null_buffer())
        side = self.cfg.data.resolution
        return {
            "prompt_embeds": embeds.to(device),
            "prompt_attention_mask": mask.to(device),
            "negative_prompt": None,  # the pipeline's default "" would clash with the embeddings
            "negative_prompt_embeds": null.to(device),
            "negative_prompt_attention_mask": null_mask.to(device),
            "height": side,
            "width": side,
            "use_resolution_binning": False,
        }

    def measure(self, images: list, indices: range) -> dict:
        """This rank's share, measured: FID features, CLIP score sums, scorer sums (all on the CPU)."""
        if not images:
            return {}
        uint8 = evaluate.to_uint8(images)  # (n, 3, H, W)
        device, n, out = self.accelerator.device, len(images), {}
        if self.features is not None:
            out["fid"] = self.features.to(device)(uint8).cpu()
        if self.clip is not None:
            self.clip.to(device).reset()
            self.clip.update(uint8.to(device), self.texts(indices))
            out["clip_score"] = (float(self.clip.score), int(self.clip.n_samples))
        conditions = [self.conditions[j // self.cfg.validation.metrics_per_prompt] for j in indices]
        for name, score in self.scorers.items():
            out[name] = (float(sum(score(images, conditions))), n)
        return out

    def combine(self, records: list[dict], step: int) -> dict[str, float]:
        """Rank 0: the metrics from every rank's measurements, and the evaluation's record file."""
        if not self.accelerator.is_main_process:
            return {}
        values: dict[str, float] = {"val/images": sum(r["images"] for r in records)}
        if self.features is not None:
            generated = torch.cat([r["fid"] for r in records if "fid" in r])  # (N, D), every rank's
            values["val/fid"] = evaluate.fid_of_features(generated, self.reference)
        for name in [m for m in self.cfg.validation.metrics if m != "fid"]:
            total, n = (sum(r[name][i] for r in records if name in r) for i in (0, 1))
            values[f"val/{name}"] = total / n
        write_record(Path(self.cfg.run.dir) / "eval" / f"step_{step:07d}.json", step, values, records)
        return values

    def _reference_statistics(self) -> dict | None:
        """The held-out split's FID statistics: read from run.dir, or measured now by every rank."""
        path, key = Path(self.cfg.run.dir) / "eval" / REFERENCE, self._reference_key()
        stored = None
        if self.accelerator.is_main_process and path.is_file():
            loaded = dict(np.load(path))
            stored = loaded if str(loaded.get("key")) == key else None
        (stored,) = broadcast_object_list([stored])  # every rank takes the same branch
        if stored is not None:
            return stored
        feats = gather_object([self._reference_features()])
        if not self.accelerator.is_main_process:
            return None
        stats = evaluate.feature_statistics(torch.cat([f for f in feats if len(f)]))
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, key=np.array(key), **stats)
        return stats

    def _reference_key(self) -> str:
        """What the reference depends on: the extractor, the VAE and the held-out samples."""
        keys = ",".join(s.key for s in self.split.samples)
        return f"{self.cfg.validation.fid_feature_extractor}|{self.cfg.encoders.vae}|{keys}"

    def _reference_features(self) -> torch.Tensor:
        """FID features of this rank's share of the held-out split, decoded from its cached latents."""
        device = self.accelerator.device
        mine = share(len(self.split), self.accelerator.process_index, self.accelerator.num_processes)
        vae, feats = self.vae.to(device), []
        for rows in self.split.runs(mine, self.cfg.data.batch_size):
            mean = self.split.batch(rows)["mean"].to(device, torch.float32)
            pixels = vae.decode(mean).sample  # the posterior mean, decoded: (b, 3, H, W) in [-1, 1]
            uint8 = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
            feats.append(self.features.to(device)(uint8).cpu())
        return torch.cat(feats) if feats else torch.zeros(0)


def image_scorer(name: str):
    """The image scorer ``name`` names; an unknown name is one line listing every metric there is."""
    if name not in image_scorer_names():
        known = ", ".join([*BUILT_IN, *image_scorer_names()])
        raise ConfigError(f"key 'validation.metrics': unknown metric {name!r}; known: {known}")
    return load_image_scorer(name)


def class_names(cfg: Config) -> dict[str, str]:
    """Class id -> name from the feature cache's manifest (stage 1's CLIP prompts)."""
    manifest = Path(cfg.data.cache_dir) / "manifest.json"
    return json.loads(manifest.read_text()).get("class_names", {}) if manifest.is_file() else {}


def write_record(path: Path, step: int, values: dict, records: list[dict]) -> None:
    """``eval/step_NNNNNNN.json``: the values, and per rank its share of the images and its times."""
    ranks = [{k: r[k] for k in ("rank", "images", "start", "end")} for r in records]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"step": step, "values": values, "ranks": ranks}, indent=1))
