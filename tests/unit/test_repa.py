"""REPA (objective.repa): the alignment loss against the paper's formula, the projector on the right
block of both families, the encoder's features in the cache pass (equal to a direct forward,
fingerprinted, fed to the loader), and the keys' checks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image

from tristage.data.features import CacheError, FeatureLoader, LoaderSpec
from tristage.data.fingerprint import fingerprint
from tristage.data.repa_features import RepaFeatures
from tristage.demo import synthetic
from tristage.demo.encoders import build_vision_encoder, save_vision_encoder
from tristage.demo.tiny_run import tiny_vae
from tristage.train.config import ConfigError, ModelConfig, load_config
from tristage.train.diffusion import repa
from tristage.train.diffusion.config import RepaConfig
from tristage.train.diffusion.objective import Objective, ObjectiveConfig
from tristage.train.diffusion.repa import alignment_loss, target_tokens
from tristage.train.families import family_of, feature_encoders, repa_features
from tristage.train.models.masking import KeptTokens
from tristage.train.training.stage_cache import cache_stage

from ..conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH = 12  # encoder width of the unit tests


def paper_formula(zs: torch.Tensor, zs_tilde: torch.Tensor) -> torch.Tensor:
    """REPA loss.py written out: per sample, per token, minus the cosine of the two vectors; the
    token mean summed over the batch and divided by the batch size (one encoder).  Plain loops, float64."""
    total = 0.0
    for z, z_tilde in zip(zs.double(), zs_tilde.double()):
        cosines = [(a @ b) / (a.norm() * b.norm()) for a, b in zip(z, z_tilde)]
        total = total - sum(cosines) / len(cosines)
    return total / zs.shape[0]


def test_alignment_loss_is_the_paper_formula():
    g = torch.Generator().manual_seed(0)
    target, projected = torch.randn(4, 16, WIDTH, generator=g), torch.randn(4, 16, WIDTH, generator=g)
    per_sample = alignment_loss(projected, target)
    assert per_sample.shape == (4,)
    torch.testing.assert_close(per_sample.mean().double(), paper_formula(target, projected))
    assert alignment_loss(target * 3.0, target).allclose(torch.full((4,), -1.0))  # aligned: cos 1
    assert alignment_loss(-target, target).allclose(torch.ones(4))


def build(family: str, block: int | None = None) -> tuple[torch.nn.Module, repa.RepaTap, RepaConfig]:
    """A tiny model (2 blocks) in float64 with random weights, its projector and tap."""
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, size="tiny", sample_size=8, num_classes=10, caption_channels=16)
    model = family_of(family).build(cfg, 8).double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    config = RepaConfig(encoder="unused", block=block, projector_dim=24)
    tap = repa.attach(model, config, WIDTH)
    model.double()
    return model, tap, config


def conditions(family: str) -> dict:
    if family == "dit":
        return {"class_labels": torch.tensor([1, 2, 3])}
    return {
        "encoder_hidden_states": torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1)).double()
    }


def tokens_after(model: torch.nn.Module, family: str, x: torch.Tensor, t: torch.Tensor, blocks: int):
    """The hidden tokens after the first ``blocks`` blocks, by a forward written out for each family."""
    h = model.pos_embed(x)
    if family == "dit":
        c = F.silu(model.condition(t, conditions(family)["class_labels"], h.dtype))
        for block in model.transformer_blocks[:blocks]:
            h = block(h, c)
        return h
    extra = {"resolution": None, "aspect_ratio": None}
    timestep, _ = model.adaln_single(t, extra, batch_size=x.shape[0], hidden_dtype=h.dtype)
    text = model.caption_projection(conditions(family)["encoder_hidden_states"]).view(3, -1, h.shape[-1])
    for block in model.transformer_blocks[:blocks]:
        h = block(h, encoder_hidden_states=text, timestep=timestep)
    return h


@pytest.mark.parametrize("block", [1, 2])
@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_the_tap_projects_the_configured_block(family, block):
    model, tap, _ = build(family, block)
    assert isinstance(model.repa_projector, repa.Projector)
    assert [type(m).__name__ for m in model.repa_projector] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert model.repa_projector[4].out_features == WIDTH and model.repa_projector[0].in_features == 32
    x, t = torch.randn(3, 4, 8, 8, dtype=torch.float64), torch.tensor([1, 500, 900])
    model(x, timestep=t, return_dict=False, **conditions(family))
    want = model.repa_projector(tokens_after(model, family, x, t, block))  # (B, 16, WIDTH)
    torch.testing.assert_close(tap.take(), want)
    with pytest.raises(RuntimeError, match="did not run in training mode"):
        tap.take()  # taken once
    model.eval()
    model(x, timestep=t, return_dict=False, **conditions(family))
    assert tap.projected is None  # sampling and validation (eval mode) project nothing


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_objective_adds_weight_times_the_alignment_loss(family):
    model, tap, config = build(family)
    plain = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g).double(), torch.randn(3, 4, 8, 8, generator=g).double()
    t, features = torch.tensor([3, 400, 999]), torch.randn(3, 4, 4, WIDTH, generator=g).double()
    batch = {"latents": x0, "cond": conditions(family), "repa": features}
    with_repa = Objective(ObjectiveConfig(repa=config))
    loss, metrics = with_repa.loss(model, batch, noise=noise, timesteps=t, tap=tap)
    base, _ = Objective(ObjectiveConfig()).loss(plain, batch, noise=noise, timesteps=t)
    projected = plain.repa_projector(tokens_after(plain, family, with_repa.add_noise(x0, noise, t), t, 1))
    formula = paper_formula(features.flatten(1, 2), projected)
    torch.testing.assert_close(loss, base + 0.5 * formula)
    torch.testing.assert_close(metrics["repa_loss"], formula)
    torch.testing.assert_close(metrics["repa_cos"], -formula)
    loss.backward()
    assert model.repa_projector[0].weight.grad.abs().sum() > 0  # the projector trains


def test_under_masking_the_alignment_is_taken_on_the_kept_tokens():
    g = torch.Generator().manual_seed(4)
    features = torch.randn(2, 4, 4, WIDTH, generator=g)
    index = torch.tensor([[0, 3, 5, 15], [1, 2, 8, 9]])
    kept = KeptTokens(index, (4, 4), 2)

    class Tap:  # what the tap holds when the block ran on the kept tokens
        patch, projected = 2, torch.randn(2, 4, WIDTH, generator=g)

        def take(self):
            return self.projected

    got = Objective(ObjectiveConfig(repa=RepaConfig(encoder="x"))).alignment(features, Tap(), (8, 8), kept)
    want = [
        paper_formula(features.flatten(1, 2)[i, index[i]][None], Tap.projected[i][None]) for i in range(2)
    ]
    torch.testing.assert_close(got.double(), torch.stack(want))


def test_target_tokens_follow_the_dit_grid():
    features = torch.randn(2, 4, 4, WIDTH)
    assert torch.equal(target_tokens(features, (4, 4)), features.flatten(1, 2))  # same grid: as stored
    flat = torch.ones(2, 8, 8, WIDTH) * torch.arange(WIDTH)
    resized = target_tokens(flat, (4, 4))  # 8 x 8 encoder tokens onto a 4 x 4 DiT grid
    assert resized.shape == (2, 16, WIDTH) and torch.allclose(resized, flat[:, :4, :4].flatten(1, 2))
    ramp = torch.linspace(0, 1, 8)[None, :, None, None].expand(1, 8, 8, 1)  # rows 0 -> 1
    rows = target_tokens(ramp, (4, 4)).view(4, 4)
    assert bool((rows.diff(dim=0) > 0).all()) and bool((rows.diff(dim=1) == 0).all())  # row order kept


def test_projector_is_training_only():
    model, _, _ = build("dit")
    keys = set(model.state_dict())
    with repa.without_projector(model) as plain:
        assert not any(k.startswith("repa_projector.") for k in plain.state_dict())
        assert not hasattr(plain, "repa_projector")
    assert set(model.state_dict()) == keys and any(k.startswith("repa_projector.") for k in keys)


def test_block_default_scales_with_depth():
    config = RepaConfig(encoder="x")
    assert [config.block_for(d) for d in (28, 24, 12, 6, 2)] == [8, 7, 3, 2, 1]
    assert RepaConfig(encoder="x", block=5).block_for(28) == 5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["objective.repa.block=7"], "key 'objective.repa.block': 7 is past the model's depth 6; use 1 to 6"),
        (["objective.repa.block=0"], "key 'objective.repa.block': must be >= 1"),
        (["objective.repa.weight=0"], "key 'objective.repa.weight': must be > 0"),
        (["objective.repa.projector_dim=0"], "key 'objective.repa.projector_dim': must be >= 1"),
        (["objective.repa.encoder_resolution=0"], "key 'objective.repa.encoder_resolution': must be >= 1"),
        (["objective.repa.feature_dtype=int8"], "key 'objective.repa.feature_dtype': 'int8' is not one of"),
    ],
)
def test_bad_repa_keys_are_one_line_naming_the_key(overrides, message):
    path = ROOT / "demo/configs/stage1.yaml"  # demo-narrow/2: 6 blocks
    with pytest.raises(ConfigError) as err:
        load_config(path, ["objective.repa.encoder=some/encoder", *overrides])
    text = str(err.value)
    assert text.startswith(f"{path} (command-line override): {message}") and "\n" not in text
    assert load_config(path, ["objective.repa.encoder=e", "objective.repa.block=6"]).objective.repa.block == 6


# -- the cache pass -------------------------------------------------------------------------------
ENCODER_SIDE, ENCODER_PATCH = 48, 8  # a 6 x 6 encoder grid for the 64 px images (a 4 x 4 DiT grid)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """36 raw stage-1 images, a tiny VAE and a tiny DINOv2 (saved with its processor config), and the
    config of a stage-1 cache with REPA features (float32, to compare them exactly)."""
    root = tmp_path_factory.mktemp("repa")
    raw = synthetic.write_stage1(root / "raw", n=36, per_shard=18)
    encoder = save_vision_encoder(
        build_vision_encoder(hidden=16, layers=2, patch=ENCODER_PATCH, image_size=ENCODER_SIDE), root / "dino"
    )
    overrides = [
        f"run.dir={root / 'run'}",
        f"data.cache_dir={root / 'cache'}",
        f"data.source.paths=[{raw}/imagenet-*.tar]",
        f"data.source.synsets={raw / 'synsets.txt'}",
        f"encoders.vae={tiny_vae(root / 'vae')}",
        "model.size=tiny",
        "model.sample_size=8",
        f"objective.repa.encoder={encoder}",
        f"objective.repa.encoder_resolution={ENCODER_SIDE}",
        "objective.repa.feature_dtype=float32",
        "data.batch_size=4",
    ]
    cfg = load_config(ROOT / "demo/configs/stage1.yaml", overrides)
    manifest = cache_stage(cfg, Accelerator(cpu=True))
    return {"cfg": cfg, "raw": raw, "encoder": encoder, "manifest": manifest, "overrides": overrides}


def cached_samples(cache_dir: Path) -> dict[str, torch.Tensor]:
    from tristage.data.cache_format import sample_tensors, shard_samples, spend_readonly_buffer_warning

    spend_readonly_buffer_warning()
    return {
        s["__key__"]: {k: v.clone() for k, v in sample_tensors(s).items()}
        for shard in sorted(cache_dir.glob("features-*.tar"))
        for s in shard_samples(str(shard))
    }


def raw_images(raw: Path) -> dict[str, Image.Image]:
    import io
    import tarfile

    images = {}
    for shard in sorted(raw.glob("imagenet-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith((".png", ".jpg", ".jpeg")):
                    data = tar.extractfile(member).read()
                    images[member.name.split(".")[0]] = Image.open(io.BytesIO(data)).convert("RGB")
    return images


def direct_forward(encoder: Path, image: Image.Image) -> torch.Tensor:
    """DINOv2 as its users call it: [0, 1] pixels resized to the encoder side, ImageNet-normalised,
    ``last_hidden_state`` without the CLS token, on the 6 x 6 patch grid."""
    import numpy as np
    from transformers import AutoModel

    model = AutoModel.from_pretrained(encoder).eval()
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255.0
    x = F.interpolate(
        x, size=(ENCODER_SIDE, ENCODER_SIDE), mode="bicubic", align_corners=False, antialias=True
    )
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    with torch.no_grad():
        hidden = model(pixel_values=x).last_hidden_state[0, 1:]  # (36, D)
    side = ENCODER_SIDE // ENCODER_PATCH
    return hidden.reshape(side, side, -1)


def test_cached_features_equal_a_direct_encoder_forward(world):
    cfg = world["cfg"]
    assert world["manifest"]["repa_width"] == 16
    assert world["manifest"]["fingerprint"]["repa_resolution"] == str(ENCODER_SIDE)
    samples, images = cached_samples(Path(cfg.data.cache_dir)), raw_images(world["raw"])
    assert len(samples) == 36 and set(samples) <= set(images)
    assert {image.size for image in images.values()} == {(64, 64)}  # the bucket is the raw image
    for key in sorted(samples)[:4]:
        stored = samples[key]["repa"]
        assert stored.dtype == torch.float32 and stored.shape == (6, 6, 16)
        torch.testing.assert_close(
            stored, direct_forward(world["encoder"], images[key]), rtol=1e-4, atol=1e-5
        )


def test_the_loader_hands_the_features_to_the_trainer(world):
    cfg = world["cfg"]
    expected = fingerprint(cfg.data, feature_encoders(cfg), repa_features(cfg))
    loader = FeatureLoader(cfg.data.cache_dir, LoaderSpec(4, 1, 0, 1, 0, 8, 0.0, 1000), expected=expected)
    batch = next(iter(loader))
    samples = cached_samples(Path(cfg.data.cache_dir))
    assert batch["repa"].shape == (4, 6, 6, 16)
    for row, key in enumerate(batch["keys"]):
        assert torch.equal(batch["repa"][row], samples[key]["repa"])


def test_the_features_are_fingerprinted(world, tmp_path):
    cfg = world["cfg"]
    enc = feature_encoders(cfg)
    with_repa = fingerprint(cfg.data, enc, repa_features(cfg))
    assert (
        with_repa["repa_encoder"].startswith(f"{world['encoder']}@")
        and "unresolved" not in with_repa["repa_encoder"]
    )
    assert "repa_encoder" not in fingerprint(cfg.data, enc)  # a cache without them is another cache
    for change in (
        RepaFeatures(str(world["encoder"]), ENCODER_SIDE, "bfloat16"),
        RepaFeatures(str(world["encoder"]), 56, "float32"),
    ):
        assert fingerprint(cfg.data, enc, change) != with_repa
    plain = load_config(
        ROOT / "demo/configs/stage1.yaml",
        [o for o in world["overrides"] if not o.startswith("objective.repa")],
    )
    with pytest.raises(CacheError, match=r"cache fingerprint disagrees with the config on 'repa_encoder'"):
        FeatureLoader(
            cfg.data.cache_dir, LoaderSpec(4, 1, 0, 1, 0, 8, 0.0, 1000), expected=fingerprint(plain.data, enc)
        )


def test_a_run_with_repa_refuses_a_cache_without_features(world, tmp_path):
    """The run's REPA features must be in its cache: one line naming the field, before any step."""
    from tristage.train.training.trainer import Trainer

    plain = load_config(
        ROOT / "demo/configs/stage1.yaml",
        [o for o in world["overrides"] if not o.startswith("objective.repa")],
    )
    plain.data.cache_dir = str(tmp_path / "plain")
    cache_stage(plain, Accelerator(cpu=True))
    mixed = copy.deepcopy(world["cfg"])
    mixed.data.cache_dir, mixed.run.dir = plain.data.cache_dir, str(tmp_path / "run")
    with pytest.raises(CacheError, match=r"disagrees with the config on 'repa_encoder' \(cache: None"):
        Trainer(mixed)
    assert not (tmp_path / "run" / "checkpoints").exists()


