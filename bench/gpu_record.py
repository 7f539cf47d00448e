"""What bench/gpu.py's sections share: the sizes they build, the record of one section, timing and memory.

A section is a list of items run in order of importance. Each item is timed, caught (an error, a CUDA
out-of-memory included, is recorded and the next item runs) and written to the section's JSON file as
soon as it ends, so a section killed at its time limit still leaves everything it finished; an item
still marked "running" in that file was cut off by the limit. An item whose estimated cost on an H100
no longer fits the section's time is skipped, and says so.
"""
import gc
import json
import os
import resource
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tests import fixtures
from tinyrpo.clip import CLIPConfig, CLIPTextConfig
from tinyrpo.unet import UNet, UNetConfig
from tinyrpo.vae import VAEConfig

GiB = 2**30


# ---------------------------------------------------------------------------------------------- sizes

@dataclass
class Sizes:
    """What every section builds: SD v1.5 and CLIP ViT-L/14 for the report, the tests' tiny ones for --dry-run."""
    unet: UNetConfig
    vae: VAEConfig
    text: CLIPTextConfig
    clip: CLIPConfig
    resolution: int
    sample_steps: int
    kernel_cases: list                # (pairs B, per-sample shape): odd sizes, partial blocks, B > FINISH_ROWS
    warmup: int                       # untimed steps before the timed ones (the first one compiles)
    repeats: int                      # timed train steps / forwards per measurement
    sample_repeats: int
    matmul: int                       # n of the n×n×n bf16 matmul that measures the achievable peak
    copy_mib: int
    fullrun: dict = field(default_factory=dict)  # TrainConfig overrides (none: the default run)

    @property
    def latent(self) -> int:
        return self.resolution // 2 ** (len(self.vae.block_out_channels) - 1)


REAL = Sizes(UNetConfig(), VAEConfig(), CLIPTextConfig(), CLIPConfig(), resolution=512, sample_steps=50,
             kernel_cases=[(1, (4, 64, 64)), (3, (4, 17, 19)), (17, (1, 2, 3)), (1, (4, 63, 65)), (40, (4, 9, 11)),
                           (8, (4, 96, 96))],
             warmup=2, repeats=10, sample_repeats=3, matmul=8192, copy_mib=2048)
DRY = Sizes(fixtures.TINY_UNET, fixtures.TINY_VAE, fixtures.TINY_TEXT,
            CLIPConfig(text=fixtures.TINY_CLIP_TEXT, vision=fixtures.TINY_CLIP_VISION, projection_dim=32),
            resolution=16, sample_steps=3, kernel_cases=[(17, (1, 2, 3)), (2, (4, 17, 19))],
            warmup=1, repeats=1, sample_repeats=1, matmul=256, copy_mib=16,
            fullrun=dict(resolution=16, steps=4, val_every=2, save_every=2, sample_steps=2, val_images_per_prompt=1,
                         gen_batch_size=8, options={"images_per_prompt": 1}))


# ---------------------------------------------------------------------------------------------- one section's record

class Unsupported(Exception):
    """What this device or build cannot run (e.g. an SDPA backend): recorded as such, not as a failure."""


