"""tinyrpo's DDIM / DDPM samplers against diffusers' schedulers built from SD v1.5's scheduler_config.json.

Both sides run whole trajectories from the same x_T, each feeding its own x_t to the same pseudo noise
predictor ε(x, t) (a fixed function, so any drift would compound), with identically seeded generators
for the random draws. Every step's output must agree within 1e-6.
"""
import json

import pytest
import torch
from diffusers import DDIMScheduler as RefDDIM
from diffusers import DDPMScheduler as RefDDPM

from tinyrpo.errors import UserError
from tinyrpo.schedulers import (DDIMScheduler, DDPMScheduler, NoiseSchedule, SchedulerConfig,
                                from_diffusers_config)

# SD v1.5's scheduler/scheduler_config.json, verbatim
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
SHAPE = (2, 4, 8, 8)
TOL = 1e-6


def fake_eps(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for ε_θ(x_t, t) that depends on both arguments."""
    fixed = torch.randn(SHAPE, generator=torch.Generator().manual_seed(123))
    return 0.5 * x + fixed * (0.5 + int(t) / 1000)


def run(scheduler, timesteps, step_kwargs, seed):
    """The trajectory x_T, ..., x_0 of one scheduler, with a generator seeded `seed` for its draws."""
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(seed)
    xs = [x]
    for t in timesteps:
        out = scheduler.step(fake_eps(x, t), t, x, generator=gen, **step_kwargs)
        x = out.prev_sample if hasattr(out, "prev_sample") else out
        xs.append(x)
    return torch.stack(xs)


def test_config_defaults_are_sd15():
    assert from_diffusers_config(SD15_SCHEDULER_CONFIG) == SchedulerConfig()


def test_from_diffusers_config_reads_a_file_and_refuses_other_models(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({**SD15_SCHEDULER_CONFIG, "prediction_type": "epsilon", "steps_offset": 0}))
    assert from_diffusers_config(path) == SchedulerConfig(steps_offset=0)
    with pytest.raises(UserError, match="prediction_type='v_prediction'.*noise"):
        from_diffusers_config({**SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction"})  # SD 2.x 768
    with pytest.raises(UserError, match="timestep_spacing"):
        from_diffusers_config({**SD15_SCHEDULER_CONFIG, "timestep_spacing": "trailing"})
    with pytest.raises(UserError, match="cannot read"):
        from_diffusers_config(tmp_path / "missing.json")


def test_noise_schedule_and_add_noise():
    ours, ref = NoiseSchedule(), RefDDPM.from_config(SD15_SCHEDULER_CONFIG)
    assert torch.equal(ours.betas, ref.betas) and torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(ours.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-5)
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.tensor([0, 999])
    x_t = ours.add_noise(x0, noise, t)
    assert (x_t - ref.add_noise(x0, noise, t)).abs().max() <= TOL
    # eq. (4) by hand, and x̂_0 inverts it
    a = ours.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=TOL)
    assert torch.allclose(ours.pred_x0(x_t, noise, t), x0, atol=1e-4)
    assert torch.allclose(ours.add_noise(x0, noise, 500), ours.add_noise(x0, noise, torch.tensor([500, 500])))
    assert ours.add_noise(x0.half(), noise.half(), t).dtype == torch.float16


@pytest.mark.parametrize("steps", [50, 20])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers(steps, eta):
    ours, ref = DDIMScheduler(), RefDDIM.from_config(SD15_SCHEDULER_CONFIG)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert ours.timesteps[0] == 1000 - 1000 // steps + 1 and ours.timesteps[-1] == 1
    got = run(ours, ours.timesteps, {"eta": eta}, seed=7)
    want = run(ref, ref.timesteps, {"eta": eta}, seed=7)
    assert (got - want).abs().max() <= TOL
    assert got[-1].abs().max() > 0.1  # the trajectory did something


def test_ddim_eta0_is_deterministic_and_eta1_draws_noise():
    s = DDIMScheduler()
    s.set_timesteps(20)
    a = run(s, s.timesteps, {"eta": 0.0}, seed=1)
    assert torch.equal(a, run(s, s.timesteps, {"eta": 0.0}, seed=2))
    assert not torch.equal(run(s, s.timesteps, {"eta": 1.0}, seed=1), run(s, s.timesteps, {"eta": 1.0}, seed=2))


def test_ddpm_50_steps_matches_diffusers():
    ours, ref = DDPMScheduler(), RefDDPM.from_config(SD15_SCHEDULER_CONFIG)
    ours.set_timesteps(50)
    ref.set_timesteps(50)
    assert torch.equal(ours.timesteps, ref.timesteps)
    got, want = run(ours, ours.timesteps, {}, seed=3), run(ref, ref.timesteps, {}, seed=3)
    assert (got - want).abs().max() <= TOL


def test_ddpm_1000_steps_matches_diffusers_full_chain():
    # diffusers' set_timesteps(1000) with steps_offset=1 asks for t = 1000 and fails with an IndexError; its
    # chain without set_timesteps is Algorithm 2's 999, ..., 0, which is what tinyrpo gives for 1000 steps.
    ours, ref = DDPMScheduler(), RefDDPM.from_config(SD15_SCHEDULER_CONFIG)
    ours.set_timesteps(1000)
    assert torch.equal(ours.timesteps, ref.timesteps) and ours.timesteps[0] == 999
    got, want = run(ours, ours.timesteps, {}, seed=4), run(ref, ref.timesteps, {}, seed=4)
    assert (got - want).abs().max() <= TOL


def test_same_numbers_in_half_precision_input():
    # fp16 samples are computed in float32 and come back in fp16
    s = DDIMScheduler()
    s.set_timesteps(10)
    x = torch.randn(SHAPE)
    t = s.timesteps[3]
    out = s.step(fake_eps(x, t).half(), t, x.half())
    assert out.dtype == torch.float16
    assert (out.float() - s.step(fake_eps(x, t).half().float(), t, x.half().float())).abs().max() < 1e-2
