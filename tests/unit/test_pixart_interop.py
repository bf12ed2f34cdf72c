"""PixArt-alpha interop: checkpoints in (official / diffusers), init_from, exported pipelines vs ours."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
)
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, T5EncoderModel

from tristage.data.cache import Encoders
from tristage.demo.encoders import write_demo_text_encoder
from tristage.train.config import load_config, save_config
from tristage.train.conversion.init_from import load_initial_weights
from tristage.train.conversion.pixart_layouts import (
    load_pixart_checkpoint,
    pixart_state_dict_from_official,
    pixart_to_official_state_dict,
)
from tristage.train.diffusion.objective import DIFFUSERS_PREDICTION_TYPE, Objective
from tristage.train.inference.export import export
from tristage.train.models.dit import ClassConditionalDiT, build_dit
from tristage.train.models.pixart import build_pixart
from tristage.train.models.sizes import SIZES, Size

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = 8  # latent side: 4 x 4 tokens with patch 2
SCALE = max(
    SAMPLE // 64, 1
)  # the loader's default interpolation scale (diffusers', the official lewei_scale)
CAPTION = 12
# MS embeds height, width and aspect ratio to hidden // 3 channels each and adds their concatenation to
# the timestep embedding, so MS needs hidden % 3 == 0: "tiny" (32) and "demo" (128) cannot be MS; 48 can.
MS_SIZE = Size(2, 2, 24, 2)
NULL_CLASS = 1000  # DiTPipeline's hard-coded null class


pytestmark = pytest.mark.usefixtures("one_thread")


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (the zero-initialised cross-attention output, final linear and adaLN
    would hide mapping bugs), scaled so activations stay O(1)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=p[0].numel() ** -0.5 if p.ndim > 1 else 0.1)
    return model.eval()


def tiny_pixart(ms: bool = False, caption_channels: int = CAPTION, seed: int = 0) -> PixArtTransformer2DModel:
    size = MS_SIZE if ms else SIZES["tiny"]
    return perturb(build_pixart(size, SAMPLE, 4, 8, caption_channels, SCALE, ms), seed)


def pixart_inputs(ms: bool, batch: int = 3, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    mask = (torch.rand(batch, 6, generator=gen) > 0.4).long()
    mask[:, 0] = 1  # at least one real token per caption
    inputs = {
        "hidden_states": torch.randn(batch, 4, SAMPLE, SAMPLE, generator=gen),
        "timestep": torch.randint(0, 1000, (batch,), generator=gen),
        "encoder_hidden_states": torch.randn(batch, 6, CAPTION, generator=gen),
        "encoder_attention_mask": mask,
    }
    if ms:
        inputs["added_cond_kwargs"] = micro_conditions(batch, gen)
    return inputs


def micro_conditions(batch: int, gen: torch.Generator) -> dict:
    height_width = torch.randint(128, 2048, (batch, 2), generator=gen).float()
    return {"resolution": height_width, "aspect_ratio": height_width[:, :1] / height_width[:, 1:]}


@torch.no_grad()
def run(model: PixArtTransformer2DModel, inputs: dict) -> torch.Tensor:
    return model(**inputs).sample


def assert_same_outputs(a, b, inputs: dict, what: str, tol: float = 1e-5) -> None:
    want, got = run(a, inputs), run(b, inputs)
    err = (want - got).abs().max().item()
    print(f"{what}: |out| max {want.abs().max().item():.3g}, max abs error {err:.3g}")
    assert want.abs().max() > 0.1  # not a comparison of two near-zero outputs
    assert err < tol, what


def official_state(ms: bool = False) -> dict[str, torch.Tensor]:
    return pixart_to_official_state_dict(tiny_pixart(ms), null_caption=torch.randn(7, CAPTION))


# ---------------------------------------------------------------------------------------------
# Checkpoints in
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ms", [False, True], ids=["base", "MS"])
def test_official_pth_round_trip(tmp_path, caplog, ms):
    model = tiny_pixart(ms)
    null = torch.randn(7, CAPTION)
    state = pixart_to_official_state_dict(model, null_caption=null)
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    assert state["blocks.1.attn.qkv.weight"].shape == (3 * dim, dim)
    assert state["blocks.1.cross_attn.kv_linear.weight"].shape == (2 * dim, dim)
    assert state["pos_embed"].shape == (1, (SAMPLE // 2) ** 2, dim)
    assert ("csize_embedder.mlp.0.weight" in state) == ms and ("ar_embedder.mlp.2.bias" in state) == ms
    torch.save({"state_dict": state}, tmp_path / "PixArt-tiny.pth")  # nested as the official trainer saves

    with caplog.at_level(logging.WARNING, logger="tristage.train.conversion.pixart_layouts"):
        loaded = load_pixart_checkpoint(tmp_path / "PixArt-tiny.pth", num_attention_heads=2)
    assert "y_embedder.y_embedding" in caplog.text and 'T5("")' in caplog.text
    cfg = loaded.config
    assert (cfg.num_layers, cfg.caption_channels, cfg.out_channels, cfg.patch_size) == (2, CAPTION, 8, 2)
    assert cfg.sample_size == SAMPLE and cfg.interpolation_scale == SCALE  # grid of pos_embed, lewei_scale
    assert loaded.adaln_single.emb.use_additional_conditions == ms
    assert_same_outputs(model, loaded, pixart_inputs(ms), f"official .pth round trip (ms={ms})")

    _, dropped = pixart_state_dict_from_official(state)
    assert torch.equal(dropped["y_embedder.y_embedding"], null)  # returned, not silently lost


@pytest.mark.parametrize("ms", [False, True], ids=["base", "MS"])
def test_diffusers_folder_and_state_dict_round_trip(tmp_path, ms):
    model = tiny_pixart(ms)
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    inputs = pixart_inputs(ms)
    for folder in (tmp_path / "pipe", tmp_path / "pipe" / "transformer"):
        assert_same_outputs(model, load_pixart_checkpoint(folder), inputs, f"diffusers folder (ms={ms})")
    bare = load_pixart_checkpoint(
        model.state_dict(), sample_size=SAMPLE, interpolation_scale=SCALE, num_attention_heads=2
    )
    assert bare.adaln_single.emb.use_additional_conditions == ms
    assert_same_outputs(model, bare, inputs, f"diffusers state dict (ms={ms})")


def official_pixart_pos_embed(dim: int, grid: int, lewei_scale: float) -> torch.Tensor:
    """PixArt.py's table, derived independently: the MAE sin-cos of positions (grid index / lewei_scale,
    base size = the grid), [sincos(column), sincos(row)]."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    index = torch.arange(grid * grid)
    rows, cols = (index // grid) / lewei_scale, (index % grid) / lewei_scale

    def sincos(pos: torch.Tensor) -> torch.Tensor:
        angle = pos[:, None].double() * omega[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([sincos(cols), sincos(rows)], dim=1)[None].float()


# Release -> (latent side, MS, the official config's lewei_scale). Patch 8 keeps the 1024 grid at 16 x 16
# tokens on CPU; the default scale depends on the latent side alone.
RELEASES = {"256": (32, False, 1.0), "512": (64, False, 1.0), "1024-MS": (128, True, 2.0)}


@pytest.mark.parametrize("release", RELEASES)
def test_official_release_loads_with_its_own_interpolation_scale(tmp_path, caplog, release):
    side, ms, lewei_scale = RELEASES[release]
    model = perturb(build_pixart(Size(2, 2, 24, 8), side, 4, 8, CAPTION, lewei_scale, ms))
    state = pixart_to_official_state_dict(model, null_caption=torch.randn(7, CAPTION))
    state["pos_embed"] = official_pixart_pos_embed(48, side // 8, lewei_scale)
    torch.save({"state_dict": state}, tmp_path / f"PixArt-XL-2-{release}.pth")
    with caplog.at_level(logging.WARNING):
        loaded = load_pixart_checkpoint(tmp_path / f"PixArt-XL-2-{release}.pth", num_attention_heads=2)
    assert loaded.config.interpolation_scale == lewei_scale and "pos_embed differs" not in caplog.text
    inputs = pixart_inputs(ms, batch=2) | {"hidden_states": torch.randn(2, 4, side, side)}
    assert_same_outputs(model, loaded, inputs, f"official PixArt-{release} .pth, default scale")
    with caplog.at_level(logging.WARNING):  # another scale is not the release's table: said in one line
        load_pixart_checkpoint(state, interpolation_scale=0.5, num_attention_heads=2)
    assert "pos_embed differs from the table at interpolation_scale=0.5" in caplog.text


def test_official_missing_and_unexpected_keys_are_named():
    state = official_state()
    del state["blocks.1.cross_attn.kv_linear.bias"]
    state["blocks.0.bogus.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="missing keys") as err:
        load_pixart_checkpoint(state, num_attention_heads=2)
    assert "blocks.1.cross_attn.kv_linear.bias" in str(err.value)
    assert "blocks.0.bogus.weight" in str(err.value)


@pytest.mark.parametrize(
    ("ms_source", "flag", "named"),
    [
        (False, True, "missing keys: ar_embedder.mlp.0.bias"),  # asked for MS, checkpoint has none
        (True, False, "unexpected keys: ar_embedder.mlp.0.bias"),  # MS tensors no rule consumes
    ],
)
def test_official_ms_flag_must_match_the_tensors(ms_source, flag, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        load_pixart_checkpoint(
            official_state(ms_source), use_additional_conditions=flag, num_attention_heads=2
        )


def test_diffusers_missing_and_unexpected_keys_are_named(tmp_path):
    model = tiny_pixart()
    state = dict(model.state_dict())
    del state["transformer_blocks.0.attn2.to_k.weight"]
    state["transformer_blocks.0.attn2.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="missing keys") as err:
        load_pixart_checkpoint(state, sample_size=SAMPLE, num_attention_heads=2)
    assert "transformer_blocks.0.attn2.to_k.weight" in str(err.value)
    assert "transformer_blocks.0.attn2.extra.weight" in str(err.value)

    model.save_pretrained(tmp_path)
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({**load_file(weights), "caption_projection.stray": torch.zeros(2)}, weights)
    with pytest.raises(ValueError, match=r"unexpected keys: caption_projection\.stray"):
        load_pixart_checkpoint(tmp_path)


def test_bare_state_dict_without_sample_size_and_unknown_layouts_are_refused():
    with pytest.raises(ValueError, match="sample_size"):
        load_pixart_checkpoint(tiny_pixart().state_dict(), num_attention_heads=2)
    with pytest.raises(ValueError, match="layout"):
        load_pixart_checkpoint({"model.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------
# init_from: a non-MS source into an MS target leaves the outputs unchanged
# ---------------------------------------------------------------------------------------------


def stage3_config(tmp_path: Path, init_from: Path, ms: bool = True):
    return load_config(
        ROOT / "demo/configs/stage3.yaml",
        [
            f"model.use_additional_conditions={str(ms).lower()}",
            f"model.sample_size={SAMPLE}",
            f"model.interpolation_scale={SCALE}",
            f"model.caption_channels={CAPTION}",
            f"init_from={init_from}",
            f"run.dir={tmp_path / 'stage3'}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
    )


def ms_target(seed: int = 5) -> PixArtTransformer2DModel:
    """A different random MS model: every tensor must come from the source (or be zeroed)."""
    return tiny_pixart(ms=True, seed=seed)


@pytest.mark.parametrize("layout", ["final", "official.pth", "bare.safetensors"])
def test_ms_init_from_non_ms_source_leaves_outputs_unchanged(tmp_path, layout):
    source = perturb(build_pixart(MS_SIZE, SAMPLE, 4, 8, CAPTION, SCALE, False), seed=3)
    if layout == "final":
        source.save_pretrained(tmp_path / "final" / "transformer")
    elif layout.endswith(".pth"):
        torch.save(pixart_to_official_state_dict(source), tmp_path / layout)
    else:
        save_file(source.state_dict(), tmp_path / layout)
    target = ms_target()
    load_initial_weights(target, stage3_config(tmp_path, tmp_path / layout))

    emb = target.adaln_single.emb
    for embedder in (emb.resolution_embedder, emb.aspect_ratio_embedder):
        assert not embedder.linear_2.weight.any() and embedder.linear_2.bias.abs().sum() == 0
    base = pixart_inputs(ms=False, batch=2)
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):  # the micro-conditions must not matter, whatever they are
        assert_same_outputs(
            source, target, {**base, "added_cond_kwargs": micro_conditions(2, gen)}, f"MS init ({layout})"
        )
    with torch.no_grad():  # the check can fail: once the embedder is live, the output moves
        emb.resolution_embedder.linear_2.bias.fill_(0.5)
    moved = (run(source, base) - run(target, {**base, "added_cond_kwargs": micro_conditions(2, gen)})).abs()
    assert moved.max() > 1e-3


def test_init_from_official_ms_pth_keeps_its_micro_conditions(tmp_path):
    source = tiny_pixart(ms=True, seed=2)
    torch.save({"state_dict": pixart_to_official_state_dict(source)}, tmp_path / "ms.pth")
    target = ms_target()
    load_initial_weights(target, stage3_config(tmp_path, tmp_path / "ms.pth"))
    assert_same_outputs(source, target, pixart_inputs(ms=True), "official MS .pth -> MS target")


def test_init_from_an_unknown_weights_file_is_refused(tmp_path):
    torch.save({"net.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="weights-file layout"):
        load_initial_weights(ms_target(), stage3_config(tmp_path, tmp_path / "other.pth"))


# ---------------------------------------------------------------------------------------------
# Export round trips: the diffusers pipeline samples what our model + our sampler sample
# ---------------------------------------------------------------------------------------------


def tiny_vae(path: Path) -> Path:
    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SAMPLE,
    ).save_pretrained(path)
    return path


def finish_run(run_dir: Path, model: torch.nn.Module, cfg) -> None:
    """What a finished stage leaves behind: final/transformer and the resolved final/config.yaml."""
    model.save_pretrained(run_dir / "final" / "transformer")
    save_config(cfg, run_dir / "final" / "config.yaml")


def assert_scheduler_is_training_schedule(out: Path, cfg) -> None:
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DPMSolverMultistepScheduler"
    obj = cfg.objective
    assert saved["num_train_timesteps"] == obj.num_timesteps == 1000
    assert saved["beta_start"] == obj.beta_start and saved["beta_end"] == obj.beta_end
    assert saved["beta_schedule"] == obj.beta_schedule == "linear"
    assert saved["prediction_type"] == DIFFUSERS_PREDICTION_TYPE[obj.prediction]


def capture_decoded_latents(pipe) -> list[torch.Tensor]:
    """Record what the pipeline hands to the VAE (DiTPipeline has no output_type="latent")."""
    seen, decode = [], pipe.vae.decode
    pipe.vae.decode = lambda z, *args, **kwargs: (seen.append(z.clone()), decode(z, *args, **kwargs))[1]
    return seen


def guided(eps_cond: torch.Tensor, eps_null: torch.Tensor, scale: float, channels: int) -> torch.Tensor:
    """CFG on the first C (eps) channels -- all of them -- of a learned-sigma output."""
    cond, null = eps_cond[:, :channels], eps_null[:, :channels]
    return null + scale * (cond - null)


STEPS, GUIDANCE = 5, 4.0


def assert_same_latents(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Relative to the largest latent: an untrained model's first DPM-Solver step divides by
    sqrt(alpha_bar_999) ~ 0.006, so the sampled latents reach ~1e3, where a float32 ulp is ~1e-4."""
    scale, err = want.abs().max().item(), (got - want).abs().max().item()
    print(f"{what}: |latents| max {scale:.3g}, max abs error {err:.3g}, relative {err / scale:.2g}")
    assert err < 1e-5 * scale, what


@torch.no_grad()
def reference_dit_sample(dit: ClassConditionalDiT, cfg, labels: list[int], seed: int) -> torch.Tensor:
    scheduler = DPMSolverMultistepScheduler(**Objective(cfg.objective).scheduler_kwargs())
    scheduler.set_timesteps(STEPS)
    x = torch.randn(len(labels), 4, SAMPLE, SAMPLE, generator=torch.Generator().manual_seed(seed))
    cond, null = torch.tensor(labels), torch.full((len(labels),), NULL_CLASS)
    for t in scheduler.timesteps:
        ts = t.expand(len(labels))
        eps = guided(dit(x, ts, cond).sample, dit(x, ts, null).sample, GUIDANCE, 4)
        x = scheduler.step(eps, t, x).prev_sample
    return x


def test_stage1_export_samples_like_our_dit(tmp_path):
    dit = perturb(build_dit(SIZES["tiny"], SAMPLE, 4, 8, num_classes=1000), seed=4)
    with torch.no_grad():
        dit.class_embedder.weight.normal_(std=1.0)  # classes that actually differ
    synsets = tmp_path / "synsets.txt"
    synsets.write_text("n001 red circle\nn002 blue square, cube\nn003 green triangle\n")
    cfg = load_config(
        ROOT / "demo/configs/stage1.yaml",
        [
            f"encoders.vae={tiny_vae(tmp_path / 'vae')}",
            f"data.source.synsets={synsets}",
            f"data.cache_dir={tmp_path / 'no_cache'}",  # no manifest: class names come from synsets
            f"run.dir={tmp_path / 'run'}",
        ],
    )
    finish_run(tmp_path / "run", dit, cfg)
    out = export(tmp_path / "run", tmp_path / "export")
    assert_scheduler_is_training_schedule(out, cfg)

    pipe = DiTPipeline.from_pretrained(out)
    assert pipe.get_label_ids(["red circle", "cube", "blue square", "green triangle"]) == [0, 1, 1, 2]
    seen = capture_decoded_latents(pipe)
    images = pipe(
        class_labels=[0, 2],
        guidance_scale=GUIDANCE,
        generator=torch.Generator().manual_seed(7),
        num_inference_steps=STEPS,
        output_type="pt",
    ).images
    assert images.shape == (2, 3, SAMPLE, SAMPLE) and images.isfinite().all()
    want = reference_dit_sample(dit, cfg, [0, 2], seed=7)
    got = seen[0] * pipe.vae.config.scaling_factor  # the pipeline divides by it before decoding
    assert_same_latents(got, want, "DiTPipeline vs our sampler")


@torch.no_grad()
def reference_pixart_sample(pixart, cfg, prompts: list[str], latents: torch.Tensor) -> torch.Tensor:
    """Our model fed the cache's text features (trimmed to real tokens) and the cached null T5("")."""
    encoders = Encoders(
        vae=None,
        tokenizer=AutoTokenizer.from_pretrained(cfg.encoders.tokenizer),
        text_encoder=T5EncoderModel.from_pretrained(cfg.encoders.text_encoder).eval(),
        device=torch.device("cpu"),
    )
    texts = encoders.encode_text(prompts, cfg.encoders.max_tokens)
    (null,) = encoders.encode_text([""], cfg.encoders.max_tokens)
    scheduler = DPMSolverMultistepScheduler(**Objective(cfg.objective).scheduler_kwargs())
    scheduler.set_timesteps(STEPS)
    x = latents.clone()
    for t in scheduler.timesteps:
        eps = []
        for i, text in enumerate(texts):  # one sample at a time, each caption at its own length
            outs = [
                pixart(x[i : i + 1], encoder_hidden_states=c[None], timestep=t[None]).sample
                for c in (text, null)
            ]
            eps.append(guided(*outs, GUIDANCE, 4))
        x = scheduler.step(torch.cat(eps), t, x).prev_sample
    return x


def test_stage3_export_samples_like_our_pixart(tmp_path):
    tokenizer, text_encoder = write_demo_text_encoder(tmp_path / "encoders")
    pixart = tiny_pixart(caption_channels=64, seed=6)  # the demo T5 is 64 wide
    cfg = load_config(
        ROOT / "demo/configs/stage3.yaml",
        [
            f"encoders.vae={tiny_vae(tmp_path / 'vae')}",
            f"encoders.tokenizer={tokenizer}",
            f"encoders.text_encoder={text_encoder}",
            f"data.cache_dir={tmp_path / 'no_cache'}",
            f"run.dir={tmp_path / 'run'}",
            f"model.sample_size={SAMPLE}",
            f"model.interpolation_scale={SCALE}",
        ],
    )
    finish_run(tmp_path / "run", pixart, cfg)
    out = export(tmp_path / "run", tmp_path / "export")
    assert_scheduler_is_training_schedule(out, cfg)

    pipe = PixArtAlphaPipeline.from_pretrained(out)
    prompts = ["a red circle on a black background", "a small blue square in the top left corner"]
    latents = torch.randn(2, 4, SAMPLE, SAMPLE, generator=torch.Generator().manual_seed(3))
    got = pipe(
        prompts,
        negative_prompt="",
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        height=SAMPLE,  # the tiny VAE does not downsample
        width=SAMPLE,
        latents=latents.clone(),
        output_type="latent",
        use_resolution_binning=False,
        clean_caption=False,
        max_sequence_length=cfg.encoders.max_tokens,
    ).images
    want = reference_pixart_sample(pixart, cfg, prompts, latents)
    assert_same_latents(got, want, "PixArtAlphaPipeline vs our sampler")
    assert (want - latents).abs().max() > 0.1  # sampling moved the latents
