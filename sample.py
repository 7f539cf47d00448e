"""Generate images with Stable Diffusion v1, optionally with a U-Net fine-tuned by train.py.

    python sample.py --prompt "a photo of a dog on the beach"                     # base SD v1.5, 4 images
    python sample.py --ckpt runs/dog/best.safetensors --prompt "a sks dog in the snow" --images-per-prompt 8
    python sample.py --lora my_style.safetensors --lora-scale 0.8 --prompt "a castle"  # a kohya/diffusers LoRA
    python sample.py --weights runs/dog/dog.safetensors --prompt "a sks dog"       # an exported single file
    python sample.py --prompt "a cat" --prompt "a sks dog" --negative-prompt "blurry" --seed 7
    python sample.py --prompt "a castle" --scheduler ddpm --sample-steps 100 --out samples/ddpm
    python sample.py --prompt "a dog" --device cpu --sample-steps 10 --height 256 --width 256  # a quick CPU run

Each run writes into a new numbered folder (samples/0000/, samples/0001/, ...; --overwrite writes straight
into --out instead): one PNG per image, one grid per prompt and settings.json. Every PNG carries the
settings as text metadata, e.g. `python -c "from PIL import Image; print(Image.open('x.png').text)"`, among
them `parameters` in AUTOMATIC1111's format (its "PNG Info" tab and civitai read it; tinyrpo/formats/infotext.py).
Seeds: prompt p uses --seed + p, and image k of it equals image k of diffusers' StableDiffusionPipeline
called with that prompt, num_images_per_prompt=--images-per-prompt and torch.Generator().manual_seed(--seed + p).
"""
import argparse
import hashlib
import math
import os
import shutil
import tempfile
from pathlib import Path

# Waiting OpenMP threads sleep instead of spinning (set before torch starts OpenMP): on a machine shared with
# other jobs a spinning thread steals the core its partner needs (see tinyrpo/toy/__main__.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from PIL.PngImagePlugin import PngInfo

from tinyrpo.cli import HelpFormatter, add_alias, check_input, check_out_folder
from tinyrpo.errors import UserError, run_cli
from tinyrpo.formats.checkpoint import BEST, apply_checkpoint, load_checkpoint
from tinyrpo.formats.identify import checkpoint_mixup
from tinyrpo.formats.infotext import infotext, lora_hash, model_hash, model_name
from tinyrpo.formats.lora_files import apply_lora, tinyrpo_lora_meta
from tinyrpo.formats.weights import load_sd
from tinyrpo.pipeline import (PRECISIONS, check_args, check_seed, generate, image_grid, resolve_device,
                              resolve_precision, slug, to_pil)
from tinyrpo.runs.atomic import atomic_save_image, atomic_write_json, fsync_dir, write_error
from tinyrpo.runs.paths import DEFAULT_SD
from tinyrpo.toy.subjects import WEIGHTS as TOY_WEIGHTS

SMALL_UNET = 20_000_000  # parameters: the toy world's U-Net has 4.2M, SD v1.5's 860M


