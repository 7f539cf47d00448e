"""LoRA files of every tool, for SD v1: the one place that knows their tensor names.

    kohya's sd-scripts (what A1111, ComfyUI and civitai share):
        lora_unet_<module path, "." -> "_">.lora_down.weight (A, r × k) / .lora_up.weight (B, d × r) / .alpha
        lora_te_<text-encoder module path, "." -> "_">...     for the text encoder
      sd-scripts trains SD v1 on a U-Net with diffusers' module names (library/original_unet.py), so
      `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`; some SD v1 LoRAs carry the
      CompVis names instead (`lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q`): both are read, the
      CompVis ones through the loader's own table (tinyrpo/formats/layouts.py). "_" is ambiguous, so names are
      matched against the model's module paths, not split.
    diffusers / PEFT (`load_lora_weights`): unet.<path>.lora_A.weight / .lora_B.weight, text_encoder.<path>...;
      α in the header's lora_adapter_metadata ("unet.lora_alpha"), else α = r.
    diffusers before PEFT (attention processors): unet.<...attn1>.processor.to_q_lora.down.weight / .up.weight
    tinyrpo: a checkpoint whose header says "tinyrpo.content": "lora" (tinyrpo/formats/checkpoint.py).

Reading folds each update into the weights it adapts, W += s·(α/r)·B A (Hu et al. 2021, eq. 3; s the
--lora-scale), which is what A1111 and ComfyUI do too. Writing (tinyrpo.export) gives kohya's names with
the α of training, and diffusers' names with α/r folded into B (α = r), which every loader reads the same.
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from tinyrpo.cli import check_input
from tinyrpo.errors import UserError
from tinyrpo.formats.checkpoint import FORMAT, decode_metadata, load_checkpoint, read_header
from tinyrpo.formats.identify import WANTED, kind_of_names, wrong_kind
from tinyrpo.formats.layouts import Renames, compvis_unet_table
from tinyrpo.formats.weights import read_state_dict

KOHYA_UNET, KOHYA_TEXT = "lora_unet_", "lora_te_"


@dataclass
class LoRAUpdate:
    """One adapted layer: W += scale · (alpha / rank) · up @ down."""
    network: str  # "unet" or "text_encoder"
    path: str  # module path in tinyrpo's (= diffusers' / HF's) names
    down: torch.Tensor  # A: (r, k) or a conv's (r, k, kh, kw)
    up: torch.Tensor  # B: (d, r) or (d, r, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


# ---------------------------------------------------------------------------------------------------------
# Names


def kohya_name(network: str, path: str) -> str:
    """kohya's name of a layer: the prefix, then the module path with every "." made "_"."""
    return (KOHYA_UNET if network == "unet" else KOHYA_TEXT) + path.replace(".", "_")


def kohya_names(sd) -> dict[str, tuple[str, str]]:
    """kohya name -> (network, module path) for every linear / conv layer of the U-Net and text encoder, in both
    the diffusers-derived and the CompVis-derived U-Net naming."""
    compvis = Renames(compvis_unet_table(sd.unet.cfg))
    names = {}
    for network, model in (("unet", sd.unet), ("text_encoder", sd.text_encoder)):
        for path, m in model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                names[kohya_name(network, path)] = (network, path)
                if network == "unet":
                    names[kohya_name(network, compvis.file_name(path + ".weight").removesuffix(".weight"))] = (
                        network, path)
    return names


_OLD_DIFFUSERS = re.compile(r"(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")


def _peft_alphas(header: dict | None) -> dict[str, float]:
    """{"unet": α, "text_encoder": α} from diffusers' lora_adapter_metadata header entry, where present."""
    try:
        meta = json.loads((header or {}).get("lora_adapter_metadata") or "{}")
    except ValueError:
        return {}
    return {net: float(meta[f"{net}.lora_alpha"]) for net in ("unet", "text_encoder") if f"{net}.lora_alpha" in meta}


