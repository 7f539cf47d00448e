"""The exports of a fine-tuned model: one CompVis-layout single file, a diffusers folder, kohya and diffusers LoRA
files, each written atomically. `python -m tinyrpo.export` (tinyrpo/export.py) is the command, and its docstring
describes each format and why the files are written as they are."""
import json
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from tinyrpo.errors import UserError
from tinyrpo.formats.checkpoint import apply_checkpoint, best_checkpoint, load_checkpoint
from tinyrpo.formats.layouts import (CONFIG_KEYS, MODEL_INDEX_JSON, compvis_single_file, scheduler_config_json,
                                     text_config_json, unet_config_json, vae_config_json)
from tinyrpo.formats.lora_files import to_diffusers, to_kohya
from tinyrpo.formats.weights import load_sd
from tinyrpo.pipeline import DTYPES
from tinyrpo.runs.atomic import WriteError, atomic_save_safetensors, machine_errno, write_error
from tinyrpo.schedulers import make_betas

FORMATS = ("single-file", "diffusers", "lora-kohya", "lora-diffusers")
PRECISIONS = ("fp16", "fp32")  # of the files written: what A1111, ComfyUI and diffusers all read
SUFFIX = {"single-file": ".safetensors", "diffusers": "-diffusers", "lora-kohya": "-lora.safetensors",
          "lora-diffusers": "-lora-diffusers.safetensors"}


# ---------------------------------------------------------------------------------------------------------
# Writers


def _cast(state: dict, dtype: torch.dtype) -> dict:
    return {k: (t.to(dtype) if t.is_floating_point() else t).contiguous() for k, t in state.items()}


def _header(meta: dict) -> dict[str, str]:
    """A few facts about the fine-tune for the exported file's header (never "tinyrpo.format": that marks a
    tinyrpo checkpoint)."""
    facts = {k: meta.get(k) for k in ("token", "class_noun", "base", "step", "reward")}
    return {"format": "pt", **{f"tinyrpo.{k}": str(v) for k, v in facts.items() if v is not None}}


def architecture_header(sd, dtype: torch.dtype) -> dict[str, str]:
    """The diffusers configs of the three networks and of the scheduler, as JSON header entries (layouts.CONFIG_KEYS):
    without them a loader reads what shapes cannot tell (head counts, the VAE's scaling factor, the sample size,
    the noise schedule) as SD v1.5's. tinyrpo.formats.weights reads them back; other tools ignore them."""
    configs = {"unet": unet_config_json(sd.unet.cfg), "vae": vae_config_json(sd.vae.cfg),
               "text_encoder": text_config_json(sd.text_encoder.config, dtype),
               "scheduler": scheduler_config_json(sd.scheduler_config)}
    return {CONFIG_KEYS[k]: json.dumps(v, sort_keys=True) for k, v in configs.items()}


def single_file_state(sd, dtype: torch.dtype) -> dict:
    """The loaded (fine-tuned) model as one CompVis-layout state dict."""
    return _cast(compvis_single_file(sd.unet.state_dict(), sd.unet.cfg, sd.vae.state_dict(), sd.vae.cfg,
                                     sd.text_encoder.state_dict(), make_betas(sd.scheduler_config)), dtype)


def write_single_file(sd, out: Path, dtype: torch.dtype, meta: dict) -> Path:
    return atomic_save_safetensors(single_file_state(sd, dtype), out, {**_header(meta), **architecture_header(sd, dtype)})


