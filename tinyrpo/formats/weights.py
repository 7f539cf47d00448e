"""Loading public checkpoints into tinyrpo's networks: the one module that reads weight files.

    load_sd(path)    Stable Diffusion v1.x: one .safetensors file (CompVis layout) or a diffusers folder
    load_clip(path)  CLIP: an HF folder (model.safetensors, config.json) or the weight file itself
    load_dino(path)  DINO ViT: HF facebook/dino-vits16 names or DINO's own (timm) names; .safetensors/.pth/.bin

tinyrpo's modules carry the diffusers / HF names, so those files load with a plain strict load_state_dict.
Every other layout is mapped by the rename rules of tinyrpo/formats/layouts.py (one table per network, built from
the config; shared with the export, which runs them backwards), and every config is read there too: off
tensor shapes for a single file, as openai/CLIP's build_model does (what shapes cannot tell, head counts,
follows SD v1's rule unless the file's header carries the diffusers configs tinyrpo.export writes: then those
are used, exactly, and a one-line note says what they change), or from a folder's config.json.

Every load is strict: a tensor missing, left over (beyond the known non-weights) or of the wrong shape raises
one WeightsError naming the file and the first few offending tensors, and checkpoints of other models (SD 2.x,
SDXL, inpainting) are refused by name. Models are built on the meta device and the file's tensors are
assigned, so no memory or time goes into a random initialization that would be overwritten.

Mirrors diffusers/loaders/single_file_utils.py (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
convert_ldm_clip_checkpoint) and transformers' convert_dino_to_pytorch.py; tests/test_weights.py checks
the CompVis mapping against diffusers' converter, value for value.

Facts that trip loaders (the layout and config facts are in tinyrpo/formats/layouts.py):
- The text encoder's names lose their `text_model.` prefix when transformers 5.x saves a CLIPTextModel
  (so in SD folders that recent diffusers/transformers write): both namings load.
- HF's ViTConfig defaults to layer_norm_eps 1e-12 and facebook/dino-vits16 keeps it; DINO trained with 1e-6.
- Non-weights in single files: schedule buffers, position_ids (int64), model_ema.* (see below).
"""
import json
import pickle
import re
import shlex
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from tinyrpo.clip import CLIPConfig, CLIPModel, CLIPTextModel
from tinyrpo.dino import DINO
from tinyrpo.formats import hub
from tinyrpo.formats.checkpoint import unet_fingerprint
from tinyrpo.formats.identify import WANTED, Identified, identify, kind_of_names, wrong_kind
from tinyrpo.formats.layouts import (CONFIG_KEYS, DINO_HF, DINO_ORIGINAL, SCHEDULE_BUFFERS, SD1_ONLY, TEXT_PREFIX,
                                     UNET_PREFIX, VAE_PREFIX, Renames, WeightsError, compvis_unet_table,
                                     compvis_vae_table, expand, indices, infer_clip_text_config,
                                     infer_clip_vision_config, infer_compvis_unet_config, infer_compvis_vae_config,
                                     infer_dino_config, split_qkv, unet_config_from_diffusers, vae_conv_to_linear,
                                     vae_config_from_diffusers, vae_legacy_table)
from tinyrpo.schedulers import DDIMScheduler, SchedulerConfig, from_diffusers_config
from tinyrpo.tokenizer import CLIPTokenizer
from tinyrpo.unet import UNet
from tinyrpo.vae import AutoencoderKL


# ---------------------------------------------------------------------------------------------------------
# Reading files


