"""What the benchmarks share: device sync, memory readings, diffusers' U-Net holding tinyrpo's
weights, and running one measurement in a fresh subprocess.

Import it from a script in bench/ after putting the repository root on sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.common import sync, ...
"""
import json
import platform
import resource
import subprocess
import sys

import torch

from tinyrpo.unet import UNet

def sync(device):
    """Wait for queued GPU work, so that a wall-clock reading covers it (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def rss_mib() -> float:
    """This process's resident set now, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    """This process's largest resident set so far, MiB (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine(device) -> str:
    """One line naming what ran the benchmark, for the printed header."""
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, torch {torch.__version__}"


def diffusers_unet(ours: UNet):
    """diffusers' UNet2DConditionModel holding the same tensors as `ours` (not copies).

    Built on the meta device, so no second set of weights is allocated or initialised, then given ours'
    state dict with assign=True; the strict load checks that every name and shape matches.
    """
    from diffusers import UNet2DConditionModel

    cfg = ours.cfg
    with torch.device("meta"):
        theirs = UNet2DConditionModel(
            sample_size=cfg.sample_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels)),
            block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
            attention_head_dim=cfg.num_heads,  # diffusers' misnomer: the number of heads in SD v1
            cross_attention_dim=cfg.cross_attention_dim, norm_num_groups=cfg.norm_num_groups)
    theirs.load_state_dict(ours.state_dict(), strict=True, assign=True)
    return theirs.train(ours.training)


def run_child(script: str, argv: list[str]) -> tuple[int, dict | None]:
    """Run `python3 script argv` in a fresh process; return its exit code and the JSON of its last stdout line.

    A fresh process per measurement keeps one model's memory from counting in another's peak, and lets
    the CPU runs fit in RAM one at a time. The child's stderr (progress, warnings) goes to ours.
    """
    r = subprocess.run([sys.executable, script, *argv], stdout=subprocess.PIPE, text=True)
    lines = r.stdout.strip().splitlines()
    try:
        return r.returncode, json.loads(lines[-1]) if r.returncode == 0 and lines else None
    except ValueError:
        return r.returncode, None
