"""Generate images with Stable Diffusion v1, optionally with a U-Net fine-tuned by train.py.

    python sample.py --prompt "a photo of a dog on the beach"                     # base SD v1.5, 4 images
    python sample.py --ckpt runs/dog/best.safetensors --prompt "a sks dog in the snow" --n 8
    python sample.py --lora my_style.safetensors --lora-scale 0.8 --prompt "a castle"  # a kohya/diffusers LoRA
    python sample.py --weights runs/dog/dog.safetensors --prompt "a sks dog"       # an exported single file
    python sample.py --prompt "a cat" --prompt "a sks dog" --negative-prompt "blurry" --seed 7
    python sample.py --prompt "a castle" --scheduler ddpm --steps 100 --out samples/ddpm
    python sample.py --prompt "a dog" --device cpu --steps 10 --height 256 --width 256  # a quick CPU run

Each run writes into a new numbered folder (samples/0000/, samples/0001/, ...; --overwrite writes straight
into --out instead): one PNG per image, one grid per prompt and settings.json. Every PNG carries the
settings as text metadata, e.g. `python -c "from PIL import Image; print(Image.open('x.png').text)"`, among
them `parameters` in AUTOMATIC1111's format (its "PNG Info" tab and civitai read it; tinyrpo/infotext.py).
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
from tinyrpo.checkpoint import BEST, apply_checkpoint, load_checkpoint
from tinyrpo.download import DEFAULT_SD
from tinyrpo.errors import UserError, run_cli
from tinyrpo.identify import checkpoint_mixup
from tinyrpo.infotext import infotext, lora_hash, model_hash, model_name
from tinyrpo.lora_files import apply_lora, tinyrpo_lora_meta
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
    p.add_argument("--ckpt", default=None, help=f"a checkpoint written by train.py: {BEST}, a fine-tuned U-Net or a "
                                                "LoRA (best.pt of older runs too; default: none, the base model)")
    p.add_argument("--lora", default=None, help="a LoRA file of an SD v1 model to merge in: kohya / A1111 / civitai "
                                                "(lora_unet_*), diffusers (lora_A/lora_B), or tinyrpo's own LoRA "
                                                "checkpoint (or its export)")
    p.add_argument("--lora-scale", type=float, default=1.0,
                   help="strength of the LoRA (--lora, or a LoRA --ckpt): 0 = base model, 1 = as trained")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--scheduler", choices=["ddim", "ddpm"], default="ddim", help="sampler")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 = deterministic, 1 = DDPM-like); "
                                                         "ignored by ddpm")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt p uses seed + p")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--height", type=int, default=None,
                   help="image height in pixels (a multiple of 8 for SD v1; default: the model's own size, "
                        "512 for SD v1.5, 32 for the toy world)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: as --height)")
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


def a1111_params(args, weights, ckpt_meta) -> dict:
    """AUTOMATIC1111's generation parameters (tinyrpo/infotext.py) of this run, but for the seed.

    Model / Model hash name the checkpoint file A1111 would load: the base weights, or, for a whole fine-tuned
    U-Net, the run (`python -m tinyrpo.export RUN` writes it as RUN.safetensors; its hash is not known before).
    LoRAs are listed in "Lora hashes" ("name: hash"), as A1111 does.
    """
    full_ckpt = ckpt_meta is not None and ckpt_meta["content"] == "unet"
    loras = []
    if ckpt_meta is not None and ckpt_meta["content"] == "lora":
        loras.append(f"{Path(args.ckpt).resolve().parent.name}: {lora_hash(args.ckpt)}")
    if args.lora is not None:
        loras.append(f"{Path(args.lora).stem}: {lora_hash(args.lora)}")
    return {"Steps": args.steps, "Sampler": args.scheduler.upper(), "CFG scale": args.guidance, "Seed": None,
            "Size": f"{args.width}x{args.height}", "Model hash": None if full_ckpt else model_hash(weights),
            "Model": Path(args.ckpt).resolve().parent.name if full_ckpt else model_name(weights),
            "Eta DDIM": args.eta if args.scheduler == "ddim" and args.eta != 0 else None,
            "Lora hashes": ", ".join(loras) or None}


def main(argv=None):
    args = parse_args(argv)
    # Everything but the VAE's downsampling factor can be checked before the (slow) weight loading.
    check_args(args.n, args.steps, args.guidance, args.scheduler, args.eta, args.height or 512, args.width or 512, 1,
               args.batch_size)
    check_seed(args.seed, len(args.prompt))
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (torch.float16 if device.type == "cuda" else torch.float32)

    weights, ckpt_meta = args.weights, None
    if args.ckpt is not None:
        if mixup := checkpoint_mixup(args.ckpt):
            raise UserError(mixup)
        _, ckpt_meta = load_checkpoint(args.ckpt)  # fails early on a bad file
        weights = weights or ckpt_meta.get("base")
    ckpt_is_lora = ckpt_meta is not None and ckpt_meta["content"] == "lora"
    if args.lora_scale != 1.0 and args.lora is None and not ckpt_is_lora:
        raise UserError("--lora-scale sets the strength of a LoRA; pass --lora FILE (or a LoRA --ckpt)")
    if args.lora is not None and weights is None:
        weights = (tinyrpo_lora_meta(args.lora) or {}).get("base")  # a tinyrpo LoRA names its base
    weights = weights or DEFAULT_SD
    sd = load_sd(weights, device, dtype)
    native = sd.unet.cfg.sample_size * sd.vae.downsample_factor  # the size the model was trained at
    args.height = args.height or native
    args.width = args.width or args.height
    if args.ckpt is not None:
        # --lora-scale goes to --lora when there is one, else to a LoRA checkpoint
        apply_checkpoint(sd, args.ckpt, args.lora_scale if ckpt_is_lora and args.lora is None else 1.0)
    if args.lora is not None:
        apply_lora(sd, args.lora, args.lora_scale)
    unet = torch.compile(sd.unet) if args.compile else None

    images, records = generate(sd, args.prompt, negative_prompt=args.negative_prompt, n=args.n, steps=args.steps,
                               guidance=args.guidance, scheduler=args.scheduler, eta=args.eta, seed=args.seed,
                               height=args.height, width=args.width, batch_size=args.batch_size,
                               progress=args.progress, unet=unet)

    folder = run_folder(Path(args.out), args.overwrite)
    common = dict(negative_prompt=args.negative_prompt, steps=args.steps, guidance=args.guidance,
                  scheduler=args.scheduler, eta=args.eta, height=args.height, width=args.width, n=args.n,
                  weights=str(weights), ckpt=args.ckpt, lora=args.lora, lora_scale=args.lora_scale,
                  dtype=str(dtype).removeprefix("torch."), device=str(device))
    a1111 = a1111_params(args, weights, ckpt_meta)
    pils = to_pil(images)
    written, index = [], []
    for p, prompt in enumerate(args.prompt):
        stem = f"p{p:02d}-{slug(prompt)}"
        for k in range(args.n):
            i, r = p * args.n + k, records[p * args.n + k]
            path = folder / f"{stem}-{k:02d}.png"
            parameters = infotext(r.prompt, args.negative_prompt, {**a1111, "Seed": r.seed})
            pils[i].save(path, pnginfo=png_info({"parameters": parameters, "prompt": r.prompt, "seed": r.seed,
                                                 "index": r.index, **common}))
            written.append(path)
            index.append({"file": path.name, **vars(r)})
        path = folder / f"{stem}-grid.png"
        parameters = infotext(prompt, args.negative_prompt, {**a1111, "Seed": args.seed + p})
        image_grid(pils[p * args.n:(p + 1) * args.n]).save(
            path, pnginfo=png_info({"parameters": parameters, "prompt": prompt, "seed": args.seed + p, **common}))
        written.append(path)
    (folder / "settings.json").write_text(json.dumps({**vars(args), **common, "images": index}, indent=2) + "\n")
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    run_cli(main)
