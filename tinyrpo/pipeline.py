"""Text-to-image sampling with classifier-free guidance: prompts -> images.

Used by sample.py, by train.py (the negative set and the validation images) and by the evaluation.
The steps are those of diffusers' `StableDiffusionPipeline.__call__`, and with the same seed they give the
same images (tests/test_sample.py checks it pixel for pixel):

    prompt, negative prompt --tokenizer--> ids --text encoder--> c, c_neg     (once per distinct prompt)
    x_T ~ N(0, I), drawn on the CPU from a seeded generator                  (Ho et al. 2020, Alg. 2 line 1)
    for t in T..1:  ε = ε(x_t, c_neg) + s·(ε(x_t, c) − ε(x_t, c_neg))       (Ho & Salimans 2022, eq. 6)
                    x_{t-1} = DDIM / DDPM step(ε, t, x_t)                  (schedulers.py)
    image = VAE decode(x_0 / scaling_factor), mapped from [-1, 1] to [0, 1]

Seeding rule. Prompt p (0-based, in the order given) uses one CPU generator seeded with `seed + p`. From it
come, in diffusers' order: the initial latents of all n images of that prompt as ONE randn of shape
(n, C, h, w), then (DDPM, or DDIM with eta > 0) one randn of that shape at every step. So image k of prompt
p is exactly image k of diffusers'
    StableDiffusionPipeline(prompt_p, num_images_per_prompt=n, generator=torch.Generator().manual_seed(seed + p))
and it does not depend on `batch_size`, on the device, or on the other prompts. (With DDIM eta=0 it does not
depend on n either: the first k rows of a randn are the same whatever its length.) The same call therefore
gives the same noise every time, which is what train.py's validation images rely on.

Numerics: the U-Net, text encoder and VAE run in whatever dtype the caller cast them to; the latents, the
guidance combination and the scheduler math stay in float32 (diffusers keeps them in the model dtype, so in
fp16 the two differ by rounding only).
"""
import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from tinyrpo.errors import UserError
from tinyrpo.schedulers import DDIMScheduler, DDPMScheduler

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
# --precision's names, for every command (sample.py, the evaluation, train.py's autocast, the export, bench/).
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISIONS = ("auto", *DTYPES)


def resolve_device(name: str) -> torch.device:
    """--device: "auto" (the GPU when torch sees one), "cpu", "cuda" or "cuda:N"; a clear error otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this PyTorch sees no CUDA GPU; use --device cpu")
    return device


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """--precision of a model that only generates: "auto" is fp16 on a GPU (half the memory, SD v1's usual
    inference dtype), fp32 on the CPU (where fp16 matmuls are slow or missing)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


@dataclass
class ImageRecord:
    """How one image was made: image `index` of the `n` that `seed` gives for `prompt` (see the seeding rule)."""

    prompt: str
    negative_prompt: str
    seed: int
    index: int


def check_args(n, steps, guidance, scheduler, eta, height, width, factor, batch_size=None):
    """Raise UserError for a value generate() cannot use; the message names the flag to change."""
    if n < 1:
        raise UserError(f"--images-per-prompt must be at least 1 (got {n})")
    if steps < 1:
        raise UserError(f"--sample-steps must be at least 1 (got {steps})")
    if not 0 <= guidance < math.inf:  # also catches NaN
        raise UserError(f"--guidance must be >= 0 and finite (got {guidance}); 1 means no guidance, 7.5 is SD's "
                        "usual value")
    if scheduler not in SCHEDULERS:
        raise UserError(f"--scheduler must be one of {', '.join(SCHEDULERS)} (got {scheduler!r})")
    if not 0.0 <= eta <= 1.0:
        raise UserError(f"--eta must be in [0, 1] (got {eta}); 0 is deterministic DDIM, 1 is DDPM-like")
    for name, v in (("height", height), ("width", width)):
        if v < 1:
            raise UserError(f"--{name} must be positive (got {v})")
        if v % factor:
            raise UserError(f"--{name} must be a multiple of {factor}, the VAE's downsampling factor (got {v}); "
                            f"try {max(factor, round(v / factor) * factor)}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--gen-batch-size must be at least 1 (got {batch_size})")


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit integer


def check_seed(seed: int, count: int = 1, flag: str = "--seed") -> None:
    """Raise UserError unless seeds `seed` .. `seed + count - 1` (one per prompt) all fit a torch generator.
    Negative seeds are refused rather than wrapped around (-1 would silently be 2**64 - 1, not "random")."""
    top = MAX_SEED - (count - 1)
    if not 0 <= seed <= top:
        per = f"; prompt p uses {flag} + p, and there are {count} prompts" if count > 1 else ""
        raise UserError(f"{flag} must be between 0 and {top} (got {seed}){per}; "
                        f"any value in that range gives reproducible images")


@torch.inference_mode()
def encode_prompts(sd, prompts: list[str]) -> torch.Tensor:
    """Text-encoder states (P, 77, D) of `prompts`, each distinct prompt encoded once."""
    distinct = list(dict.fromkeys(prompts))
    limit = sd.tokenizer.context_length - 2
    for p in distinct:
        if len(sd.tokenizer.encode(p)) > limit:
            warnings.warn(f"prompt {p[:40]!r}... is longer than {limit} tokens; CLIP only sees the first {limit}")
    device = next(sd.text_encoder.parameters()).device
    states = sd.text_encoder(sd.tokenizer(distinct).to(device))
    return states[[distinct.index(p) for p in prompts]]


