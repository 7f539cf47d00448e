"""Generate images with Stable Diffusion v1, optionally with a U-Net fine-tuned by train.py.

    python sample.py --prompt "a photo of a dog on the beach"                     # base SD v1.5, 4 images
    python sample.py --ckpt runs/dog/best.pt --prompt "a sks dog in the snow" --n 8
    python sample.py --prompt "a cat" --prompt "a sks dog" --negative-prompt "blurry" --seed 7
    python sample.py --prompt "a castle" --scheduler ddpm --steps 100 --out samples/ddpm
    python sample.py --prompt "a dog" --device cpu --steps 10 --height 256 --width 256  # a quick CPU run

Each run writes into a new numbered folder (samples/0000/, samples/0001/, ...; --overwrite writes straight
into --out instead): one PNG per image, one grid per prompt and settings.json. Every PNG carries the
settings as text metadata, e.g. `python -c "from PIL import Image; print(Image.open('x.png').text)"`.
Seeds: prompt p uses --seed + p, and image k of it equals image k of diffusers' StableDiffusionPipeline
called with that prompt, num_images_per_prompt=--n and torch.Generator().manual_seed(--seed + p).
"""
import argparse
import json
import re
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo

from tinyrpo.cli import HelpFormatter
from tinyrpo.checkpoint import apply_checkpoint, load_checkpoint
from tinyrpo.download import DEFAULT_SD
from tinyrpo.errors import UserError, run_cli
from tinyrpo.identify import checkpoint_mixup
from tinyrpo.pipeline import check_args, check_seed, generate, image_grid, resolve_device, to_pil
from tinyrpo.weights import load_sd

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv=None):
    description, examples = __doc__.split("\n\n")[:2]
    p = argparse.ArgumentParser(description=description, epilog=f"examples:\n{examples}", formatter_class=HelpFormatter)
    p.add_argument("--prompt", action="append", required=True, help="text prompt; repeat for several prompts")
    p.add_argument("--negative-prompt", default="",
                   help="what guidance steers away from (the unconditional text; default: the empty prompt)")
    p.add_argument("--weights", default=None,
                   help=f"base SD v1 weights: a diffusers folder or a single .safetensors/.ckpt file "
                        f"(default: the checkpoint's recorded base with --ckpt, else {DEFAULT_SD})")
    p.add_argument("--ckpt", default=None, help="a fine-tuned U-Net checkpoint written by train.py (default: none, "
                                                 "the base model)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--scheduler", choices=["ddim", "ddpm"], default="ddim", help="sampler")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 = deterministic, 1 = DDPM-like); "
                                                         "ignored by ddpm")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt p uses seed + p")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--height", type=int, default=512, help="image height in pixels (a multiple of 8 for SD v1)")
    p.add_argument("--width", type=int, default=512, help="image width in pixels (a multiple of 8 for SD v1)")
    p.add_argument("--out", default="samples", help="output folder; each run gets a numbered subfolder")
    p.add_argument("--overwrite", action="store_true",
                   help="write straight into --out, replacing files of the same name, instead of a new subfolder")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per U-Net pass, to cap memory (default: all images, at most 8)")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net (slow start, faster steps)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return p.parse_args(argv)


def run_folder(out: Path, overwrite: bool) -> Path:
    """--out itself with --overwrite, else the next free numbered subfolder (created here, so never shared)."""
    if overwrite:
        out.mkdir(parents=True, exist_ok=True)
        return out
    out.mkdir(parents=True, exist_ok=True)
    i = 1 + max([int(d.name) for d in out.iterdir() if d.is_dir() and d.name.isdigit()], default=-1)
    while True:
        try:
            (out / f"{i:04d}").mkdir()
            return out / f"{i:04d}"
        except FileExistsError:  # another run took it meanwhile
            i += 1


def slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "prompt"


def png_info(settings: dict) -> PngInfo:
    info = PngInfo()
    for k, v in settings.items():
        info.add_text(k, "" if v is None else str(v))
    return info


def main(argv=None):
    args = parse_args(argv)
    # Everything but the VAE's downsampling factor can be checked before the (slow) weight loading.
    check_args(args.n, args.steps, args.guidance, args.scheduler, args.eta, args.height, args.width, 1, args.batch_size)
    check_seed(args.seed, len(args.prompt))
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.float16 if device.type == "cuda" else torch.float32)

    weights = args.weights
    if args.ckpt is not None:
        if mixup := checkpoint_mixup(args.ckpt):
            raise UserError(mixup)
        _, meta = load_checkpoint(args.ckpt)  # fails early on a bad file; memory-mapped, so cheap
        weights = weights or meta.get("base")
    weights = weights or DEFAULT_SD
    sd = load_sd(weights, device, dtype)
    if args.ckpt is not None:
        apply_checkpoint(sd, args.ckpt)
    unet = torch.compile(sd.unet) if args.compile else None

    images, records = generate(sd, args.prompt, negative_prompt=args.negative_prompt, n=args.n, steps=args.steps,
                               guidance=args.guidance, scheduler=args.scheduler, eta=args.eta, seed=args.seed,
                               height=args.height, width=args.width, batch_size=args.batch_size,
                               progress=args.progress, unet=unet)

    folder = run_folder(Path(args.out), args.overwrite)
    common = dict(negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
                  scheduler=args.scheduler, eta=args.eta, height=args.height, width=args.width, n=args.n,
                  weights=str(weights), ckpt=args.ckpt, dtype=str(dtype).removeprefix("torch."), device=str(device))
    pils = to_pil(images)
    written, index = [], []
    for p, prompt in enumerate(args.prompt):
        stem = f"p{p:02d}-{slug(prompt)}"
        for k in range(args.n):
            i, r = p * args.n + k, records[p * args.n + k]
            path = folder / f"{stem}-{k:02d}.png"
            pils[i].save(path, pnginfo=png_info({"prompt": r.prompt, "seed": r.seed, "index": r.index, **common}))
            written.append(path)
            index.append({"file": path.name, **vars(r)})
        path = folder / f"{stem}-grid.png"
        image_grid(pils[p * args.n:(p + 1) * args.n]).save(
            path, pnginfo=png_info({"prompt": prompt, "seed": args.seed + p, **common}))
        written.append(path)
    (folder / "settings.json").write_text(json.dumps({**vars(args), **common, "images": index}, indent=2) + "\n")
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    run_cli(main)
