"""The layouts of public checkpoints as rename rules: a file's module paths -> tinyrpo's (diffusers / HF names).

Shared by loading (tinyrpo/weights.py reads files through these tables) and export (tinyrpo/export.py runs
them backwards), so the two can never disagree. One table per network, built from the config by a few loops
(so a tiny model maps as well as SD v1.5), `{i}` standing for a layer index, the longest matching dotted
prefix winning. The few fixes that are not renames (1x1 convs stored where we have linears, DINO's fused
qkv) sit beside the tables.

Facts that trip converters:
- CompVis keeps the U-Net's down path as one flat `input_blocks` list (conv_in, then per level L x
  [resnet, attention?], then a downsampler of its own); an `output_blocks` upsampler sits at `.2.conv`
  after an attention and at `.1.conv` where the level has none. The VAE decoder's `up.i` is diffusers'
  `up_blocks.(n-1-i)`; its mid attention q/k/v/proj_out are 1x1 convs, diffusers' are linears.
- DINO's own attn.qkv fuses [q; k; v] by output rows.
"""
import re

import torch

from tinyrpo.unet import UNetConfig
from tinyrpo.vae import VAEConfig

# ---------------------------------------------------------------------------------------------------------
# Renaming by tables of dotted prefixes


class Renames:
    """A file's tensor names -> tinyrpo's, by a table of module paths; the longest matching prefix wins.

    The rest of a name is kept, so `input_blocks.1.1 -> down_blocks.0.attentions.0` carries every tensor
    inside that block. A name that matches no entry is unknown (None), or kept as is if `passthrough`.
    """

    def __init__(self, table: dict[str, str], passthrough: bool = False):
        self.table, self.passthrough = table, passthrough
        self.inverse = {v: k for k, v in table.items()}

    @staticmethod
    def _lookup(table: dict[str, str], name: str, keep: bool) -> str | None:
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            head = ".".join(parts[:n])
            if head in table:
                return ".".join([table[head], *parts[n:]])
        return name if keep else None

    def __call__(self, name: str) -> str | None:
        return self._lookup(self.table, name, self.passthrough)

    def file_name(self, ours: str) -> str:
        """The file's name for one of our tensors (to say which one is missing)."""
        return ours if self.passthrough else self._lookup(self.inverse, ours, True)


def expand(template: dict[str, str], num_layers: int) -> dict[str, str]:
    """A table with `{i}` entries written out for layers 0 .. num_layers-1 (gpt-fast's templated table)."""
    table = {}
    for a, b in template.items():
        table.update({a.format(i=i): b.format(i=i) for i in range(num_layers)} if "{i}" in a else {a: b})
    return table


# ---- the Stable Diffusion U-Net: CompVis ldm/modules/diffusionmodules/openaimodel.py -> diffusers

# Inside a ResBlock: CompVis keeps nn.Sequential indices (in_layers = [GroupNorm, SiLU, Conv], emb_layers =
# [SiLU, Linear], out_layers = [GroupNorm, SiLU, Dropout, Conv]); diffusers names the modules.
UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
               "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def compvis_unet_table(cfg: UNetConfig) -> dict[str, str]:
    """CompVis U-Net module paths -> ours. Inside an attention block (SpatialTransformer ->
    Transformer2DModel) the names already agree: norm, proj_in, transformer_blocks.*, proj_out."""
    n, L = len(cfg.block_out_channels), cfg.layers_per_block
    table = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}

    def resnet(src, dst):
        table.update({f"{src}.{a}": f"{dst}.{b}" for a, b in UNET_RESNET.items()})

    # input_blocks is one flat list: conv_in, then per level L x [resnet, attention?] and, on every level
    # but the last, a downsampler of its own. So level l, layer j sits at 1 + l*(L+1) + j.
    i = 1
    for lvl in range(n):
        for j in range(L):
            resnet(f"input_blocks.{i}.0", f"down_blocks.{lvl}.resnets.{j}")
            if cfg.attention_levels[lvl]:
                table[f"input_blocks.{i}.1"] = f"down_blocks.{lvl}.attentions.{j}"
            i += 1
        if lvl < n - 1:
            table[f"input_blocks.{i}.0.op"] = f"down_blocks.{lvl}.downsamplers.0.conv"
            i += 1
    resnet("middle_block.0", "mid_block.resnets.0")
    table["middle_block.1"] = "mid_block.attentions.0"
    resnet("middle_block.2", "mid_block.resnets.1")
    # output_blocks: deepest level first, L+1 x [resnet, attention?], the level's last one also holding the
    # upsampler, at index 2 after an attention and 1 otherwise.
    i = 0
    for u, lvl in enumerate(reversed(range(n))):
        attn = cfg.attention_levels[lvl]
        for j in range(L + 1):
            resnet(f"output_blocks.{i}.0", f"up_blocks.{u}.resnets.{j}")
            if attn:
                table[f"output_blocks.{i}.1"] = f"up_blocks.{u}.attentions.{j}"
            if j == L and lvl > 0:
                table[f"output_blocks.{i}.{2 if attn else 1}.conv"] = f"up_blocks.{u}.upsamplers.0.conv"
            i += 1
    return table


