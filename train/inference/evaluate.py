"""``tristage eval``: FID, CLIP score and the demo adherence metric, offline.

* FID (torchmetrics ``FrechetInceptionDistance``) of a ``tristage sample`` output folder against a
  reference: a folder of images, or an ``.npz`` of statistics (``mu``, ``sigma``, ``n``) that
  ``--save-stats`` writes.  The feature extractor is user-supplied and nothing is downloaded:
  ``--inception PATH`` is torch-fidelity's Inception-v3 weights file (``pt_inception-2015-12-05``,
  the one clean-fid / torch-fidelity use; needs ``pip install 'tristage[eval]'``), or ``--features
  PATH`` any TorchScript module mapping (B, 3, H, W) uint8 images to (B, D) features.
* Class-conditional FID (stage 1, ``--per-class``): the samples are grouped by their prompt (the
  class label), each group is compared with ``REFERENCE/<label>/``, and the per-class FIDs are averaged.
* CLIP score (torchmetrics ``CLIPScore``) of each image against its prompt, from a local CLIP folder
  ``--clip PATH`` (``CLIPModel`` + ``CLIPProcessor`` saved with ``save_pretrained``).
* ``--adherence EXPORT_DIR``: a named scorer's report on a pipeline folder (``--scorer``, default
  ``adherence``: the demo's rates of single shape, kind, colour, background, size and position, by an
  independent shape classifier, ``demo/adherence.py``).  Scorers are found by name
  (``train/inference/scorers.py``), so nothing here imports the demo.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tristage.errors import EvalError
from tristage.train.inference.scorers import Scorer, load_scorer

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


# -- images ---------------------------------------------------------------------------------------
def to_uint8(images: Iterable[Image.Image], size: int | None = None) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) uint8, resized to ``size`` x ``size`` when given."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if size is not None and image.size != (size, size):
            image = image.resize((size, size), Image.BICUBIC)
        arrays.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
    if not arrays:
        raise EvalError("no images")
    return torch.stack(arrays)


def image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise EvalError(f"{folder}: not a folder")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def load_folder(folder: Path, size: int | None = None) -> torch.Tensor:
    files = image_files(folder)
    if not files:
        raise EvalError(f"{folder}: no images")
    return to_uint8((Image.open(f) for f in files), size)


def load_samples(folder: Path) -> list[tuple[str, Path]]:
    """(prompt, file) of a ``tristage sample`` output folder, from its settings.json."""
    settings = folder / "settings.json"
    if not settings.is_file():
        raise EvalError(f"{folder}: not a `tristage sample` output (settings.json missing)")
    data = json.loads(settings.read_text())
    prompts = list(data.get("prompt") or [])
    if data.get("prompt_file"):
        lines = Path(data["prompt_file"]).read_text().splitlines()
        prompts += [p.strip() for p in lines if p.strip()]
    pairs = []
    for name in data["files"]:
        path = Path(name)
        index = int(path.name.split("_")[0])  # PPP_II.png: prompt index, image index
        pairs.append((prompts[index], folder / path.name))
    return pairs


# -- FID ------------------------------------------------------------------------------------------
class Uint8Features(torch.nn.Module):
    """Adapts a feature module so it sees uint8 images, as torchmetrics' own Inception does."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images).flatten(1)


def inception_extractor(weights: str | Path) -> torch.nn.Module:
    """torch-fidelity's Inception-v3 (2048-d pool features) from a local weights file."""
    if not Path(weights).is_file():
        raise EvalError(f"--inception: weights file not found: {weights}")
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as err:
        raise EvalError(f"--inception needs torch-fidelity (pip install 'tristage[eval]'): {err}") from None
    return NoTrainInceptionV3(
        name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(weights)
    )


def extractor_from_args(args: argparse.Namespace) -> torch.nn.Module:
    if args.inception:
        return inception_extractor(args.inception)
    if args.features:
        if not Path(args.features).is_file():
            raise EvalError(f"--features: TorchScript file not found: {args.features}")
        return Uint8Features(torch.jit.load(args.features, map_location="cpu").eval())
    raise EvalError("FID needs a feature extractor: --inception WEIGHTS or --features TORCHSCRIPT")


def new_fid(feature: torch.nn.Module, input_size: int = 299):
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(
        feature=feature, reset_real_features=True, input_img_size=(3, input_size, input_size)
    )


@torch.no_grad()
def statistics(feature: torch.nn.Module, images: torch.Tensor, batch: int = 64) -> dict[str, np.ndarray]:
    """Mean, covariance and count of the features of uint8 images (the reference ``.npz``)."""
    feats = torch.cat([feature(images[i : i + batch]).double() for i in range(0, len(images), batch)])
    if len(feats) < 2:
        raise EvalError("statistics need at least 2 images")
    return {"mu": feats.mean(0).numpy(), "sigma": np.cov(feats.numpy(), rowvar=False), "n": len(feats)}


def load_stats(fid, stats: dict) -> None:
    """Set the metric's real-feature sums so that its mean and covariance are ``stats``."""
    n = int(stats["n"])
    mu = torch.as_tensor(stats["mu"], dtype=torch.float64)
    sigma = torch.as_tensor(stats["sigma"], dtype=torch.float64).reshape(len(mu), len(mu))
    if mu.shape != fid.real_features_sum.shape:
        raise EvalError(
            f"reference statistics have {len(mu)} features, the extractor gives {len(fid.real_features_sum)}"
        )
    fid.real_features_sum = mu * n
    fid.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)  # torchmetrics' raw sums
    fid.real_features_num_samples = torch.tensor(n, dtype=torch.long)