def write_diffusers(sd, out: Path, dtype: torch.dtype, meta: dict) -> Path:
    """A diffusers StableDiffusionPipeline folder, built in a temporary folder beside `out` and renamed into place
    when complete; whatever fails (a full disk, Ctrl-C) removes the temporary folder and leaves `out` as it was."""
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the folder is for sharing
        for sub, model, name, config in [
                ("unet", sd.unet, "diffusion_pytorch_model", unet_config_json(sd.unet.cfg)),
                ("vae", sd.vae, "diffusion_pytorch_model", vae_config_json(sd.vae.cfg)),
                ("text_encoder", sd.text_encoder, "model", text_config_json(sd.text_encoder.config, dtype))]:
            (tmp / sub).mkdir()
            atomic_save_safetensors(_cast(model.state_dict(), dtype), tmp / sub / f"{name}.safetensors",
                                    _header(meta))
            (tmp / sub / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        sd.tokenizer.save_vocab(tmp / "tokenizer")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(scheduler_config_json(sd.scheduler_config), indent=2) + "\n")
        (tmp / "model_index.json").write_text(json.dumps(MODEL_INDEX_JSON, indent=2) + "\n")
        with interrupts_held():
            swap_in(tmp, out)
    except BaseException as e:
        # A temporary name means nothing to the user: a full disk or a read-only folder is reported for `out`.
        code = e.errno if isinstance(e, WriteError) else machine_errno(e)
        if code is None:
            raise
        raise WriteError(out, code) from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def swap_in(tmp: Path, out: Path) -> None:
    """Rename the complete folder `tmp` to `out`. An existing `out` is first renamed aside, and renamed back if
    the second rename fails, so `out` is always the old folder or the new one."""
    if not out.exists():
        os.replace(tmp, out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    try:
        os.replace(out, aside / out.name)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(aside / out.name, out)
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def interrupts_held():
    """Hold Ctrl-C (SIGINT) while the folders are swapped and deliver it afterwards: an interrupt between the two
    renames would otherwise leave neither the old export nor the new one under the name."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread receives signals
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *args: received.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(*received[0])
        elif received and previous != signal.SIG_IGN:
            # SIG_DFL, or a handler installed outside Python (getsignal gives None): deliver it as Python's own
            # Ctrl-C would be, rather than lose it
            raise KeyboardInterrupt


def write_lora(state: dict, meta: dict, out: Path, dtype: torch.dtype, fmt: str) -> Path:
    lora = meta["lora"]
    if fmt == "lora-kohya":
        tensors = to_kohya(state, lora["alpha"])
        # sd-scripts' own header entries: A1111 reads them to tell an SD v1 LoRA from an SDXL / SD 2 one
        header = {"ss_network_module": "networks.lora", "ss_network_dim": str(lora["rank"]),
                  "ss_network_alpha": str(lora["alpha"]), "ss_base_model_version": "sd_v1", "ss_v2": "False",
                  "ss_output_name": out.stem}
    else:
        tensors, header = to_diffusers(state, lora["rank"], lora["alpha"]), {}
    return atomic_save_safetensors(_cast(tensors, dtype), out, {**_header(meta), **header})


# ---------------------------------------------------------------------------------------------------------
# The command


def resolve_checkpoint(path) -> Path:
    """A run folder's best checkpoint, or the file itself."""
    path = Path(path)
    if path.is_dir():
        found = best_checkpoint(path)
        if found is None:
            raise UserError(f"{path} holds no best.safetensors: pass a train.py run folder or a "
                            "checkpoint file; a run writes its best checkpoint at the first validation")
        return found
    if not path.exists():
        raise UserError(f"{path} not found; pass a train.py run folder (runs/<subject>) or its best.safetensors")
    return path


def default_out(ckpt: Path, fmt: str) -> Path:
    """Beside the checkpoint, named after the run: runs/dog/dog.safetensors, dog-diffusers/, dog-lora.safetensors."""
    name = ckpt.resolve().parent.name or "model"
    return ckpt.parent / f"{name}{SUFFIX[fmt]}"


def check_out(out: Path, fmt: str, overwrite: bool, ckpt: Path) -> None:
    """Refuse an output that would replace what the user did not mean to lose: anything without --overwrite, and
    even with it the checkpoint itself, a folder for a file (or the other way round), a folder that is not an
    earlier diffusers export."""
    if fmt != "diffusers" and out.suffix != ".safetensors":
        raise UserError(f"--out {out}: the {fmt} format is one .safetensors file; name it *.safetensors")
    if not out.exists():
        return
    if not overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it, or --out another path")
    resolved, source = out.resolve(), ckpt.resolve()
    if resolved == source or resolved in source.parents:
        raise UserError(f"--out {out} would replace the checkpoint {ckpt} it is exported from; choose another --out")
    if fmt != "diffusers" and out.is_dir():
        raise UserError(f"--out {out} is a folder; the {fmt} format is one file: name a file *.safetensors")
    if fmt == "diffusers" and not (out / "model_index.json").is_file():
        raise UserError(f"--out {out} exists and is not a diffusers model folder (no model_index.json), which "
                        "--overwrite would delete; choose another --out")


def export_checkpoint(path, fmt: str = "single-file", out=None, precision: str | None = None, weights=None,
           overwrite: bool = False) -> Path:
    """Write checkpoint (or run folder) `path` as `fmt` in `precision` (None: the format's default); returns the
    output path."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    ckpt = resolve_checkpoint(path)
    state, meta = load_checkpoint(ckpt)  # (train.py's last.pt is refused here, with what to pass instead)
    is_lora = meta["content"] == "lora"
    if fmt.startswith("lora") and not is_lora:
        raise UserError(f"{ckpt} is a whole fine-tuned U-Net, not a LoRA; export it as --format single-file or "
                        "diffusers (train with --lora RANK for a LoRA)")
    dtype = DTYPES[precision or ("fp16" if fmt.startswith("lora") else "fp32")]
    out = Path(out) if out is not None else default_out(ckpt, fmt)
    check_out(out, fmt, overwrite, ckpt)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(out, e) from None
    if fmt.startswith("lora"):
        return write_lora(state, meta, out, dtype, fmt)
    del state  # apply_checkpoint reads it again into the model
    sd = load_sd(weights or meta.get("base"), "cpu", torch.float32)
    if Path(sd.source).resolve() == out.resolve():
        raise UserError(f"--out {out} is the base model itself, which the checkpoint needs; choose another --out")
    apply_checkpoint(sd, ckpt)  # a LoRA is merged here
    writer = write_single_file if fmt == "single-file" else write_diffusers
    return writer(sd, out, dtype, meta)