@torch.inference_mode()
def generate(sd, prompts, negative_prompt: str = "", n: int = 4, steps: int = 50, guidance: float = 7.5,
             scheduler: str = "ddim", eta: float = 0.0, seed: int = 0, height: int = 512, width: int = 512,
             batch_size: int | None = None, progress: bool = True, callback=None, unet=None,
             desc: str = "sampling"):
    """Generate n images for each prompt. Returns (images, records).

    images: float32 CPU tensor (len(prompts)·n, 3, height, width) in [0, 1], prompt-major (all n images of
            prompt 0 first); records: one ImageRecord per image, same order.
    prompts: a string or a list of strings; negative_prompt: the unconditional text of the guidance.
    scheduler: "ddim" (eta from 0 = deterministic to 1) or "ddpm" (ancestral; eta is ignored).
    guidance: s in ε_neg + s·(ε_c − ε_neg); with s = 1 the negative pass is skipped (it has no effect).
              (diffusers ignores s <= 1 and uses ε_c; here s < 1 moves toward the negative prompt.)
    batch_size: images per U-Net pass (the pass holds twice that with guidance); default min(all, 8).
    callback: called as callback(i, t, latents) after step i with the float32 latents of all images.
    unet: a U-Net to use instead of sd.unet (train.py passes the policy being trained, maybe compiled).
    desc: the progress bar's label.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise UserError("give at least one prompt")
    unet = sd.unet if unet is None else unet
    factor = sd.vae.downsample_factor
    check_args(n, steps, guidance, scheduler, eta, height, width, factor, batch_size)
    num = len(prompts) * n
    batch_size = min(num, 8) if batch_size is None else batch_size
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    vae_dtype = next(sd.vae.parameters()).dtype

    # Text: the same states for every image of a prompt; the negative prompt once for all.
    cond = encode_prompts(sd, prompts).to(dtype)  # (P, 77, D)
    guided = guidance != 1.0
    if guided:
        uncond = encode_prompts(sd, [negative_prompt]).to(dtype)  # (1, 77, D)

    # Initial noise x_T, one generator per prompt (see the seeding rule in the module docstring).
    C, h, w = sd.vae.cfg.latent_channels, height // factor, width // factor
    generators = [torch.Generator("cpu").manual_seed(seed + p) for p in range(len(prompts))]
    x = torch.cat([torch.randn((n, C, h, w), generator=g, dtype=torch.float32) for g in generators]).to(device)
    sched = SCHEDULERS[scheduler](sd.scheduler_config)
    sched.set_timesteps(steps)
    x = x * getattr(sched, "init_noise_sigma", 1.0)  # 1 for DDIM/DDPM; kept for schedulers that scale x_T

    step_kwargs = {"eta": eta} if scheduler == "ddim" else {}
    for i, t in enumerate(tqdm(sched.timesteps, desc=desc, disable=not progress, leave=False)):
        eps = torch.empty_like(x)
        for s in range(0, num, batch_size):
            xb = x[s:s + batch_size].to(dtype)
            ctx = cond[torch.arange(s, s + len(xb), device=cond.device) // n]
            if not guided:
                eps[s:s + len(xb)] = unet(xb, t, ctx).float()
                continue
            # One U-Net call for both halves, negative first as in diffusers.
            e_neg, e_cond = unet(torch.cat([xb, xb]), t, torch.cat([uncond.expand_as(ctx), ctx])).float().chunk(2)
            eps[s:s + len(xb)] = e_neg + guidance * (e_cond - e_neg)  # classifier-free guidance
        # Step each prompt's images together with that prompt's generator: the draws line up with diffusers.
        x = torch.cat([sched.step(eps[p * n:(p + 1) * n], t, x[p * n:(p + 1) * n], generator=g, **step_kwargs)
                       for p, g in enumerate(generators)])
        if callback is not None:
            callback(i, t, x)

    images = torch.cat([
        (sd.vae.decode_latents(x[s:s + batch_size].to(vae_dtype)).float() / 2 + 0.5).clamp(0, 1).cpu()
        for s in range(0, num, batch_size)
    ])
    records = [ImageRecord(p, negative_prompt, seed + i, k) for i, p in enumerate(prompts) for k in range(n)]
    return images, records


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) floats in [0, 1] -> (N, H, W, 3) uint8, rounded as diffusers' `numpy_to_pil` does."""
    x = images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return (x * 255).round().astype(np.uint8)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) floats in [0, 1] -> N RGB PIL images."""
    return [Image.fromarray(a) for a in to_uint8(images)]


def slug(prompt: str, limit: int = 48) -> str:
    """A prompt as part of a file name (sample.py's images, the evaluation's grids): "a sks dog, on the beach"
    -> "a-sks-dog-on-the-beach"."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit].strip("-") or "prompt"


def image_grid(images: list[Image.Image], rows: int | None = None, cols: int | None = None) -> Image.Image:
    """Tile equally sized images row by row. By default about square; give rows or cols to fix the shape."""
    if cols is None:
        cols = math.ceil(len(images) / rows) if rows else math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid
