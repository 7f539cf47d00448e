"""Text-to-image at SD v1.5 size: tinyrpo.pipeline.generate vs diffusers' StableDiffusionPipeline.

    python3 bench/sample.py --sample-steps 5                          # CPU, fp32: 50 steps take many minutes there
    python3 bench/sample.py --device cuda --precision fp16     # 512x512, 50 DDIM steps, batch 1, guidance 7.5
    python3 bench/sample.py --device cuda --precision fp16 --compile

One image per call (batch 1, so each U-Net pass holds 2 latents: negative and conditional), the whole
pipeline timed: text encoding, the denoising loop, the VAE decode. Both pipelines use the same random
weights (default PyTorch init of tinyrpo's networks; diffusers' U-Net and VAE get tinyrpo's tensors
assigned, names match; transformers' text encoder reads them from a file), the same DDIM schedule
and the same seed, so the images they make are compared too. After a one-step warm-up of each
(compilation with --compile), the timed runs alternate (ours, theirs, ours, ...) and the median is shown.

Memory: on CUDA, torch.cuda.max_memory_allocated above what was allocated before the call (the weights);
on CPU, the peak resident set during the call above the resident set before it, sampled every 5 ms.
"""
import argparse
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import diffusers_unet  # noqa: E402
from tinyrpo.cli import HelpFormatter, add_alias  # noqa: E402
from tinyrpo.clip import CLIPTextConfig, CLIPTextModel  # noqa: E402
from tinyrpo.pipeline import DTYPES, generate  # noqa: E402
from tinyrpo.schedulers import SchedulerConfig  # noqa: E402
from tinyrpo.tokenizer import CLIPTokenizer  # noqa: E402
from tinyrpo.unet import UNet, UNetConfig  # noqa: E402
from tinyrpo.vae import AutoencoderKL, VAEConfig  # noqa: E402

PROMPT, NEGATIVE = "a photo of a sks dog on the beach", "blurry, low quality"


def build_ours(device, dtype):
    torch.manual_seed(0)
    return SimpleNamespace(
        unet=UNet(UNetConfig()).to(device, dtype).eval(),
        vae=AutoencoderKL(VAEConfig()).to(device, dtype).eval(),
        text_encoder=CLIPTextModel(CLIPTextConfig()).to(device, dtype).eval(),
        tokenizer=CLIPTokenizer.from_bpe_gz(),
        scheduler_config=SchedulerConfig(),
    )


