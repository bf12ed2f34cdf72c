"""Token masking (train.mask): kept tokens only through the model, exact gradients on them and none on the
dropped ones, ratio 0 bit for bit the unmasked path, one draw on any number of processes, checked keys."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tristage.data.features import NoiseDraw
from tristage.train.config import ConfigError, MaskConfig, ModelConfig, load_config
from tristage.train.diffusion.objective import Objective, ObjectiveConfig
from tristage.train.families import family_of
from tristage.train.models import masking
from tristage.train.models.masking import KeptTokens, draw_kept

from ..conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE, PATCH, TEXT = 8, 2, 16  # latent side, patch, caption width: a 4 x 4 token grid


def build(family: str, mask: MaskConfig | None) -> torch.nn.Module:
    """A tiny model of ``family`` in float64 with every weight random (nothing zero-initialised), hooked."""
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, size="tiny", sample_size=SIDE, num_classes=10, caption_channels=TEXT)
    model = family_of(family).build(cfg, 8).double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    masking.install(model, mask, family_of(family).token_head)
    return model


def conditions(family: str, batch: int) -> dict:
    g = torch.Generator().manual_seed(1)
    if family == "dit":
        return {"class_labels": torch.arange(batch) % 10}
    return {"encoder_hidden_states": torch.randn(batch, 5, TEXT, generator=g, dtype=torch.float64)}


def inputs(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(batch, 4, SIDE, SIDE, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return x0, noise, torch.tensor([3, 400, 999])[:batch]


def kept(ratio: float, batch: int = 3, seed: int = 5) -> KeptTokens:
    draw = NoiseDraw(seed=seed, lo=0, hi=batch, global_batch=batch, scaling_factor=1.0)
    return draw_kept(draw, (SIDE // PATCH, SIDE // PATCH), PATCH, ratio, torch.device("cpu"))


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["random", "deferred"])
@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_ratio_zero_is_the_unmasked_path_bit_for_bit(family, mode):
    """Every hook and the masked loss run (keep_tokens = all tokens) and change no bit of loss or grads."""
    model = build(family, MaskConfig(ratio=0.0, mode=mode))
    plain = copy.deepcopy(model)
    objective = Objective(ObjectiveConfig(detail_weight=1.0))  # the detail term also sees the mask
    x0, noise, t = inputs()
    batch = {"latents": x0, "cond": conditions(family, 3)}
    everything = kept(0.0)
    assert everything.index.shape == (3, 16) and bool(everything.pixels().all())
    loss, metrics = objective.loss(model, batch, noise=noise, timesteps=t, kept=everything)
    loss.backward()
    want, want_metrics = objective.loss(plain, batch, noise=noise, timesteps=t)
    want.backward()
    assert torch.equal(loss, want)
    assert all(torch.equal(metrics[k], want_metrics[k]) for k in want_metrics)
    got, expected = grads(model), grads(plain)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def patchify(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C) tokens in diffusers' (h, w, p, q, c) order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // PATCH, PATCH, w // PATCH, PATCH)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // PATCH) * (w // PATCH), PATCH * PATCH * c)


def as_image(tokens: torch.Tensor, channels: int) -> torch.Tensor:
    """(B, K, p*p*C) kept tokens -> (B, C, K, p*p): an 'image' made of exactly the kept elements."""
    b, k, _ = tokens.shape
    return tokens.reshape(b, k, PATCH * PATCH, channels).permute(0, 3, 1, 2)


def reference_dit(model, x_t, t, cond, index) -> torch.Tensor:
    """Our DiT's forward written out on the kept tokens only: (B, K, p*p*C_out)."""
    x = model.pos_embed(x_t)  # (B, N, D), positions added
    x = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))  # (B, K, D)
    c = F.silu(model.condition(t, cond["class_labels"], x.dtype))
    for block in model.transformer_blocks:
        x = block(x, c)
    shift, scale = model.proj_out_1(c).chunk(2, dim=1)
    return model.proj_out_2(model.norm_out(x) * (1 + scale[:, None]) + shift[:, None])


def reference_pixart(model, x_t, t, cond, index) -> torch.Tensor:
    """diffusers' PixArt forward written out on the kept tokens only: (B, K, p*p*C_out)."""
    b = x_t.shape[0]
    x = model.pos_embed(x_t)
    x = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
    extra = {"resolution": None, "aspect_ratio": None}
    timestep, embedded = model.adaln_single(t, extra, batch_size=b, hidden_dtype=x.dtype)
    text = model.caption_projection(cond["encoder_hidden_states"]).view(b, -1, x.shape[-1])
    for block in model.transformer_blocks:
        x = block(x, encoder_hidden_states=text, timestep=timestep)
    shift, scale = (model.scale_shift_table[None] + embedded[:, None]).chunk(2, dim=1)
    return model.proj_out(model.norm_out(x) * (1 + scale) + shift)