class Section:
    """One section's process: its settings, its items, and the JSON file they are flushed to."""

    def __init__(self, spec: dict):
        self.spec, self.name, self.path = spec, spec["section"], Path(spec["partial"])
        self.until, self.dry = spec["until"], spec["dry_run"]
        self.device = torch.device(spec["device"])
        self.cuda = self.device.type == "cuda"
        self.sizes = DRY if self.dry else REAL
        self.backend = spec["compile_backend"]
        self.train_dtype = torch.bfloat16 if self.cuda else None  # the trainer's "auto": bf16 autocast on CUDA
        self.sample_dtype = torch.float16 if self.cuda else torch.float32
        self.scratch = Path(spec["scratch"])
        self.data = {"items": {}, "notes": [], "info": {}}

    def left(self) -> float:
        return self.until - time.time()

    def note(self, text: str):
        if text not in self.data["notes"]:
            self.data["notes"].append(text)
            self.flush()

    def flush(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_jsonable))
        os.replace(tmp, self.path)

    def item(self, name: str, fn, est_s: float = 0.0):
        """Run fn() -> dict of figures as item `name`; est_s: its rough cost on an H100 (skipped if it cannot fit)."""
        est = 0.0 if self.dry else est_s
        if est > self.left():
            self.data["items"][name] = {"status": "skipped", "why": f"needs ~{est:.0f} s, {self.left():.0f} s left "
                                        f"in this section (rerun it alone: --sections {self.name})"}
            self.flush()
            return None
        self.data["items"][name] = {"status": "running"}
        self.flush()
        print(f"[{self.name}] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            result = fn() or {}
            rec = {"status": "ok", **result}
        except Unsupported as e:
            result, rec = None, {"status": "unsupported", "why": str(e)}
        except Exception as e:  # noqa: BLE001 (a failed measurement is a result; the next one still runs)
            result = None
            rec = {"status": "error", "error": f"{type(e).__name__}: {str(e).strip()[:600]}",
                   "traceback": traceback.format_exc(limit=-4)[-2000:]}
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        self.data["items"][name] = rec
        self.flush()
        figures = ", ".join(f"{k} {_short(v)}" for k, v in rec.items() if k in SHOW) or rec.get("error", "")
        print(f"[{self.name}] {name}: {rec['status']} in {rec['seconds']:.1f} s; {figures}", flush=True)
        free(self.device)
        return result

    def compile(self, fn, mode: str = "default"):
        """torch.compile(fn) with the section's backend; --compile-backend none returns fn and notes it."""
        if self.backend == "none":
            self.note("torch.compile was skipped (--compile-backend none, the dry run's default on a CPU): the "
                      "compiled rows ran eager code")
            return fn
        kw = {"mode": mode} if self.backend == "inductor" and mode != "default" else {}
        return torch.compile(fn, backend=self.backend, **kw)


SHOW = ("ms", "s_per_image", "mfu_pct", "peak_gib", "rel_err", "grad_err", "total_s", "tflops", "vs_baseline")


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _jsonable(x):
    if isinstance(x, (torch.Tensor, np.generic)):
        return x.item() if x.numel() == 1 else x.tolist()
    return str(x)


def free(device):
    """Give an item's GPU memory back before the next one measures its peak (the CPU needs no help: a full
    gc.collect there costs more than the tiny dry-run items)."""
    if torch.device(device).type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, n: int) -> list[float]:
    """Seconds of each of n calls of fn, the device synchronized around each."""
    times = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def back_to_back(fn, device, n: int) -> list[float]:
    """Seconds of each of n calls of fn run back to back, the host never waiting for the GPU in between
    (CUDA events on the GPU's timeline), so launch overhead hides behind queued work as in a training loop."""
    if device.type != "cuda":
        return timed(fn, device, n)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    torch.cuda.synchronize()
    events[0].record()
    for e in events[1:]:
        fn()
        e.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])]


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak(device) -> dict:
    """Peak memory since reset_peak: CUDA allocated and reserved; on the CPU the process's peak RSS (all items)."""
    if device.type == "cuda":
        return {"peak_gib": torch.cuda.max_memory_allocated() / GiB, "reserved_gib": torch.cuda.max_memory_reserved() / GiB}
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


@contextmanager
def sdpa(backend: str | None):
    """Restrict F.scaled_dot_product_attention to one backend (None: PyTorch's choice); raise Unsupported when
    that backend cannot run these inputs on this device."""
    if backend is None:
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        with sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                          "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]):
            yield
    except RuntimeError as e:
        if "No viable backend" in str(e) or "No available kernel" in str(e):
            raise Unsupported(f"SDPA {backend} cannot run here: {str(e).splitlines()[0][:200]}") from None
        raise


def unet_flops(cfg: UNetConfig, latent: int) -> float:
    """F: one U-Net forward on one latent, counted as bench/train_step.py counts it (FlopCounterMode, meta)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        unet = UNet(cfg)
        x, t = torch.empty(1, cfg.in_channels, latent, latent), torch.zeros(1, dtype=torch.long)
        c = torch.empty(1, 77, cfg.cross_attention_dim)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(x, t, c)
    return float(counter.get_total_flops())


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
