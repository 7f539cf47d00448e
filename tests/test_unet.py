"""tinyrpo.unet against diffusers' UNet2DConditionModel (the oracle), at tiny configs, through files."""
import json
import pathlib

import pytest
import torch
from safetensors.torch import save_file

from tests.util import max_rel_err, randomize_, scaled_init_
from tinyrpo.unet import UNet, UNetConfig

MANIFEST = pathlib.Path(__file__).parent / "manifests" / "sd15_diffusers_unet.json"

TINY = {
    # 2 levels, attention only on the top one, 2 layers per level.
    "2lvl": UNetConfig(block_out_channels=(32, 64), layers_per_block=2, attention_levels=(True, False),
                       num_heads=2, cross_attention_dim=32, norm_num_groups=8, sample_size=8),
    # 3 levels like SD's pattern (attention, attention, none), 1 layer, 16 groups, 4 input channels -> 3 out.
    "3lvl": UNetConfig(in_channels=4, out_channels=3, block_out_channels=(32, 32, 64), layers_per_block=1,
                       attention_levels=(False, True, False), num_heads=2, cross_attention_dim=24,
                       norm_num_groups=16, sample_size=8),
}


def diffusers_unet_config(cfg: UNetConfig) -> dict:
    """The diffusers `config.json` of the same network (SD v1.5's unet/config.json at the defaults)."""
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)]
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": cfg.sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": down,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": up,
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "attention_head_dim": cfg.num_heads,  # diffusers' misnomer: the number of heads for SD v1
        "cross_attention_dim": cfg.cross_attention_dim,
        "norm_num_groups": cfg.norm_num_groups,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "center_input_sample": False,
        "use_linear_projection": False,
    }


# Max error relative to the output's scale, with scaled_init_ weights, measured on this CPU: 0 in float64 and
# 0 in float32 (the same ops in the same order). The tolerances leave room for other BLAS / CPUs; in float64
# a planted one-line bug stands far above them (measured): resnet GroupNorm eps 1e-6 for 1e-5 moves the output
# by 5e-6 .. 1.4e-5, tanh-GELU in GEGLU by 2e-4, an attention scale of head_dim^-0.25 by 0.4 .. 0.7.
TOL64, TOL32 = 1e-12, 1e-5


def _pair(cfg: UNetConfig, folder: pathlib.Path):
    """tinyrpo U-Net with weights at a trained network's scale, and diffusers' U-Net loaded from the files
    tinyrpo wrote."""
    diffusers = pytest.importorskip("diffusers")
    ours = scaled_init_(UNet(cfg)).eval()
    save_file(ours.state_dict(), str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(diffusers_unet_config(cfg)))
    ref = diffusers.UNet2DConditionModel.from_pretrained(str(folder)).eval()
    return ours, ref


@pytest.mark.parametrize("name", list(TINY))
def test_matches_diffusers(name, tmp_path):
    cfg = TINY[name]
    ours, ref = _pair(cfg, tmp_path)
    g = torch.Generator().manual_seed(1)
    B, hw = 2, 8
    x = torch.randn(B, cfg.in_channels, hw, hw, generator=g)
    ctx = torch.randn(B, 7, cfg.cross_attention_dim, generator=g)
    odd = torch.randn(1, cfg.in_channels, 7, 5, generator=g)
    for dtype, tol in ((torch.float64, TOL64), (torch.float32, TOL32)):
        ours, ref = ours.to(dtype), ref.to(dtype)
        errs = []
        with torch.no_grad():
            for t in (torch.tensor([3, 981]), torch.tensor(500), 999, torch.tensor([7.0])):
                want = ref(x.to(dtype), t, ctx.to(dtype)).sample
                got = ours(x.to(dtype), t, ctx.to(dtype))
                assert got.shape == (B, cfg.out_channels, hw, hw) and got.dtype == dtype
                errs.append(max_rel_err(got, want))
            # Odd latent sizes: the upsamplers must follow the skips' sizes, as diffusers does.
            errs.append(max_rel_err(ours(odd.to(dtype), 10, ctx[:1].to(dtype)),
                                    ref(odd.to(dtype), 10, ctx[:1].to(dtype)).sample))
        print(name, dtype, f"max_rel_err {max(errs):.1e}")
        assert max(errs) <= tol, (name, dtype, errs)


def test_gradient_checkpointing_same_output_and_grads():
    cfg = TINY["2lvl"]
    model = randomize_(UNet(cfg)).train()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 5, cfg.cross_attention_dim, generator=g, requires_grad=True)
    t = torch.tensor([10, 700])

    def run(ckpt):
        model.gradient_checkpointing = ckpt
        model.zero_grad(set_to_none=True)
        ctx.grad = None
        out = model(x, t, ctx)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}, ctx.grad.clone()

    out0, grads0, cgrad0 = run(False)
    out1, grads1, cgrad1 = run(True)
    assert all(b.gradient_checkpointing for b in model.down_blocks)
    assert torch.allclose(out0, out1, rtol=0, atol=1e-6)
    assert max_rel_err(cgrad1, cgrad0) <= 1e-5
    assert grads0.keys() == grads1.keys()
    for k in grads0:
        assert max_rel_err(grads1[k], grads0[k]) <= 1e-5, k


def test_sd15_state_dict_matches_manifest():
    with torch.device("meta"):
        model = UNet(UNetConfig())
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    manifest = json.loads(MANIFEST.read_text())
    want = manifest["tensors"]
    assert len(want) == manifest["n_tensors"]
    assert sorted(set(ours) - set(want)) == [] and sorted(set(want) - set(ours)) == []
    assert ours == want


def test_bf16_weights_run():
    # The time embedding follows the weights' dtype, so a bf16 model takes fp32-free inputs.
    cfg = TINY["3lvl"]
    model = randomize_(UNet(cfg)).eval().to(torch.bfloat16)
    x = torch.randn(1, cfg.in_channels, 8, 8, dtype=torch.bfloat16)
    ctx = torch.randn(1, 3, cfg.cross_attention_dim, dtype=torch.bfloat16)
    with torch.no_grad():
        out = model(x, 5, ctx)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
