"""The Stable Diffusion v1 U-Net (ε-prediction), in plain PyTorch.

Built bottom-up: timestep embedding -> ResnetBlock2D -> attention / GEGLU feed-forward ->
BasicTransformerBlock -> Transformer2DModel -> down / mid / up blocks -> UNet.

Module attribute names equal diffusers' `UNet2DConditionModel` state-dict names for SD v1.x, so
`unet/diffusion_pytorch_model.safetensors` of a diffusers folder loads with a strict `load_state_dict`.
Mirrors diffusers/models/unets/unet_2d_condition.py, unet_2d_blocks.py, resnet.py,
transformers/transformer_2d.py and attention.py, with everything SD v1 does not use left out.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_levels: tuple = (True, True, True, False)  # which down levels have cross-attention; up levels mirror it; mid always has it
    num_heads: int = 8  # diffusers calls this `attention_head_dim=8` for SD v1, but it is the number of heads
    cross_attention_dim: int = 768  # CLIP ViT-L/14 text width
    norm_num_groups: int = 32
    sample_size: int = 64  # latent size the model was trained at (512 px / 8); informational


# ----------------------------------------------------------------------------- time


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of shape (B, dim), in float32.

    Equals diffusers' `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`: frequencies
    exp(-ln(max_period) * i / (dim/2)), i = 0 .. dim/2-1 (Vaswani et al. 2017, sec. 3.5). Kept in
    float32 because t * freq reaches ~1000 rad, where bf16 would lose the phase.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: Linear -> SiLU -> Linear."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


# ----------------------------------------------------------------------------- resnet


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-Conv twice, with the time embedding added between, plus a (1x1 conv) shortcut."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # one shift per channel
        h = self.conv2(F.silu(self.norm2(h)))  # (dropout p=0 in SD v1: left out)
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample2D(nn.Module):
    """Halve H and W with a stride-2 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling to `size` (2x, or the matching skip's size when H/W were odd), then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


# ----------------------------------------------------------------------------- transformer


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, else cross-attention on it."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        context_dim = dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers' [Linear, Dropout]: keeps the name to_out.0

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
        return self.to_out[0](rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection to 2x width, half of it gates the other half."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # diffusers' [GEGLU, Dropout, Linear]; the Dropout (p=0) keeps the output layer's name net.2.
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer layer: self-attention, cross-attention on the text, GEGLU MLP."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        return x


class Transformer2DModel(nn.Module):
    """A transformer over the H*W pixels of a feature map, with residual. SD v1: 1x1 conv in/out, one layer."""

    def __init__(self, ch: int, heads: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(ch, heads, context_dim)])
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x, context):
        h = self.proj_in(self.norm(x))
        # One token per pixel. rearrange alone would return a transposed view; copying once here spares each
        # LayerNorm a hidden copy and keeps the residual adds on contiguous memory.
        h = rearrange(h, "b c h w -> b (h w) c").contiguous()
        for block in self.transformer_blocks:
            h = block(h, context)
        h = rearrange(h, "b (h w) c -> b c h w", h=x.shape[2]).contiguous()  # NCHW like the rest
        return x + self.proj_out(h)


# ----------------------------------------------------------------------------- U-Net blocks


class _Stage(nn.Module):
    """Base of the down / mid / up blocks: runs their resnets and transformers, optionally checkpointed."""

    gradient_checkpointing = False  # set by UNet.gradient_checkpointing

    def _run(self, layer, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            # Recompute the layer's activations in backward instead of storing them.
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)


