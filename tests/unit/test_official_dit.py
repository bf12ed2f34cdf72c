"""The official DiT in, exactly: the release ``.pt``, DiT ``train.py`` checkpoints, diffusers folders.

The reference is the official DiT forward written out below from the paper's and the official code's
maths (DiT §3.2; facebookresearch/DiT ``models.py``): GLIDE's sinusoid without a frequency shift, fused
qkv, adaLN-Zero, the MAE position table. It runs in float64 on the state dict itself, sharing no code
with ``ClassConditionalDiT``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import PixArtTransformer2DModel

from tristage.cli import main
from tristage.train.config import ConfigError, load_config
from tristage.train.conversion.dit_layouts import dit_to_diffusers
from tristage.train.conversion.init_from import load_initial_weights
from tristage.train.families import family_of
from tristage.train.models.dit import ClassConditionalDiT

from .test_handoff import official_pos_embed, random_dit

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
DEPTH, DIM, HEADS, PATCH, GRID, CLASSES = 2, 32, 2, 2, 4, 10  # "tiny": 2 blocks, 2 heads x 16
SAMPLE = GRID * PATCH


def official_state(seed: int) -> dict[str, torch.Tensor]:
    """Random tensors (none zero) under the official names and shapes; ``pos_embed`` from the MAE formula."""
    g = torch.Generator().manual_seed(seed)

    def linear(name: str, n_out: int, n_in: int) -> dict[str, torch.Tensor]:
        return {
            f"{name}.weight": torch.randn(n_out, n_in, generator=g) / n_in**0.5,
            f"{name}.bias": torch.randn(n_out, generator=g) * 0.1,
        }

    state = {
        "x_embedder.proj.weight": torch.randn(DIM, 4, PATCH, PATCH, generator=g) / (4 * PATCH**2) ** 0.5,
        "x_embedder.proj.bias": torch.randn(DIM, generator=g) * 0.1,
        "pos_embed": official_pos_embed(DIM, GRID),
        "y_embedder.embedding_table.weight": torch.randn(CLASSES + 1, DIM, generator=g),
        **linear("t_embedder.mlp.0", DIM, 256),
        **linear("t_embedder.mlp.2", DIM, DIM),
        **linear("final_layer.adaLN_modulation.1", 2 * DIM, DIM),
        **linear("final_layer.linear", PATCH**2 * 8, DIM),
    }
    for i in range(DEPTH):
        state |= linear(f"blocks.{i}.attn.qkv", 3 * DIM, DIM) | linear(f"blocks.{i}.attn.proj", DIM, DIM)
        state |= linear(f"blocks.{i}.mlp.fc1", 4 * DIM, DIM) | linear(f"blocks.{i}.mlp.fc2", DIM, 4 * DIM)
        state |= linear(f"blocks.{i}.adaLN_modulation.1", 6 * DIM, DIM)
    return state


def _linear(x: torch.Tensor, s: dict, name: str) -> torch.Tensor:
    return x @ s[f"{name}.weight"].T + s[f"{name}.bias"]


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


def _self_attention(x: torch.Tensor, s: dict, name: str) -> torch.Tensor:
    b, n, d = x.shape
    q, k, v = _linear(x, s, f"{name}.qkv").reshape(b, n, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-1, -2) / math.sqrt(d // HEADS)).softmax(-1)  # (B, H, N, N)
    return _linear((weights @ v).transpose(1, 2).reshape(b, n, d), s, f"{name}.proj")


def official_forward(state: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DiT(x, t, y) in float64: c = e_t + e_y, adaLN-Zero blocks, final adaLN layer, unpatchify."""
    s = {k: v.double() for k, v in state.items()}
    tokens = F.conv2d(x.double(), s["x_embedder.proj.weight"], s["x_embedder.proj.bias"], stride=PATCH)
    tokens = tokens.flatten(2).transpose(1, 2) + s["pos_embed"]  # (B, N, D)
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)  # no shift
    angles = t.double()[:, None] * freqs[None]
    t_freq = torch.cat([angles.cos(), angles.sin()], dim=-1)  # (B, 256)
    t_emb = _linear(F.silu(_linear(t_freq, s, "t_embedder.mlp.0")), s, "t_embedder.mlp.2")
    c = F.silu(t_emb + s["y_embedder.embedding_table.weight"][y])  # (B, D)
    for i in range(DEPTH):
        shift1, scale1, gate1, shift2, scale2, gate2 = _linear(c, s, f"blocks.{i}.adaLN_modulation.1").chunk(
            6, 1
        )
        tokens = tokens + gate1[:, None] * _self_attention(
            _modulate(tokens, shift1, scale1), s, f"blocks.{i}.attn"
        )
        hidden = F.gelu(
            _linear(_modulate(tokens, shift2, scale2), s, f"blocks.{i}.mlp.fc1"), approximate="tanh"
        )
        tokens = tokens + gate2[:, None] * _linear(hidden, s, f"blocks.{i}.mlp.fc2")
    shift, scale = _linear(c, s, "final_layer.adaLN_modulation.1").chunk(2, 1)
    out = _linear(_modulate(tokens, shift, scale), s, "final_layer.linear")  # (B, N, p*p*C)
    b, channels = out.shape[0], out.shape[-1] // PATCH**2
    out = out.reshape(b, GRID, GRID, PATCH, PATCH, channels).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
    return out.reshape(b, channels, SAMPLE, SAMPLE)


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 4, SAMPLE, SAMPLE, generator=g)
    return x, torch.tensor([0, 17, 500, 999]), torch.tensor([0, 3, CLASSES, 9])


