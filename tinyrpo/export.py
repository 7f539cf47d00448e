"""Export a fine-tuned model for the tools people already use: A1111, ComfyUI, diffusers, kohya, civitai.

    python -m tinyrpo.export runs/dog                                  # runs/dog/dog.safetensors (single file)
    python -m tinyrpo.export runs/dog --format single-file --precision fp16 --out dog-fp16.safetensors
    python -m tinyrpo.export runs/dog --format diffusers               # runs/dog/dog-diffusers/
    python -m tinyrpo.export runs/dog --format lora-kohya              # runs/dog/dog-lora.safetensors
    python -m tinyrpo.export runs/dog/best.safetensors --format lora-diffusers

RUN_OR_CKPT is a train.py run folder (its best checkpoint is used) or a checkpoint file. Formats:

    single-file     one CompVis-layout SD v1 .safetensors, v1-5-pruned-emaonly's names: the fine-tuned U-Net
                    (a LoRA merged into it), the base model's VAE and text encoder. A1111, ComfyUI and
                    diffusers' from_single_file load it, and so does `sample.py --weights`.
    diffusers       a folder StableDiffusionPipeline.from_pretrained loads (model_index.json, unet/, vae/,
                    text_encoder/, tokenizer/, scheduler/).
    lora-kohya      a LoRA checkpoint in kohya sd-scripts' names (lora_unet_*.lora_down / lora_up / alpha): put
                    it in A1111's models/Lora or ComfyUI's models/loras.
    lora-diffusers  a LoRA checkpoint in the names diffusers' pipe.load_lora_weights reads (unet.*.lora_A/B).

The single file is the loader's rules run backwards (tinyrpo/formats/layouts.py), so what tinyrpo reads it writes. A single
file has no config.json: what tensor shapes cannot tell (head counts, the VAE's scaling factor, the sample size, the
noise schedule) a loader takes to be SD v1.5's. So the export also writes the diffusers configs of the U-Net, VAE,
text encoder and scheduler into the file's header (tinyrpo.unet_config, ...: JSON), and tinyrpo reads them back
exactly, with a one-line note when they differ from SD v1.5's (the toy world's model: 4 heads, scaling 0.39382,
32 px). A1111, ComfyUI and from_single_file ignore the header: for a model that is not SD v1.5's shape, give those
tools the diffusers export. Public files carry no such entries and are read as before.
--precision: fp32 keeps a full fine-tune exactly (it moves weights by ~1e-3 of their size, near fp16's
resolution); fp16 halves the file (2.1 GB for SD v1.5). LoRA files default to fp16: their factors lose nothing
that matters there. Every file is written atomically and an existing output is kept unless --overwrite.

Nothing is left half-written: a single file goes to a temporary file that is renamed over the target when complete,
a diffusers folder is built in a temporary folder that then takes the old one's place (Ctrl-C is held for those two
renames). A full disk, a read-only target or Ctrl-C mid-write removes the temporary file or folder and leaves an
earlier export as it was; the first two say so in one line ("cannot write OUT: no space left on the device; ...").
--overwrite never replaces the checkpoint being exported, its base model, or a folder that is not a diffusers export.
"""
import argparse

from tinyrpo.cli import HelpFormatter, add_alias
from tinyrpo.errors import run_cli
from tinyrpo.formats.exports import FORMATS, PRECISIONS, export_checkpoint


def build_parser() -> argparse.ArgumentParser:
    description, examples = __doc__.split("\n\n")[:2]
    p = argparse.ArgumentParser(prog="python -m tinyrpo.export", description=description,
                                epilog=f"examples:\n{examples}\n\nThe formats are described in "
                                       "`python -m pydoc tinyrpo.export`.", formatter_class=HelpFormatter)
    p.add_argument("path", metavar="RUN_OR_CKPT", help="a train.py run folder (its best checkpoint) or a checkpoint")
    p.add_argument("--format", default="single-file", choices=FORMATS, help="what to write")
    p.add_argument("--precision", default=None, choices=PRECISIONS,
                   help="tensor precision (default: fp32 for single-file and diffusers, fp16 for the LoRA formats)")
    p.add_argument("--out", default=None, help="output file (folder for diffusers); default: beside the "
                                               "checkpoint, named after the run")
    p.add_argument("--weights", default=None, help="the base SD v1 model (default: the one the checkpoint records)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_alias(p, "--dtype", "--precision")  # the spelling before one vocabulary (cli.py)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = export_checkpoint(args.path, args.format, args.out, args.precision, args.weights, args.overwrite)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.is_dir() else out.stat().st_size
    print(f"wrote {out} ({size / 1e6:.1f} MB)")
    return out


if __name__ == "__main__":
    run_cli(main)
