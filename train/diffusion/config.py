"""The objective's config section (``objective:``): what the denoiser predicts, the noise schedule, the
loss weighting.  It sits beside ``objective.py``, which reads the choice lists from here, and imports
neither torch nor the objective, so loading a config stays light.
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import MISSING

from tristage.checks import at_least, check_choice, in_range, positive
from tristage.data.config import FEATURE_DTYPES
from tristage.errors import ConfigError

# The choices, in the names diffusers uses where it has them (objective.py keys its tables by them).
PREDICTIONS = ("epsilon", "v", "flow")  # objective.prediction (objective.py TARGET_COEFFICIENTS)
BETA_SCHEDULES = ("linear", "scaled_linear")  # objective.beta_schedule (objective.py BETA_SCHEDULE_FNS)
WEIGHTINGS = ("none", "min_snr")  # objective.weighting
MIN_SNR_PREDICTIONS = ("epsilon", "v")  # where min-SNR is defined (objective.py MIN_SNR_DENOMINATOR)
PROJECTOR = "repa_projector"  # the REPA projector's attribute on the transformer (its state-dict prefix)
PAPER_BLOCK, PAPER_DEPTH = 8, 28  # REPA aligns SiT-XL/2's block 8 of 28


@dataclass
class RepaConfig:
    """``objective.repa``: align an early block with a frozen encoder's cached patch features; null = off
    (``repa.py``)."""

    encoder: str = MISSING  # vision encoder, hub id or folder (AutoModel): e.g. facebook/dinov2-base
    encoder_resolution: int = 224  # encoder input side for an image of data.resolution (REPA: 224 at 256 px)
    block: int | None = None  # 1-based block whose output is aligned; null: 8 of 28, scaled to the depth
    weight: float = 0.5  # lambda: the alignment loss's weight in the total loss (REPA: 0.5)
    projector_dim: int = 2048  # hidden width of the 3-layer projector MLP (REPA: 2048)
    feature_dtype: str = "bfloat16"  # dtype of the cached encoder features: bfloat16 | float16 | float32

    def __post_init__(self) -> None:
        at_least("objective.repa.encoder_resolution", self.encoder_resolution, 1)
        at_least("objective.repa.projector_dim", self.projector_dim, 1)
        if self.block is not None:
            at_least("objective.repa.block", self.block, 1)  # 1-based
        positive("objective.repa.weight", self.weight)
        check_choice("objective.repa.feature_dtype", self.feature_dtype, FEATURE_DTYPES)

    def block_for(self, depth: int) -> int:
        """The aligned block of a ``depth``-block model: ``block``, or REPA's 8 of 28 scaled to the depth."""
        return self.block or max(1, round(PAPER_BLOCK * depth / PAPER_DEPTH))

    def check_depth(self, depth: int) -> None:
        """The block must exist (the model's depth comes from model.size)."""
        if self.block_for(depth) > depth:
            raise ConfigError(
                f"key 'objective.repa.block': {self.block} is past the model's depth {depth}; "
                f"use 1 to {depth}"
            )


@dataclass
class ObjectiveConfig:
    """What the denoiser predicts, the noise schedule and the loss weighting."""

    prediction: str = "epsilon"
    """Model target: "epsilon" (noise, PixArt/DiT default), "v" (v-prediction) or "flow" (rectified flow)."""
    learn_sigma: bool = True
    """IDDPM learned-range variance: the model outputs 2*C channels and the loss adds the VLB term."""
    num_timesteps: int = 1000
    """Number of discrete diffusion steps T (for "flow": the scale of the model's timestep input)."""
    beta_start: float = 1e-4
    """First beta of the schedule (PixArt / DiT: 1e-4)."""
    beta_end: float = 0.02
    """Last beta of the schedule (PixArt / DiT: 0.02)."""
    beta_schedule: str = "linear"
    """How betas go from beta_start to beta_end: "linear" (PixArt / DiT) or "scaled_linear" (SD)."""
    zero_terminal_snr: bool = False
    """Rescale the betas so the last step is pure noise (Lin et al. 2024; needs "v"): see build_schedule."""
    timestep_shift: float = 1.0
    """Training timesteps drawn as s u / (1 + (s - 1) u), u ~ U[0, 1) (SD3's shift): s > 1 trains more
    on high noise, where the layout is decided; 1 is uniform (PixArt / DiT)."""
    weighting: str = "none"
    """Per-timestep MSE weighting: "none" or "min_snr" (Hang et al. 2023; epsilon and v only)."""
    min_snr_gamma: float = 5.0
    """The gamma of min-SNR-gamma weighting (the paper's default is 5)."""
    detail_weight: float = 0.0
    """Extra weight on the error's detail: its part that varies inside each detail_pool x detail_pool
    block (the error minus the block's mean). 0 (PixArt / DiT) is the plain MSE; lambda adds lambda times
    the detail's MSE, so fine structure the plain loss barely sees gets a gradient of its own."""
    detail_pool: int = 2
    """Side in latent pixels of the blocks whose mean detail_weight removes (a patch-2 token: 2)."""
    repa: RepaConfig | None = None
    """REPA: align an early block with a frozen encoder's cached patch features (train/diffusion/repa.py);
    null (the default) is off."""

    def __post_init__(self) -> None:
        check_choice("objective.prediction", self.prediction, PREDICTIONS)
        check_choice("objective.beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        check_choice("objective.weighting", self.weighting, WEIGHTINGS)
        _require_type("objective.learn_sigma", self.learn_sigma, bool)
        _require_type("objective.num_timesteps", self.num_timesteps, int)
        _require_type("objective.detail_pool", self.detail_pool, int)
        at_least("objective.num_timesteps", self.num_timesteps, 2)
        in_range("objective.beta_start", self.beta_start, 0.0, 1.0, open_low=True, open_high=True)
        in_range("objective.beta_end", self.beta_end, self.beta_start, 1.0, open_high=True)
        positive("objective.timestep_shift", self.timestep_shift)
        positive("objective.min_snr_gamma", self.min_snr_gamma)
        at_least("objective.detail_weight", self.detail_weight, 0.0)
        at_least("objective.detail_pool", self.detail_pool, 2)
        self._check_combination()

    def _check_combination(self) -> None:
        """Options that only go together: flow has no variance to learn and no SNR to weight by; zero
        terminal SNR needs a target that does not vanish at pure noise."""
        if self.zero_terminal_snr and self.prediction != "v":
            raise ConfigError(
                "key 'objective.zero_terminal_snr': needs prediction v: at zero SNR the input holds no "
                f"signal, so a {self.prediction!r} target cannot recover x0 (Lin et al. 2024, section 3.2)"
            )
        if self.prediction == "flow" and self.learn_sigma:
            raise ConfigError(
                "key 'objective.learn_sigma': must be false with prediction flow: "
                "rectified flow has no Gaussian reverse variance to learn"
            )
        if self.weighting == "min_snr" and self.prediction not in MIN_SNR_PREDICTIONS:
            raise ConfigError(
                f"key 'objective.weighting': min_snr is defined for prediction "
                f"{' or '.join(MIN_SNR_PREDICTIONS)}, not {self.prediction!r}"
            )


def _require_type(key: str, value: object, kind: type) -> None:
    """OmegaConf types the loaded keys; a section built in code gets the same check (bool is no int)."""
    if isinstance(value, bool) is not (kind is bool) or not isinstance(value, kind):
        raise ConfigError(f"key '{key}': {value!r} is not a {kind.__name__}")