def shape_kind_recall(encoder_dir: Path) -> float:
    """Leave-one-out 1-NN over 54 centred renders (every colour x kind x background) by the cosine of
    the features of the 2 x 2 centre patches, which every kind covers in its own colour: the share whose
    nearest neighbour is of the same kind.  Only features that carry the shape's kind get it right."""
    import random

    from tristage.data.cache import to_pixels
    from tristage.data.repa_features import RepaEncoder

    rng, scenes = (
        random.Random(5),
        [(c, s, b) for c in synthetic.COLOURS for s in synthetic.SHAPES for b in synthetic.BACKGROUNDS],
    )
    renders = [synthetic.render(synthetic.centred_scene(rng, *scene, 64, 64)) for scene in scenes]
    encoder = RepaEncoder(RepaFeatures(str(encoder_dir), 64, "float32"), 64, torch.device("cpu"))
    centre = F.normalize(
        encoder.encode(torch.stack([to_pixels(r) for r in renders]))[:, 3:5, 3:5].mean((1, 2)), dim=-1
    )
    similar = centre @ centre.T
    similar.fill_diagonal_(-2.0)
    nearest = similar.argmax(dim=1).tolist()
    return sum(scenes[i][1] == scenes[j][1] for i, j in enumerate(nearest)) / len(scenes)


def test_the_committed_demo_encoder_knows_the_kinds(tmp_path):
    """demo/assets/demo_encoder (train_demo_encoder.py): loaded as a hub id would be, an 8 x 8 grid at
    64 px (the demo DiT's), and patch features that tell the kinds apart where a random one cannot."""
    from tristage.demo.encoders import demo_vision_encoder_path

    committed = demo_vision_encoder_path()
    assert sum(f.stat().st_size for f in committed.iterdir()) < 1_000_000
    assert shape_kind_recall(committed) >= 0.9
    random_one = save_vision_encoder(build_vision_encoder(), tmp_path / "random")  # same class and shape
    assert shape_kind_recall(random_one) < 0.6