REFERENCES = {"dit": reference_dit, "pixart": reference_pixart}


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_masked_step_has_exact_gradients_on_kept_tokens_and_none_on_dropped(family):
    """The masked loss and its gradients equal a written-out forward on the kept tokens with the plain
    hybrid loss over exactly their elements; the dropped tokens' pixels get no gradient at all."""
    model, objective = build(family, MaskConfig(ratio=0.5)), Objective(ObjectiveConfig())
    reference = copy.deepcopy(model)
    x0, noise, t = inputs()
    cond, half = conditions(family, 3), kept(0.5)
    assert half.index.shape == (3, 8)
    loss, _ = objective.loss(model, {"latents": x0, "cond": cond}, noise=noise, timesteps=t, kept=half)
    loss.backward()
    x_t = objective.add_noise(x0, noise, t)
    out = REFERENCES[family](reference, x_t, t, cond, half.index)  # (B, K, p*p*8)
    parts = [as_image(half.gather(patchify(v)), 4) for v in (x0, noise, x_t)]
    mse, vlb = objective.loss_terms(as_image(out, 8), *parts, t)
    want = (mse + vlb).mean()
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
    got, expected = grads(model), grads(reference)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-10, atol=1e-14, msg=name)
    # The input: every dropped token's pixels have an exactly zero gradient, every kept one's not.
    x_in = x_t.clone().requires_grad_()
    output = model(x_in, timestep=t, keep_tokens=half.index, return_dict=False, **cond)[0]
    assert bool((output[~half.pixels().expand_as(output)] == 0).all())  # dropped: scattered zeros
    (grad,) = torch.autograd.grad(output.square().sum(), x_in)
    per_token = patchify(grad.abs()).sum(-1)  # (B, N)
    dropped = torch.ones_like(per_token, dtype=torch.bool).scatter(1, half.index, False)
    assert bool((per_token[dropped] == 0).all()) and bool((per_token[~dropped] > 0).all())


def test_deferred_masking_runs_the_mixer_on_every_token():
    """Deferred: the first block sees every token (the dropped ones reach the kept outputs), later
    blocks only the kept ones; the output of a dropped token is zero."""
    model = build("dit", MaskConfig(ratio=0.5, mode="deferred", mixer_blocks=1))
    seen = []
    model.transformer_blocks[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    x0, _, t = inputs()
    x_in = x0.clone().requires_grad_()
    half = kept(0.5)
    out = model(x_in, timestep=t, keep_tokens=half.index, return_dict=False, **conditions("dit", 3))[0]
    assert seen == [8]  # 8 of 16 tokens after the mixer block
    (grad,) = torch.autograd.grad(out.square().sum(), x_in)
    dropped = torch.ones(3, 16, dtype=torch.bool).scatter(1, half.index, False)
    assert bool((patchify(grad.abs()).sum(-1)[dropped] > 0).all())  # mixed into the kept tokens
    model(x0, timestep=t, return_dict=False, **conditions("dit", 3))  # without keep_tokens: all 16
    assert seen == [8, 16]


def test_the_draw_is_the_same_on_any_number_of_processes_and_on_a_repeat():
    one = draw_kept(NoiseDraw(11, 0, 8, 8, 1.0), (4, 4), 2, 0.75, torch.device("cpu"))
    halves = [
        draw_kept(NoiseDraw(11, lo, lo + 4, 8, 1.0), (4, 4), 2, 0.75, torch.device("cpu")) for lo in (0, 4)
    ]
    assert torch.equal(one.index, torch.cat([h.index for h in halves]))
    assert one.index.shape == (8, 4) and bool((one.index.diff(dim=1) > 0).all())  # sorted, distinct
    again = draw_kept(NoiseDraw(11, 0, 8, 8, 1.0), (4, 4), 2, 0.75, torch.device("cpu"))
    other = draw_kept(NoiseDraw(12, 0, 8, 8, 1.0), (4, 4), 2, 0.75, torch.device("cpu"))
    assert torch.equal(one.index, again.index) and not torch.equal(one.index, other.index)
    skipped = draw_kept(NoiseDraw(11, 0, 8, 8, 1.0, skipped=(2,)), (4, 4), 2, 0.75, torch.device("cpu"))
    assert torch.equal(skipped.index, one.index[[0, 1, 3, 4, 5, 6, 7]])  # the damaged row left out
    assert one.pixels().shape == (8, 1, 8, 8) and int(one.pixels()[0].sum()) == 4 * 2 * 2


def test_until_step_ends_the_masked_phase():
    cfg = MaskConfig(ratio=0.5, until_step=3)
    assert [cfg.active(s) for s in range(5)] == [True, True, True, False, False]
    assert MaskConfig(ratio=0.5).active(10**9)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.mask.ratio=1.0", "key 'train.mask.ratio': must be in [0.0, 1.0)"),
        ("train.mask.ratio=-0.1", "key 'train.mask.ratio': must be in [0.0, 1.0)"),
        ("train.mask.until_step=-1", "key 'train.mask.until_step': must be >= 0"),
        ("train.mask.mode=block", "key 'train.mask.mode': 'block' is not one of random, deferred"),
        ("train.mask.mixer_blocks=0", "key 'train.mask.mixer_blocks': must be >= 1"),
    ],
)
def test_bad_mask_keys_are_one_line_naming_the_key(override, message):
    path = ROOT / "demo/configs/stage1.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    text = str(err.value)
    assert text.startswith(f"{path} (command-line override): {message}") and "\n" not in text


def test_deferred_mixer_must_leave_a_masked_block():
    path = ROOT / "demo/configs/stage1.yaml"  # demo-narrow/2: 6 blocks
    assert (
        load_config(path, ["train.mask.mode=deferred", "train.mask.mixer_blocks=5"]).train.mask.mixer_blocks
        == 5
    )
    with pytest.raises(
        ConfigError, match=r"key 'train.mask.mixer_blocks': 6 leaves no masked block .* depth 6"
    ):
        load_config(path, ["train.mask.mode=deferred", "train.mask.mixer_blocks=6"])