# ---- the VAE: CompVis ldm/modules/diffusionmodules/model.py (Encoder/Decoder) -> diffusers AutoencoderKL

VAE_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# The same block as saved by diffusers before 0.14 (many 2022-era uploads)
VAE_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def compvis_vae_table(cfg: VAEConfig) -> dict[str, str]:
    n, L = len(cfg.block_out_channels), cfg.layers_per_block
    table = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}

    def resnet(src, dst):  # same names as diffusers' ResnetBlock2D but for the shortcut
        table.update({f"{src}.{a}": f"{dst}.{a}" for a in ("norm1", "conv1", "norm2", "conv2")})
        table[f"{src}.nin_shortcut"] = f"{dst}.conv_shortcut"

    for part in ("encoder", "decoder"):
        table.update({f"{part}.conv_in": f"{part}.conv_in", f"{part}.norm_out": f"{part}.conv_norm_out",
                      f"{part}.conv_out": f"{part}.conv_out"})
        resnet(f"{part}.mid.block_1", f"{part}.mid_block.resnets.0")
        resnet(f"{part}.mid.block_2", f"{part}.mid_block.resnets.1")
        table.update({f"{part}.mid.attn_1.{a}": f"{part}.mid_block.attentions.0.{b}" for a, b in VAE_ATTENTION.items()})
    for lvl in range(n):
        for j in range(L):
            resnet(f"encoder.down.{lvl}.block.{j}", f"encoder.down_blocks.{lvl}.resnets.{j}")
        if lvl < n - 1:
            table[f"encoder.down.{lvl}.downsample.conv"] = f"encoder.down_blocks.{lvl}.downsamplers.0.conv"
        # The decoder's up.{lvl} works at resolution level lvl (up.0 is the full-size one, run last);
        # diffusers numbers its up_blocks in the order they run, so up.{lvl} is up_blocks.{n-1-lvl}.
        u = n - 1 - lvl
        for j in range(L + 1):
            resnet(f"decoder.up.{lvl}.block.{j}", f"decoder.up_blocks.{u}.resnets.{j}")
        if lvl > 0:
            table[f"decoder.up.{lvl}.upsample.conv"] = f"decoder.up_blocks.{u}.upsamplers.0.conv"
    return table


def vae_legacy_table() -> dict[str, str]:
    return {f"{part}.mid_block.attentions.0.{a}": f"{part}.mid_block.attentions.0.{b}"
            for part in ("encoder", "decoder") for a, b in VAE_LEGACY_ATTENTION.items()}


_VAE_ATTN_WEIGHT = re.compile(r"(en|de)coder\.mid_block\.attentions\.0\.to_(q|k|v|out\.0)\.weight")


def vae_conv_to_linear(name: str, t: torch.Tensor) -> torch.Tensor:
    """CompVis computes the VAE's mid attention q/k/v/proj_out with 1x1 convs [C, C, 1, 1]; we (and
    diffusers) use linears [C, C] over the flattened pixels: the same numbers, one reshape apart."""
    if _VAE_ATTN_WEIGHT.fullmatch(name) and t.ndim == 4 and t.shape[2:] == (1, 1):
        return t.flatten(1)
    return t


def vae_linear_to_conv(name: str, t: torch.Tensor) -> torch.Tensor:
    """The inverse of vae_conv_to_linear, for writing a CompVis file."""
    return t[:, :, None, None] if _VAE_ATTN_WEIGHT.fullmatch(name) and t.ndim == 2 else t


# ---- DINO ViT: HF transformers ViTModel and facebookresearch/dino (timm) -> tinyrpo (CLIP's block names)

DINO_HF = {
    "embeddings": "embeddings",
    "encoder.layer.{i}.layernorm_before": "encoder.layers.{i}.layer_norm1",
    "encoder.layer.{i}.attention.attention.query": "encoder.layers.{i}.self_attn.q_proj",
    "encoder.layer.{i}.attention.attention.key": "encoder.layers.{i}.self_attn.k_proj",
    "encoder.layer.{i}.attention.attention.value": "encoder.layers.{i}.self_attn.v_proj",
    "encoder.layer.{i}.attention.output.dense": "encoder.layers.{i}.self_attn.out_proj",
    "encoder.layer.{i}.layernorm_after": "encoder.layers.{i}.layer_norm2",
    "encoder.layer.{i}.intermediate.dense": "encoder.layers.{i}.mlp.fc1",
    "encoder.layer.{i}.output.dense": "encoder.layers.{i}.mlp.fc2",
    "layernorm": "layernorm",
}
DINO_ORIGINAL = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj": "embeddings.patch_embeddings.projection",
    "blocks.{i}.norm1": "encoder.layers.{i}.layer_norm1",
    "blocks.{i}.attn.q": "encoder.layers.{i}.self_attn.q_proj",  # q, k, v: the thirds of attn.qkv, see split_qkv
    "blocks.{i}.attn.k": "encoder.layers.{i}.self_attn.k_proj",
    "blocks.{i}.attn.v": "encoder.layers.{i}.self_attn.v_proj",
    "blocks.{i}.attn.proj": "encoder.layers.{i}.self_attn.out_proj",
    "blocks.{i}.norm2": "encoder.layers.{i}.layer_norm2",
    "blocks.{i}.mlp.fc1": "encoder.layers.{i}.mlp.fc1",
    "blocks.{i}.mlp.fc2": "encoder.layers.{i}.mlp.fc2",
    "norm": "layernorm",
}
_QKV = re.compile(r"(blocks\.\d+\.attn\.)qkv\.(weight|bias)")