def stage1_config(tmp_path: Path, init_from: Path, *overrides: str):
    """configs/stage1_imagenet.yaml at the tiny size, starting from ``init_from``."""
    return load_config(
        ROOT / "configs/stage1_imagenet.yaml",
        [
            "model.size=tiny",
            f"model.sample_size={SAMPLE}",
            f"model.num_classes={CLASSES}",
            f"init_from={init_from}",
            f"run.dir={tmp_path / 'run'}",
            *overrides,
        ],
    )


def loaded_dit(cfg) -> ClassConditionalDiT:
    model = family_of(cfg.model.family).build(cfg.model, 8)
    load_initial_weights(model, cfg)
    return model.eval()


def max_gap(model: torch.nn.Module, state: dict) -> float:
    x, t, y = inputs()
    with torch.no_grad():
        got = model(x, t, y).sample.double()
    want = official_forward(state, x, t, y)
    assert want.abs().max() > 0.5  # not a comparison of near-zero outputs
    return (got - want).abs().max().item()


def test_official_release_pt_gives_the_official_output(tmp_path):
    state = official_state(seed=0)
    torch.save(state, tmp_path / "DiT-XL-2-256x256.pt")  # the release is a bare state dict
    model = loaded_dit(stage1_config(tmp_path, tmp_path / "DiT-XL-2-256x256.pt", "model.freq_shift=0"))
    gap = max_gap(model, state)
    print(f"official DiT .pt -> init_from: max |delta| vs the official forward {gap:.3g}")
    assert model.config.freq_shift == 0 and gap < 1e-4
    model.time_proj.downscale_freq_shift = 1  # diffusers' sinusoid: the check can fail
    assert max_gap(model, state) > 1e-2


def test_official_release_needs_freq_shift_0(tmp_path):
    torch.save(official_state(seed=0), tmp_path / "DiT.pt")
    with pytest.raises(ConfigError, match=r"freq_shift 0 .*set model\.freq_shift: 0") as err:
        loaded_dit(stage1_config(tmp_path, tmp_path / "DiT.pt"))  # the shipped file's freq_shift: 1
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("weights", ["ema", "model"])
def test_train_py_checkpoint_takes_ema_by_default_or_model(tmp_path, weights):
    raw, ema = official_state(seed=1), official_state(seed=2)
    checkpoint = {"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []}}
    checkpoint["args"] = argparse.Namespace(model="DiT-XL/2", global_batch_size=256)  # as train.py saves
    torch.save(checkpoint, tmp_path / "0400000.pt")
    chosen = [] if weights == "ema" else ["init_from_weights=model"]
    model = loaded_dit(stage1_config(tmp_path, tmp_path / "0400000.pt", "model.freq_shift=0", *chosen))
    assert max_gap(model, ema if weights == "ema" else raw) < 1e-4
    assert max_gap(model, raw if weights == "ema" else ema) > 1e-2


@pytest.mark.parametrize("class_name", ["DiTTransformer2DModel", "Transformer2DModel"])
def test_diffusers_dit_folder_into_init_from(tmp_path, class_name):
    """diffusers' own folders, and the hub's older ones that name their class ``Transformer2DModel``."""
    import json

    dit = random_dit(freq_shift=1)
    folder = tmp_path / "pipe" / "transformer"
    dit_to_diffusers(dit).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"_class_name": class_name}))
    cfg = stage1_config(tmp_path, tmp_path / "pipe")
    model = loaded_dit(cfg)
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y).sample, dit(x, t, y).sample, atol=1e-5, rtol=0)


def test_freq_shift_is_recorded_in_the_saved_model(tmp_path):
    cfg = stage1_config(tmp_path, tmp_path, "model.freq_shift=0")
    family_of("dit").build(cfg.model, 8).save_pretrained(tmp_path / "final" / "transformer")
    again = ClassConditionalDiT.from_pretrained(tmp_path / "final" / "transformer")
    assert again.config.freq_shift == 0 and again.time_proj.downscale_freq_shift == 0


def test_convert_cli_takes_a_train_py_checkpoint(tmp_path):
    ema = official_state(seed=3)
    checkpoint = {"model": official_state(seed=4), "ema": ema, "args": argparse.Namespace(epochs=1)}
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    out = tmp_path / "pixart"
    argv = ["convert", "dit-to-pixart", str(tmp_path / "ckpt.pt"), str(out), "--caption-channels", "12"]
    assert main([*argv, "--num-attention-heads", str(HEADS)]) == 0
    pixart = PixArtTransformer2DModel.from_pretrained(out).eval()
    x, _, _ = inputs()
    caption = torch.randn(4, 5, 12)
    with torch.no_grad():
        got = pixart(x, encoder_hidden_states=caption, timestep=torch.full((4,), 500)).sample
    want = official_forward(ema, x, torch.full((4,), 500), torch.full((4,), CLASSES))
    assert (got.double() - want).abs().max() < 1e-4


def test_convert_cli_bad_source_is_one_line(tmp_path, capsys):
    torch.save({"net.weight": torch.zeros(1)}, tmp_path / "other.pt")
    assert main(["convert", "dit-to-pixart", str(tmp_path / "other.pt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other.pt" in err and "layout" in err
