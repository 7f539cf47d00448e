"""The noise schedule of Stable Diffusion v1, and the DDIM and DDPM samplers over it.

Notation follows Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM): β_t the per-step
noise variance, α_t = 1 - β_t, ᾱ_t = Π_{s<=t} α_s. Song et al. 2021, "Denoising Diffusion Implicit Models"
(DDIM), write α_t for what DDPM calls ᾱ_t; here it is always ᾱ_t (`alphas_cumprod`).

Timesteps are 0-indexed as in diffusers (0..999, where the papers say 1..1000), and both samplers give
the same numbers as diffusers' DDIMScheduler / DDPMScheduler with SD v1.5's scheduler_config.json, step
by step, including the random draws for a given torch.Generator. Every formula is computed in float32
on the sample's device; results come back in the sample's dtype.
"""
import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from tinyrpo.errors import UserError


@dataclass
class SchedulerConfig:
    """SD v1.5's scheduler_config.json (its `_class_name` is PNDMScheduler; the numbers are shared)."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # latent diffusion's: betas linear in sqrt(beta)
    steps_offset: int = 1  # sampling timesteps are shifted by one: 981, 961, ..., 1 for 50 steps
    set_alpha_to_one: bool = False  # DDIM's last step lands on ᾱ_0, not on ᾱ = 1
    clip_sample: bool = False  # latents are not bounded to [-1, 1], so x̂_0 is not clipped


# diffusers keys whose other values would change the math; tinyrpo implements SD v1's value only
_FIXED_KEYS = {"prediction_type": "epsilon", "timestep_spacing": "leading", "trained_betas": None,
               "rescale_betas_zero_snr": False, "thresholding": False, "variance_type": "fixed_small",
               "clip_sample_range": 1.0}


def from_diffusers_config(config: dict | str | Path) -> SchedulerConfig:
    """A SchedulerConfig from a diffusers `scheduler_config.json` (path or dict); other keys are ignored."""
    if not isinstance(config, dict):
        try:
            config = json.loads(Path(config).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read scheduler config {config}: {e}") from None
    for key, value in _FIXED_KEYS.items():
        if key in config and config[key] != value:
            what = ("a model trained to predict the noise ε (SD v1)" if key == "prediction_type"
                    else f"{key}={value!r} (SD v1's)")
            raise UserError(f"the scheduler config sets {key}={config[key]!r}, but tinyrpo supports only {what}; "
                            "use a Stable Diffusion v1 checkpoint")
    return SchedulerConfig(**{f.name: config[f.name] for f in fields(SchedulerConfig) if f.name in config})


def make_betas(cfg: SchedulerConfig) -> torch.Tensor:
    """β_1..β_T, float32 as diffusers computes them (float32 linspace, then squared for scaled_linear)."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "scaled_linear":
        return torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, T, dtype=torch.float32) ** 2
    if cfg.beta_schedule == "linear":  # Ho et al. 2020, sec. 4
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    raise UserError(f"beta_schedule {cfg.beta_schedule!r} is not supported; use 'scaled_linear' (SD v1) or 'linear'")


