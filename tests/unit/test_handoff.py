"""Stage hand-offs: DiT -> PixArt re-parameterisation, official / diffusers DiT checkpoints, export."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from tristage.train.config import load_config
from tristage.train.conversion.dit_layouts import (
    dit_to_diffusers,
    dit_to_official_state_dict,
    load_dit_checkpoint,
)
from tristage.train.conversion.init_from import convert_dit_to_pixart, load_initial_weights
from tristage.train.conversion.reparam import dit_to_pixart
from tristage.train.families import family_of
from tristage.train.models.dit import ClassConditionalDiT

from ..conftest import ROOT

TINY = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=16,
    num_classes=10,
)
NULL = TINY["num_classes"]
CAPTION_CHANNELS = 12


def random_dit(freq_shift: int = 1, seed: int = 0) -> ClassConditionalDiT:
    """A tiny DiT with EVERY weight random: the zero-initialised adaLN and final layers would hide bugs."""
    torch.manual_seed(seed)
    return randomised(ClassConditionalDiT(**TINY, freq_shift=freq_shift))


def randomised(dit: ClassConditionalDiT) -> ClassConditionalDiT:
    dit.eval()
    with torch.no_grad():
        for p in dit.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.normal_(std=fan_in**-0.5 if p.ndim > 1 else 0.1)
        dit.class_embedder.weight.normal_(std=1.0)
    return dit


def latents(batch: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, TINY["in_channels"], TINY["sample_size"], TINY["sample_size"], dtype=dtype)


def captions(batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    mask = (torch.rand(batch, 5) > 0.4).long()
    mask[:, 0] = 1  # at least one real token per caption
    return torch.randn(batch, 5, CAPTION_CHANNELS, dtype=dtype), mask


@torch.no_grad()
def dit_out(dit, x: torch.Tensor, t: int | torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    t = torch.full((x.shape[0],), t) if isinstance(t, int) else t
    return dit(x, t, labels).sample


@torch.no_grad()
def pixart_out(pixart, x: torch.Tensor, t: int, caption: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    t = torch.full((x.shape[0],), t)
    return pixart(x, encoder_hidden_states=caption, timestep=t, encoder_attention_mask=mask).sample


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_pixart_equals_dit_at_t_ref_and_diverges_elsewhere(dtype, tol):
    dit = random_dit() if dtype == torch.float32 else random_dit().to(dtype)
    pixart = dit_to_pixart(dit, caption_channels=CAPTION_CHANNELS).eval()
    assert pixart.dtype == dtype
    x = latents(3, dtype)
    null = torch.full((3,), NULL)

    def gap(t: int) -> float:
        return max(
            (pixart_out(pixart, x, t, *captions(3, dtype)) - dit_out(dit, x, t, null)).abs().max().item()
            for _ in range(3)  # several random captions and masks
        )

    scale = dit_out(dit, x, 500, null).abs().max().item()
    err = gap(500)
    print(f"[{dtype}] |DiT| max {scale:.3g}; max abs error at t=500: {err:.3g}")
    assert scale > 0.1  # the comparison is not between two near-zero outputs
    assert err < tol
    for t in (0, 250, 750, 999):
        divergence = gap(t)
        print(f"[{dtype}] divergence at t={t}: {divergence:.3g}")
        assert math.isfinite(divergence)
        assert divergence > max(1e-3, 100 * err)


def test_global_adaln_is_block_mean_and_tables_absorb_the_rest():
    dit = random_dit().double()
    pixart = dit_to_pixart(dit, caption_channels=CAPTION_CHANNELS)
    w = torch.stack([block.adaln.weight for block in dit.transformer_blocks])
    torch.testing.assert_close(pixart.adaln_single.linear.weight, w.mean(0))
    tables = [block.scale_shift_table for block in pixart.transformer_blocks]
    assert tables[0].shape == (6, 32) and not torch.allclose(tables[0], tables[1])
    assert pixart.scale_shift_table.shape == (2, 32)


def test_cross_attention_is_zero_and_output_ignores_the_caption():
    dit = random_dit()
    pixart = dit_to_pixart(dit, caption_channels=CAPTION_CHANNELS).eval()
    for block in pixart.transformer_blocks:
        assert not block.attn2.to_out[0].weight.any() and not block.attn2.to_out[0].bias.any()
        assert block.attn2.to_q.weight.abs().sum() > 0  # the rest of attn2 is freshly initialised
    x = latents(2)
    for t in (0, 250, 500, 750, 999):
        a = pixart_out(pixart, x, t, *captions(2, torch.float32))
        b = pixart_out(pixart, x, t, *captions(2, torch.float32))
        assert torch.equal(a, b), t


def test_other_position_table_warns(caplog):
    dit_to_pixart(random_dit(), caption_channels=CAPTION_CHANNELS)
    assert "position table" not in caplog.text
    dit_to_pixart(random_dit(), caption_channels=CAPTION_CHANNELS, interpolation_scale=0.5)
    assert "position table" in caplog.text


def official_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """The official DiT/MAE 2-D sin-cos table, derived independently: [sincos(column), sincos(row)]."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.arange(grid * grid) // grid, torch.arange(grid * grid) % grid

    def sincos(pos: torch.Tensor) -> torch.Tensor:
        angle = pos[:, None].double() * omega[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([sincos(cols), sincos(rows)], dim=1)[None].float()


def check_same_outputs(a, b, atol: float = 1e-6) -> None:
    torch.manual_seed(1)
    x = latents(4)
    t = torch.tensor([0, 17, 500, 999])
    labels = torch.tensor([0, 3, NULL, 9])
    torch.testing.assert_close(dit_out(a, x, t, labels), dit_out(b, x, t, labels), atol=atol, rtol=0)


def test_official_layout_round_trip(tmp_path):
    dit = random_dit(freq_shift=0)
    state = dit_to_official_state_dict(dit)
    assert state["blocks.1.attn.qkv.weight"].shape == (96, 32)
    assert state["y_embedder.embedding_table.weight"].shape == (NULL + 1, 32)
    torch.testing.assert_close(state["pos_embed"], official_pos_embed(32, 4), atol=1e-6, rtol=0)
    torch.save(state, tmp_path / "DiT-tiny.pt")
    loaded = load_dit_checkpoint(str(tmp_path / "DiT-tiny.pt"), num_attention_heads=2)
    assert loaded.config.freq_shift == 0 and loaded.config.num_classes == NULL
    assert loaded.config.sample_size == TINY["sample_size"]
    check_same_outputs(dit, loaded)


def test_official_layout_with_a_wrong_pos_embed_is_refused():
    state = dit_to_official_state_dict(random_dit(freq_shift=0))
    state["pos_embed"] = state["pos_embed"] + 0.1
    with pytest.raises(ValueError, match="pos_embed"):
        load_dit_checkpoint(state, num_attention_heads=2)


def test_diffusers_layout_round_trip(tmp_path):
    dit = random_dit()
    dit_to_diffusers(dit).save_pretrained(tmp_path / "pipe" / "transformer")
    for folder in (tmp_path / "pipe", tmp_path / "pipe" / "transformer"):
        loaded = load_dit_checkpoint(folder)
        assert loaded.config.freq_shift == 1 and loaded.config.num_attention_heads == 2
        check_same_outputs(dit, loaded)


def test_hub_style_diffusers_folder_loads_by_keys(tmp_path):
    """The hub's DiT folders say ``Transformer2DModel`` and use diffusers' default norm_eps 1e-5."""
    dit = random_dit()
    dit_to_diffusers(dit).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["_class_name"] = "Transformer2DModel"
    del config["norm_eps"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="norm_eps"):
        loaded = load_dit_checkpoint(tmp_path)
    check_same_outputs(dit, loaded)


def test_dit_to_diffusers_matches_ours():
    dit = random_dit()
    check_same_outputs(dit, dit_to_diffusers(dit).eval(), atol=1e-5)


def test_dit_to_diffusers_warns_about_freq_shift_in_one_line(caplog):
    dit_to_diffusers(random_dit(freq_shift=1))
    assert not caplog.records
    dit_to_diffusers(random_dit(freq_shift=0))
    (record,) = caplog.records
    assert "freq_shift" in record.getMessage() and "\n" not in record.getMessage()


def test_differing_embedder_copies_are_refused():
    state = dit_to_diffusers(random_dit()).state_dict()
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight"
    state[key] = state[key] + 1e-3
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_dit_checkpoint(state, num_attention_heads=2, sample_size=8)


@pytest.mark.parametrize(
    ("layout", "drop"),
    [
        ("official", "blocks.1.mlp.fc2.bias"),
        ("diffusers", "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"),
    ],
)
def test_missing_and_unexpected_keys_are_listed(layout, drop):
    if layout == "official":
        state = dit_to_official_state_dict(random_dit(freq_shift=0))
    else:
        state = dit_to_diffusers(random_dit()).state_dict()
    del state[drop]
    state["blocks.0.bogus.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="missing keys") as err:
        load_dit_checkpoint(state, num_attention_heads=2, sample_size=8)
    assert drop in str(err.value) and "blocks.0.bogus.weight" in str(err.value)


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="layout"):
        load_dit_checkpoint({"model.weight": torch.zeros(1)})


@pytest.mark.parametrize("source", ["final", "final/transformer", "official.pt"])
def test_convert_cli_writes_a_pixart_folder(tmp_path, source):
    dit = random_dit(freq_shift=0 if source.endswith(".pt") else 1)
    if source.endswith(".pt"):
        torch.save(dit_to_official_state_dict(dit), tmp_path / source)
    else:
        dit.save_pretrained(tmp_path / "final" / "transformer")
    convert_dit_to_pixart(
        str(tmp_path / source), str(tmp_path / "out"), CAPTION_CHANNELS, None, num_attention_heads=2
    )
    pixart = PixArtTransformer2DModel.from_pretrained(tmp_path / "out")
    x = latents(2)
    got = pixart_out(pixart, x, 500, *captions(2, torch.float32))
    torch.testing.assert_close(got, dit_out(dit, x, 500, torch.full((2,), NULL)), atol=1e-4, rtol=0)


def shipped_handoff_gap(tmp_path, *stage2_overrides: str) -> float:
    """A tiny stage-1 DiT built from configs/stage1_imagenet.yaml, handed to configs/stage2_sam_llava.yaml
    through ``init_from``: max |PixArt - DiT| at t=500, null class, random captions. Only the size
    (and the caption width) are overridden: the position settings are the shipped files'."""
    tiny = ["model.size=tiny", "model.num_classes=10", "validation.class_labels=[1]"]  # labels < classes
    stage1 = load_config(ROOT / "configs/stage1_imagenet.yaml", tiny)
    torch.manual_seed(0)
    dit = randomised(family_of("dit").build(stage1.model, 8))
    dit.save_pretrained(tmp_path / "stage1" / "final" / "transformer")
    stage2 = load_config(
        ROOT / "configs/stage2_sam_llava.yaml",
        [
            "model.size=tiny",
            f"model.caption_channels={CAPTION_CHANNELS}",
            f"init_from={tmp_path / 'stage1' / 'final'}",
            *stage2_overrides,
        ],
    )
    pixart = family_of("pixart").build(stage2.model, 8).eval()
    load_initial_weights(pixart, stage2)
    side = stage1.model.sample_size
    x = torch.randn(2, 4, side, side)
    want = dit_out(dit, x, 500, torch.full((2,), 10))
    assert want.abs().max() > 0.1
    return max(
        (pixart_out(pixart, x, 500, *captions(2, torch.float32)) - want).abs().max().item() for _ in range(3)
    )


def test_handoff_is_exact_under_the_shipped_configs(tmp_path):
    gap = shipped_handoff_gap(tmp_path)
    print(f"shipped stage1 -> stage2 configs: max |delta| at t=500 {gap:.3g}")
    assert gap < 1e-4
    old = shipped_handoff_gap(tmp_path, "model.interpolation_scale=0.5")  # the old table: the check can fail
    print(f"with the old interpolation_scale 0.5: max |delta| at t=500 {old:.3g}")
    assert old > 1e-2
