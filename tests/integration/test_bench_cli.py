"""The benchmark CLIs' contract: the last stdout line is one JSON object with the named figures."""

from __future__ import annotations

import json

from ..conftest import run_cli


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_bench_cache_prints_the_three_figures():
    args = "--shards 2 --per-shard 8 --batch 4 --images 4 --encode-batch 2 --repeats 1".split()
    result = run_cli("bench", "cache", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = last_json(result.stdout)
    assert figures["loader_vs_raw_read"] > 0 and figures["extract_vs_bare"] > 0
    # fp8 T5 rows (80 x 4096 + per-token scales) plus 256 px moments and the tar/metadata overhead
    assert 80 * 4096 < figures["bytes_per_sample_256"] < 350_000
    assert figures["bytes_per_sample_256_bf16"] > 2 * 80 * 4096


def test_bench_train_prints_overhead_throughput_and_the_validation_share():
    args = "--steps 4 --repeats 1 --resolution 64 --window 2 --batch 2 --grad-accum 2".split()
    result = run_cli("bench", "train", *args, "--val-loss-every", "4", "--val-samples", "4")
    assert result.returncode == 0, result.stderr[-2000:]
    figures = last_json(result.stdout)
    assert figures["img_per_s"] > 0 and figures["bare_img_per_s"] > 0
    assert "overhead_vs_bare" in figures and figures["steps"] == 4 and figures["grad_accum"] == 2
    assert figures["val_evaluations"] == 1 and figures["val_samples"] == 4  # at step 4 of 6
    assert 0 < figures["val_share_of_wall"] < 1 and figures["val_rows_per_training_image"] > 0


def test_bench_train_prints_the_cheaper_training_figures(capsys):
    """``--mask-ratio`` and ``--repa`` (issue 38): Trainer runs with and without the option, one ratio
    (the console script once; the second in this process, as ``tristage bench`` runs it)."""
    from tristage.bench import train

    args = "--steps 2 --repeats 1 --resolution 64 --window 2 --batch 2 --size tiny".split()
    masked = run_cli("bench", "train", *args, "--mask-ratio", "0.5")
    assert masked.returncode == 0, masked.stderr[-2000:]
    figures = last_json(masked.stdout)
    assert figures["masked_vs_full_img_per_s"] > 0 and figures["option"][0] == "train.mask.ratio=0.5"
    assert figures["masked_img_per_s"] > 0 and figures["full_img_per_s"] > 0
    train.main([*args, "--repa", "--encoder-width", "16", "--projector-dim", "32", "--threads", "1"])
    figures = last_json(capsys.readouterr().out)
    assert "repa_overhead" in figures and figures["repa_img_per_s"] > 0 and figures["steps"] == 2


def test_bench_convergence_prints_steps_to_the_target(tmp_path):
    """``tristage bench convergence`` from the console script, on a tiny world: every variant's curve of
    scored checkpoints and its steps to base's last shape rate."""
    args = "--variants base,mask --images 36 --steps 20 --every 10 --seeds 0 --per-class 1".split()
    done = run_cli("bench", "convergence", *args, "--workdir", str(tmp_path / "work"))
    assert done.returncode == 0, done.stderr[-3000:]
    figures = last_json(done.stdout)
    assert set(figures["variants"]) == {"base", "mask"} and figures["seeds"] == "0"
    for variant in figures["variants"].values():
        assert [row["step"] for row in variant["curve"]] == [10, 20]
        assert all(0.0 <= row["mean"] <= 1.0 for row in variant["curve"])
    assert figures["variants"]["base"]["steps_to_target"] in (10, 20)  # base reaches its own last rate


def test_bench_caption_prints_the_ratio(capsys):
    from tristage.bench import caption

    args = "--images 4 --per-unit 2 --image-px 64 --batch 2 --max-new-tokens 4 --width 64 --layers 1"
    caption.main([*args.split(), "--repeats", "1", "--image-side", "32"])
    figures = last_json(capsys.readouterr().out)
    assert figures["captions"] == 4 and figures["new_tokens_per_caption"] <= 4
    assert figures["captions_per_s"] > 0 and figures["bare_captions_per_s"] > 0
    assert figures["caption_vs_bare"] > 0 and figures["clock"] == "process_cpu"
