"""One SD v1.5 U-Net forward: tinyrpo vs diffusers' UNet2DConditionModel, same random weights.

    python3 bench/unet_forward.py                         # CPU, fp32, batch 2, 64x64 latent, 3 timed runs
    python3 bench/unet_forward.py --threads 1 --repeats 5 # steadier on a busy machine (CPU time barely moves)
    python3 bench/unet_forward.py --device cuda --precision bf16 --repeats 10
    python3 bench/unet_forward.py --device cuda --precision bf16 --compile

Speed: both models live in one process and share the same weight tensors (diffusers is built on the meta
device and gets tinyrpo's state dict assigned, names match). After a warm-up of each, the runs are
interleaved in ABBA order (ours, theirs, theirs, ours, ...) so drifting clocks or load hit both alike.
Medians are shown as wall time and as this process's CPU time (steadier when other jobs share the cores).

Memory: on CPU each model is built and run once in a fresh subprocess, which reports its peak resident set
(getrusage ru_maxrss) and its resident set just before the forward, so one model's allocations cannot
inflate the other's number. Both children import the same libraries and build the same weights the same
way, so their peaks compare (the "before" numbers differ by diffusers' meta-built module). On CUDA,
torch.cuda.max_memory_allocated is exact per model, so it is measured in this process, above the weights.
"""
import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from tinyrpo.cli import HelpFormatter, add_alias  # noqa: E402
from tinyrpo.pipeline import DTYPES  # noqa: E402
from tinyrpo.unet import UNet, UNetConfig  # noqa: E402


def build(which: str, device: str, dtype: torch.dtype, ours: UNet | None = None) -> torch.nn.Module:
    """The model to time: 'ours' (default init), or 'diffusers' sharing `ours`' weight tensors."""
    if which == "ours":
        return UNet(UNetConfig()).to(device=device, dtype=dtype).eval()
    from diffusers import UNet2DConditionModel
    cfg = UNetConfig()
    # diffusers' defaults are SD v1's U-Net except the text width; the strict load below checks the rest.
    kwargs = dict(cross_attention_dim=cfg.cross_attention_dim, sample_size=cfg.sample_size)
    with torch.device("meta"):
        ref = UNet2DConditionModel(**kwargs)
    ref.load_state_dict(ours.state_dict(), strict=True, assign=True)
    return ref.eval()


def inputs(args, device, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 4, args.size, args.size, generator=g).to(device, dtype)
    ctx = torch.randn(args.batch, 77, 768, generator=g).to(device, dtype)
    t = torch.tensor([999, 500][: args.batch] + [10] * max(0, args.batch - 2), device=device)
    return x, t, ctx


def forward_fn(which, model):
    if which == "ours":
        return lambda x, t, ctx: model(x, t, ctx)
    return lambda x, t, ctx: model(x, t, ctx, return_dict=False)[0]


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def memory_child(args):
    """Subprocess: build one model, run one forward, print its RSS numbers as JSON."""
    # Both children import the same libraries and build the same tinyrpo model first (the diffusers one then takes
    # over its weight tensors), so their allocation histories match up to the forward and the peaks compare.
    import diffusers  # noqa: F401
    dtype = DTYPES[args.precision]
    torch.manual_seed(0)
    model = build("ours", "cpu", dtype)
    if args.memory_child == "diffusers":
        model = build("diffusers", "cpu", dtype, ours=model)
    f = forward_fn(args.memory_child, model)
    x, t, ctx = inputs(args, "cpu", dtype)
    with torch.inference_mode():
        before = rss_mib()
        f(x, t, ctx)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"before_forward_mib": before, "peak_mib": peak}))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--precision", default="fp32", choices=list(DTYPES),
                   help="weights and inputs dtype (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per model (default: %(default)s)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default: %(default)s)")
    p.add_argument("--size", type=int, default=64, help="latent height = width (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads, 0 = torch's default (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models first (default: off)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--memory-child", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    add_alias(p, "--dtype", "--precision")  # the spelling before one vocabulary (tinyrpo/cli.py)
    return p


def main():
    args = build_parser().parse_args()
    if args.memory_child:
        return memory_child(args)

    if args.threads:
        torch.set_num_threads(args.threads)
    dev, dtype = args.device, DTYPES[args.precision]
    torch.manual_seed(0)
    ours = build("ours", dev, dtype)
    ref = build("diffusers", dev, dtype, ours)
    x, t, ctx = inputs(args, dev, dtype)
    fns = {"tinyrpo": forward_fn("ours", ours), "diffusers": forward_fn("diffusers", ref)}
    if args.compile:
        fns = {k: torch.compile(f) for k, f in fns.items()}

    times = {k: [] for k in fns}
    cpu_times = {k: [] for k in fns}
    peaks = {}
    with torch.inference_mode():
        outs = {}
        for k, f in fns.items():  # warm-up (and compilation)
            outs[k] = f(x, t, ctx).float()
            sync(dev)
        err = ((outs["tinyrpo"] - outs["diffusers"]).abs().max() / outs["diffusers"].abs().max()).item()
        for r in range(args.repeats):
            for k, f in list(fns.items())[:: 1 if r % 2 == 0 else -1]:  # ABBA order: neither always goes first
                sync(dev)
                t0, c0 = time.perf_counter(), time.process_time()
                f(x, t, ctx)
                sync(dev)
                times[k].append(time.perf_counter() - t0)
                cpu_times[k].append(time.process_time() - c0)
        if dev.startswith("cuda") and not args.no_memory:
            for k, f in fns.items():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                f(x, t, ctx)
                sync(dev)
                peaks[k] = f"{(torch.cuda.max_memory_allocated() - base) / 2**20:.0f} MiB above weights"

    if dev == "cpu" and not args.no_memory:
        for k, child in (("tinyrpo", "ours"), ("diffusers", "diffusers")):
            cmd = [sys.executable, __file__, "--memory-child", child, "--precision", args.precision,
                   "--batch", str(args.batch), "--size", str(args.size)]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            peaks[k] = f"peak RSS {r['peak_mib']:.0f} MiB ({r['before_forward_mib']:.0f} before the forward)"

    print(f"SD v1.5 U-Net forward: device={dev} dtype={args.precision} batch={args.batch} latent={args.size}x{args.size} "
          f"threads={torch.get_num_threads()} compile={args.compile} repeats={args.repeats}; "
          f"max rel diff tinyrpo vs diffusers = {err:.1e}")
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu = {k: statistics.median(v) for k, v in cpu_times.items()}
    print(f"{'model':<10} {'wall s/fwd (median)':>20} {'min':>8} {'max':>8} {'CPU s/fwd (median)':>19}  memory")
    for k in fns:
        print(f"{k:<10} {med[k]:>20.3f} {min(times[k]):>8.3f} {max(times[k]):>8.3f} {cpu[k]:>19.3f}  {peaks.get(k, '-')}")
    print(f"ratio tinyrpo / diffusers: wall {med['tinyrpo'] / med['diffusers']:.3f}, CPU {cpu['tinyrpo'] / cpu['diffusers']:.3f}")


if __name__ == "__main__":
    main()