class DownBlock(_Stage):
    """diffusers CrossAttnDownBlock2D (attention=True) or DownBlock2D: (resnet [+ transformer]) x n, downsample.

    Returns the output and the skips it pushes for the up path: one per layer, plus the downsampled map.
    """

    def __init__(self, in_ch, out_ch, temb_dim, num_layers, attention, heads, context_dim, groups, downsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_dim, groups) for i in range(num_layers)])
        self.attentions = nn.ModuleList(
            [Transformer2DModel(out_ch, heads, context_dim, groups) for _ in range(num_layers)]) if attention else None
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch)]) if downsample else None

    def forward(self, x, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = self._run(resnet, x, temb)
            if self.attentions is not None:
                x = self._run(self.attentions[i], x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(_Stage):
    """diffusers UNetMidBlock2DCrossAttn: resnet, transformer, resnet at the lowest resolution."""

    def __init__(self, ch, temb_dim, heads, context_dim, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb_dim, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2DModel(ch, heads, context_dim, groups)])

    def forward(self, x, temb, context):
        x = self._run(self.resnets[0], x, temb)
        x = self._run(self.attentions[0], x, context)
        x = self._run(self.resnets[1], x, temb)
        return x


class UpBlock(_Stage):
    """diffusers CrossAttnUpBlock2D (attention=True) or UpBlock2D: (concat skip, resnet [+ transformer]) x n, upsample.

    `prev_ch`: channels coming from below; `skip_chs`: channels of the skips, in the order they are popped.
    """

    def __init__(self, prev_ch, out_ch, skip_chs, temb_dim, attention, heads, context_dim, groups, upsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D((prev_ch if i == 0 else out_ch) + s, out_ch, temb_dim, groups) for i, s in enumerate(skip_chs)])
        self.attentions = nn.ModuleList(
            [Transformer2DModel(out_ch, heads, context_dim, groups) for _ in skip_chs]) if attention else None
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, x, skips, temb, context, upsample_size=None):
        # `skips` in push order; the last pushed is used first.
        for i, (resnet, skip) in enumerate(zip(self.resnets, reversed(skips))):
            x = torch.cat([x, skip], dim=1)  # the skip connection: stack channels (frees the old x before the resnet)
            x = self._run(resnet, x, temb)
            if self.attentions is not None:
                x = self._run(self.attentions[i], x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


# ----------------------------------------------------------------------------- U-Net


class UNet(nn.Module):
    """ε-prediction U-Net: forward(noisy latent (B,4,h,w), timestep, text states (B,77,768)) -> noise (B,4,h,w)."""

    def __init__(self, cfg: UNetConfig | None = None):
        super().__init__()
        self.cfg = cfg = UNetConfig() if cfg is None else cfg
        chs, n, g = cfg.block_out_channels, cfg.layers_per_block, cfg.norm_num_groups
        attn_args = dict(heads=cfg.num_heads, context_dim=cfg.cross_attention_dim, groups=g)
        temb_dim = 4 * chs[0]
        levels = len(chs)

        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], temb_dim)

        # Down path. Skip channels are recorded in push order: conv_in's output, then each down block's.
        skip_chs = [chs[0]]
        self.down_blocks = nn.ModuleList()
        for lvl in range(levels):
            last = lvl == levels - 1
            self.down_blocks.append(DownBlock(chs[max(lvl - 1, 0)], chs[lvl], temb_dim, n, cfg.attention_levels[lvl],
                                              downsample=not last, **attn_args))
            skip_chs += [chs[lvl]] * (n + (0 if last else 1))

        self.mid_block = MidBlock(chs[-1], temb_dim, **attn_args)

        # Up path mirrors the down path; each up block takes n+1 skips (popped last-in, first-out).
        self.up_blocks = nn.ModuleList()
        prev = chs[-1]
        for lvl in reversed(range(levels)):
            mine, skip_chs = skip_chs[-(n + 1):], skip_chs[:-(n + 1)]
            self.up_blocks.append(UpBlock(prev, chs[lvl], mine[::-1], temb_dim, cfg.attention_levels[lvl],
                                          upsample=lvl > 0, **attn_args))
            prev = chs[lvl]
        assert not skip_chs

        self.conv_norm_out = nn.GroupNorm(g, chs[0], eps=1e-5)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, 3, padding=1)
        self.gradient_checkpointing = False

    @property
    def gradient_checkpointing(self) -> bool:
        return self._gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool):
        # Each resnet / transformer then runs under torch.utils.checkpoint while training.
        self._gradient_checkpointing = on
        for block in [*self.down_blocks, self.mid_block, *self.up_blocks]:
            block.gradient_checkpointing = on

    def forward(self, sample, timestep, encoder_hidden_states):
        B = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(B)  # int, 0-d, [1] or [B]
        w = self.time_embedding.linear_1.weight
        temb = self.time_embedding(timestep_embedding(t, w.shape[1]).to(w.dtype))  # (B, 4*C0)
        ctx = encoder_hidden_states

        # Down: every map a down block produces is pushed onto `skips` (SD v1.5: 12 maps, 64x64 .. 8x8).
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, pushed = block(x, temb, ctx)
            skips += pushed

        x = self.mid_block(x, temb, ctx)

        # Up: each block pops its n+1 skips and upsamples to the size of the next skip in line.
        for block in self.up_blocks:
            k = len(block.resnets)
            mine, skips = skips[-k:], skips[:-k]
            x = block(x, mine, temb, ctx, upsample_size=skips[-1].shape[-2:] if skips else None)

        return self.conv_out(F.silu(self.conv_norm_out(x)))