def build_parser() -> argparse.ArgumentParser:
    description, examples = __doc__.split("\n\n")[:2]
    p = argparse.ArgumentParser(description=description, epilog=f"examples:\n{examples}", formatter_class=HelpFormatter)
    p.add_argument("--prompt", action="append", required=True, help="text prompt; repeat for several prompts")
    p.add_argument("--negative-prompt", default="",
                   help="what guidance steers away from (the unconditional text; default: the empty prompt)")
    p.add_argument("--weights", default=None,
                   help=f"base SD v1 weights: a diffusers folder or a single .safetensors/.ckpt file "
                        f"(default: the checkpoint's recorded base with --ckpt, else {DEFAULT_SD})")
    p.add_argument("--ckpt", default=None, help=f"a checkpoint written by train.py: {BEST}, a fine-tuned U-Net or a "
                                                "LoRA (default: none, the base model)")
    p.add_argument("--lora", default=None, help="a LoRA file of an SD v1 model to merge in: kohya / A1111 / civitai "
                                                "(lora_unet_*), diffusers (lora_A/lora_B), or tinyrpo's own LoRA "
                                                "checkpoint (or its export)")
    p.add_argument("--lora-scale", type=float, default=1.0,
                   help="strength of the LoRA (--lora, or a LoRA --ckpt): 0 = base model, 1 = as trained")
    p.add_argument("--sample-steps", type=int, default=50, help="denoising steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--scheduler", choices=["ddim", "ddpm"], default="ddim", help="sampler")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise (0 = deterministic, 1 = DDPM-like); "
                                                         "ignored by ddpm")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt; prompt p uses seed + p")
    p.add_argument("--images-per-prompt", type=int, default=4, help="images generated per prompt")
    p.add_argument("--height", type=int, default=None,
                   help="image height in pixels (a multiple of 8 for SD v1; default: the model's own size, "
                        "512 for SD v1.5, 32 for the toy world)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: as --height)")
    p.add_argument("--out", default="samples", help="output folder; each run gets a numbered subfolder")
    p.add_argument("--overwrite", action="store_true",
                   help="write straight into --out, replacing files of the same name, instead of a new subfolder")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="the models' dtype; auto: fp16 on CUDA, "
                                                                           "fp32 on CPU")
    p.add_argument("--gen-batch-size", type=int, default=None,
                   help="images per U-Net pass, to cap memory (default: all images, at most 8)")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net (slow start, faster steps)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: 1 for a model as small as the toy world's, where more "
                        "threads only wait for each other, else torch's, one per core)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    for old, new in (("--n", "--images-per-prompt"), ("--steps", "--sample-steps"), ("--dtype", "--precision"),
                     ("--batch-size", "--gen-batch-size")):  # the spellings before one vocabulary (cli.py)
        add_alias(p, old, new)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def run_folder(out: Path, overwrite: bool) -> Path:
    """--out itself with --overwrite, else the next free numbered subfolder (created here, so never shared)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            return out
        i = 1 + max([int(d.name) for d in out.iterdir() if d.is_dir() and d.name.isdigit()], default=-1)
        while True:
            try:
                (out / f"{i:04d}").mkdir()
                return out / f"{i:04d}"
            except FileExistsError:  # another run took it meanwhile
                i += 1
    except OSError as e:
        raise write_error(e.filename or out, e) from None


def write_all(out: Path, overwrite: bool, files: list[tuple[str, callable]]) -> list[Path]:
    """Write a run's files, each through save(path), all or none.

    A new numbered folder is this run's own: if any file cannot be written (a full disk, Ctrl-C), the folder is
    removed with what was written into it, so every folder under --out is a complete run. With --overwrite the
    files go to a hidden folder inside --out first and replace the old ones only once all are written (renames
    need no space), so a failed run leaves --out as it was.
    """
    folder = run_folder(out, overwrite)
    try:
        stage = Path(tempfile.mkdtemp(prefix=".sample-", dir=folder)) if overwrite else folder
    except OSError as e:
        raise write_error(folder, e) from None
    try:
        for name, save in files:
            save(stage / name)
        if overwrite:
            for name, _ in files:
                os.replace(stage / name, folder / name)
            stage.rmdir()
            fsync_dir(folder)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return [folder / name for name, _ in files]


def png_info(settings: dict) -> PngInfo:
    info = PngInfo()
    for k, v in settings.items():
        info.add_text(k, "" if v is None else str(v))
    return info


def a1111_params(args, weights, ckpt_meta) -> dict:
    """AUTOMATIC1111's generation parameters (tinyrpo/formats/infotext.py) of this run, but for the seed.

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
    return {"Steps": args.sample_steps, "Sampler": args.scheduler.upper(), "CFG scale": args.guidance, "Seed": None,
            "Size": f"{args.width}x{args.height}", "Model hash": None if full_ckpt else model_hash(weights),
            "Model": Path(args.ckpt).resolve().parent.name if full_ckpt else model_name(weights),
            "Eta DDIM": args.eta if args.scheduler == "ddim" and args.eta != 0 else None,
            "Lora hashes": ", ".join(loras) or None}