@torch.no_grad()
def fid_score(
    feature: torch.nn.Module, generated: torch.Tensor, reference: torch.Tensor | dict, batch: int = 64
) -> float:
    """FID of uint8 ``generated`` images against uint8 ``reference`` images or their statistics."""
    if len(generated) < 2:
        raise EvalError("FID needs at least 2 generated images")
    fid = new_fid(feature, generated.shape[-1])
    if isinstance(reference, dict):
        load_stats(fid, reference)
    else:
        for i in range(0, len(reference), batch):
            fid.update(reference[i : i + batch], real=True)
    for i in range(0, len(generated), batch):
        fid.update(generated[i : i + batch], real=False)
    return float(fid.compute())


def per_class_fid(
    feature: torch.nn.Module, samples: list[tuple[str, Path]], reference_root: Path, size: int | None
) -> dict:
    """FID of each class's samples against ``reference_root/<label>/``; the mean over classes."""
    by_class: dict[str, list[Path]] = defaultdict(list)
    for label, path in samples:
        by_class[label].append(path)
    scores = {}
    for label, paths in sorted(by_class.items()):
        ref_dir = reference_root / label
        if not ref_dir.is_dir():
            raise EvalError(f"{ref_dir}: no reference images for class {label!r}")
        generated = to_uint8((Image.open(p) for p in paths), size)
        scores[label] = fid_score(feature, generated, load_folder(ref_dir, generated.shape[-1]))
    return {"per_class": scores, "mean": float(np.mean(list(scores.values())))}


# -- CLIP score -----------------------------------------------------------------------------------
def clip_metric(clip_dir: str | Path):
    """torchmetrics ``CLIPScore`` around a local CLIP folder (never a hub id)."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    if not (Path(clip_dir) / "config.json").is_file():
        raise EvalError(f"--clip: {clip_dir} is not a saved CLIP folder (config.json missing)")

    def load():
        model = CLIPModel.from_pretrained(clip_dir).eval()
        for name in ("get_image_features", "get_text_features"):
            setattr(model, name, _projected(getattr(model, name)))
        return model, CLIPProcessor.from_pretrained(clip_dir)

    return CLIPScore(model_name_or_path=load)


def _projected(method):
    """transformers >= 5 returns a model output whose ``pooler_output`` holds the projected features;
    torchmetrics' CLIPScore expects the tensor itself (as transformers 4 returned)."""

    def features(*args, **kwargs):
        out = method(*args, **kwargs)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    return features


@torch.no_grad()
def clip_score(clip_dir: str | Path, images: torch.Tensor, prompts: list[str], batch: int = 32) -> float:
    """Mean of 100 * max(cos(image, text), 0) over (image, prompt) pairs."""
    metric = clip_metric(clip_dir)
    for i in range(0, len(images), batch):
        metric.update(images[i : i + batch], prompts[i : i + batch])
    return float(metric.compute())


# -- the command ----------------------------------------------------------------------------------
def run_eval(args: argparse.Namespace) -> dict:
    if args.adherence:
        scorer = load_scorer(args.scorer)  # before the pipeline loads: a wrong name fails at once
        results = {args.scorer: score_export(Path(args.adherence), scorer, args.per_prompt, args.seed)}
    elif args.save_stats:
        results = save_reference_stats(args)
    else:
        results = evaluate_samples(args)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


def save_reference_stats(args: argparse.Namespace) -> dict:
    if not args.reference:
        raise EvalError("--save-stats needs --reference IMAGE_FOLDER")
    stats = statistics(extractor_from_args(args), load_folder(Path(args.reference), args.size))
    np.savez(args.save_stats, **stats)
    return {"stats": args.save_stats, "n": stats["n"]}


def evaluate_samples(args: argparse.Namespace) -> dict:
    if not args.samples:
        raise EvalError("give a samples folder (from `tristage sample`) or --adherence EXPORT_DIR")
    if not (args.reference or args.clip):
        raise EvalError("nothing to measure: give --reference (FID) and/or --clip (CLIP score)")
    samples = load_samples(Path(args.samples))
    results: dict = {"samples": len(samples)}
    if args.reference:
        feature = extractor_from_args(args)
        reference = Path(args.reference)
        if args.per_class:
            results["fid_per_class"] = per_class_fid(feature, samples, reference, args.size)
        else:
            generated = to_uint8((Image.open(p) for _, p in samples), args.size)
            ref = reference_of(reference, generated.shape[-1])
            results["fid"] = fid_score(feature, generated, ref)
    if args.clip:
        images = to_uint8(Image.open(p) for _, p in samples)
        results["clip_score"] = clip_score(args.clip, images, [prompt for prompt, _ in samples])
    return results


def reference_of(path: Path, size: int) -> torch.Tensor | dict:
    if path.suffix == ".npz":
        if not path.is_file():
            raise EvalError(f"--reference: {path} not found")
        return dict(np.load(path))
    return load_folder(path, size)


def score_export(export_dir: Path, scorer: Scorer, per_prompt: int, seed: int = 0) -> dict:
    """``scorer``'s report on the pipeline folder ``export_dir``, loaded as users load it."""
    from tristage.train.models.pipelines import load_exported

    if not (export_dir / "model_index.json").is_file():
        raise EvalError(f"{export_dir}: not a pipeline folder (model_index.json missing)")
    return scorer(load_exported(export_dir), per_prompt, seed)
