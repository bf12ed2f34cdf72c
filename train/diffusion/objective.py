"""Training objective: noise schedule, targets and the IDDPM hybrid loss.

The trainer never computes a loss itself (DiT style); it calls ``Objective.loss(model, batch)``.

Conventions
-----------
* Discrete diffusion ("epsilon", "v"): integer timesteps ``t`` in ``[0, T)``, ``x_t = a x0 + b eps`` with
  ``a = sqrt(alpha_bar_t)`` and ``b = sqrt(1 - alpha_bar_t)`` (Ho et al. 2020).
* Rectified flow ("flow"): continuous ``s`` in ``[0, 1)``, ``x_t = (1 - s) x0 + s eps``. The model, the
  ``timesteps`` metric and the ``timesteps=`` override all use ``s * T`` (a float), so the same timestep
  embedder serves both and ``FlowMatchEulerDiscreteScheduler``'s ``sigma * 1000`` convention matches.
* Every prediction is linear in ``(x0, eps)``: ``pred = c x0 + d eps``. With ``x_t = a x0 + b eps`` the
  2x2 system inverts to ``x0 = (d x_t - b pred) / det`` and ``eps = (a pred - c x_t) / det`` with
  ``det = a d - b c``; ``to_eps`` / ``to_x0`` use that for all three parameterisations.

The schedule is built once in float64 (as IDDPM does in numpy) and cast to the working dtype when
gathered. Nothing here calls ``.item()`` or otherwise syncs with the host.

Randomness: the objective draws nothing.  A training step's random numbers -- each sample's timestep
draw ``u ~ U[0, 1)``, its latent sampled from the cached posterior, the diffusion noise -- are drawn in
one place, the feature loader (``data/features.py``), for the whole global batch from a generator seeded
by (seed, epoch, batch index), then sliced to this process's rows.  So N processes x B equal 1 x N*B and
a resumed run is bit-identical.  The objective maps ``u`` to a timestep
(:meth:`Objective.timesteps_from_uniform`, with ``timestep_shift``) and :meth:`Objective.loss` takes
the timesteps and noise it is given.

References: Nichol & Dhariwal 2021, "Improved DDPM" (IDDPM, arXiv:2102.09672), and its code
``improved_diffusion/gaussian_diffusion.py``; DiT (Peebles & Xie 2023, ``diffusion/gaussian_diffusion.py``),
which PixArt-alpha reuses; Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting"
(arXiv:2303.09556); Liu et al. 2022, "Flow Straight and Fast" (rectified flow).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from tristage.train.diffusion.config import ObjectiveConfig
from tristage.train.diffusion.repa import RepaTap, alignment_loss, target_tokens
from tristage.train.models.masking import KeptTokens

LN2 = math.log(2.0)

# Beta schedules (choices: diffusion/config.py BETA_SCHEDULES), named as diffusers names them so
# `scheduler_kwargs` can pass the name straight through.
# Both are computed in float64; diffusers computes them in float32 (differences ~1e-7 relative).
BETA_SCHEDULE_FNS: dict[str, Callable[[float, float, int], torch.Tensor]] = {
    "linear": lambda start, end, n: torch.linspace(start, end, n, dtype=torch.float64),
    "scaled_linear": lambda start, end, n: torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2,
}

# Target coefficients (c, d) of `pred = c x0 + d eps` given the mixing coefficients (a, b), per
# objective.prediction (choices: diffusion/config.py PREDICTIONS).
TARGET_COEFFICIENTS: dict[str, Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]] = {
    "epsilon": lambda a, b: (torch.zeros_like(a), torch.ones_like(a)),
    "v": lambda a, b: (-b, a),  # Salimans & Ho 2022: v = a eps - b x0
    "flow": lambda a, b: (-torch.ones_like(a), torch.ones_like(a)),  # velocity d x_t / d s = eps - x0
}

# Min-SNR-gamma (Hang et al. 2023, eq. 12 and its v variant): weight = min(SNR, gamma) / denominator.
MIN_SNR_DENOMINATOR: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "epsilon": lambda snr: snr,
    "v": lambda snr: snr + 1.0,
}

# The diffusers `prediction_type` that matches each exportable prediction.
DIFFUSERS_PREDICTION_TYPE: dict[str, str] = {"epsilon": "epsilon", "v": "v_prediction"}


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: (B, ...) -> (B,)."""
    return x.flatten(1).mean(dim=1)