def build_diffusers(sd, device, dtype, tmp: Path):
    """StableDiffusionPipeline from diffusers / transformers classes holding `sd`'s weights (any sizes)."""
    from diffusers import AutoencoderKL as DAutoencoderKL
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig as HFTextConfig
    from transformers import CLIPTextModel as HFTextModel
    from transformers import CLIPTokenizer as HFTokenizer

    v, t, s = sd.vae.cfg, sd.text_encoder.config, sd.scheduler_config
    levels = len(v.block_out_channels)
    unet = diffusers_unet(sd.unet)  # diffusers' U-Net and VAE share tinyrpo's tensors (3.8 GB in fp32)
    with torch.device("meta"):
        vae = DAutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                             up_block_types=("UpDecoderBlock2D",) * levels,
                             block_out_channels=v.block_out_channels, layers_per_block=v.layers_per_block,
                             latent_channels=v.latent_channels, norm_num_groups=v.norm_num_groups,
                             sample_size=v.sample_size, scaling_factor=v.scaling_factor)
    vae.load_state_dict(sd.vae.state_dict(), strict=True, assign=True)
    # transformers' CLIPTextModel renames checkpoint keys on load, so it gets the weights through a file
    HFTextConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                 num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                 max_position_embeddings=t.max_position_embeddings, hidden_act=t.hidden_act,
                 layer_norm_eps=t.layer_norm_eps, eos_token_id=t.eos_token_id).save_pretrained(tmp / "text_encoder")
    state = {name: w.float().cpu().contiguous() for name, w in sd.text_encoder.state_dict().items()}
    save_file(state, tmp / "text_encoder" / "model.safetensors")
    text = HFTextModel.from_pretrained(tmp / "text_encoder")
    sd.tokenizer.save_vocab(tmp / "tokenizer")
    scheduler = DDIMScheduler(num_train_timesteps=s.num_train_timesteps, beta_start=s.beta_start, beta_end=s.beta_end,
                              beta_schedule=s.beta_schedule, steps_offset=s.steps_offset,
                              set_alpha_to_one=s.set_alpha_to_one, clip_sample=s.clip_sample)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=HFTokenizer.from_pretrained(tmp / "tokenizer"),
                                   unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device, dtype)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakMemory:
    """Peak memory of the code inside `with`, above what was in use when it started (see the docstring)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = rss_mib()
        self.stop = threading.Event()

        def poll():
            while not self.stop.wait(0.005):
                self.peak = max(self.peak, rss_mib())
        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.stop.set()
            self.thread.join()
            self.mib = max(self.peak, rss_mib()) - self.base


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps (default: %(default)s; use ~5 on a CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: %(default)s)")
    p.add_argument("--precision", default="fp32", choices=list(DTYPES), help="model dtype (default: %(default)s)")
    p.add_argument("--size", type=int, default=512, help="image height = width (default: %(default)s)")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=1, help="timed images per pipeline (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile both U-Nets (default: off)")
    for old, new in (("--steps", "--sample-steps"), ("--dtype", "--precision")):
        add_alias(p, old, new)  # the spellings before one vocabulary (tinyrpo/cli.py)
    return p


def main():
    args = build_parser().parse_args()
    dev, dtype = args.device, DTYPES[args.precision]

    sd = build_ours(dev, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_diffusers(sd, dev, dtype, Path(tmp))
    unet = torch.compile(sd.unet) if args.compile else sd.unet
    if args.compile:
        pipe.unet = torch.compile(pipe.unet)

    def ours(steps):
        return generate(sd, [PROMPT], negative_prompt=NEGATIVE, n=1, steps=steps, guidance=args.guidance, seed=0,
                        height=args.size, width=args.size, progress=False, unet=unet)[0]

    def theirs(steps):
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=args.guidance,
                    height=args.size, width=args.size, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images.float().cpu()

    fns = {"tinyrpo": ours, "diffusers": theirs}
    for f in fns.values():  # warm-up (and compilation)
        f(1)
    times, mem, images = {k: [] for k in fns}, {}, {}
    for _ in range(args.repeats):
        for k, f in fns.items():
            with PeakMemory(dev) as m:
                t0 = time.perf_counter()
                images[k] = f(args.sample_steps)
                if dev.startswith("cuda"):
                    torch.cuda.synchronize()
                times[k].append(time.perf_counter() - t0)
            mem[k] = max(mem.get(k, 0.0), m.mib)

    diff = (images["tinyrpo"] - images["diffusers"]).abs() * 255
    print(f"txt2img {args.size}x{args.size}, {args.sample_steps} DDIM steps, batch 1, guidance {args.guidance}: "
          f"device={dev} dtype={args.precision} threads={torch.get_num_threads()} compile={args.compile} "
          f"repeats={args.repeats}")
    print(f"same image? max |tinyrpo - diffusers| = {diff.max():.2f}/255, mean {diff.mean():.3f}/255")
    med = {k: statistics.median(v) for k, v in times.items()}
    what = "peak CUDA memory above weights" if dev.startswith("cuda") else "peak RSS above pre-call"
    print(f"{'pipeline':<10} {'s/image':>9}  {what}")
    for k in fns:
        print(f"{k:<10} {med[k]:>9.2f}  {mem[k]:.0f} MiB")
    print(f"ratio tinyrpo / diffusers = {med['tinyrpo'] / med['diffusers']:.3f}")


if __name__ == "__main__":
    main()