def _per_sample(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Shape a (B,) or () coefficient to broadcast over x (B, C, H, W)."""
    return a.reshape(-1, *[1] * (x.ndim - 1)) if a.ndim else a


class NoiseSchedule:
    """β_t, ᾱ_t and the closed forms that need nothing else: the forward process and x̂_0 from ε."""

    init_noise_sigma = 1.0  # x_T ~ N(0, I): the starting latents are not scaled

    def __init__(self, cfg: SchedulerConfig | None = None):
        self.cfg = cfg or SchedulerConfig()
        self.betas = make_betas(self.cfg)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # ᾱ_t, float32 on the CPU
        self.set_timesteps(self.cfg.num_train_timesteps)

    def alpha_bar(self, t, device=None) -> torch.Tensor:
        """ᾱ_t for an int or a LongTensor of timesteps, float32."""
        device = device or self.alphas_cumprod.device
        return self.alphas_cumprod.to(device)[torch.as_tensor(t, device=device)]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I), DDPM eq. (4); t is an int or (B,) timesteps."""
        a = _per_sample(self.alpha_bar(t, x0.device), x0)
        return (a ** 0.5 * x0.float() + (1 - a) ** 0.5 * noise.float()).to(x0.dtype)

    def pred_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """x̂_0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t): DDPM eq. (15) solved for x_0 (DDIM's "predicted x_0")."""
        a = _per_sample(self.alpha_bar(t, x_t.device), x_t)
        return ((x_t.float() - (1 - a) ** 0.5 * eps.float()) / a ** 0.5).to(x_t.dtype)

    def set_timesteps(self, num_inference_steps: int) -> torch.Tensor:
        """The sampling timesteps, descending: diffusers' "leading" spacing plus steps_offset.

        n steps out of T: t = (n-1)k, ..., k, 0 with k = T // n, each + steps_offset (SD v1: 981, ..., 21, 1
        for 50 steps). With n = T the offset would ask for t = T, which does not exist (diffusers fails
        there); the full chain T-1, ..., 0 of DDPM's Algorithm 2 is what n = T means, so that is used.
        """
        T, n = self.cfg.num_train_timesteps, num_inference_steps
        if not 1 <= n <= T:
            raise UserError(f"the number of sampling steps must be between 1 and {T}, got {n}")
        self.num_inference_steps, self.step_ratio = n, T // n
        offset = self.cfg.steps_offset if n < T else 0
        self.timesteps = (torch.arange(n) * self.step_ratio).flip(0) + offset
        return self.timesteps

    def _coefficients(self, t, final_alpha_bar: torch.Tensor):
        """ᾱ_t and ᾱ_prev of the step t -> t - T//n; past the last step (t - T//n < 0) ᾱ_prev is `final_alpha_bar`."""
        t, prev_t = int(t), int(t) - self.step_ratio
        a_t = self.alphas_cumprod[t]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else final_alpha_bar
        return a_t, a_prev

    def _clip(self, x0: torch.Tensor) -> torch.Tensor:
        return x0.clamp(-1, 1) if self.cfg.clip_sample else x0


def randn_like_diffusers(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, I) noise shaped like x, drawn as diffusers' `randn_tensor` draws it, so seeded runs line up.

    It draws on the generator's device in x's dtype (a CPU generator gives the same numbers everywhere)
    and then moves the noise to x's device.
    """
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


class DDIMScheduler(NoiseSchedule):
    """Song et al. 2021: deterministic for η = 0, DDPM-like ancestral sampling for η = 1."""

    def __init__(self, cfg: SchedulerConfig | None = None):
        super().__init__(cfg)
        # ᾱ_prev of the last step: 1 would denoise fully; SD v1 uses ᾱ_0 (set_alpha_to_one=False)
        self.final_alpha_bar = torch.tensor(1.0) if self.cfg.set_alpha_to_one else self.alphas_cumprod[0]

    def step(self, eps: torch.Tensor, t, x_t: torch.Tensor, eta: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """x_{t-k} from x_t and the predicted noise ε_θ(x_t, t) (k = T // n)."""
        a_t, a_prev = self._coefficients(t, self.final_alpha_bar)
        x, eps32 = x_t.float(), eps.float()
        x0 = self._clip((x - (1 - a_t) ** 0.5 * eps32) / a_t ** 0.5)  # "predicted x_0", eq. (12)
        # σ_t(η) = η sqrt((1 - ᾱ_prev) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_prev), eq. (16)
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        # x_prev = sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev - σ_t²) ε + σ_t z, eq. (12)
        x_prev = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * eps32
        if eta > 0:
            x_prev = x_prev + sigma * randn_like_diffusers(eps, generator).float()
        return x_prev.to(x_t.dtype)


class DDPMScheduler(NoiseSchedule):
    """Ho et al. 2020, Algorithm 2 (ancestral sampling) with the "fixed small" variance σ_t² = β̃_t.

    With fewer steps than T, a step t -> t-k uses that jump's own β = 1 - ᾱ_t / ᾱ_{t-k} (Nichol & Dhariwal
    2021, sec. 4), which is what diffusers' DDPMScheduler does after set_timesteps(n).
    """

    def step(self, eps: torch.Tensor, t, x_t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        a_t, a_prev = self._coefficients(t, torch.tensor(1.0))  # before x_0 there is no noise: ᾱ = 1
        alpha = a_t / a_prev
        beta = 1 - alpha
        x, eps32 = x_t.float(), eps.float()
        x0 = self._clip((x - (1 - a_t) ** 0.5 * eps32) / a_t ** 0.5)  # eq. (15)
        # posterior mean, eq. (7): μ̃_t(x_t, x̂_0) = sqrt(ᾱ_prev) β_t / (1 - ᾱ_t) x̂_0
        #                                        + sqrt(α_t) (1 - ᾱ_prev) / (1 - ᾱ_t) x_t
        mean = (a_prev ** 0.5 * beta) / (1 - a_t) * x0 + alpha ** 0.5 * (1 - a_prev) / (1 - a_t) * x
        if int(t) == 0:  # Algorithm 2: z = 0 on the last step (diffusers: `if t > 0`, also for a short chain)
            return mean.to(x_t.dtype)
        # posterior variance, eq. (7): β̃_t = (1 - ᾱ_prev) / (1 - ᾱ_t) β_t; "fixed small" σ_t² = β̃_t, sec. 3.2
        var = (1 - a_prev) / (1 - a_t) * beta
        return (mean + var ** 0.5 * randn_like_diffusers(eps, generator).float()).to(x_t.dtype)
