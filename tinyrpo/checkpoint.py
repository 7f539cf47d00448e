"""The fine-tuned checkpoint: written by train.py, read by sample.py and the evaluation.

Format (version 1): one `torch.save` file holding a plain dict

    {"format": "tinyrpo-ckpt", "version": 1,
     "unet": {name: float32 tensor, ...},        # the whole fine-tuned U-Net, diffusers names
     "meta": {"base": ..., "base_fingerprint": ..., "token": ..., "class_noun": ...,
              "step": ..., "reward": ..., "config": {...}}}

Why the U-Net and why in full float32: RPO fine-tunes only the U-Net (text encoder, VAE and tokenizer are
the base model's), and 400 steps at lr 5e-6 move each weight by about 1e-3 of its size, which is below
bf16's resolution (2^-8 ≈ 4e-3) and near fp16's (2^-11 ≈ 5e-4): a half-precision copy would round most of
the fine-tuning away. A delta against the base would be smaller once quantized, but it needs the exact base
tensors both when saving and when loading; the full U-Net is self-contained and is what
`load_state_dict` takes. The base model is still identified (`base_fingerprint`), because the U-Net is only
meaningful next to the text encoder and VAE it was trained with.

Reading uses `torch.load(weights_only=True)` (no pickle code runs) and mmap (a 3.4 GB SD v1.5 U-Net is not
read into memory twice). Writing is atomic: a temporary file in the same folder, fsync, then `os.replace`,
so a crash mid-write leaves the previous checkpoint intact and never a truncated one under the real name.
"""
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

from tinyrpo.errors import UserError

FORMAT = "tinyrpo-ckpt"
VERSION = 1


def save_checkpoint(path, unet_state: dict, meta: dict) -> Path:
    """Write `unet_state` (any dtype/device; stored as float32 on the CPU) and `meta` to `path`, atomically.

    `meta` must be JSON-like; Paths and other objects are stored as strings, tuples as lists, so that the
    file loads with `weights_only=True`.
    """
    state = {k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu()).contiguous()
             for k, v in unet_state.items()}
    meta = json.loads(json.dumps(meta, default=str))
    obj = {"format": FORMAT, "version": VERSION, "unet": state, "meta": meta}
    return atomic_torch_save(obj, path)


def atomic_torch_save(obj, path) -> Path:
    """torch.save(obj, path) that leaves either the old file or the complete new one, never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o644)  # mkstemp makes it private (0600); a checkpoint is an ordinary file
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the new name points at them
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a folder; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path) -> tuple[dict, dict]:
    """-> (U-Net state dict of float32 CPU tensors, meta). Raises UserError for a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} not found; train.py writes best.pt into its run folder (runs/<subject>/)")
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder; pass the .pt file inside it")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, RuntimeError, ValueError, OSError) as e:
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        detail = detail if len(detail) <= 80 else detail[:77] + "..."
        raise UserError(f"cannot read checkpoint {path}: it is truncated, corrupt or not a tinyrpo checkpoint "
                        f"({detail}); re-run train.py or pick another checkpoint") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise UserError(f"{path} is not a tinyrpo checkpoint (no format tag '{FORMAT}'); sample.py --ckpt takes "
                        "the .pt files that train.py writes, and --weights takes base Stable Diffusion weights")
    if not isinstance(obj.get("version"), int) or obj["version"] > VERSION:
        raise UserError(f"checkpoint {path} has format version {obj.get('version')}, this tinyrpo reads up to "
                        f"version {VERSION}; update tinyrpo")
    if not isinstance(obj.get("unet"), dict) or not isinstance(obj.get("meta"), dict):
        raise UserError(f"checkpoint {path} is incomplete (no 'unet' or 'meta' entry); re-run train.py")
    return obj["unet"], obj["meta"]


def apply_checkpoint(sd, path) -> dict:
    """Load the fine-tuned U-Net of checkpoint `path` into `sd.unet` (in sd.unet's dtype); return its meta.

    The base model must be the one the checkpoint was trained from: same fingerprint and same U-Net shapes.
    """
    state, meta = load_checkpoint(path)
    base = meta.get("base", "<unknown>")
    if meta.get("base_fingerprint") != getattr(sd, "fingerprint", None):
        raise UserError(f"checkpoint {path} was trained from {base}, not from {sd.source}; pass --weights {base}")
    own = sd.unet.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                  if k in state and state[k].shape != v.shape]
    if missing or unexpected or mis_shaped:
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}" for what, keys in
                           (("missing", missing), ("unexpected", unexpected), ("shape", mis_shaped)) if keys)
        raise UserError(f"checkpoint {path} does not fit the U-Net of {sd.source} ({detail}); it was trained from "
                        f"{base}: pass --weights {base}")
    sd.unet.load_state_dict(state)  # copies into the existing parameters, casting to their dtype/device
    return meta
