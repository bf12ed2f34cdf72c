"""Export a finished stage to a diffusers pipeline folder, built by its family's pipeline builder
(``train/models/pipelines.py``, the one validation samples with):

* stage 1 (``ClassConditionalDiT``) -> ``DiTPipeline`` with ``id2label`` in
  ``model_index.json`` (``save_pretrained`` does not write it by itself);
* stages 2-3 (``PixArtTransformer2DModel``) -> ``PixArtAlphaPipeline`` with the T5 and tokenizer.

The scheduler is a DPM-Solver++ built from the training noise schedule
(``Objective.scheduler_kwargs``), so sampling matches training.  The CFG null
condition is the one training used: class id ``num_classes`` for DiT, and T5("")
for PixArt with ``data.null_caption: t5_empty`` (the cache stores T5("") for caption
dropout, and the pipeline's default negative prompt is "").  With ``buffer`` the
pipeline cannot hold the buffer (it always encodes a negative prompt unless given
``negative_prompt_embeds``): the export keeps ``null_caption_buffer.safetensors``
beside ``model_index.json`` (``tristage sample`` uses it) and says so in one line.
A DiT trained with timestep ``freq_shift`` 0 (the official weights) exports with one warning
line: ``DiTPipeline`` hard-codes shift 1 (``conversion.dit_layouts.dit_to_diffusers``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from diffusers import AutoencoderKL

from tristage.data.cache_format import MANIFEST
from tristage.data.sources import class_names
from tristage.errors import CheckpointError
from tristage.train.config import Config, load_config
from tristage.train.conversion.init_from import model_folder, source_class
from tristage.train.families import Family, family_of
from tristage.train.inference.sample import TRAINING_SIZE, quiet_loading
from tristage.train.models.null_caption import BUFFER_FILE
from tristage.train.models.pipelines import scheduler_for

log = logging.getLogger(__name__)


def id2label(cfg: Config) -> dict[str, str]:
    """Class names from the cache manifest, else from the synsets file."""
    manifest = Path(cfg.data.cache_dir) / MANIFEST
    if manifest.is_file():
        names = json.loads(manifest.read_text()).get("class_names") or {}
        if names:
            return names
    return {str(k): v for k, v in class_names(cfg.data.source).items()}


def text_parts(cfg: Config, family: Family) -> tuple:
    """(T5 encoder, tokenizer) for a text family's pipeline; none for a class-conditional one."""
    if not family.needs_text:
        return None, None
    from transformers import AutoTokenizer, T5EncoderModel

    text_encoder = T5EncoderModel.from_pretrained(cfg.encoders.text_encoder)
    return text_encoder, AutoTokenizer.from_pretrained(cfg.encoders.tokenizer)


def export(run_dir: str | Path, out: str | Path) -> Path:
    """Write the pipeline folder for the finished run in ``run_dir`` (its ``final/``)."""
    final = Path(run_dir) / "final"
    if not (final / "config.yaml").is_file():
        raise CheckpointError(f"{final}: no finished stage here (final/config.yaml missing)")
    cfg = load_config(final / "config.yaml")
    quiet_loading()  # the command prints the folder it wrote, not loading and writing bars
    folder, family = model_folder(final), family_of(cfg.model.family)
    source_class(folder)  # a final/ without its model: the one-line "holds no model" error
    vae = AutoencoderKL.from_pretrained(cfg.encoders.vae)
    transformer = family.model_class.from_pretrained(folder)
    pipe = family.pipeline(transformer, vae, scheduler_for(cfg.objective), *text_parts(cfg, family))
    if not family.needs_text:  # class-conditional: the label names go with the pipeline
        pipe.register_to_config(id2label=id2label(cfg))
    pipe.save_pretrained(out, safe_serialization=True)
    keep_null_buffer(folder, Path(out))
    write_trained_size(cfg, Path(out))
    return Path(out)


def keep_null_buffer(folder: Path, out: Path) -> None:
    """A null-caption buffer the stage trained with (``data.null_caption: buffer``) goes with the pipeline."""
    buffer = folder.parent / BUFFER_FILE
    if buffer.is_file():
        shutil.copy2(buffer, out / BUFFER_FILE)
        log.warning(
            "%s: trained with data.null_caption: buffer; `tristage sample` uses it, but the pipeline's "
            'own default negative prompt is T5(""): pass negative_prompt_embeds from %s '
            "(under the prompt's mask)",
            out,
            BUFFER_FILE,
        )


def write_trained_size(cfg: Config, out: Path) -> None:
    """What `tristage sample` defaults to: the transformer's ``sample_size`` is not the trained size when
    the pos-embed base was chosen apart from it (the demo's PixArt: 32 latents, trained at 64 / 96 px)."""
    record = {"resolution": cfg.data.resolution, "multi_aspect": cfg.data.multi_aspect}
    (out / TRAINING_SIZE).write_text(json.dumps(record))
