"""The fine-tuned checkpoint: written by train.py, read by sample.py, the evaluation and the export.

Format (version 2): one `.safetensors` file (no pickle: safe to share), train.py's `best.safetensors`:

    tensors   the whole fine-tuned U-Net in float32, diffusers names ("content": "unet"), or only the LoRA
              adapters, `<module path>.lora_A.weight` / `.lora_B.weight` in float32 ("content": "lora");
              with a fine-tuned text encoder (DreamBooth's --train-text-encoder, look forward), also the
              whole text encoder in float32 under "text_encoder." + its tinyrpo names, and "text_encoder":
              "true" in the header
    header    {"format": "pt", "tinyrpo.format": "tinyrpo-ckpt", "tinyrpo.version": "2",
               "tinyrpo.content": "unet" | "lora", "tinyrpo.json": '["step", ...]',
               "base": ..., "base_fingerprint": ..., "token": ..., "class_noun": ..., "step": ..., "reward": ...,
               "config": '{...}', "lora": '{"rank": 4, "alpha": 4.0, "targets": [...]}'}

The header holds strings only (safetensors' rule), so a string stays as it is and anything else (numbers,
booleans, lists, dicts) is written as JSON, its key listed in "tinyrpo.json" so that reading gives back the
same types. `python -c "from safetensors import safe_open; print(safe_open('best.safetensors', 'pt').metadata())"`
shows it. "format": "pt" is the entry transformers and diffusers expect in a safetensors header.

Why the whole U-Net and in full float32: RPO fine-tunes only the U-Net (text encoder, VAE and tokenizer are
the base model's), and 400 steps at lr 5e-6 move each weight by about 1e-3 of its size, which is below
bf16's resolution (2^-8 ≈ 4e-3) and near fp16's (2^-11 ≈ 5e-4): a half-precision copy would round most of
the fine-tuning away. A LoRA stores its update as the two small factors instead (tinyrpo/lora.py). The
base model is identified (`base_fingerprint`), because the U-Net or the LoRA is only meaningful next to
the base it was trained from.

train.py's `last.pt` is not a checkpoint of this kind: it is the resumable training state (weights, optimizer,
RNG) for `train.py --resume`, and reading it as one is refused with a message that says so.

Writing is atomic (tinyrpo/runs/atomic.py): a crash or a full disk mid-write leaves the previous checkpoint intact
and never a truncated one under the real name.
"""
import hashlib
import json
import shlex
import pickle
import zipfile
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open

from tinyrpo.errors import UserError
from tinyrpo.lora import add_lora, load_lora_state_dict, merge_lora, set_lora_scale
from tinyrpo.runs.atomic import atomic_save_safetensors
from tinyrpo.unet import UNetConfig

FORMAT = "tinyrpo-ckpt"
VERSION = 2
BEST = "best.safetensors"  # the validation-reward argmax that train.py keeps: what sample.py --ckpt takes
LAST = "last.pt"  # train.py's resumable state (--resume), not a checkpoint to sample from
TEXT_ENCODER = "text_encoder."  # the prefix of a fine-tuned text encoder's tensors in the file
CONTENTS = ("unet", "lora")


# ---------------------------------------------------------------------------------------------------------
# The header: strings only


def encode_metadata(meta: dict) -> dict[str, str]:
    """meta -> safetensors header entries: strings as they are, anything else as JSON (listed in tinyrpo.json)."""
    out, as_json = {}, []
    for k, v in meta.items():
        if isinstance(v, str):
            out[k] = v
        else:
            out[k] = json.dumps(v, default=str)  # Paths and other objects become strings
            as_json.append(k)
    out["tinyrpo.json"] = json.dumps(as_json)
    return out


def decode_metadata(header: dict[str, str]) -> dict:
    """The inverse of encode_metadata, without the format entries."""
    as_json = set(json.loads(header.get("tinyrpo.json", "[]")))
    return {k: json.loads(v) if k in as_json else v for k, v in header.items()
            if k != "format" and not k.startswith("tinyrpo.")}


# ---------------------------------------------------------------------------------------------------------
# Writing and reading