def parse_lora(state: dict, header: dict | None, sd, source: str) -> list[LoRAUpdate]:
    """The updates of a kohya / diffusers / PEFT LoRA state dict, in tinyrpo's module paths."""
    exotic = [k for k in state if re.search(r"(hada_|lokr_|dora_scale|lora_mid|\.diff$|\.diff_b$)", k)]
    if exotic:
        raise UserError(f"{source} holds LyCORIS / DoRA weights ({exotic[0]}), which tinyrpo does not read; "
                        "use a plain LoRA (lora_down/lora_up or lora_A/lora_B)")
    if any(k.startswith(("lora_te1_", "lora_te2_")) or k.startswith("text_encoder_2.") for k in state):
        raise UserError(f"{source} is a LoRA of Stable Diffusion XL (two text encoders); tinyrpo supports SD v1.x")
    pairs: dict[tuple[str, str], dict] = {}
    kohya = None
    peft_alpha = _peft_alphas(header)
    for k, t in state.items():
        if k.startswith((KOHYA_UNET, KOHYA_TEXT)):
            kohya = kohya or kohya_names(sd)
            name, _, kind = k.partition(".")
            if name not in kohya:
                raise UserError(f"{source}: {k} adapts a layer that this SD v1 model does not have; is it a LoRA "
                                "of another model (SD 2.x, SDXL)?")
            slot = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(kind)
            key = kohya[name]
        elif m := _OLD_DIFFUSERS.fullmatch(k.removeprefix("unet.")):
            key, slot = ("unet", f"{m[1]}.{m[2]}{'.0' if m[2] == 'to_out' else ''}"), m[3]
        elif k.endswith((".lora_A.weight", ".lora_B.weight")):
            path = k.removeprefix("base_model.model.")
            network = "text_encoder" if path.startswith("text_encoder.") else "unet"
            path = path.removeprefix(network + ".")
            key, slot = (network, path.rsplit(".", 2)[0]), "down" if ".lora_A." in k else "up"
            pairs.setdefault(key, {}).setdefault("alpha", peft_alpha.get(network))
        else:
            slot = None
        if slot is None:
            raise UserError(f"{source}: {k} is not a LoRA tensor name tinyrpo knows (kohya lora_down/lora_up/alpha, "
                            "diffusers/PEFT lora_A/lora_B); is it a LoRA file?")
        pairs.setdefault(key, {})[slot] = t.item() if slot == "alpha" else t
    updates = []
    for (network, path), p in pairs.items():
        if "down" not in p or "up" not in p:
            raise UserError(f"{source}: the LoRA of {path} has only its {'up' if 'up' in p else 'down'} matrix; "
                            "the file is incomplete")
        alpha = p.get("alpha")
        updates.append(LoRAUpdate(network, path, p["down"], p["up"], float(p["down"].shape[0] if alpha is None
                                                                           else alpha)))
    if not updates:
        raise UserError(f"{source} holds no LoRA tensors")
    return updates


# ---------------------------------------------------------------------------------------------------------
# Reading a file and merging it


def tinyrpo_lora_meta(path) -> dict | None:
    """The meta of a tinyrpo checkpoint file (its header only), None for any other file."""
    path = Path(path)
    header = read_header(path) if path.suffix == ".safetensors" and path.is_file() else None
    return decode_metadata(header) if header is not None and header.get("tinyrpo.format") == FORMAT else None


def read_lora(path, sd) -> tuple[list[LoRAUpdate], dict | None]:
    """(updates, tinyrpo meta or None) of a LoRA file in any of the formats above."""
    path = Path(path)
    check_input(path, "--lora")
    if not path.is_file():
        raise UserError(f"--lora {path} not found" + (" (it is a folder: pass the .safetensors file inside it)"
                                                       if path.is_dir() else ""))
    header = read_header(path)
    if header is None:
        refuse_non_weights(path)
    if header is not None and header.get("tinyrpo.format") == FORMAT:
        state, meta = load_checkpoint(path)
        if meta["content"] != "lora":
            raise UserError(f"{path} is a whole fine-tuned U-Net, not a LoRA; pass it as --ckpt")
        alpha = float(meta["lora"]["alpha"])
        updates = [LoRAUpdate("unet", k.removesuffix(".lora_A.weight"), state[k],
                              state[k.removesuffix(".lora_A.weight") + ".lora_B.weight"], alpha)
                   for k in state if k.endswith(".lora_A.weight")]
        return updates, meta
    if header is not None and (mixup := wrong_kind(path, "lora")):  # a whole SD, a U-Net alone, CLIP...
        raise UserError(mixup)
    state = read_state_dict(path, want="lora")
    if mixup := wrong_kind(path, "lora", kind_of_names(state)):  # a pickle: known once read
        raise UserError(mixup)
    return parse_lora(state, header, sd, str(path)), None


