"""Model registry and the stage-1 DiT: shapes, init, conditioning, save/load through from_pretrained."""

from __future__ import annotations

import pytest
import torch

from tristage.train.config import load_config
from tristage.train.families import family_of
from tristage.train.models.dit import ClassConditionalDiT, build_dit
from tristage.train.models.sizes import SIZES, size_of

from ..conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


def test_xl2_matches_the_paper():
    xl = size_of("XL/2")
    assert (xl.num_layers, xl.num_attention_heads * xl.attention_head_dim, xl.num_attention_heads) == (
        28,
        1152,
        16,
    )
    assert xl.patch_size == 2 and xl.attention_head_dim == 72


def test_unknown_size_and_family_are_named():
    with pytest.raises(ValueError, match="XL/3"):
        size_of("XL/3")
    with pytest.raises(ValueError, match="unet"):
        family_of("unet")


def test_dit_shapes_and_adaln_zero_init():
    model = build_dit(SIZES["tiny"], sample_size=8, in_channels=4, out_channels=8, num_classes=1000)
    x = torch.randn(3, 4, 8, 8)
    out = model(x, timestep=torch.tensor([0, 500, 999]), class_labels=torch.tensor([1, 2, 1000])).sample
    assert out.shape == (3, 8, 8, 8)
    assert torch.count_nonzero(out) == 0  # zeroed final layer: DiT's adaLN-Zero start
    assert model.class_embedder.weight.shape == (1001, 32)  # 1000 classes + null


def test_dit_conditioning_and_checkpointing_agree():
    torch.manual_seed(0)
    model = build_dit(SIZES["tiny"], 8, 4, 8, 1000, class_embed_std=1.0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    t, y = torch.tensor([10, 700]), torch.tensor([3, 1000])
    plain = model(x, timestep=t, class_labels=y).sample
    other = model(x, timestep=t, class_labels=torch.tensor([4, 1000])).sample
    assert not torch.allclose(plain[0], other[0]) and torch.allclose(plain[1], other[1])
    (g_plain,) = torch.autograd.grad(plain.square().sum(), x)
    model.enable_gradient_checkpointing()
    ckpt = model(x, timestep=t, class_labels=y).sample
    (g_ckpt,) = torch.autograd.grad(ckpt.square().sum(), x)
    torch.testing.assert_close(plain, ckpt)
    torch.testing.assert_close(g_plain, g_ckpt)


def test_save_and_from_pretrained_roundtrip(tmp_path):
    model = build_dit(SIZES["tiny"], 8, 4, 8, 1000)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model.save_pretrained(tmp_path)
    again = ClassConditionalDiT.from_pretrained(tmp_path)
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.tensor([7])
    torch.testing.assert_close(
        model(x, timestep=t, class_labels=y).sample, again(x, timestep=t, class_labels=y).sample
    )


@pytest.mark.parametrize("stage, family", [(1, "dit"), (2, "pixart"), (3, "pixart")])
def test_demo_configs_build_their_family(stage, family):
    cfg = load_config(ROOT / f"demo/configs/stage{stage}.yaml")
    assert cfg.model.family == family
    model = family_of(family).build(cfg.model, cfg.model.in_channels * 2)
    assert type(model) is family_of(family).model_class