def save_checkpoint(path, state: dict, meta: dict, lora: dict | None = None,
                    text_encoder: dict | None = None) -> Path:
    """Write a checkpoint to `path`, atomically; returns the path.

    state: the fine-tuned U-Net's state dict (any dtype/device; stored as float32 on the CPU), or with `lora`
           given, the adapters' tensors (tinyrpo.lora.lora_state_dict).
    meta:  JSON-like facts about the run (base, base_fingerprint, token, class_noun, step, reward, config...).
    lora:  tinyrpo.lora.lora_config(unet) for a LoRA checkpoint, None for a full U-Net.
    text_encoder: the fine-tuned text encoder's state dict, when it was trained (meta["text_encoder"] says so).
    """
    state = _cpu_fp32(state)
    meta = json.loads(json.dumps(meta, default=str))  # Paths as strings, tuples as lists: what loading gives back
    if lora is not None:
        meta["lora"] = json.loads(json.dumps(lora))
    meta["text_encoder"] = text_encoder is not None
    if text_encoder is not None:
        state |= {TEXT_ENCODER + k: v for k, v in _cpu_fp32(text_encoder).items()}
    header = {"format": "pt", "tinyrpo.format": FORMAT, "tinyrpo.version": str(VERSION),
              "tinyrpo.content": "lora" if lora is not None else "unet", **encode_metadata(meta)}
    return atomic_save_safetensors(state, path, header)


def _cpu_fp32(state: dict) -> dict:
    return {k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in state.items()}


def best_checkpoint(run) -> Path | None:
    """The best checkpoint of a train.py run folder (its best.safetensors), or None."""
    path = Path(run) / BEST
    return path if path.is_file() else None


def _short(e: Exception) -> str:
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return detail if len(detail) <= 80 else detail[:77] + "..."


def _resumable_state_message(path: Path) -> str:
    return (f"{path} is train.py's resumable state (weights, optimizer, RNG: for train.py --resume), not a "
            f"checkpoint to sample from; pass {path.with_name(BEST)}")


def _corrupt(path: Path, e: Exception) -> UserError:
    return UserError(f"cannot read checkpoint {path}: it is truncated, corrupt or not a tinyrpo checkpoint "
                     f"({_short(e)}); re-run train.py or pick another checkpoint")


def _torch_file_message(path: Path) -> str:
    """What to say of a torch.save'd file given as a checkpoint (checkpoints are safetensors files): train.py's
    resumable state under another name is named as such, so the user knows which file to pass instead."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # no pickle code runs
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError, ValueError, OSError):
        obj = None
    if isinstance(obj, dict) and "optimizer" in obj and "rng" in obj:
        return _resumable_state_message(path)
    return (f"{path} is a torch .pt file, not a tinyrpo checkpoint; --ckpt takes the {BEST} that train.py writes, "
            "--weights takes base Stable Diffusion weights and --lora a LoRA file")


def read_header(path) -> dict[str, str] | None:
    """The safetensors header metadata of `path`, or None when it is not a readable safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # safetensors raises its own error types for a foreign, truncated or corrupt file
        return None


def load_checkpoint(path) -> tuple[dict, dict]:
    """-> (tensors as float32 CPU tensors, meta). meta["content"] is "unet" (a whole U-Net state dict) or
    "lora" (adapter tensors; meta["lora"] = {"rank", "alpha", "targets"}); meta["text_encoder"] is True when
    the file also holds a fine-tuned text encoder (apply_checkpoint loads it; it is not in the tensors returned).

    Raises UserError for a missing, corrupt or foreign file, and for train.py's last.pt.
    """
    state, meta = _read(path)
    return {k: v for k, v in state.items() if not k.startswith(TEXT_ENCODER)}, meta


