"""Analytic checks of train/objective.py: schedule, targets, VLB, stop-gradient, min-SNR, config errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tristage.errors import ConfigError
from tristage.train.diffusion.config import ObjectiveConfig
from tristage.train.diffusion.objective import Objective, approx_standard_normal_cdf

T = 1000


def _np_schedule(beta_start: float = 1e-4, beta_end: float = 0.02) -> dict[str, np.ndarray]:
    """An independent float64 numpy version of the linear schedule and the posterior (Ho et al. 2020)."""
    betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    acp = np.cumprod(1.0 - betas)
    acp_prev = np.append(1.0, acp[:-1])
    post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
    return {
        "betas": betas,
        "acp": acp,
        "post_logvar": np.log(np.append(post_var[1], post_var[1:])),
        "coef1": betas * np.sqrt(acp_prev) / (1.0 - acp),
        "coef2": (1.0 - acp_prev) * np.sqrt(1.0 - betas) / (1.0 - acp),
    }


def _tensors(seed: int = 0, shape: tuple[int, ...] = (3, 2, 4, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1
    return x0, torch.randn(shape, generator=g, dtype=torch.float64)


def _objective(**kwargs) -> Objective:
    return Objective(ObjectiveConfig(**kwargs))


def _timesteps(obj: Objective, n: int, generator: torch.Generator) -> torch.Tensor:
    """n timesteps from u ~ U[0, 1), as the feature loader draws u (the objective draws nothing)."""
    return obj.timesteps_from_uniform(torch.rand(n, generator=generator, dtype=torch.float64))


# --- schedule -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_schedule_matches_diffusers(schedule: str) -> None:
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    kwargs = dict(beta_start=0.00085, beta_end=0.012) if schedule == "scaled_linear" else {}
    obj = _objective(beta_schedule=schedule, **kwargs)
    assert obj.alphas_cumprod.dtype == torch.float64 and obj.alphas_cumprod.shape == (T,)
    reference = DDPMScheduler(**obj.scheduler_kwargs()).alphas_cumprod.double()
    # diffusers works in float32, so allow float32-level accumulated rounding.
    torch.testing.assert_close(obj.alphas_cumprod, reference, rtol=2e-5, atol=0)
    assert DPMSolverMultistepScheduler(**obj.scheduler_kwargs()).config.prediction_type == "epsilon"
    v_kwargs = _objective(prediction="v", beta_schedule=schedule, **kwargs).scheduler_kwargs()
    assert v_kwargs["prediction_type"] == "v_prediction"


def test_zero_terminal_snr_matches_diffusers_rescale_and_keeps_iddpm_finite() -> None:
    """Our rescaled schedule against diffusers' own (Lin et al. 2024, Algorithm 1), through the exported
    scheduler kwargs; the last step is pure noise yet every beta is in (0, 1) and the VLB is finite."""
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

    obj = _objective(prediction="v", zero_terminal_snr=True)
    kwargs = obj.scheduler_kwargs()
    assert kwargs["rescale_betas_zero_snr"] and kwargs["timestep_spacing"] == "trailing"
    reference = DDPMScheduler(**kwargs).alphas_cumprod.double()
    assert float(reference[-1]) == 0.0  # diffusers' rescale: exactly zero at the last step
    torch.testing.assert_close(obj.alphas_cumprod[:-1], reference[:-1], rtol=2e-4, atol=1e-12)
    assert 0.0 < float(obj.alphas_cumprod[-1]) < 1e-8 < float(_objective(prediction="v").alphas_cumprod[-1])
    assert bool(((obj.betas > 0) & (obj.betas < 1)).all())
    sampler = DPMSolverMultistepScheduler(**kwargs)
    sampler.set_timesteps(20)
    assert int(sampler.timesteps[0]) == T - 1  # sampling starts where training saw pure noise
    x0, noise = _tensors()
    t = torch.full((x0.shape[0],), T - 1)
    out = torch.cat([obj.target(x0, noise, t), torch.zeros_like(x0)], dim=1)
    mse, vlb = obj.loss_terms(out, x0, noise, obj.add_noise(x0, noise, t), t)
    assert bool(torch.isfinite(mse).all() and torch.isfinite(vlb).all()), (mse, vlb)


def test_timestep_shift_moves_training_to_high_noise() -> None:
    """s u / (1 + (s - 1) u): u = 0.5 lands at s / (1 + s) of the schedule; shift 1 is uniform."""
    u = torch.tensor([0.0, 0.25, 0.5, 0.75], dtype=torch.float64)
    assert _objective().timesteps_from_uniform(u).tolist() == [0, 250, 500, 750]
    assert _objective(timestep_shift=3.0).timesteps_from_uniform(u).tolist() == [0, 500, 750, 900]
    draws = _timesteps(_objective(timestep_shift=3.0), 4000, torch.Generator())
    assert float((draws >= 750).double().mean()) == pytest.approx(0.5, abs=0.03)


def test_flow_has_no_scheduler_export() -> None:
    with pytest.raises(ValueError, match="prediction='flow'.*DPMSolverMultistepScheduler"):
        _objective(prediction="flow", learn_sigma=False).scheduler_kwargs()


# --- targets ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v", "flow"])
def test_target_converts_back_to_noise_and_x0(prediction: str) -> None:
    obj = _objective(prediction=prediction, learn_sigma=False)
    x0, noise = _tensors()
    t = _timesteps(obj, x0.shape[0], torch.Generator().manual_seed(1))
    x_t = obj.add_noise(x0, noise, t)
    target = obj.target(x0, noise, t)
    torch.testing.assert_close(obj.to_eps(target, x_t, t), noise)
    torch.testing.assert_close(obj.to_x0(target, x_t, t), x0)


def test_v_target_formula() -> None:
    obj, ref = _objective(prediction="v"), _np_schedule()
    x0, noise = _tensors()
    t = torch.tensor([0, 500, 999])
    a = torch.from_numpy(np.sqrt(ref["acp"][t.numpy()])).view(-1, 1, 1, 1)
    expected = a * noise - torch.sqrt(1 - a**2) * x0
    torch.testing.assert_close(obj.target(x0, noise, t), expected)


def _closure_model(output_fn):
    """A stand-in denoiser: ignores its weights and returns output_fn(x_t, timestep) in a tuple."""

    def model(x_t, timestep, return_dict, **cond):
        assert return_dict is False and cond == {"y": "cond"}
        return (output_fn(x_t, timestep),)

    return model


@pytest.mark.parametrize("prediction", ["epsilon", "v", "flow"])
def test_perfect_prediction_gives_zero_mse(prediction: str) -> None:
    obj, ref = _objective(prediction=prediction, learn_sigma=False), _np_schedule()
    x0, noise = _tensors()

    def perfect(x_t, t):
        if prediction == "flow":
            return noise - x0
        a = torch.from_numpy(np.sqrt(ref["acp"][t.numpy()])).view(-1, 1, 1, 1)
        return noise if prediction == "epsilon" else a * noise - torch.sqrt(1 - a**2) * x0

    batch, t = {"latents": x0, "cond": {"y": "cond"}}, _timesteps(obj, 3, torch.Generator().manual_seed(3))
    loss, metrics = obj.loss(_closure_model(perfect), batch, noise=noise, timesteps=t)
    assert float(loss) == pytest.approx(0.0, abs=1e-20)
    assert float(metrics["loss_mse"]) == pytest.approx(0.0, abs=1e-20)
    # ... and an imperfect one does not.
    imperfect = _closure_model(lambda x_t, t: perfect(x_t, t) + 0.1)
    loss, _ = obj.loss(imperfect, batch, noise=noise, timesteps=t)
    assert float(loss) == pytest.approx(0.01)


def test_perfect_eps_with_learned_sigma_has_zero_mse_and_positive_vlb() -> None:
    obj = _objective()
    x0, noise = _tensors()
    model = _closure_model(lambda x_t, t: torch.cat([noise, torch.zeros_like(noise)], dim=1))
    t = _timesteps(obj, 3, torch.Generator().manual_seed(5))
    loss, metrics = obj.loss(model, {"latents": x0, "cond": {"y": "cond"}}, noise=noise, timesteps=t)
    assert float(metrics["loss_mse"]) == pytest.approx(0.0, abs=1e-20)
    assert float(metrics["loss_vlb"]) > 0.0
    assert float(loss) == pytest.approx(float(metrics["loss_vlb"]))


# --- VLB ----------------------------------------------------------------------------------------------


def _np_vlb_inputs(t: int):
    ref = _np_schedule()
    rng = np.random.default_rng(t)
    x0 = rng.uniform(-1, 1, (1, 2, 2, 2))
    x0[0, 0, 0, 0], x0[0, 0, 0, 1] = -1.0, 1.0  # exercise both edge bins of the decoder
    noise, eps_error, var_values = rng.normal(size=(3, 1, 2, 2, 2))
    x_t = np.sqrt(ref["acp"][t]) * x0 + np.sqrt(1 - ref["acp"][t]) * noise
    eps, var_values = noise + 0.5 * eps_error, np.tanh(var_values)
    pred_x0 = (x_t - np.sqrt(1 - ref["acp"][t]) * eps) / np.sqrt(ref["acp"][t])
    model_mean = ref["coef1"][t] * pred_x0 + ref["coef2"][t] * x_t
    frac = (var_values + 1) / 2
    model_logvar = frac * np.log(ref["betas"][t]) + (1 - frac) * ref["post_logvar"][t]
    true_mean = ref["coef1"][t] * x0 + ref["coef2"][t] * x_t
    return ref, x0, x_t, eps, var_values, model_mean, model_logvar, true_mean


def _obj_vlb(t: int, x0, x_t, eps, var_values) -> float:
    tt = torch.tensor([t])
    args = [torch.from_numpy(a) for a in (x0, x_t)]
    return float(_objective().vlb(args[0], args[1], tt, torch.from_numpy(eps), torch.from_numpy(var_values)))


@pytest.mark.parametrize("t", [1, 37, 999])
def test_vlb_is_gaussian_kl_in_bits(t: int) -> None:
    ref, x0, x_t, eps, var_values, model_mean, model_logvar, true_mean = _np_vlb_inputs(t)
    s1, s2 = np.exp(0.5 * ref["post_logvar"][t]), np.exp(0.5 * model_logvar)
    kl = np.log(s2 / s1) + (s1**2 + (true_mean - model_mean) ** 2) / (2 * s2**2) - 0.5
    assert _obj_vlb(t, x0, x_t, eps, var_values) == pytest.approx(kl.mean() / math.log(2), rel=1e-10)


def test_vlb_at_t0_is_discretized_gaussian_nll_in_bits() -> None:
    _, x0, x_t, eps, var_values, model_mean, model_logvar, _ = _np_vlb_inputs(0)
    sigma = np.exp(0.5 * model_logvar)

    def cdf(z):  # the tanh approximation IDDPM / DiT use
        return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))

    upper = np.where(x0 > 0.999, 1.0, cdf((x0 + 1 / 255 - model_mean) / sigma))
    lower = np.where(x0 < -0.999, 0.0, cdf((x0 - 1 / 255 - model_mean) / sigma))
    nll_bits = -np.log(upper - lower).mean() / math.log(2)
    assert _obj_vlb(0, x0, x_t, eps, var_values) == pytest.approx(nll_bits, rel=1e-10)


def test_approx_cdf_is_close_to_exact() -> None:
    z = torch.linspace(-6, 6, 101, dtype=torch.float64)
    exact = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    torch.testing.assert_close(approx_standard_normal_cdf(z), exact, atol=1e-3, rtol=0)


def test_vlb_vanishes_for_true_noise_and_posterior_variance() -> None:
    obj = _objective()
    x0, noise = _tensors()
    t = torch.tensor([1, 400, 999])
    x_t = obj.add_noise(x0, noise, t)
    vlb = obj.vlb(x0, x_t, t, noise, -torch.ones_like(x0))  # v = -1 selects the posterior variance
    torch.testing.assert_close(vlb, torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    # beta_t differs from the posterior variance, most at small t (they converge as t grows).
    t = torch.tensor([1, 2, 5])
    assert (obj.vlb(x0, obj.add_noise(x0, noise, t), t, noise, torch.ones_like(x0)) > 1e-3).all()


# --- stop-gradient ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_vlb_gradient_reaches_variance_only(prediction: str) -> None:
    obj = _objective(prediction=prediction)
    x0, noise = _tensors()
    mean_out = torch.randn_like(x0).requires_grad_()
    var_out = torch.tanh(torch.randn_like(x0)).requires_grad_()
    t = torch.tensor([0, 10, 700])
    x_t = obj.add_noise(x0, noise, t)
    mse, vlb = obj.loss_terms(torch.cat([mean_out, var_out], dim=1), x0, noise, x_t, t)
    grad_mean, grad_var = torch.autograd.grad(vlb.sum(), [mean_out, var_out])
    assert torch.count_nonzero(grad_mean) == 0
    assert torch.count_nonzero(grad_var) == grad_var.numel()

    # Through loss(): the gradient on the mean is exactly the MSE gradient 2 (pred - target) / (N B).
    model = _closure_model(lambda x_t, t: torch.cat([mean_out, var_out], dim=1))
    loss, _ = obj.loss(model, {"latents": x0, "cond": {"y": "cond"}}, noise=noise, timesteps=t)
    (grad_mean,) = torch.autograd.grad(loss, [mean_out])
    expected = 2 * (mean_out - obj.target(x0, noise, t)) / x0.numel()
    torch.testing.assert_close(grad_mean, expected.detach())


# --- weighting ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_min_snr_weights(prediction: str) -> None:
    gamma = 5.0
    obj, ref = _objective(prediction=prediction, weighting="min_snr", min_snr_gamma=gamma), _np_schedule()
    t = torch.arange(T)
    snr = ref["acp"] / (1 - ref["acp"])
    expected = np.minimum(snr, gamma) / (snr if prediction == "epsilon" else snr + 1)
    weight = obj.mse_weight(t, torch.float64)
    np.testing.assert_allclose(weight.numpy(), expected, rtol=1e-12)
    assert (weight <= 1.0).all() and (weight > 0).all()
    if prediction == "epsilon":  # clipped where SNR > gamma, exactly 1 where SNR <= gamma
        assert (weight[snr > gamma] < 1).all() and (weight[torch.from_numpy(snr <= gamma)] == 1).all()


def test_min_snr_weights_enter_the_loss() -> None:
    obj = _objective(weighting="min_snr", learn_sigma=False)
    x0, noise = _tensors()
    t = torch.tensor([0, 100, 900])
    model = _closure_model(lambda x_t, tt: torch.zeros_like(x_t))
    _, metrics = obj.loss(model, {"latents": x0, "cond": {"y": "cond"}}, noise=noise, timesteps=t)
    expected = obj.mse_weight(t, torch.float64) * (noise**2).flatten(1).mean(1)
    torch.testing.assert_close(metrics["per_sample_loss"], expected)
    assert metrics["per_sample_loss"][0] < 0.01 * metrics["per_sample_loss"][2]  # high SNR is down-weighted


# --- sampling, dtypes, metrics ------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["epsilon", "flow"])
def test_loss_is_reproducible_and_metrics_are_detached(prediction: str) -> None:
    obj = _objective(prediction=prediction, learn_sigma=prediction != "flow")
    x0 = torch.randn(4, 2, 4, 4, dtype=torch.bfloat16)
    weight = torch.ones(1, requires_grad=True)
    seen = {}

    def model(x_t, timestep, return_dict, **cond):
        seen["dtype"], seen["t"] = x_t.dtype, timestep
        out = torch.zeros(x_t.shape[0], x_t.shape[1] * (1 + obj.config.learn_sigma), *x_t.shape[2:])
        return (out.to(x_t.dtype) * weight,)

    def run(seed: int):
        g = torch.Generator().manual_seed(seed)
        t = _timesteps(obj, x0.shape[0], g)
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float32)
        return obj.loss(model, {"latents": x0, "cond": {}}, noise=noise, timesteps=t)

    runs = [run(s) for s in (7, 7, 8)]
    assert seen["dtype"] == torch.bfloat16 and runs[0][0].dtype == torch.float32 and runs[0][0].requires_grad
    torch.testing.assert_close(runs[0][1]["per_sample_loss"], runs[1][1]["per_sample_loss"])
    assert not torch.equal(runs[0][1]["timesteps"], runs[2][1]["timesteps"])
    metrics = runs[0][1]
    assert set(metrics) == {"loss_mse", "loss_vlb", "per_sample_loss", "timesteps"}
    assert all(not m.requires_grad for m in metrics.values())
    assert metrics["per_sample_loss"].shape == metrics["timesteps"].shape == (4,)
    assert metrics["timesteps"].dtype == (torch.float32 if prediction == "flow" else torch.int64)
    assert ((metrics["timesteps"] >= 0) & (metrics["timesteps"] < T)).all()
    if prediction == "flow":
        assert float(metrics["loss_vlb"]) == 0.0


def test_wrong_output_channels_is_a_clear_error() -> None:
    obj = _objective()
    x0, _ = _tensors()
    model = _closure_model(lambda x_t, t: x_t)  # C channels, but learn_sigma wants 2*C
    t = torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match="2 channels, expected 4 .*learn_sigma=True"):
        obj.loss(model, {"latents": x0, "cond": {"y": "cond"}}, noise=torch.zeros_like(x0), timesteps=t)


# --- config -------------------------------------------------------------------------------------------


def _mse_with_error(error: torch.Tensor, **kwargs) -> torch.Tensor:
    """The MSE term of loss_terms when the prediction misses the v target by `error` (no VLB)."""
    obj = _objective(prediction="v", learn_sigma=False, **kwargs)
    x0, noise = _tensors(shape=error.shape)
    t = torch.tensor([10, 500, 990])
    pred = obj.target(x0, noise, t) - error
    return obj.loss_terms(pred, x0, noise, obj.add_noise(x0, noise, t), t)[0]


def test_detail_weight_scales_only_the_error_inside_each_block() -> None:
    """An error flat on every 2x2 block is plain MSE; one with zero block means gets (1 + lambda) x."""
    g = torch.Generator().manual_seed(3)
    flat = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64).repeat_interleave(2, -1)
    flat = flat.repeat_interleave(2, -2)  # (3, 2, 4, 4), constant on each 2x2 block
    signs = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64).repeat(2, 2)
    inside = signs.expand(3, 2, 4, 4)  # a checkerboard: every 2x2 block's mean is 0
    for error, factor in ((flat, 1.0), (inside, 4.0)):
        plain = (error**2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(_mse_with_error(error, detail_weight=3.0), factor * plain)
    torch.testing.assert_close(
        _mse_with_error(flat + inside), _mse_with_error(flat + inside, detail_weight=0.0)
    )
    # 4x4 blocks: the checkerboard's 4x4 block means are 0 too, but the flat-on-2x2 error is now detail.
    assert (_mse_with_error(flat, detail_weight=3.0, detail_pool=4) > (flat**2).mean(dim=(1, 2, 3))).all()


def test_detail_pool_must_divide_the_latents() -> None:
    with pytest.raises(ValueError, match=r"ObjectiveConfig\.detail_pool=3"):
        _mse_with_error(torch.zeros(3, 2, 4, 4, dtype=torch.float64), detail_weight=1.0, detail_pool=3)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"prediction": "x0"}, "prediction"),
        ({"beta_schedule": "cosine"}, "beta_schedule"),
        ({"weighting": "p2"}, "weighting"),
        ({"num_timesteps": 0}, "num_timesteps"),
        ({"num_timesteps": 10.0}, "num_timesteps"),
        ({"beta_start": 0.0}, "beta_start"),
        ({"beta_end": 1.5}, "beta_end"),
        ({"beta_start": 0.03, "beta_end": 0.02}, "beta_end"),
        ({"min_snr_gamma": 0.0}, "min_snr_gamma"),
        ({"timestep_shift": 0.0}, "timestep_shift"),
        ({"detail_weight": -1.0}, "detail_weight"),
        ({"detail_pool": 1}, "detail_pool"),
        ({"detail_pool": 2.0}, "detail_pool"),
        ({"zero_terminal_snr": True}, "zero_terminal_snr"),
        ({"learn_sigma": "yes"}, "learn_sigma"),
        ({"prediction": "flow"}, "learn_sigma"),
        ({"prediction": "flow", "learn_sigma": False, "weighting": "min_snr"}, "weighting"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=rf"^key 'objective\.{field}'"):
        ObjectiveConfig(**kwargs)


def test_lr_schedules_warm_up_then_hold_or_decay_to_zero():
    from tristage.train.training.lr_schedules import lr_lambda

    constant = lr_lambda("constant", warmup_steps=10, max_steps=110)
    assert [constant(s) for s in (0, 4, 9, 50, 109)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    cosine = lr_lambda("cosine", warmup_steps=10, max_steps=110)
    assert cosine(4) == pytest.approx(0.5) and cosine(9) == pytest.approx(1.0)
    assert cosine(59) == pytest.approx(0.5)  # half-way through the decay
    assert cosine(109) == pytest.approx(0.0, abs=1e-12)
    assert all(cosine(s) >= cosine(s + 1) for s in range(9, 109))