def refuse_non_weights(path: Path) -> None:
    """A --lora that is neither safetensors nor a torch file (zip or pickle): say what it is in one line, before
    torch.load's unpickler answers with a paragraph about weights_only."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch.save's zip; a pickle's PROTO opcode
        return
    try:
        head.decode("utf-8")
        what = "a text file" if head else "empty"
    except UnicodeDecodeError as e:
        what = ("a text file" if e.start > len(head) - 4  # only a character cut at the 4096th byte
                else "not a readable .safetensors or torch weight file (corrupt, cut short, or another format)")
    raise UserError(f"--lora {path} is {what}, not a LoRA; {WANTED['lora']}")


def delta_weight(u: LoRAUpdate, shape: torch.Size) -> torch.Tensor:
    """(α/r)·B A in fp32, shaped like the weight it adapts: a linear's (d, k), a conv's (d, k, kh, kw)."""
    up, down = u.up.float().flatten(1), u.down.float()
    if down.ndim == 4 and down.shape[2:] != (1, 1):  # a k×k conv, then a 1×1 one: compose the two kernels
        delta = torch.einsum("or,rikl->oikl", up, down)
    else:  # linears or 1×1 convs: a matrix product, in the weight's shape (a 1×1 conv's is (d, k, 1, 1))
        delta = up @ down.flatten(1)
        delta = delta.reshape(shape) if delta.numel() == shape.numel() else delta
    if delta.shape != shape:
        raise ValueError(f"B A is {list(delta.shape)}, the weight {list(shape)}")
    return delta * (u.alpha / u.rank)


@torch.no_grad()
def merge_updates(sd, updates: list[LoRAUpdate], scale: float, source: str) -> None:
    """W += scale · (α/r) · B A for every update, in the weights' own dtype."""
    for u in updates:
        model = getattr(sd, u.network)
        try:
            layer = model.get_submodule(u.path)
            delta = delta_weight(u, layer.weight.shape)
        except (AttributeError, ValueError) as e:
            raise UserError(f"{source} adapts {u.network} layer {u.path} ({e}), which this SD v1 model does not have "
                            "in that shape; is it a LoRA of another model (SD 2.x, SDXL)?") from None
        layer.weight += (scale * delta).to(layer.weight.dtype)
        if not torch.isfinite(layer.weight).all():  # a huge --lora-scale, or an fp16 overflow
            raise UserError(f"{source} at --lora-scale {scale} makes {u.network} layer {u.path} overflow (inf or "
                            f"NaN weights); use a smaller --lora-scale")


def apply_lora(sd, path, scale: float = 1.0) -> dict:
    """Merge the LoRA file `path` into sd's U-Net (and text encoder, for a kohya/diffusers file that adapts it).
    Returns {"layers": n, "networks": [...], "meta": tinyrpo meta or None}."""
    updates, meta = read_lora(path, sd)
    merge_updates(sd, updates, scale, str(path))
    return {"layers": len(updates), "networks": sorted({u.network for u in updates}), "meta": meta}


# ---------------------------------------------------------------------------------------------------------
# Writing other tools' names (tinyrpo.export)


def to_kohya(lora_state: dict, alpha: float) -> dict[str, torch.Tensor]:
    """tinyrpo's adapter tensors -> kohya's names: lora_down = A, lora_up = B, alpha per layer."""
    out = {}
    for k, A in lora_state.items():
        if k.endswith(".lora_A.weight"):
            path = k.removesuffix(".lora_A.weight")
            name = kohya_name("unet", path)
            out[f"{name}.lora_down.weight"] = A
            out[f"{name}.lora_up.weight"] = lora_state[f"{path}.lora_B.weight"]
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def to_diffusers(lora_state: dict, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """tinyrpo's adapter tensors -> the PEFT names diffusers' load_lora_weights reads, α/r folded into B."""
    out = {}
    for k, t in lora_state.items():
        out["unet." + k] = t * (alpha / rank) if k.endswith(".lora_B.weight") else t
    return out
