"""Generation parameters in AUTOMATIC1111's format, the PNG `parameters` text that A1111, civitai and most image
viewers read ("PNG Info"):

    a photo of sks dog on the beach
    Negative prompt: blurry
    Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 3, Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly

Mirrors stable-diffusion-webui's modules/processing.py (create_infotext: "key: value" pairs joined by ", ",
entries that are None left out, the negative-prompt line only when there is one) and infotext_utils.py
(quote: a value holding "," ":" or a newline is written as a JSON string). Hashes are A1111's: a checkpoint's
"Model hash" is the first 10 hex digits of the file's sha256; a LoRA's (in "Lora hashes") the first 12 of
the sha256 of its tensor bytes (a safetensors file without its header: kohya's "addnet" hash).
"""
import hashlib
import json
from pathlib import Path


def quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def infotext(prompt: str, negative_prompt: str, params: dict) -> str:
    """prompt, "Negative prompt: ..." (when there is one), then the parameters on one line; None values are left out."""
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def _sha256(path, offset: int = 0) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_hash(path) -> str | None:
    """A1111's short hash of a checkpoint file (sha256, 10 hex digits); None for a folder."""
    return _sha256(path)[:10] if Path(path).is_file() else None


def lora_hash(path) -> str:
    """A1111's short hash of a LoRA: sha256 of a safetensors file's tensor bytes (after the 8-byte length and the
    JSON header), or of the whole file otherwise, 12 hex digits."""
    offset = 0
    if Path(path).suffix == ".safetensors":
        with open(path, "rb") as f:
            offset = 8 + int.from_bytes(f.read(8), "little")
    return _sha256(path, offset)[:12]


def model_name(path) -> str:
    """A1111's name of a checkpoint: the file name without extension (a diffusers folder: its name)."""
    path = Path(path)
    return path.stem if path.is_file() else path.name