def _read(path) -> tuple[dict, dict]:
    """Every tensor of the file (a text encoder's under TEXT_ENCODER) and its meta, checked."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} not found; train.py writes {BEST} into its run folder (runs/<subject>/)")
    if path.is_dir():
        found = best_checkpoint(path)
        raise UserError(f"checkpoint {path} is a folder; pass the file inside it"
                        + (f": {found}" if found else f" ({BEST})"))
    if path.name == LAST:
        raise UserError(_resumable_state_message(path))
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"PK\x03\x04":  # a zip: torch.save's format, which no tinyrpo checkpoint uses
        raise UserError(_torch_file_message(path))
    header = read_header(path)
    if header is None:
        raise _corrupt(path, ValueError("not a safetensors file"))
    if header.get("tinyrpo.format") != FORMAT:
        raise UserError(f"{path} is not a tinyrpo checkpoint (no tinyrpo.format '{FORMAT}' in its header); "
                        f"--ckpt takes the {BEST} that train.py writes, --weights takes base Stable Diffusion "
                        "weights (an exported single file too) and --lora a LoRA file")
    version = header.get("tinyrpo.version", "")
    if not version.isdigit() or int(version) > VERSION:
        raise UserError(f"checkpoint {path} has format version {version}, this tinyrpo reads up to version "
                        f"{VERSION}; update tinyrpo")
    content = header.get("tinyrpo.content")
    if content not in CONTENTS:
        raise UserError(f"checkpoint {path} holds '{content}', not one of {', '.join(CONTENTS)}; update tinyrpo")
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
        meta = decode_metadata(header)
    except Exception as e:
        raise _corrupt(path, e) from None
    if content == "lora" and not isinstance(meta.get("lora"), dict):
        raise UserError(f"checkpoint {path} is a LoRA without its rank/alpha/targets entry; re-run train.py")
    return _checked(path, state, {**meta, "content": content})


def _checked(path, state: dict, meta: dict) -> tuple[dict, dict]:
    has_text_encoder = any(k.startswith(TEXT_ENCODER) for k in state)
    if bool(meta.get("text_encoder")) != has_text_encoder:
        raise UserError(f"checkpoint {path} is incomplete (its header and its text-encoder tensors disagree); "
                        "re-run train.py")
    return state, {**meta, "text_encoder": has_text_encoder}


def apply_checkpoint(sd, path, lora_scale: float = 1.0) -> dict:
    """Put checkpoint `path` into `sd.unet` (in sd.unet's dtype), and its fine-tuned text encoder, if it has
    one, into `sd.text_encoder`; return its meta.

    A full U-Net replaces the weights; a LoRA is added and merged into them, its update scaled by lora_scale.
    The base model must be the one the checkpoint was trained from: same fingerprint and same shapes.
    """
    state, meta = _read(path)
    base = meta.get("base", "<unknown>")
    if meta.get("base_fingerprint") != getattr(sd, "fingerprint", None):
        raise UserError(f"checkpoint {path} was trained from {base}, not from {sd.source}; pass --weights {shlex.quote(str(base))}")
    text_encoder = {k[len(TEXT_ENCODER):]: state.pop(k) for k in [k for k in state if k.startswith(TEXT_ENCODER)]}
    if text_encoder:  # checked before the U-Net changes, so a misfit leaves the model as it was
        _check_fits(sd.text_encoder.state_dict(), text_encoder, f"the text encoder of {sd.source}", path, base)
    meta = _apply_unet(sd, path, state, meta, base, lora_scale)
    if text_encoder:
        sd.text_encoder.load_state_dict(text_encoder)
    return meta


def _check_fits(own: dict, state: dict, what: str, path, base) -> None:
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in state and state[k].shape != v.shape]
    if missing or unexpected or mis_shaped:
        detail = "; ".join(f"{kind}: {', '.join(keys[:3])}" for kind, keys in
                           (("missing", missing), ("unexpected", unexpected), ("shape", mis_shaped)) if keys)
        raise UserError(f"checkpoint {path} does not fit {what} ({detail}); it was trained from "
                        f"{base}: pass --weights {shlex.quote(str(base))}")


def _apply_unet(sd, path, state: dict, meta: dict, base: str, lora_scale: float) -> dict:
    if meta["content"] == "lora":
        cfg = meta["lora"]
        add_lora(sd.unet, cfg["rank"], cfg["alpha"], cfg["targets"])
        load_lora_state_dict(sd.unet, state, source=f"checkpoint {path}")
        set_lora_scale(sd.unet, lora_scale)
        merge_lora(sd.unet)
        sd.unet.requires_grad_(True)  # as load_sd returns it; add_lora had frozen it
        return meta
    if lora_scale != 1.0:
        raise UserError(f"--lora-scale scales a LoRA, and {path} holds a whole fine-tuned U-Net; drop --lora-scale")
    _check_fits(sd.unet.state_dict(), state, f"the U-Net of {sd.source}", path, base)
    sd.unet.load_state_dict(state)  # copies into the existing parameters, casting to their dtype/device
    return meta


# ---------------------------------------------------------------------------------------------------------
# The base model's identity: what a checkpoint records of the U-Net it was trained on (weights.load_sd
# computes it on loading), so that applying it to another base can be refused.

FINGERPRINT_TENSORS = ("conv_in.weight", "time_embedding.linear_1.weight",
                       "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight", "conv_out.weight")


def unet_fingerprint(cfg: UNetConfig, state: dict) -> str:
    """16 hex digits naming a base U-Net: sha256 of its config and of a few of its tensors.

    The tensors are hashed rounded to fp16, so a file and its .fp16 variant, in either layout, loaded in
    any dtype, give the same fingerprint; sample_size is left out, as a single file cannot tell it.
    """
    config = {k: v for k, v in asdict(cfg).items() if k != "sample_size"}
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in FINGERPRINT_TENSORS:
        h.update(state[name].detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