def same_file(a, b) -> bool:
    """The same file by path (links resolved) or by content (a copy)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    if a.stat().st_size != b.stat().st_size:
        return False
    return hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


def check_numbers(args) -> None:
    """The float flags argparse lets through as nan or inf ("--lora-scale nan" gives black images, exit 0)."""
    for flag, value in (("--lora-scale", args.lora_scale), ("--guidance", args.guidance), ("--eta", args.eta)):
        if not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number (got {value})")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1 (got {args.threads})")


def main(argv=None):
    args = parse_args(argv)
    check_numbers(args)
    # Everything but the VAE's downsampling factor can be checked before the (slow) weight loading.
    check_args(args.images_per_prompt, args.sample_steps, args.guidance, args.scheduler, args.eta,
               args.height or 512, args.width or 512, 1, args.gen_batch_size)
    check_seed(args.seed, len(args.prompt))
    check_out_folder(args.out)
    for flag in ("--weights", "--ckpt", "--lora"):
        if getattr(args, flag[2:]) is not None:
            check_input(getattr(args, flag[2:]), flag)
    device = resolve_device(args.device)
    dtype = resolve_precision(args.precision, device)
    if args.threads:
        torch.set_num_threads(args.threads)

    weights, ckpt_meta = args.weights, None
    if args.ckpt is not None:
        if mixup := checkpoint_mixup(args.ckpt):
            raise UserError(mixup)
        _, ckpt_meta = load_checkpoint(args.ckpt)  # fails early on a bad file
        weights = weights or ckpt_meta.get("base")
    ckpt_is_lora = ckpt_meta is not None and ckpt_meta["content"] == "lora"
    if args.lora_scale != 1.0 and args.lora is None and not ckpt_is_lora:
        raise UserError("--lora-scale sets the strength of a LoRA; pass --lora FILE (or a LoRA --ckpt)")
    if ckpt_is_lora and args.lora is not None and Path(args.lora).is_file() and same_file(args.ckpt, args.lora):
        raise UserError(f"--ckpt {args.ckpt} and --lora {args.lora} are the same LoRA, which would be merged twice; "
                        "pass it once (--ckpt or --lora) and set its strength with --lora-scale")
    if args.lora is not None and weights is None:
        weights = (tinyrpo_lora_meta(args.lora) or {}).get("base")  # a tinyrpo LoRA names its base
    toy_sd = Path(TOY_WEIGHTS["sd"])
    if weights is None and not Path(DEFAULT_SD).exists() and toy_sd.exists():
        # A fresh checkout has the toy model and not SD v1.5: say how to draw with what is there.
        raise UserError(f"no Stable Diffusion v1.5 weights at {DEFAULT_SD}: draw with the toy model that ships "
                        f"with tinyrpo (`python sample.py --weights {toy_sd} --prompt \"a toy on the beach\"`, or "
                        "--ckpt runs/toy/best.safetensors after `python train.py`), or get SD v1.5 with "
                        "`python -m tinyrpo.download sd15` (about 4.3 GB)")
    weights = weights or DEFAULT_SD
    check_input(weights, "--weights")  # also the base a checkpoint names
    sd = load_sd(weights, device, dtype)
    if args.threads is None and sum(p.numel() for p in sd.unet.parameters()) < SMALL_UNET:
        torch.set_num_threads(1)  # 4x faster than 2 threads for the toy model on a busy 2-core machine
    native = sd.unet.cfg.sample_size * sd.vae.downsample_factor  # the size the model was trained at
    args.height = args.height or native
    args.width = args.width or args.height
    if args.ckpt is not None:
        # --lora-scale goes to --lora when there is one, else to a LoRA checkpoint
        apply_checkpoint(sd, args.ckpt, args.lora_scale if ckpt_is_lora and args.lora is None else 1.0)
    if args.lora is not None:
        apply_lora(sd, args.lora, args.lora_scale)
    unet = torch.compile(sd.unet) if args.compile else None

    n = args.images_per_prompt
    images, records = generate(sd, args.prompt, negative_prompt=args.negative_prompt, n=n, steps=args.sample_steps,
                               guidance=args.guidance, scheduler=args.scheduler, eta=args.eta, seed=args.seed,
                               height=args.height, width=args.width, batch_size=args.gen_batch_size,
                               progress=args.progress, unet=unet)
    if not torch.isfinite(images).all():  # black PNGs otherwise
        raise UserError(f"the images came out NaN or infinite: the model overflowed at --lora-scale {args.lora_scale}, "
                        f"--guidance {args.guidance} in {str(dtype).removeprefix('torch.')}; use smaller values"
                        + (" or --precision fp32" if dtype != torch.float32 else ""))

    common = dict(negative_prompt=args.negative_prompt, steps=args.sample_steps, guidance=args.guidance,
                  scheduler=args.scheduler, eta=args.eta, height=args.height, width=args.width, n=n,
                  weights=str(weights), ckpt=args.ckpt, lora=args.lora, lora_scale=args.lora_scale,
                  dtype=str(dtype).removeprefix("torch."), device=str(device))
    a1111 = a1111_params(args, weights, ckpt_meta)
    pils = to_pil(images)
    files, index = [], []  # (file name, save(path)): written all together at the end, all or none

    def png(image, settings):
        return lambda path: atomic_save_image(image, path, pnginfo=png_info(settings))

    for p, prompt in enumerate(args.prompt):
        stem = f"p{p:02d}-{slug(prompt)}"
        for k in range(n):
            i, r = p * n + k, records[p * n + k]
            name = f"{stem}-{k:02d}.png"
            parameters = infotext(r.prompt, args.negative_prompt, {**a1111, "Seed": r.seed})
            files.append((name, png(pils[i], {"parameters": parameters, "prompt": r.prompt, "seed": r.seed,
                                              "index": r.index, **common})))
            index.append({"file": name, **vars(r)})
        parameters = infotext(prompt, args.negative_prompt, {**a1111, "Seed": args.seed + p})
        files.append((f"{stem}-grid.png", png(image_grid(pils[p * n:(p + 1) * n]),
                                              {"parameters": parameters, "prompt": prompt, "seed": args.seed + p,
                                               **common})))
    settings = {**vars(args), **common, "images": index}
    files.append(("settings.json", lambda path: atomic_write_json(path, settings)))
    written = write_all(Path(args.out), args.overwrite, files)
    for path in written[:-1]:  # the images, not settings.json
        print(path)
    return written[:-1]


if __name__ == "__main__":
    run_cli(main)