def read_state_dict(path, want: str = "sd") -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, or of a .pth / .bin / .ckpt state dict (weights_only=True).
    `want` (a kind of tinyrpo.formats.identify) is what the caller loads, to word the error for a train.py checkpoint."""
    path = Path(path)
    if path.suffix == ".safetensors" and (found := identify(path)) and found.kind == "ckpt":  # its header says so
        raise WeightsError(wrong_kind(path, want, found))
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(f"{path} holds Python objects that torch.load(weights_only=True) refuses to run "
                           f"({str(e).splitlines()[0]}); use the .safetensors version of these weights") from None
    except Exception as e:  # safetensors and zip/pickle raise many types on a corrupt or cut-short file
        raise WeightsError(f"cannot read {path} ({type(e).__name__}: {e}): the file is corrupt or incomplete; "
                           "delete it and download it again") from None
    if isinstance(obj, dict) and str(obj.get("format", "")).startswith("tinyrpo"):
        raise WeightsError(wrong_kind(path, want, Identified("ckpt", "a checkpoint written by train.py")))
    # A Lightning .ckpt keeps its weights under "state_dict"; DINO's training checkpoints under "teacher".
    for key in ("state_dict", "teacher"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} is not a state dict of tensors")
    return obj


def _read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot read {path}: {e}") from None


def _first_file(folder: Path, names: list[str], what: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise WeightsError(f"{folder} has no {what} weights: expected {' or '.join(names[:2])}")


# ---------------------------------------------------------------------------------------------------------
# One network's tensors, renamed, with the config that fits them; strict build


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def mismatch_error(source, what, missing=(), unexpected=(), misshaped=(), hint="") -> WeightsError:
    parts = [f"{label} {_few(list(names))}" for label, names in
             (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if names]
    return WeightsError(f"{source} does not match {what}: {'; '.join(parts)}" + (f"; {hint}" if hint else ""))


class _SkipInit(TorchFunctionMode):
    """Skip the random initialization of a model whose every tensor is about to be replaced. (On the meta
    device torch still runs it, and its first normal_ there costs seconds of imports.)"""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in ("normal_", "uniform_", "trunc_normal_", "kaiming_uniform_"):
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def empty_model(cls, cfg) -> nn.Module:
    """`cls(cfg)` on the meta device: names and shapes, no memory, no initialization."""
    with torch.device("meta"), _SkipInit():
        return cls(cfg)


@dataclass
class Part:
    """One network: its tensors under our names, its config, and how to talk about the file's names."""
    cls: type
    cfg: object
    state: dict  # our name -> tensor
    source: str  # the file, for messages
    what: str  # e.g. "the SD v1 U-Net"
    file_name: Callable[[str], str]  # our name -> the file's (to name a missing tensor)
    origin: dict = field(default_factory=dict)  # our name -> the file's, for every tensor in state
    unknown: list = field(default_factory=list)  # the file's names that map to nothing
    hint: str = ""
    guess: object = None  # for a single file whose header gave cfg: the config its shapes alone would give

    def check(self) -> nn.Module:
        """Raise a WeightsError unless the tensors are exactly the model's, name for name and shape for shape;
        return the (empty, meta-device) model."""
        model = empty_model(self.cls, self.cfg)
        expected = model.state_dict()
        missing = [self.file_name(k) for k in expected if k not in self.state]
        unexpected = self.unknown + [self.origin.get(k, k) for k in self.state if k not in expected]
        misshaped = [f"{self.origin.get(k, k)} {list(self.state[k].shape)} (expected {list(v.shape)})"
                     for k, v in expected.items() if k in self.state and self.state[k].shape != v.shape]
        if missing or unexpected or misshaped:
            raise mismatch_error(self.source, self.what, missing, unexpected, misshaped, self.hint)
        return model

    def build(self, device="cpu", dtype=torch.float32) -> nn.Module:
        """The model on `device` in `dtype` (floating tensors cast; integer ones kept), in eval mode."""
        model = self.check()
        state = {k: t.to(device, dtype if t.is_floating_point() else t.dtype) for k, t in self.state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        if str(device) != "meta":  # a non-persistent buffer would still be an empty meta tensor
            left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
            assert not left, f"{self.cls.__name__} has tensors no checkpoint holds: {left[:3]}"
        return model.eval()

    def shape(self, ours: str) -> torch.Size:
        """The shape of one of our tensors, or the error that names it missing (used while inferring sizes)."""
        if ours not in self.state:
            raise mismatch_error(self.source, self.what, missing=[self.file_name(ours)], hint=self.hint)
        return self.state[ours].shape


def rename(state: dict, renames: Callable[[str], str | None], fix=None) -> tuple[dict, dict, list]:
    """-> (our name -> tensor, our name -> file name, file names that map to nothing or collide)."""
    out, origin, unknown = {}, {}, []
    for k, t in state.items():
        new = renames(k)
        if new is None or new in out:
            unknown.append(k)
            continue
        out[new] = fix(new, t) if fix else t
        origin[new] = k
    return out, origin, unknown


# ---------------------------------------------------------------------------------------------------------
# Stable Diffusion v1: single file (CompVis layout)

SD1_HINT = "is this an SD v1.x checkpoint?"


def _ignored_single(k: str) -> bool:
    return k in SCHEDULE_BUFFERS or k.startswith("model_ema.") or k.endswith("position_ids")


def refuse_other_single_files(names, source: str) -> None:
    """Name the model family of a single file that is not SD v1 (its text encoder gives it away first)."""
    names = list(names)
    if any(k.startswith(("conditioner.embedders.", UNET_PREFIX + "label_emb.")) for k in names):
        raise WeightsError(f"{source} is a Stable Diffusion XL checkpoint (conditioner.embedders.*, label_emb); "
                           + SD1_ONLY)
    if any(k.startswith("cond_stage_model.model.") for k in names):
        raise WeightsError(f"{source} is a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder "
                           f"cond_stage_model.model.*); " + SD1_ONLY)
    if not any(k.startswith(UNET_PREFIX) for k in names):
        message = wrong_kind(source, "sd", kind_of_names(names))
        raise WeightsError(message or f"{source} is not a Stable Diffusion v1.x single-file checkpoint (no "
                           f"{UNET_PREFIX}* tensors); " + WANTED["sd"])


def single_file_configs(path: Path) -> dict[str, dict]:
    """The diffusers configs tinyrpo.export writes into a single file's header ({"unet": {...}, "vae", "text_encoder",
    "scheduler"}: layouts.CONFIG_KEYS); {} for a public file, which carries none."""
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception:  # a corrupt file: read_state_dict says so
        return {}
    configs = {}
    for part, key in CONFIG_KEYS.items():
        if key in header:
            try:
                configs[part] = json.loads(header[key])
            except ValueError:
                configs[part] = None
            if not isinstance(configs[part], dict):
                raise WeightsError(f"{path}: its header entry {key} is not a JSON config; export the model again "
                                   "(python -m tinyrpo.export) or pass the diffusers folder it came from")
    return configs


def header_note(path: Path, parts: dict[str, Part], scheduler: SchedulerConfig) -> str | None:
    """One line naming what a single file's header says and its shapes could not (None when nothing differs)."""
    changed = [f"{name} {k}={v}" for name, p in parts.items() if p.guess is not None
               for k, v in asdict(p.cfg).items() if getattr(p.guess, k) != v]
    changed += [f"scheduler {k}={v}" for k, v in asdict(scheduler).items() if getattr(SchedulerConfig(), k) != v]
    if not changed:
        return None
    return (f"note: {path} carries its architecture in its header (tinyrpo.export), read from there instead of "
            f"SD v1.5's: {', '.join(changed)}")


def text_part(state: dict, hf: dict | None, source: str, what: str = "the SD v1 text encoder (CLIP text tower)",
              hint: str = "", strip: str = "") -> Part:
    """A CLIP text tower under `text_model.*`. transformers 5.x's save_pretrained writes its names without
    that prefix (embeddings.*, encoder.*, final_layer_norm.*), so it is added where missing."""
    def ours(k):
        k = k[len(strip):]
        return k if k.startswith("text_model.") else "text_model." + k
    renamed = {ours(k): t for k, t in state.items() if not k.endswith("position_ids")}
    p = Part(CLIPTextModel, None, renamed, source, what, file_name=lambda k: strip + k,
             origin={ours(k): k for k in state}, hint=hint)
    p.cfg = infer_clip_text_config(p, hf)
    return p


def sd_single_file_parts(state: dict, source: str, configs: dict | None = None) -> dict[str, Part]:
    """Split an SD v1 single file into U-Net, VAE and text-encoder parts under our names, sizes inferred, or
    taken from `configs` (the diffusers configs tinyrpo.export wrote into the header: single_file_configs)."""
    configs = configs or {}
    refuse_other_single_files(state, source)
    groups = {UNET_PREFIX: {}, VAE_PREFIX: {}, TEXT_PREFIX: {}}
    strays = []
    for k, t in state.items():
        if _ignored_single(k):
            continue
        prefix = next((g for g in groups if k.startswith(g)), None)
        if prefix is None:
            strays.append(k)
        else:
            groups[prefix][k[len(prefix):]] = t
    for prefix, what in ((VAE_PREFIX, "VAE"), (TEXT_PREFIX, "text encoder")):
        if not groups[prefix]:
            raise WeightsError(f"{source} has no {what} ({prefix}* tensors): it is not a complete SD v1.x "
                               "checkpoint; pass one with all three parts, or a diffusers folder")

    # U-Net: infer the config from the file's names, then rename with the table that config implies.
    raw = Part(UNet, None, groups[UNET_PREFIX], source, "the SD v1 U-Net", lambda k: UNET_PREFIX + k, hint=SD1_HINT)
    unet_guess = infer_compvis_unet_config(raw)
    unet_cfg = (unet_config_from_diffusers(configs["unet"], f"{source}'s header {CONFIG_KEYS['unet']}")
                if "unet" in configs else unet_guess)
    renames = Renames(compvis_unet_table(unet_cfg))
    s, origin, unknown = rename(raw.state, renames)
    unet = Part(UNet, unet_cfg, s, source, "the SD v1 U-Net", lambda k: UNET_PREFIX + renames.file_name(k),
                {k: UNET_PREFIX + v for k, v in origin.items()}, [UNET_PREFIX + k for k in unknown] + strays, SD1_HINT,
                unet_guess if "unet" in configs else None)

    raw = Part(AutoencoderKL, None, groups[VAE_PREFIX], source, "the SD v1 VAE", lambda k: VAE_PREFIX + k,
               hint=SD1_HINT)
    vae_guess = infer_compvis_vae_config(raw)
    vae_cfg = vae_config_from_diffusers(configs["vae"]) if "vae" in configs else vae_guess
    renames_vae = Renames(compvis_vae_table(vae_cfg))
    s, origin, unknown = rename(raw.state, renames_vae, vae_conv_to_linear)
    vae = Part(AutoencoderKL, vae_cfg, s, source, "the SD v1 VAE", lambda k: VAE_PREFIX + renames_vae.file_name(k),
               {k: VAE_PREFIX + v for k, v in origin.items()}, [VAE_PREFIX + k for k in unknown], SD1_HINT,
               vae_guess if "vae" in configs else None)

    text = text_part({TEXT_PREFIX + k: t for k, t in groups[TEXT_PREFIX].items()}, None, source,
                     hint=SD1_HINT, strip=TEXT_PREFIX)
    if "text_encoder" in configs:
        text.guess, text.cfg = text.cfg, infer_clip_text_config(text, configs["text_encoder"])
    return {"unet": unet, "vae": vae, "text_encoder": text}


# ---------------------------------------------------------------------------------------------------------
# Stable Diffusion v1: diffusers folder

def _weights_file(folder: Path, stem: str) -> Path:
    # diffusers' "fp16" variant files (`*.fp16.safetensors`) stand in when the plain ones are absent.
    return _first_file(folder, [f"{stem}.safetensors", f"{stem}.fp16.safetensors", f"{stem}.bin", f"{stem}.fp16.bin"],
                       folder.name)


def _not_a_folder_message(folder: Path) -> str:
    """Say what the folder is instead: another model (then which flag takes it), the folder of a single file
    (then that file), one part of an SD folder (then the whole folder)."""
    found = identify(folder)
    head = f"{folder} has no unet/ subfolder, so it is not a diffusers Stable Diffusion folder"
    if found is not None and found.kind == "sd" and found.file is not None:
        return f"{head}; it holds the single-file checkpoint {found.file.name}: pass --weights {shlex.quote(str(found.file))}"
    return wrong_kind(folder, "sd", found) or f"{head} (unet/, vae/, text_encoder/); " + WANTED["sd"]


def sd_folder_parts(folder: Path) -> dict[str, Part]:
    """U-Net, VAE and text-encoder parts of a diffusers folder; each config.json is honoured."""
    if not (folder / "unet").is_dir():
        raise WeightsError(_not_a_folder_message(folder))
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    pipeline = str(index.get("_class_name", ""))
    if "XL" in pipeline or (folder / "text_encoder_2").is_dir():
        raise WeightsError(f"{folder} is a Stable Diffusion XL folder ({pipeline or 'text_encoder_2/'}); " + SD1_ONLY)
    for sub in ("unet", "vae", "text_encoder"):
        if not (folder / sub).is_dir():
            raise WeightsError(f"{folder} has no {sub}/ subfolder: a diffusers SD v1 folder needs unet/, vae/, "
                               "text_encoder/ (tokenizer/ and scheduler/ are optional here)")

    unet_file = _weights_file(folder / "unet", "diffusion_pytorch_model")
    vae_file = _weights_file(folder / "vae", "diffusion_pytorch_model")
    text_file = _weights_file(folder / "text_encoder", "model")
    text_config = folder / "text_encoder" / "config.json"
    return {"unet": unet_part(read_state_dict(unet_file), _read_json(folder / "unet" / "config.json"), str(unet_file)),
            "vae": vae_part(read_state_dict(vae_file), _read_json(folder / "vae" / "config.json"), str(vae_file)),
            "text_encoder": text_part(read_state_dict(text_file),
                                      _read_json(text_config) if text_config.is_file() else None, str(text_file))}


def unet_part(state: dict, config: dict, source: str) -> Part:
    """A diffusers U-Net file: our names already, so nothing to rename."""
    cfg = unet_config_from_diffusers(config, str(Path(source).with_name("config.json")))
    return Part(UNet, cfg, state, source, "the SD v1 U-Net", lambda k: k, {k: k for k in state},
                hint="does unet/config.json describe this file?")


def vae_part(state: dict, config: dict, source: str) -> Part:
    """A diffusers VAE file, in either attention naming."""
    legacy = Renames(vae_legacy_table(), passthrough=True)
    s, origin, unknown = rename(state, legacy, vae_conv_to_linear)
    return Part(AutoencoderKL, vae_config_from_diffusers(config), s, source, "the SD v1 VAE", legacy.file_name,
                origin, unknown, hint="does vae/config.json describe this file?")


def check_sd_parts(parts: dict[str, Part], source: str) -> None:
    """The three networks must fit together (a U-Net from one model and a VAE from another would not)."""
    u, v, t = parts["unet"].cfg, parts["vae"].cfg, parts["text_encoder"].cfg
    if u.in_channels == 9:
        raise WeightsError(f"{source} is an inpainting model (its U-Net takes 9 input channels: latents, mask and "
                           "masked image); tinyrpo fine-tunes the text-to-image model: use v1-5-pruned-emaonly")
    if not u.in_channels == u.out_channels == v.latent_channels:
        raise WeightsError(f"{source}: the U-Net maps {u.in_channels} to {u.out_channels} channels but the VAE's "
                           f"latents have {v.latent_channels}; " + SD1_ONLY)
    if u.cross_attention_dim != t.hidden_size:
        raise WeightsError(f"{source}: the U-Net attends to {u.cross_attention_dim}-wide text states but the text "
                           f"encoder gives {t.hidden_size}; " + SD1_ONLY)


# ---------------------------------------------------------------------------------------------------------
# Public loaders


@dataclass
class StableDiffusion:
    unet: UNet
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    scheduler_config: SchedulerConfig
    source: str  # the path given to load_sd
    fingerprint: str  # see unet_fingerprint


def load_sd(path, device="cpu", dtype=torch.float32) -> StableDiffusion:
    """Stable Diffusion v1.x from one .safetensors file (CompVis layout) or a diffusers folder.

    Models come back in eval mode with requires_grad left on (freeze what you do not train). The folder's
    tokenizer/ and scheduler/scheduler_config.json are used when present, else the vocabulary shipped
    with tinyrpo and SD v1.5's schedule.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(hub.missing_weights_message("sd15", path))
    if path.is_dir():
        parts = sd_folder_parts(path)
        vocab, merges = path / "tokenizer" / "vocab.json", path / "tokenizer" / "merges.txt"
        tokenizer = (CLIPTokenizer.from_files(vocab, merges) if vocab.is_file() and merges.is_file()
                     else CLIPTokenizer.from_bpe_gz())
        sched = path / "scheduler" / "scheduler_config.json"
        scheduler_config = from_diffusers_config(sched) if sched.is_file() else SchedulerConfig()
    else:
        configs = single_file_configs(path)
        parts = sd_single_file_parts(read_state_dict(path), str(path), configs)
        tokenizer = CLIPTokenizer.from_bpe_gz()
        scheduler_config = from_diffusers_config(configs["scheduler"]) if "scheduler" in configs else SchedulerConfig()
        if note := header_note(path, parts, scheduler_config):
            print(note, file=sys.stderr)
    check_sd_parts(parts, str(path))
    unet = parts["unet"].build(device, dtype)
    return StableDiffusion(unet=unet, vae=parts["vae"].build(device, dtype),
                           text_encoder=parts["text_encoder"].build(device, dtype), tokenizer=tokenizer,
                           scheduler=DDIMScheduler(scheduler_config), scheduler_config=scheduler_config,
                           source=str(path), fingerprint=unet_fingerprint(parts["unet"].cfg, parts["unet"].state))


def _refuse_other_kind(path: Path, want: str, state: dict | None = None) -> None:
    """A path that holds another model than `want` (an SD folder given as CLIP, ...): say what it is and
    which flag takes it. Before reading, from folders and .safetensors headers; after, from the tensor names."""
    if not path.exists():
        return  # the loader names the download command
    message = wrong_kind(path, want, None if state is None else kind_of_names(state))
    if message:
        raise WeightsError(message)


def _hf_weights(path: Path, kind: str, extra: tuple = ()) -> tuple[Path, dict | None]:
    """(weight file, config.json dict or None) for an HF folder or a weight file given directly."""
    if not path.exists():
        raise WeightsError(hub.missing_weights_message(kind, path))
    folder = path if path.is_dir() else path.parent
    file = _first_file(path, ["model.safetensors", "pytorch_model.bin", *extra], kind) if path.is_dir() else path
    config = folder / "config.json"
    return file, (_read_json(config) if config.is_file() else None)


def clip_part(state: dict, hf: dict | None, source: str) -> Part:
    """An HF CLIPModel file: sizes from shapes (B/32, B/16, L/14 alike), heads/eps/act from config.json if any."""
    state = {k: t for k, t in state.items() if not k.endswith("position_ids")}
    what = "CLIP (HF CLIPModel layout)"
    towers = [f"{t}*" for t in ("text_model.", "vision_model.") if not any(k.startswith(t) for k in state)]
    if towers:
        raise mismatch_error(source, what, missing=towers, hint="pass a full CLIP model such as "
                             "openai/clip-vit-large-patch14 (an SD text_encoder/ holds the text tower only)")
    p = Part(CLIPModel, None, state, source, what, lambda k: k, {k: k for k in state})
    hf = hf or {}
    p.cfg = CLIPConfig(text=infer_clip_text_config(p, hf.get("text_config")),
                       vision=infer_clip_vision_config(p, hf.get("vision_config")),
                       projection_dim=p.shape("visual_projection.weight")[0])
    return p


def load_clip(path, device="cpu", dtype=torch.float32) -> CLIPModel:
    """CLIP from an HF folder (model.safetensors or pytorch_model.bin, + config.json) or the file itself."""
    path = Path(path)
    kind = "clip-b32" if path.name == hub.MODELS["clip-b32"][1] else "clip-l14"
    _refuse_other_kind(path, "clip")
    file, hf = _hf_weights(path, kind)
    state = read_state_dict(file, "clip")
    _refuse_other_kind(file, "clip", state)
    return clip_part(state, hf, str(file)).build(device, dtype)


def dino_part(state: dict, hf: dict | None, source: str) -> Part:
    """A DINO ViT in HF ViTModel names or DINO's own; `hf` (config.json) is used for the HF layout only."""
    # DINO's training checkpoints prefix the backbone ("module.", "backbone."; its load_pretrained_weights
    # strips them); the projection head (head.*) and HF's pooler (pooler.*) play no part in the features.
    for prefix in ("module.", "backbone.", "vit."):  # vit.: transformers' ViTFor* heads wrap a ViTModel
        state = {k.removeprefix(prefix): t for k, t in state.items()}
    state = {k: t for k, t in state.items() if not k.startswith(("head.", "pooler."))}
    if "cls_token" in state:  # DINO original / timm
        layers = len(indices(state, r"blocks\.(\d+)\."))
        renames, state, hf = Renames(expand(DINO_ORIGINAL, layers)), split_qkv(state), None
        file_name = lambda k: re.sub(r"attn\.[qkv]\.", "attn.qkv.", renames.file_name(k))  # noqa: E731
        eps = 1e-6  # DINO's vision_transformer.py: partial(nn.LayerNorm, eps=1e-6)
    elif "embeddings.cls_token" in state:  # HF ViTModel
        layers = len(indices(state, r"encoder\.layer\.(\d+)\."))
        renames = Renames(expand(DINO_HF, layers))
        file_name = renames.file_name
        # HF's ViTConfig defaults to 1e-12 and facebook/dino-vits16 keeps it; DINO trained with 1e-6.
        eps = hf.get("layer_norm_eps", 1e-12) if hf is not None else 1e-6
    else:
        raise mismatch_error(source, "DINO ViT (HF ViTModel or DINO names)",
                             missing=["cls_token / embeddings.cls_token"],
                             hint="pass facebook/dino-vits16 or dino_deitsmall16_pretrain.pth")
    s, origin, unknown = rename(state, renames)
    origin = {k: re.sub(r"attn\.[qkv]\.", "attn.qkv.", v) for k, v in origin.items()}
    p = Part(DINO, None, s, source, "DINO ViT", file_name, origin, unknown)
    p.cfg = infer_dino_config(p, hf, eps)
    return p


def load_dino(path, device="cpu", dtype=torch.float32) -> DINO:
    """DINO from an HF folder (facebook/dino-vits16: model.safetensors or pytorch_model.bin, config.json) or a
    weight file in either naming (e.g. dino_deitsmall16_pretrain.pth)."""
    path = Path(path)
    pth = sorted(p.name for p in path.glob("*.pth")) if path.is_dir() else []
    _refuse_other_kind(path, "dino")
    file, hf = _hf_weights(path, "dino", tuple(pth))
    state = read_state_dict(file, "dino")
    _refuse_other_kind(file, "dino", state)
    return dino_part(state, hf, str(file)).build(device, dtype)
