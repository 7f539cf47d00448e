"""Parity of tinyrpo.vae.AutoencoderKL with diffusers' AutoencoderKL on a tiny random VAE, loaded through files."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.util import max_rel_err, scaled_init_
from tinyrpo.vae import AutoencoderKL, VAEConfig

MANIFEST = Path(__file__).parent / "manifests" / "sd15_diffusers_vae.json"
TINY = VAEConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=32)
# Max error relative to the output's scale, with scaled_init_ weights, measured on this CPU: float64 8e-16
# (encoder mean / log-variance) and 1.4e-15 (decoder), float32 5e-7 / 1e-6. A planted bug in float64 (measured): GroupNorm
# eps 1e-5 for 1e-6 moves the outputs by 6e-6 .. 7e-6, the mid attention's scale or a residual by far more.
TOL64, TOL32 = 1e-12, 1e-5


def save_diffusers_folder(model: AutoencoderKL, folder: Path):
    """Write `model` in the diffusers `vae/` layout: diffusion_pytorch_model.safetensors + config.json."""
    cfg = model.cfg
    n = len(cfg.block_out_channels)
    config = {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "latent_channels": cfg.latent_channels,
        "block_out_channels": list(cfg.block_out_channels),
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": cfg.layers_per_block,
        "norm_num_groups": cfg.norm_num_groups,
        "act_fn": "silu",
        "sample_size": cfg.sample_size,
        "scaling_factor": cfg.scaling_factor,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    ours = scaled_init_(AutoencoderKL(TINY)).eval()
    folder = tmp_path_factory.mktemp("vae")
    save_diffusers_folder(ours, folder)
    ref, info = diffusers.AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32, output_loading_info=True,
                                                        low_cpu_mem_usage=False)
    # Every tensor of our file must land in diffusers' model, and none of theirs may stay randomly initialized.
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ref.eval()
    return ours, ref


@pytest.mark.parametrize("dtype, tol", [(torch.float64, TOL64), (torch.float32, TOL32)], ids=["fp64", "fp32"])
@torch.no_grad()
def test_encoder_matches_diffusers(pair, dtype, tol):
    ours, ref = (m.to(dtype) for m in pair)
    x = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(dtype)
    mean, logvar = ours.encode(x)
    dist = ref.encode(x).latent_dist
    f = ours.downsample_factor
    assert mean.shape == dist.mean.shape == (2, TINY.latent_channels, 32 // f, 32 // f) and mean.dtype == dtype
    err_mean, err_logvar = max_rel_err(mean, dist.mean), max_rel_err(logvar, dist.logvar)
    print(f"{dtype} encoder mean max_rel_err={err_mean:.2e} logvar max_rel_err={err_logvar:.2e}")
    assert err_mean <= tol and err_logvar <= tol


@pytest.mark.parametrize("dtype, tol", [(torch.float64, TOL64), (torch.float32, TOL32)], ids=["fp64", "fp32"])
@torch.no_grad()
def test_decoder_matches_diffusers(pair, dtype, tol):
    ours, ref = (m.to(dtype) for m in pair)
    z = torch.randn(2, TINY.latent_channels, 8, 8, generator=torch.Generator().manual_seed(2)).to(dtype)
    out, expected = ours.decode(z), ref.decode(z).sample
    assert out.shape == expected.shape == (2, 3, 8 * ours.downsample_factor, 8 * ours.downsample_factor)
    err = max_rel_err(out, expected)
    print(f"{dtype} decoder max_rel_err={err:.2e}")
    assert err <= tol


@torch.no_grad()
def test_latent_helpers(pair):
    ours, ref = (m.float() for m in pair)
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mean, logvar = ours.encode(x)
    s = TINY.scaling_factor
    torch.testing.assert_close(ours.encode_latents(x), mean * s)
    # Sampling: same generator state as diffusers' DiagonalGaussianDistribution.sample.
    lat = ours.encode_latents(x, generator=torch.Generator().manual_seed(4))
    ref_z = ref.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(4))
    assert max_rel_err(lat, ref_z * s) <= TOL32
    torch.testing.assert_close(ours.decode_latents(lat), ours.decode(lat / s).clamp(-1, 1))


def test_downsample_factor():
    assert AutoencoderKL(TINY).downsample_factor == 4
    assert AutoencoderKL(VAEConfig(block_out_channels=(8, 8), norm_num_groups=4)).downsample_factor == 2
    with torch.device("meta"):
        assert AutoencoderKL().downsample_factor == 8


def test_sd15_state_dict_matches_manifest():
    manifest = json.loads(MANIFEST.read_text())["tensors"]
    with torch.device("meta"):
        model = AutoencoderKL(VAEConfig())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(manifest) - set(ours))[:5] == [] and sorted(set(ours) - set(manifest))[:5] == []
    bad = [(k, ours[k], manifest[k]) for k in manifest if ours[k] != manifest[k]]
    assert bad == []
    assert len(ours) == 248
