"""What a weight path holds, so that a model given to the wrong flag is named and sent to the right one.

tinyrpo takes five kinds of weights, each through its own flag:

    sd     Stable Diffusion v1 (diffusers folder or single file)   --weights
    clip   CLIP (HF folder or file)                                --reward-model (train.py), --eval-clip
    dino   DINO ViT (HF folder or file, DINO's .pth)               --dino
    ckpt   a checkpoint written by train.py                        --ckpt
    lora   a LoRA file of another tool (kohya, diffusers)          --lora (sample.py)

A loader that finds something else than it wants asks `wrong_kind(path, want)` for the sentence that
says what the path is and which flag takes it. Identification reads as little as it can: a folder's
subfolders and config.json, a .safetensors file's header; a pickle only once the loader has it.
"""
import json
import shlex
from pathlib import Path
from typing import NamedTuple

KINDS = {  # kind -> (what it is, the flag(s) that take it)
    "sd": ("a Stable Diffusion v1 model", "--weights"),
    "clip": ("a CLIP model", "--reward-model (train.py) or --eval-clip (python -m tinyrpo.evaluate)"),
    "dino": ("a DINO ViT", "--dino (python -m tinyrpo.evaluate)"),
    "ckpt": ("a checkpoint written by train.py", "--ckpt (sample.py, python -m tinyrpo.evaluate)"),
    "lora": ("a LoRA", "--lora (sample.py)"),
}
WANTED = {  # kind -> what the flag needs, and where to get it
    "sd": "--weights takes an SD v1 diffusers folder (unet/, vae/, text_encoder/) or a single .safetensors file "
          "(python -m tinyrpo.download sd15)",
    "clip": "a CLIP model is an HF folder such as weights/clip-vit-large-patch14 (python -m tinyrpo.download "
            "clip-l14)",
    "dino": "DINO is an HF folder such as weights/dino-vits16 (python -m tinyrpo.download dino)",
    "ckpt": "--ckpt takes the best.safetensors that train.py writes into its run folder",
    "lora": "--lora takes a LoRA .safetensors file (kohya lora_unet_*, diffusers lora_A/lora_B, or tinyrpo's)",
}
# One network of a diffusers SD folder, alone: (config _class_name or model_type, what it is)
SD_PARTS = {"UNet2DConditionModel": "unet", "AutoencoderKL": "vae", "clip_text_model": "text_encoder"}


class Identified(NamedTuple):
    kind: str  # one of KINDS, "part" (one network of an SD folder) or "other" (nothing tinyrpo takes)
    what: str  # e.g. "a CLIP model folder"
    file: Path | None = None  # the weight file inside a folder that is not itself in a layout we load


def kind_of_names(names) -> Identified | None:
    """What a state dict holds, from its tensor names."""
    names = [n.removeprefix("module.").removeprefix("backbone.") for n in names]
    if names == ["tinyrpo.format"]:
        return Identified("ckpt", KINDS["ckpt"][0])

    def has(*prefixes):
        return any(n.startswith(prefixes) for n in names)

    if has("conditioner.embedders.", "cond_stage_model.model."):
        return Identified("other", "a Stable Diffusion XL or 2.x checkpoint (tinyrpo supports SD v1.x only)")
    if has("model.diffusion_model."):
        return Identified("sd", "a Stable Diffusion v1 single-file checkpoint")
    if any("lora" in n.lower() for n in names):
        return Identified("lora", "a LoRA (weight deltas for a base model)")
    if has("text_model.") and has("vision_model."):
        return Identified("clip", KINDS["clip"][0])
    if has("cls_token", "embeddings.cls_token", "vit.embeddings.cls_token"):
        return Identified("dino", "a ViT (DINO layout)")
    if has("text_model.", "embeddings.token_embedding."):
        return Identified("part", "a CLIP text tower alone (the text_encoder/ of an SD folder)")
    if has("down_blocks.") and has("time_embedding."):
        return Identified("part", "a diffusers U-Net alone (the unet/ of an SD folder)")
    if has("encoder.down_blocks.", "decoder.up_blocks."):
        return Identified("part", "a diffusers VAE alone (the vae/ of an SD folder)")
    return None


def _safetensors_names(path: Path) -> list[str] | None:
    """The tensor names, or ["tinyrpo.format"] for a checkpoint train.py wrote (its header says so)."""
    try:
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            return ["tinyrpo.format"] if "tinyrpo.format" in (f.metadata() or {}) else list(f.keys())
    except Exception:  # not readable as safetensors: the loader says so
        return None


def _config(folder: Path) -> dict:
    try:
        d = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


def identify(path) -> Identified | None:
    """What a folder or a .safetensors file holds; None when it cannot tell (cheaply)."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            names = _safetensors_names(path)
            return kind_of_names(names) if names else None
        return None  # a pickle: the loader reads it and asks kind_of_names
    if not path.is_dir():
        return None
    if (path / "unet").is_dir() or (path / "model_index.json").is_file():
        return Identified("sd", "a Stable Diffusion v1 diffusers folder")
    config = _config(path)
    kind = str(config.get("model_type") or config.get("_class_name") or "")
    if kind in SD_PARTS:
        return Identified("part", f"the {SD_PARTS[kind]}/ of a diffusers SD folder alone")
    if kind == "clip":
        return Identified("clip", "a CLIP model folder")
    if kind in ("vit", "dino", "dinov2"):
        return Identified("dino", "a ViT folder (DINO layout)")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    for f in files:
        found = identify(f)
        if found and found.kind in KINDS:
            return Identified(found.kind, f"a folder holding {found.what}, {f.name}", f)
    return None


def wrong_kind(path, want: str, found: Identified | None = None) -> str | None:
    """The sentence for `path` given where `want` (one of KINDS) is needed, or None when `path` is not
    recognizably something else. `found` is the caller's own identification (e.g. from tensor names)."""
    path = Path(path)
    found = found or identify(path)
    if found is None or found.kind == want:
        return None
    need = "Stable Diffusion v1 weights" if want == "sd" else KINDS[want][0]
    head = f"{path} is {found.what}, not {need}"
    if found.kind in KINDS:
        target = "it" if found.file is None else shlex.quote(str(found.file))
        return f"{head}: pass {target} as {KINDS[found.kind][1]}; {WANTED[want]}"
    if found.kind == "part":
        parent = path.parent if path.is_dir() else path.parent.parent
        if (parent / "unet").is_dir() and (parent / "vae").is_dir():
            where = f"pass the whole folder {shlex.quote(str(parent))} as --weights"
        else:
            where = "pass the diffusers folder that holds unet/, vae/ and text_encoder/ as --weights"
        return f"{head}: {where}" + ("" if want == "sd" else f"; {WANTED[want]}")
    return f"{head}; {WANTED[want]}"


def checkpoint_mixup(path) -> str | None:
    """For --ckpt: the sentence when `path` holds base or evaluation weights; None otherwise (what train.py
    writes, in whichever format, is tinyrpo.formats.checkpoint's to read and judge)."""
    found = identify(path)
    return wrong_kind(path, "ckpt", found) if found and found.kind in ("sd", "clip", "dino", "part", "lora") else None
