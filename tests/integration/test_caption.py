"""`tristage caption`: a tiny LLaVA (saved, then loaded back with from_pretrained) captions SA-style
tars into the JSONL the stage-2 reader consumes; one line per readable image in the reader's id form,
corrupt images counted, a SIGKILLed pass resumes to the same file, 2 processes equal 1, and the output
feeds `tristage cache` and a short stage-2 run.
"""

from __future__ import annotations

import importlib.util
import io
import json
import multiprocessing
import os
import signal
import tarfile
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from tristage import cli
from tristage.data.caption import Captioner, CaptionError, part_done, parts_dir, resolve_dtype, run_caption
from tristage.data.config import PAPER_CAPTION_PROMPT
from tristage.data.sources import Skips, open_source
from tristage.demo import synthetic
from tristage.demo.captioner import write_captioner, write_next_captioner
from tristage.train.config import load_config
from tristage.train.training.stage_cache import cache_stage
from tristage.train.training.trainer import Trainer

from ..conftest import ROOT, run_cli, run_cli_2proc

pytestmark = pytest.mark.usefixtures("one_thread")  # the subprocesses run one thread: same bits
CONFIG = ROOT / "demo" / "configs" / "stage2.yaml"
IMAGES, PER_SHARD = 6, 2  # 3 good units, plus one tar holding a corrupt image


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Raw SA-style tars (one with a corrupt JPEG and a 48x64 image), the tiny LLaVA, a 1-process run."""
    root = tmp_path_factory.mktemp("caption")
    raw = synthetic.write_stage2(root / "raw", IMAGES, size=64, per_shard=PER_SHARD)
    (raw / "llava_captions.jsonl").unlink()  # the pass makes the captions
    with tarfile.open(raw / "sa_000009.tar", "w") as tar:
        _add(tar, "sa_900.jpg", b"\xff\xd8 not really a jpeg")
        _add(tar, "sa_901.png", synthetic._encode(synthetic.render(_scene(48, 64)), "PNG"))
    model = write_captioner(root / "tiny_llava")

    def overrides(name: str, *extra: str) -> list[str]:
        out = root / name / "captions.jsonl"
        return [
            f"data.source.paths=[{raw}/sa_*.tar]",
            f"data.source.captions={out}",  # the stage-2 config reads what the pass writes
            f"caption.output={out}",
            f"caption.model={model}",
            "caption.max_new_tokens=6",
            "caption.batch_size=2",
            "caption.sort_window=2",
            *extra,
        ]

    cfg = load_config(CONFIG, overrides("one"))
    manifest = run_caption(cfg.caption, cfg.data.source, Accelerator())
    return {"root": root, "raw": raw, "overrides": overrides, "cfg": cfg, "manifest": manifest}


def _scene(height: int, width: int):
    import random

    return synthetic.sample_scene(random.Random(0), "red", "circle", "white", width, height)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_line_per_readable_image_in_reader_id_form(world):
    cfg, manifest = world["cfg"], world["manifest"]
    rows = lines(Path(cfg.caption.output))
    expected = [f"sa_{i}" for i in range(1, IMAGES + 1)] + ["sa_901"]  # unit order, then reader order
    assert [r["id"] for r in rows] == expected and all(r["caption"] for r in rows)
    assert manifest["skipped"] == {"undecodable_image": 1}
    assert manifest["skipped_examples"]["undecodable_image"] == ["sa_900"]
    assert manifest["model_class"] == "LlavaForConditionalGeneration"
    assert manifest["settings"]["caption.prompt"] == PAPER_CAPTION_PROMPT
    assert manifest["settings"]["caption.do_sample"] is False
    dtype = str(resolve_dtype("auto", Accelerator().device)).removeprefix("torch.")
    assert manifest["settings"]["caption.dtype"] == dtype
    # The stage-2 reader, pointed at the output, joins every readable image with its caption.
    source = open_source(cfg.data.source)
    skips = Skips()
    joined = {item.key: item.caption for unit in source.units() for item in source.read(unit, skips)}
    assert joined == {r["id"]: r["caption"] for r in rows}
    assert skips.counts == {"missing_caption": 1}  # sa_900, the corrupt one


def _killed_run(cfg) -> None:
    os.environ["TQDM_DISABLE"] = "1"
    run_caption(cfg.caption, cfg.data.source, Accelerator())


def test_sigkill_then_rerun_gives_the_same_file(world):
    cfg = load_config(CONFIG, world["overrides"]("killed"))
    parts = Path(parts_dir(cfg.caption.output))
    child = multiprocessing.get_context("fork").Process(target=_killed_run, args=(cfg,))
    child.start()
    deadline = time.time() + 60
    while not list(parts.glob("*.done.json")) and time.time() < deadline and child.is_alive():
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    # Also the worst moments of a kill: a unit written but not yet marked, and a half-written temp file.
    done = sorted(parts.glob("*.done.json"))
    assert done, "the pass was killed before any unit finished"
    for marker in done[1:]:
        marker.unlink()
    (parts / "captions-00001.jsonl").write_text('{"id": "half"')
    (parts / "captions-00002.jsonl.tmp-99999").write_text("stale")
    run_caption(cfg.caption, cfg.data.source, Accelerator())
    assert Path(cfg.caption.output).read_bytes() == Path(world["cfg"].caption.output).read_bytes()
    assert not list(parts.glob("*.tmp-*"))


def test_two_processes_equal_one(world):
    result = run_cli_2proc("caption", str(CONFIG), *world["overrides"]("two"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = world["root"] / "two" / "captions.jsonl"
    assert out.read_bytes() == Path(world["cfg"].caption.output).read_bytes()
    ranks = {p.name: json.loads(p.read_text())["rank"] for p in Path(parts_dir(out)).glob("*.done.json")}
    assert ranks == {f"captions-{i:05d}.done.json": i % 2 for i in range(4)}  # each unit by its owner
    assert "caption: 7 captions from 4 units" in result.stderr and "undecodable_image=1" in result.stderr


def test_output_feeds_cache_and_a_short_stage2_run(world, tmp_path):
    from tristage.demo.encoders import write_encoders

    enc = write_encoders(tmp_path, vae_channels=(8, 8, 8, 8))
    extra = [
        f"run.dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"encoders.vae={enc['vae']}",
        f"encoders.text_encoder={enc['text_encoder']}",
        f"encoders.tokenizer={enc['tokenizer']}",
        "model.size=tiny",
        "data.batch_size=2",
        "train.max_steps=2",
        "tracking.mode=disabled",
        "validation.loss_every=0",  # the demo config evaluates on a held-out split this test has not
        "validation.metrics_every=0",
        "checkpoint.every=100",
    ]
    cfg = load_config(CONFIG, world["overrides"]("one", *extra))
    manifest = cache_stage(cfg, Accelerator())
    assert manifest["samples"] == 7 and manifest["skipped"] == {"missing_caption": 1}  # sa_900: no caption
    Trainer(cfg).train()
    assert (tmp_path / "run" / "final").is_dir()


def test_llava_next_through_the_same_path(world):
    model = write_next_captioner(world["root"] / "tiny_llava_next")
    cfg = load_config(CONFIG, world["overrides"]("next", f"caption.model={model}"))
    manifest = run_caption(cfg.caption, cfg.data.source, Accelerator())
    assert manifest["model_class"] == "LlavaNextForConditionalGeneration" and manifest["captions"] == 7
    assert [r["id"] for r in lines(Path(cfg.caption.output))][-1] == "sa_901"  # the 48x64 image


def test_sampling_is_seeded_per_unit(world):
    cfg = load_config(CONFIG, world["overrides"]("sampled", "caption.do_sample=true"))
    run_caption(cfg.caption, cfg.data.source, Accelerator())
    first = Path(cfg.caption.output).read_bytes()
    Path(part_done(f"{parts_dir(cfg.caption.output)}/captions-00001.jsonl")).unlink()  # redo one unit
    run_caption(cfg.caption, cfg.data.source, Accelerator())
    assert Path(cfg.caption.output).read_bytes() == first
    assert first != Path(world["cfg"].caption.output).read_bytes()  # sampled, not greedy


def test_rerun_with_another_prompt_is_refused(world):
    cfg = load_config(CONFIG, world["overrides"]("one", "caption.prompt=Say hi"))
    with pytest.raises(CaptionError, match="with a different caption.prompt; use another caption.output"):
        run_caption(cfg.caption, cfg.data.source, Accelerator())
    assert len(lines(Path(cfg.caption.output))) == 7  # nothing lost


def test_hint_goes_into_the_prompt(world):
    cfg = load_config(CONFIG, world["overrides"]("one", "caption.hint=true"))
    captioner = Captioner.load(cfg.caption, Accelerator().device)
    assert "may be wrong: a red dot" in captioner.prompt("a red dot")
    assert captioner.prompt(None).rstrip().endswith("manner ASSISTANT:")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["caption.output=null"], "key 'caption.output': set the caption JSONL"),
        (["caption.batch_size=0"], "key 'caption.batch_size': must be >= 1"),
        (["caption.dtype=fp8"], "key 'caption.dtype'"),
        (["caption.model=./no/such/model"], "key 'caption.model': path does not exist"),
        (["caption.model=nobody/no-such-vlm"], "caption.model: cannot load nobody/no-such-vlm"),
        (["data.source.kind=imagenet_wds"], "imagenet_wds has class labels, not captions"),
    ],
)
def test_bad_input_is_one_line_exit_2(world, capsys, extra, message):
    code = cli.main(["caption", str(CONFIG), *world["overrides"]("bad", *extra)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_model_without_chat_template_is_refused(world, tmp_path, capsys):
    import shutil

    model = shutil.copytree(world["cfg"].caption.model, tmp_path / "no_template")
    (model / "chat_template.jinja").unlink()
    code = cli.main(["caption", str(CONFIG), *world["overrides"]("bad", f"caption.model={model}")])
    assert code == 2 and "has no chat template" in capsys.readouterr().err
    parts = parts_dir(world["root"] / "bad" / "captions.jsonl")
    assert not Path(part_done(f"{parts}/captions-00000.jsonl")).exists()


def write_tiny_qwen2vl(folder: Path) -> Path:
    """A random Qwen2-VL saved as a hub folder is (config, weights, tokenizer, image processor): its
    processor also loads ``Qwen2VLVideoProcessor``, which imports torchvision."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from tristage.demo.captioner import build_tokenizer

    tok = build_tokenizer()
    marks = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok.add_special_tokens({"additional_special_tokens": marks})
    ids = dict(zip(("vision_start_token_id", "image_token_id", "video_token_id"), [0, 2, 3]))
    ids = {key: tok.convert_tokens_to_ids(marks[i]) for key, i in ids.items()}
    special = {f"{t}_token_id": getattr(tok, f"{t}_token_id") for t in ("bos", "eos", "pad")}
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    text.update(num_key_value_heads=1, vocab_size=len(tok), **special)
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 2, 4]}
    vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=8, spatial_merge_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, **ids)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    Qwen2VLImageProcessorPil(patch_size=8, merge_size=2).save_pretrained(folder)
    return folder


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_a_vlm_needing_a_missing_package_is_one_line(world, tmp_path):
    """Qwen2-VL without torchvision: one line naming caption.model and the package, exit 2, nothing
    captioned or written."""
    model = write_tiny_qwen2vl(tmp_path / "qwen2vl")
    result = run_cli("caption", str(CONFIG), *world["overrides"]("qwen", f"caption.model={model}"))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "caption" in line]
    assert lines == [
        f"tristage caption: error: caption.model: {model} needs the package 'torchvision', which is not "
        "installed: pip install 'tristage[caption]' (or pip install torchvision)"
    ], result.stderr
    assert "Traceback" not in result.stderr
    assert not list(Path(parts_dir(world["root"] / "qwen" / "captions.jsonl")).glob("*.done.json"))
    assert not (world["root"] / "qwen" / "captions.jsonl").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_captions_in_bf16_and_the_bench_times_wall_clock(world, capsys):
    from tristage.bench import caption as bench

    cfg = load_config(CONFIG, world["overrides"]("gpu"))
    manifest = run_caption(cfg.caption, cfg.data.source, Accelerator())
    assert manifest["settings"]["caption.dtype"] == "bfloat16" and manifest["captions"] == 7
    bench.main("--images 32 --per-unit 16 --batch 8 --repeats 2".split())
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["clock"] == "wall" and figures["dtype"] == "bfloat16" and figures["caption_vs_bare"] > 0