def split_qkv(state: dict) -> dict:
    """DINO's attention is one Linear `attn.qkv` whose output rows are [q; k; v] (vision_transformer.py
    reshapes its output to (B, N, 3, heads, head_dim)); split it into the three projections we keep."""
    out = {}
    for k, t in state.items():
        m = _QKV.fullmatch(k)
        if m:
            for name, third in zip("qkv", t.chunk(3, dim=0)):
                out[f"{m[1]}{name}.{m[2]}"] = third
        else:
            out[k] = t
    return out



# ---- Stable Diffusion v1 single files: one state dict, a prefix per network

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
# Tensors real single files carry besides the weights: LatentDiffusion's noise-schedule buffers (we compute
# the schedule), the text encoder's position_ids, and the EMA: in "emaonly" files the plain weights are the
# EMA weights; other files (v1-5-pruned) add model_ema.<name-without-dots> copies beside the raw training
# weights, and, like diffusers' converter by default, we load the plain ones.
# A single file has no config.json: what tensor shapes cannot tell (head counts, the VAE's scaling factor, the
# sample size, the noise schedule) a loader guesses as SD v1.5's. tinyrpo.export therefore writes the diffusers
# configs into the file's header, as JSON under these keys, and tinyrpo.weights reads them back; public files
# carry none and are read as before.
CONFIG_KEYS = {"unet": "tinyrpo.unet_config", "vae": "tinyrpo.vae_config",
               "text_encoder": "tinyrpo.text_encoder_config", "scheduler": "tinyrpo.scheduler_config"}
SCHEDULE_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2"}


def schedule_buffers(betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """The SCHEDULE_BUFFERS values, as LatentDiffusion.register_schedule computes them from β (ldm/models/
    diffusion/ddpm.py): loaders ignore them, writers of a single file include them, as real files do."""
    betas = betas.double()
    a = torch.cumprod(1 - betas, 0)
    a_prev = torch.cat([torch.ones(1, dtype=a.dtype), a[:-1]])
    var = betas * (1 - a_prev) / (1 - a)
    out = {"betas": betas, "alphas_cumprod": a, "alphas_cumprod_prev": a_prev, "sqrt_alphas_cumprod": a.sqrt(),
           "sqrt_one_minus_alphas_cumprod": (1 - a).sqrt(), "log_one_minus_alphas_cumprod": (1 - a).log(),
           "sqrt_recip_alphas_cumprod": (1 / a).sqrt(), "sqrt_recipm1_alphas_cumprod": (1 / a - 1).sqrt(),
           "posterior_variance": var, "posterior_log_variance_clipped": var.clamp_min(1e-20).log(),
           "posterior_mean_coef1": betas * a_prev.sqrt() / (1 - a),
           "posterior_mean_coef2": (1 - a_prev) * (1 - betas).sqrt() / (1 - a)}
    return {k: v.float() for k, v in out.items()}


def compvis_single_file(unet_state: dict, unet_cfg: UNetConfig, vae_state: dict, vae_cfg: VAEConfig,
                        text_state: dict, betas: torch.Tensor) -> dict[str, torch.Tensor]:
    """tinyrpo's three networks as one CompVis-layout SD v1 single-file state dict (v1-5-pruned-emaonly's
    names): the loader's tables run backwards, the 1x1-conv fix undone, position_ids and the schedule added."""
    unet_names, vae_names = Renames(compvis_unet_table(unet_cfg)), Renames(compvis_vae_table(vae_cfg))
    state = {UNET_PREFIX + unet_names.file_name(k): t for k, t in unet_state.items()}
    state.update({VAE_PREFIX + vae_names.file_name(k): vae_linear_to_conv(k, t) for k, t in vae_state.items()})
    state.update({TEXT_PREFIX + k: t for k, t in text_state.items()})
    positions = text_state["text_model.embeddings.position_embedding.weight"].shape[0]
    state[TEXT_PREFIX + "text_model.embeddings.position_ids"] = torch.arange(positions)[None]
    state.update(schedule_buffers(betas))
    return state