def _mean_kept(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over all but the batch dimension of the elements a (B, 1, H, W) bool ``mask`` keeps (None: all).

    ``where``, not a product: a dropped element never reaches the mean (nor its gradient), whatever it
    holds.  With every element kept this is ``_mean_flat`` bit for bit (the share divided by is 1.0)."""
    if mask is None:
        return _mean_flat(x)
    kept = mask.flatten(1).to(x.dtype).mean(dim=1)  # (B,) share of the pixels kept
    return _mean_flat(torch.where(mask, x, 0.0)) / kept


def block_detail(x: torch.Tensor, pool: int) -> torch.Tensor:
    """x (B, C, H, W) minus the mean of its pool x pool block, repeated over the block (H, W divisible)."""
    if x.shape[-2] % pool or x.shape[-1] % pool:
        raise ValueError(
            f"latents {tuple(x.shape[-2:])} are not divisible by ObjectiveConfig.detail_pool={pool}"
        )
    mean = F.avg_pool2d(x, pool)  # (B, C, H / pool, W / pool)
    return x - mean.repeat_interleave(pool, dim=-2).repeat_interleave(pool, dim=-1)


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats (IDDPM ``losses.normal_kl``)."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Tanh approximation of the standard normal CDF, as IDDPM uses (kept for parity with DiT/PixArt)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Elementwise log-likelihood (nats) of `x` in [-1, 1] under a Gaussian discretised to 256 bins.

    The edge bins extend to -inf / +inf (IDDPM ``losses.discretized_gaussian_log_likelihood``). PixArt's
    latents are not 8-bit data, but DiT and PixArt use this decoder term at t == 0 all the same.
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    inner = torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    return torch.where(x < -0.999, log_cdf_plus, inner)


def zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last alpha_bar is (almost) zero, the first unchanged (Lin et al. 2024, Algorithm 1).

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first is kept; the last is then
    set to half the one before it (~2e-9 for the linear schedule), not 0, so that every beta stays in
    (0, 1) and IDDPM's variance terms (log beta, 1 / alpha_bar) stay finite.  diffusers' samplers put
    2**-24 there; both are pure noise to any model.  Without the rescale the linear schedule ends at
    alpha_bar 4e-5: a faint copy of x0 (stronger still for latents scaled up, as the demo's) that the
    model learns to read at t = T - 1 and that pure noise at sampling time does not hold.
    """
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    alphas_cumprod = root.square()
    alphas_cumprod[-1] = alphas_cumprod[-2] / 2
    previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return 1.0 - alphas_cumprod / previous


def build_schedule(config: ObjectiveConfig) -> dict[str, torch.Tensor]:
    """All per-timestep float64 buffers (T,) of the discrete schedule (IDDPM ``GaussianDiffusion.__init__``).

    beta_start / beta_end are used as given; IDDPM's ``1000 / T`` rescaling of the linear schedule for
    other step counts is not applied (diffusers does not apply it either).
    """
    betas = BETA_SCHEDULE_FNS[config.beta_schedule](config.beta_start, config.beta_end, config.num_timesteps)
    if config.zero_terminal_snr:
        betas = zero_terminal_snr(betas)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    return {
        "betas": betas,
        "log_betas": torch.log(betas),
        "alphas_cumprod": alphas_cumprod,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
        "snr": alphas_cumprod / (1.0 - alphas_cumprod),
        # The posterior variance is 0 at t == 0; IDDPM clips its log by repeating the t == 1 value.
        "posterior_log_variance_clipped": torch.log(
            torch.cat([posterior_variance[1:2], posterior_variance[1:]])
        ),
        "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
    }


class Objective:
    """Noise schedule, targets and loss for one training stage, built from an `ObjectiveConfig`."""

    def __init__(self, config: ObjectiveConfig) -> None:
        self.config = config  # checked where it is declared (diffusion/config.py), once, at load
        self._schedule = build_schedule(config)
        self._on_device: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar_t for t in [0, T), float64 on the CPU, shape (T,). Unused by "flow"."""
        return self._schedule["alphas_cumprod"]

    @property
    def betas(self) -> torch.Tensor:
        """beta_t for t in [0, T), float64 on the CPU, shape (T,)."""
        return self._schedule["betas"]

    def _buffers(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The schedule on `device`, copied once per device (float32 on MPS, which lacks float64)."""
        key = str(device)
        if key not in self._on_device:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            self._on_device[key] = {k: v.to(device=device, dtype=dtype) for k, v in self._schedule.items()}
        return self._on_device[key]

    def _gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Buffer `name` at integer timesteps t (B,), cast to `like`'s dtype, shaped (B, 1, ..., 1)."""
        values = self._buffers(t.device)[name][t].to(like.dtype)  # (B,)
        return values.view(-1, *([1] * (like.ndim - 1)))  # (B, 1, 1, 1)

    def _mixing(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) of x_t = a x0 + b eps, each (B, 1, ..., 1)."""
        if self.config.prediction == "flow":
            s = (t.to(like.dtype) / self.config.num_timesteps).view(
                -1, *([1] * (like.ndim - 1))
            )  # (B, 1, 1, 1)
            return 1.0 - s, s
        return self._gather("sqrt_alphas_cumprod", t, like), self._gather(
            "sqrt_one_minus_alphas_cumprod", t, like
        )

    def timesteps_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """Map draws u ~ U[0, 1) to timesteps: int64 floor(s*T), or for "flow" float32 s*T, where s is u
        after ``timestep_shift`` (s = u when it is 1).

        The feature loader draws u (see the module docstring); this is the objective's part: the shift.
        """
        shift, u = self.config.timestep_shift, u.to(torch.float64)
        scaled = shift * u / (1.0 + (shift - 1.0) * u) * self.config.num_timesteps
        if self.config.prediction == "flow":
            return scaled.to(torch.float32)
        return scaled.floor().long().clamp_(max=self.config.num_timesteps - 1)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = a x0 + b eps (discrete: a = sqrt(alpha_bar_t); flow: a = 1 - s, b = s with s = t / T)."""
        a, b = self._mixing(t, x0)
        return a * x0 + b * noise  # (B, C, H, W)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target: eps, v = a eps - b x0, or the flow velocity eps - x0."""
        c, d = TARGET_COEFFICIENTS[self.config.prediction](*self._mixing(t, x0))
        return c * x0 + d * noise  # (B, C, H, W)

    def _solve(
        self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from a prediction `pred = c x0 + d eps` and `x_t = a x0 + b eps`."""
        a, b = self._mixing(t, x_t)
        c, d = TARGET_COEFFICIENTS[self.config.prediction](a, b)
        det = a * d - b * c  # epsilon: a; v: a^2 + b^2 = 1; flow: 1
        return (d * x_t - b * pred) / det, (a * pred - c * x_t) / det

    def to_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noise estimate from a prediction (the first C channels when learn_sigma)."""
        return self._solve(model_output, x_t, t)[1]

    def to_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Clean-sample estimate from a prediction (the first C channels when learn_sigma)."""
        return self._solve(model_output, x_t, t)[0]

    def mse_weight(self, t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Per-sample MSE weight (B,). min-SNR-gamma: min(SNR, g) / SNR for eps, / (SNR + 1) for v.

        Hang et al. 2023. This is NOT the official PixArt ``snr_loss``, which is no min-SNR at all: it
        switches to an x0 target for t <= 249. We do not replicate that.
        """
        if self.config.weighting == "none":
            return torch.ones(t.shape, dtype=dtype, device=t.device)
        snr = self._buffers(t.device)["snr"][t]  # (B,)
        weight = snr.clamp(max=self.config.min_snr_gamma) / MIN_SNR_DENOMINATOR[self.config.prediction](snr)
        return weight.to(dtype)

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (B, C, H, W) and clipped log-var (B, 1, 1, 1) of q(x_{t-1} | x_t, x0), IDDPM eq. 10-12."""
        mean = (
            self._gather("posterior_mean_coef1", t, x0) * x0
            + self._gather("posterior_mean_coef2", t, x0) * x_t
        )
        return mean, self._gather("posterior_log_variance_clipped", t, x0)

    def model_log_variance(self, var_values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """IDDPM eq. 15: v in [-1, 1] mixes log(beta_t) (v = 1) and the clipped posterior log-var (v = -1)."""
        frac = (var_values + 1.0) / 2.0  # (B, C, H, W)
        max_log = self._gather("log_betas", t, var_values)
        min_log = self._gather("posterior_log_variance_clipped", t, var_values)
        return frac * max_log + (1.0 - frac) * min_log  # (B, C, H, W)

    def vlb(
        self,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        eps: torch.Tensor,
        var_values: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample VLB term L_t in bits (B,): KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0 and the
        discretised decoder NLL -log p(x0|x1) for t == 0 (IDDPM ``_vb_terms_bpd``, clip_denoised=False).

        Pass a detached `eps` to train only the variance through this term, as ``loss`` does. Both terms
        are sums of independent per-dimension terms, so over the pixels a bool ``mask`` (B, 1, H, W) keeps
        (token masking) their mean is the same bound per kept dimension.
        """
        pred_x0 = self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t
        pred_x0 = pred_x0 - self._gather("sqrt_recipm1_alphas_cumprod", t, x_t) * eps  # (B, C, H, W)
        model_mean, _ = self.q_posterior(pred_x0, x_t, t)
        model_log_var = self.model_log_variance(var_values, t)  # (B, C, H, W)
        true_mean, true_log_var = self.q_posterior(x0, x_t, t)
        kl = _mean_kept(normal_kl(true_mean, true_log_var, model_mean, model_log_var), mask) / LN2  # (B,)
        log_lik = discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
        decoder_nll = -_mean_kept(log_lik, mask) / LN2  # (B,)
        return torch.where(t == 0, decoder_nll, kl)

    def loss_terms(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        noise: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (weighted MSE, VLB), each (B,), from the raw model output (2*C channels if learn_sigma).

        Hybrid loss as DiT (LossType.MSE, ModelVarType.LEARNED_RANGE): the VLB sees the mean through a
        stop-gradient, so it trains only the variance. DiT does not multiply the VLB by T / 1000 (that is
        IDDPM's RESCALED_MSE); neither do we. For "v", the detached v is converted to eps for the VLB mean.
        A bool ``mask`` (B, 1, H, W) limits both terms to the pixels of the kept tokens (token masking).
        """
        channels = x0.shape[1]
        expected = channels * (2 if self.config.learn_sigma else 1)
        if model_output.shape[1] != expected:
            raise ValueError(
                f"model output has {model_output.shape[1]} channels, expected {expected} for {channels} "
                f"latent channels with ObjectiveConfig.learn_sigma={self.config.learn_sigma}"
            )
        pred, var_values = model_output[:, :channels], model_output[:, channels:]  # (B, C, H, W) each
        error = self.target(x0, noise, t) - pred  # (B, C, H, W)
        if mask is not None:  # dropped pixels out of the detail blocks' means too
            error = torch.where(mask, error, 0.0)
        mse = _mean_kept(error**2, mask)
        if self.config.detail_weight:
            detail = block_detail(error, self.config.detail_pool)
            mse = mse + self.config.detail_weight * _mean_kept(detail**2, mask)
        mse = mse * self.mse_weight(t, x0.dtype)  # (B,)
        if not self.config.learn_sigma:
            return mse, torch.zeros_like(mse)
        eps = self.to_eps(pred.detach(), x_t, t)  # stop-grad mean
        return mse, self.vlb(x0, x_t, t, eps, var_values, mask)

    def loss(
        self,
        model: Callable[..., Any],
        batch: Mapping[str, Any],
        *,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        kept: KeptTokens | None = None,
        tap: RepaTap | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One training loss on ``batch = {"latents": x0 (B, C, H, W), "cond": {model kwargs}}`` at the
        given ``timesteps`` (B,) (in the model's units, see the module docstring) and ``noise`` (like x0).

        Calls ``model(x_t, timestep=t, return_dict=False, **cond)[0]``. The loss is computed in at least
        float32; the model gets x_t in the latents' dtype. Returns the scalar mean loss and detached metric
        tensors: "loss_mse" and "loss_vlb" (batch means; "loss_mse" weighted as it enters the loss),
        "per_sample_loss" (B,) and "timesteps" (B,), for per-timestep-bucket logging without a host sync.

        ``kept`` (token masking): the model runs on those tokens (``keep_tokens=``), the loss is taken on
        their pixels.  ``objective.repa``: ``batch["repa"]`` holds the cached encoder features and ``tap``
        the projected block; "repa_loss" and "repa_cos" are logged (``_alignment_term``)."""
        latents = batch["latents"]
        x0 = latents.to(torch.promote_types(latents.dtype, torch.float32))  # (B, C, H, W)
        noise = noise.to(x0.dtype)
        x_t = self.add_noise(x0, noise, timesteps)  # (B, C, H, W)
        masked = {} if kept is None else {"keep_tokens": kept.index}
        cond = batch.get("cond", {})
        out = model(x_t.to(latents.dtype), timestep=timesteps, return_dict=False, **cond, **masked)[0]
        mask = None if kept is None else kept.pixels()
        mse, vlb = self.loss_terms(out.to(x0.dtype), x0, noise, x_t, timesteps, mask)
        metrics = {"loss_mse": mse.detach().mean(), "loss_vlb": vlb.detach().mean()}
        per_sample = mse + vlb + self._alignment_term(batch, tap, x0.shape[-2:], kept, metrics)  # (B,)
        metrics.update(per_sample_loss=per_sample.detach(), timesteps=timesteps.detach())
        return per_sample.mean(), metrics

    def _alignment_term(
        self, batch: Mapping[str, Any], tap: RepaTap | None, size, kept: KeptTokens | None, metrics: dict
    ) -> torch.Tensor | float:
        """``weight`` x the per-sample REPA loss (B,), logged into ``metrics``; 0 without objective.repa."""
        if self.config.repa is None:
            return 0.0
        align = self.alignment(batch["repa"], tap, size, kept)  # (B,)
        metrics.update(repa_loss=align.detach().mean(), repa_cos=-align.detach().mean())
        return self.config.repa.weight * align

    def alignment(
        self, features: torch.Tensor, tap: RepaTap, size: tuple[int, int], kept: KeptTokens | None
    ) -> torch.Tensor:
        """Per-sample REPA loss (B,) of the tap's projected tokens against cached encoder ``features``
        (B, h, w, D), on the DiT's token grid of latents of ``size`` -- on the kept tokens under masking."""
        grid = (size[0] // tap.patch, size[1] // tap.patch)
        target = target_tokens(features.to(torch.float32), grid)  # (B, N, D)
        projected = tap.take()  # (B, N, D), or (B, K, D) when the block ran on the kept tokens
        if kept is not None:
            target = kept.gather(target)
            projected = kept.gather(projected) if projected.shape[1] != target.shape[1] else projected
        return alignment_loss(projected, target)

    def scheduler_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a diffusers DDPM-family scheduler (DDPM, DDIM, DPMSolverMultistep, ...)
        with this training schedule. With learn_sigma, samplers use only the first C output channels
        (PixArtAlphaPipeline does this itself). "flow" raises: it has no beta schedule to export.
        """
        if self.config.prediction not in DIFFUSERS_PREDICTION_TYPE:
            raise ValueError(
                f"ObjectiveConfig.prediction={self.config.prediction!r} cannot be exported to a DDPM-family "
                "scheduler such as DPMSolverMultistepScheduler (rectified flow has no beta schedule)"
            )
        kwargs = {
            "num_train_timesteps": self.config.num_timesteps,
            "beta_start": self.config.beta_start,
            "beta_end": self.config.beta_end,
            "beta_schedule": self.config.beta_schedule,
            "prediction_type": DIFFUSERS_PREDICTION_TYPE[self.config.prediction],
        }
        if self.config.zero_terminal_snr:  # and sample from the last step, where the input is pure noise
            kwargs |= {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
        return kwargs
