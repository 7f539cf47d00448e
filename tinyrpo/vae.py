"""The Stable Diffusion v1 KL autoencoder (Rombach et al. 2022, "High-Resolution Image Synthesis with
Latent Diffusion Models", sec. 3.1), encoder and decoder.

It maps a (B, 3, H, W) image in [-1, 1] to a diagonal Gaussian over (B, 4, H/8, W/8) latents and back.
The U-Net never sees raw latents: they are multiplied by `scaling_factor` (0.18215 for SD v1) so that
their variance is about 1. The VAE is frozen throughout RPO, so nothing here needs gradients.

Mirrors diffusers' `AutoencoderKL` (models/autoencoders/autoencoder_kl.py, vae.py) and keeps its module
names, so a diffusers `vae/diffusion_pytorch_model.safetensors` loads with a strict `load_state_dict`.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

EPS = 1e-6  # every GroupNorm of the VAE uses eps 1e-6 (the U-Net uses 1e-5)


@dataclass
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # SD v1: latents are scaled by this before the U-Net sees them
    sample_size: int = 512


class ResnetBlock2D(nn.Module):
    """GroupNorm → SiLU → conv, twice, plus a (1×1-projected if the width changes) skip. No time embedding."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=EPS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=EPS)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class Attention(nn.Module):
    """Single-head self-attention over the H·W positions of the lowest-resolution feature map."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # diffusers' to_out.0 (.1 is dropout)

    def forward(self, x):
        h = rearrange(self.group_norm(x), "b c h w -> b (h w) c")  # one token per pixel
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C): one head
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        h = rearrange(self.to_out[0](h), "b (h w) c -> b c h w", h=x.shape[2])
        return x + h


class MidBlock(nn.Module):
    """resnet → attention → resnet at the bottom of both encoder and decoder."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups)])

    def forward(self, x):
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Stride-2 3×3 conv with no built-in padding; the input is padded by one pixel on the right and bottom
    only, as in the original CompVis VAE (diffusers: Downsample2D with padding=0)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if add_downsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if add_upsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """image → 2·latent_channels moments (mean and log-variance), downsampled by 2 at every level but the last."""

    def __init__(self, in_channels: int, latent_channels: int, block_out_channels: tuple, layers_per_block: int,
                 groups: int):
        super().__init__()
        chs = block_out_channels
        self.conv_in = nn.Conv2d(in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock(chs[max(i - 1, 0)], chs[i], layers_per_block, groups, add_downsample=i < len(chs) - 1)
            for i in range(len(chs))
        ])
        self.mid_block = MidBlock(chs[-1], groups)
        self.conv_norm_out = nn.GroupNorm(groups, chs[-1], eps=EPS)
        self.conv_out = nn.Conv2d(chs[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """latent → image, the encoder mirrored, with one extra resnet per level (layers_per_block + 1)."""

    def __init__(self, latent_channels: int, out_channels: int, block_out_channels: tuple, layers_per_block: int,
                 groups: int):
        super().__init__()
        chs = tuple(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(latent_channels, chs[0], 3, padding=1)
        self.mid_block = MidBlock(chs[0], groups)
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock(chs[max(i - 1, 0)], chs[i], layers_per_block + 1, groups, add_upsample=i < len(chs) - 1)
            for i in range(len(chs))
        ])
        self.conv_norm_out = nn.GroupNorm(groups, chs[-1], eps=EPS)
        self.conv_out = nn.Conv2d(chs[-1], out_channels, 3, padding=1)

    def forward(self, z):
        x = self.conv_in(z)
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg if cfg is not None else VAEConfig()
        self.encoder = Encoder(cfg.in_channels, cfg.latent_channels, cfg.block_out_channels, cfg.layers_per_block,
                               cfg.norm_num_groups)
        self.decoder = Decoder(cfg.latent_channels, cfg.out_channels, cfg.block_out_channels, cfg.layers_per_block,
                               cfg.norm_num_groups)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.cfg.block_out_channels) - 1)

    def encode(self, x):
        """Images in [-1, 1] → (mean, logvar) of the posterior q(z|x), each (B, latent_channels, H/f, W/f)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution, so exp() stays finite

    def decode(self, z):
        """Unscaled latents (latents / scaling_factor) → images, roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def encode_latents(self, x, generator: torch.Generator | None = None):
        """Images → U-Net-ready latents: the posterior mean, or a sample z = μ + σ·ε if a generator is given."""
        mean, logvar = self.encode(x)
        z = mean
        if generator is not None:
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * eps
        return z * self.cfg.scaling_factor

    def decode_latents(self, latents):
        """U-Net latents → images in [-1, 1]."""
        return self.decode(latents / self.cfg.scaling_factor).clamp(-1.0, 1.0)
