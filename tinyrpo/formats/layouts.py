"""The layouts of public checkpoints: what a file's names and config.json mean in tinyrpo's terms.

    rename rules    a file's module paths -> tinyrpo's (diffusers / HF names), one table per network
    configs         our config dataclasses read off tensor shapes or a diffusers / HF config.json,
                    and written back as those config.json files

Shared by loading (tinyrpo/formats/weights.py reads files through these tables and readers) and writing
(tinyrpo/formats/exports.py and tinyrpo/toy/models.py run them backwards), so the two can never disagree. Each table
is built from the config by a few loops (so a tiny model maps as well as SD v1.5), `{i}` standing for a
layer index, the longest matching dotted prefix winning. The few fixes that are not renames (1x1 convs
stored where we have linears, DINO's fused qkv) sit beside the tables.

Facts that trip converters:
- CompVis keeps the U-Net's down path as one flat `input_blocks` list (conv_in, then per level L x
  [resnet, attention?], then a downsampler of its own); an `output_blocks` upsampler sits at `.2.conv`
  after an attention and at `.1.conv` where the level has none. The VAE decoder's `up.i` is diffusers'
  `up_blocks.(n-1-i)`; its mid attention q/k/v/proj_out are 1x1 convs, diffusers' are linears.
- DINO's own attn.qkv fuses [q; k; v] by output rows.
- diffusers' `attention_head_dim: 8` in an SD v1 unet/config.json is the number of heads, not their size.
- openai's CLIP config.json files say eos_token_id 2 (transformers then pools at argmax(ids), which is
  49407 for real prompts); we pool at the first 49407 either way.
- A single file carries no config: sizes are read off shapes (as openai/CLIP's build_model does), head counts
  follow SD v1's / OpenAI's rule unless its header carries the configs tinyrpo.export writes (CONFIG_KEYS).
"""
import re

import torch

from tinyrpo.clip import CLIPTextConfig, CLIPVisionConfig
from tinyrpo.dino import DINOConfig
from tinyrpo.errors import UserError
from tinyrpo.schedulers import SchedulerConfig
from tinyrpo.unet import UNetConfig
from tinyrpo.vae import VAEConfig


class WeightsError(UserError):
    """A weight file that is missing, unreadable, or not the model it was given as."""


SD1_ONLY = "tinyrpo supports Stable Diffusion v1.x only (e.g. v1-5-pruned-emaonly.safetensors)"

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
# configs into the file's header, as JSON under these keys, and tinyrpo.formats.weights reads them back; public files
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


# ---------------------------------------------------------------------------------------------------------
# Configs read off a file's tensor shapes. `p` is a weights.Part: its tensors (`p.state`), `p.shape(name)`,
# which raises the error naming a missing tensor, and `p.source`, the file.


def indices(names, pattern: str) -> list[int]:
    """The distinct integers matched by the one group of `pattern` at the start of names, sorted."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in names if (m := rx.match(k))})


def infer_compvis_unet_config(p) -> UNetConfig:
    """Every U-Net size from the CompVis names' shapes; heads and groups cannot be seen, so SD v1's 8 and 32."""
    n_in = len(indices(p.state, r"input_blocks\.(\d+)\."))
    ops = indices(p.state, r"input_blocks\.(\d+)\.0\.op\.")
    L = ops[0] - 1 if ops else n_in - 1  # the first downsampler follows level 0's L layers
    levels = max(1, n_in // (L + 1)) if L > 0 else 1  # conv_in + n*L layers + (n-1) downsamplers = n*(L+1)
    chs, attn = [], []
    for lvl in range(levels):
        i = 1 + lvl * (L + 1)
        chs.append(p.shape(f"input_blocks.{i}.0.out_layers.3.weight")[0])
        attn.append(f"input_blocks.{i}.1.proj_in.weight" in p.state)
    proj_in = p.shape("middle_block.1.proj_in.weight")
    if len(proj_in) == 2:  # SD 2.x uses linear proj_in/proj_out (use_linear_projection)
        raise WeightsError(f"{p.source} has linear attention projections (proj_in {list(proj_in)}): it is a "
                           f"Stable Diffusion 2.x U-Net; " + SD1_ONLY)
    context = p.shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1]
    return UNetConfig(in_channels=p.shape("input_blocks.0.0.weight")[1], out_channels=p.shape("out.2.weight")[0],
                      block_out_channels=tuple(chs), layers_per_block=L, attention_levels=tuple(attn),
                      num_heads=8, cross_attention_dim=context, norm_num_groups=32)


def infer_compvis_vae_config(p) -> VAEConfig:
    levels = indices(p.state, r"encoder\.down\.(\d+)\.")
    chs = tuple(p.shape(f"encoder.down.{i}.block.0.conv2.weight")[0] for i in levels)
    return VAEConfig(in_channels=p.shape("encoder.conv_in.weight")[1],
                     out_channels=p.shape("decoder.conv_out.weight")[0],
                     latent_channels=p.shape("post_quant_conv.weight")[0], block_out_channels=chs,
                     layers_per_block=len(indices(p.state, r"encoder\.down\.0\.block\.(\d+)\.")),
                     norm_num_groups=32)


def infer_clip_text_config(p, hf: dict | None = None, prefix: str = "text_model.") -> CLIPTextConfig:
    """Sizes from shapes; heads, eps and activation from an HF config when there is one, else OpenAI's
    (heads = width / 64, as openai/CLIP's build_model)."""
    hf = hf or {}
    vocab, width = p.shape(prefix + "embeddings.token_embedding.weight")
    eos = hf.get("eos_token_id")  # openai's config.json files say 2, a leftover: keep 49407 then
    return CLIPTextConfig(vocab_size=vocab, hidden_size=width,
                          intermediate_size=p.shape(prefix + "encoder.layers.0.mlp.fc1.weight")[0],
                          num_layers=len(indices(p.state, re.escape(prefix) + r"encoder\.layers\.(\d+)\.")),
                          num_heads=hf.get("num_attention_heads", max(1, width // 64)),
                          max_position_embeddings=p.shape(prefix + "embeddings.position_embedding.weight")[0],
                          layer_norm_eps=hf.get("layer_norm_eps", 1e-5), hidden_act=hf.get("hidden_act", "quick_gelu"),
                          eos_token_id=eos if isinstance(eos, int) and eos > 2 else CLIPTextConfig.eos_token_id)


def infer_clip_vision_config(p, hf: dict | None = None) -> CLIPVisionConfig:
    """The vision tower of an HF CLIPModel, as infer_clip_text_config: B/32, B/16 and L/14 alike."""
    hf = hf or {}
    width = p.shape("vision_model.embeddings.class_embedding")[0]
    _, channels, patch, _ = p.shape("vision_model.embeddings.patch_embedding.weight")
    positions = p.shape("vision_model.embeddings.position_embedding.weight")[0]
    grid = round((positions - 1) ** 0.5)  # one position per patch of a square image, plus the class token
    return CLIPVisionConfig(hidden_size=width,
                            intermediate_size=p.shape("vision_model.encoder.layers.0.mlp.fc1.weight")[0],
                            num_layers=len(indices(p.state, r"vision_model\.encoder\.layers\.(\d+)\.")),
                            num_heads=hf.get("num_attention_heads", max(1, width // 64)), image_size=grid * patch,
                            patch_size=patch, num_channels=channels, layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
                            hidden_act=hf.get("hidden_act", "quick_gelu"))


def infer_dino_config(p, hf: dict | None, layer_norm_eps: float) -> DINOConfig:
    """A DINO ViT under our names; heads from the HF config when there is one, else width / 64 (ViT-S/16: 6).
    The eps is the caller's: it depends on the layout the file came in (weights.dino_part)."""
    hf = hf or {}
    width = p.shape("embeddings.cls_token")[-1]
    _, channels, patch, _ = p.shape("embeddings.patch_embeddings.projection.weight")
    grid = round((p.shape("embeddings.position_embeddings")[1] - 1) ** 0.5)
    return DINOConfig(hidden_size=width, num_layers=len(indices(p.state, r"encoder\.layers\.(\d+)\.")),
                      num_heads=hf.get("num_attention_heads", max(1, width // 64)),
                      intermediate_size=p.shape("encoder.layers.0.mlp.fc1.weight")[0], patch_size=patch,
                      image_size=grid * patch, num_channels=channels, layer_norm_eps=layer_norm_eps,
                      hidden_act=hf.get("hidden_act", "gelu"))


# ---------------------------------------------------------------------------------------------------------
# Configs read from diffusers' config.json (scheduler_config.json: schedulers.from_diffusers_config)

# diffusers UNet2DConditionModel options whose other values are other models (SD 2.x, SDXL, ...) or
# change the math; SD v1 uses these.
SD1_UNET_OPTIONS = {"use_linear_projection": False, "addition_embed_type": None, "class_embed_type": None,
                    "encoder_hid_dim": None, "transformer_layers_per_block": 1, "only_cross_attention": False,
                    "dual_cross_attention": False, "mid_block_type": "UNetMidBlock2DCrossAttn",
                    "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "norm_eps": 1e-5,
                    "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
                    "conv_in_kernel": 3, "conv_out_kernel": 3, "center_input_sample": False,
                    "num_class_embeds": None, "time_cond_proj_dim": None}


def unet_config_from_diffusers(d: dict, source: str = "unet/config.json") -> UNetConfig:
    """UNetConfig from diffusers' unet/config.json, refusing what SD v1 never uses."""
    for key, want in SD1_UNET_OPTIONS.items():
        got = d.get(key, want)
        if got != want and not (isinstance(got, list) and all(g == want for g in got)):
            model = ("an SDXL U-Net" if key == "addition_embed_type"
                     else "an SD 2.x U-Net" if key == "use_linear_projection" else "not an SD v1 U-Net")
            raise WeightsError(f"{source} sets {key}={got!r} (SD v1: {want!r}): {model}; " + SD1_ONLY)
    down, up = d.get("down_block_types", []), d.get("up_block_types", [])
    attn = [t == "CrossAttnDownBlock2D" for t in down]
    known = {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}
    if not down or set(down + up) - known or [t == "CrossAttnUpBlock2D" for t in up][::-1] != attn:
        raise WeightsError(f"{source} has blocks {down} / {up}, not an SD v1 U-Net's; " + SD1_ONLY)
    # diffusers' `attention_head_dim` is, for SD v1, the number of heads (8), not a head size: its
    # UNet2DConditionModel reads `num_attention_heads or attention_head_dim` as the head count.
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    if isinstance(heads, list):
        if len(set(heads)) != 1:
            raise WeightsError(f"{source} has a different head count per level {heads}: an SD 2.x U-Net; " + SD1_ONLY)
        heads = heads[0]
    ctx = d.get("cross_attention_dim", 768)
    if ctx == 1024:
        raise WeightsError(f"{source} has cross_attention_dim 1024 (OpenCLIP ViT-H text states): an SD 2.x "
                           "U-Net; " + SD1_ONLY)
    return UNetConfig(in_channels=d.get("in_channels", 4), out_channels=d.get("out_channels", 4),
                      block_out_channels=tuple(d["block_out_channels"]), layers_per_block=d.get("layers_per_block", 2),
                      attention_levels=tuple(attn), num_heads=heads, cross_attention_dim=ctx,
                      norm_num_groups=d.get("norm_num_groups", 32), sample_size=d.get("sample_size", 64))


def vae_config_from_diffusers(d: dict) -> VAEConfig:
    return VAEConfig(in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
                     latent_channels=d.get("latent_channels", 4), block_out_channels=tuple(d["block_out_channels"]),
                     layers_per_block=d.get("layers_per_block", 2), norm_num_groups=d.get("norm_num_groups", 32),
                     scaling_factor=d.get("scaling_factor", 0.18215), sample_size=d.get("sample_size", 512))


# ---------------------------------------------------------------------------------------------------------
# Configs written as diffusers' / HF's config.json: the readers above (and from_diffusers_config), run backwards


def unet_config_json(cfg: UNetConfig) -> dict:
    return {"_class_name": "UNet2DConditionModel", "act_fn": "silu",
            "attention_head_dim": cfg.num_heads,  # diffusers' name for SD v1's number of heads
            "block_out_channels": list(cfg.block_out_channels), "center_input_sample": False,
            "cross_attention_dim": cfg.cross_attention_dim,
            "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels],
            "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": cfg.in_channels,
            "layers_per_block": cfg.layers_per_block, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
            "norm_num_groups": cfg.norm_num_groups, "out_channels": cfg.out_channels, "sample_size": cfg.sample_size,
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in cfg.attention_levels[::-1]]}


def vae_config_json(cfg: VAEConfig) -> dict:
    n = len(cfg.block_out_channels)
    return {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": list(cfg.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * n, "in_channels": cfg.in_channels,
            "latent_channels": cfg.latent_channels, "layers_per_block": cfg.layers_per_block,
            "norm_num_groups": cfg.norm_num_groups, "out_channels": cfg.out_channels, "sample_size": cfg.sample_size,
            "scaling_factor": cfg.scaling_factor, "up_block_types": ["UpDecoderBlock2D"] * n}


def scheduler_config_json(cfg: SchedulerConfig) -> dict:
    # SD v1.5 ships a PNDMScheduler config; every diffusers scheduler reads these numbers.
    return {"_class_name": "PNDMScheduler", "num_train_timesteps": cfg.num_train_timesteps,
            "beta_start": cfg.beta_start, "beta_end": cfg.beta_end, "beta_schedule": cfg.beta_schedule,
            "steps_offset": cfg.steps_offset, "set_alpha_to_one": cfg.set_alpha_to_one,
            "clip_sample": cfg.clip_sample, "skip_prk_steps": True, "prediction_type": "epsilon",
            "timestep_spacing": "leading", "trained_betas": None}


MODEL_INDEX_JSON = {"_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None],
                    "requires_safety_checker": False, "safety_checker": [None, None],
                    "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
                    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
                    "vae": ["diffusers", "AutoencoderKL"]}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _clip_text_fields(cfg: CLIPTextConfig) -> dict:
    return {"model_type": "clip_text_model", "hidden_act": cfg.hidden_act, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_heads,
            "num_hidden_layers": cfg.num_layers, "max_position_embeddings": cfg.max_position_embeddings,
            "layer_norm_eps": cfg.layer_norm_eps, "vocab_size": cfg.vocab_size, "bos_token_id": 49406,
            "eos_token_id": cfg.eos_token_id, "pad_token_id": 1}


def text_config_json(cfg: CLIPTextConfig, dtype: torch.dtype) -> dict:
    """An SD folder's text_encoder/config.json (an HF CLIPTextModel)."""
    return {"architectures": ["CLIPTextModel"], **_clip_text_fields(cfg), "projection_dim": cfg.hidden_size,
            "torch_dtype": _dtype_name(dtype)}


def clip_config_json(cfg, dtype: torch.dtype) -> dict:
    """An HF CLIPModel's config.json (openai/clip-vit-* layout), from a clip.CLIPConfig."""
    v = cfg.vision
    return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.projection_dim,
            "logit_scale_init_value": 2.6592, "torch_dtype": _dtype_name(dtype),
            "text_config": {**_clip_text_fields(cfg.text), "projection_dim": cfg.projection_dim},
            "vision_config": {"model_type": "clip_vision_model", "hidden_act": v.hidden_act, "hidden_size": v.hidden_size,
                              "intermediate_size": v.intermediate_size, "num_attention_heads": v.num_heads,
                              "num_hidden_layers": v.num_layers, "image_size": v.image_size,
                              "patch_size": v.patch_size, "num_channels": v.num_channels,
                              "layer_norm_eps": v.layer_norm_eps, "projection_dim": cfg.projection_dim}}


def dino_config_json(cfg: DINOConfig, dtype: torch.dtype) -> dict:
    """An HF ViTModel's config.json (facebook/dino-vits16's)."""
    return {"architectures": ["ViTModel"], "model_type": "vit", "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "intermediate_size": cfg.intermediate_size, "hidden_act": cfg.hidden_act, "image_size": cfg.image_size,
            "patch_size": cfg.patch_size, "num_channels": cfg.num_channels, "qkv_bias": True,
            "layer_norm_eps": cfg.layer_norm_eps, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
            "torch_dtype": _dtype_name(dtype)}
