"""The measurements of bench/gpu.py, one function per report section; each runs in its own process.

    machine    what ran it, and the ceilings measured on it: a large bf16 matmul, a device-to-device copy
    kernels    tinyrpo/kernels.py against the PyTorch reference in float64; under torch.compile(fullgraph)
               (bench/gpu_kernels.py)
    train      the RPO step of Trainer.run: eager, checkpointing, LoRA, compiled; ms, MFU, peak memory
    sample     50-step DDIM, CFG 7.5, batch 1: tinyrpo.pipeline.generate vs StableDiffusionPipeline
    fullrun    train.py's default RPO run through Trainer, on random weights written in the public layouts
    variants   SDPA backends, channels_last and compile modes on the train step and the sampler's forward

bench/gpu_record.py has the item machinery (time budget, errors, incremental writes) and the sizes.
"""
import copy
import os
import platform
import statistics
import tempfile
import time
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from bench.gpu_record import (GiB, Section, Sizes, back_to_back, folder_bytes, peak, reset_peak, sdpa, sync,
                              timed, unet_flops)
from bench.gpu_kernels import kernels_section
from bench.train_step import step_flops
from tests import fixtures
from tinyrpo import kernels
from tinyrpo.clip import CLIPModel, CLIPTextModel
from tinyrpo.lora import add_lora, lora_disabled
from tinyrpo.pipeline import generate
from tinyrpo.rpo import RPOOptions, rpo_forward
from tinyrpo.schedulers import NoiseSchedule, SchedulerConfig
from tinyrpo.tokenizer import CLIPTokenizer
from tinyrpo.config import TrainConfig, resolve_config
from tinyrpo.trainer import Trainer, optimizer_step
from tinyrpo.unet import UNet
from tinyrpo.vae import AutoencoderKL

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, matched against the device name in
# this order; the first match wins. --peak-tflops overrides.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H200", 989.0),
                    ("H100", 989.0), ("A100", 312.0)]
PROMPT, NEGATIVE = "a photo of a sks dog on the beach", "blurry, low quality"
SDPA = ("flash", "efficient", "cudnn", "math")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


# ---------------------------------------------------------------------------------------------- machine

def machine(sec: Section):
    info = sec.data["info"]
    info.update(python=platform.python_version(), torch=torch.__version__, cpu_count=os.cpu_count(),
                device=str(sec.device), triton=_version("triton"), diffusers=_version("diffusers"),
                transformers=_version("transformers"), kernels_triton=kernels.HAS_TRITON,
                triton_interpret=kernels.INTERPRET)
    if sec.cuda:
        p = torch.cuda.get_device_properties(sec.device)
        info.update(gpu=p.name, sm_count=p.multi_processor_count, gpu_memory_gib=p.total_memory / GiB,
                    capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda)
        match = next(((k, v) for k, v in PEAK_BF16_TFLOPS if k in p.name), None)
        info["datasheet_bf16_tflops"] = match[1] if match else None
        info["datasheet_source"] = f"table entry '{match[0]}'" if match else "no table entry for this device"
    else:
        info.update(gpu=None, datasheet_bf16_tflops=None, datasheet_source="CPU: no datasheet peak")
    if sec.spec.get("peak_tflops"):
        info.update(datasheet_bf16_tflops=sec.spec["peak_tflops"], datasheet_source="--peak-tflops")
    sec.flush()

    def matmul():
        n, dtype = sec.sizes.matmul, torch.bfloat16 if sec.cuda else torch.float32
        a, b = (torch.randn(n, n, device=sec.device, dtype=dtype) for _ in range(2))  # random, never zeros
        timed(lambda: a @ b, sec.device, 3)
        s = statistics.median(timed(lambda: a @ b, sec.device, 10))
        return {"n": n, "dtype": str(dtype), "tflops": 2 * n**3 / s / 1e12}

    def copy_():
        n = sec.sizes.copy_mib * 2**20 // 4
        a = torch.randn(n, device=sec.device)
        b = torch.empty_like(a)
        timed(lambda: b.copy_(a), sec.device, 3)
        s = statistics.median(timed(lambda: b.copy_(a), sec.device, 10))
        return {"mib": sec.sizes.copy_mib, "gb_per_s": 2 * a.numel() * 4 / s / 1e9}  # bytes read + written

    sec.item("bf16 matmul" if sec.cuda else "fp32 matmul", matmul)
    sec.item("device copy", copy_)


def _version(name):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------- the train step

class TrainStep:
    """Trainer.run's RPO step on random latents (as bench/train_step.py): the policy U-Net forward and backward
    on 2B latents, the frozen reference forward on the same 2B, the fused RPO loss, clipping, fused AdamW on
    fp32 master weights, autocast at the trainer's precision. lora: adapters on the attention projections
    (tinyrpo/lora.py), AdamW on them only, and the reference is the same U-Net with the adapters off."""

    def __init__(self, sec: Section, checkpointing=False, lora=False, compiled=False, mode="default",
                 channels_last=False, pairs=1):
        self.sec, self.dev, self.B, self.L = sec, sec.device, pairs, sec.sizes.latent
        self.channels_last = channels_last
        torch.manual_seed(0)  # every configuration starts from the same random weights
        with torch.device(self.dev):
            policy = UNet(sec.sizes.unet)
        if lora:
            self.params = add_lora(policy, sec.spec["lora_rank"])
        else:
            self.params = list(policy.parameters())
            # Trainer.load: a copy of the base in the autocast dtype (it only runs forwards)
            ref = copy.deepcopy(policy).to(sec.train_dtype or torch.float32).requires_grad_(False).eval()
        policy.gradient_checkpointing = checkpointing
        policy.train()
        if channels_last:
            policy.to(memory_format=torch.channels_last)
            if not lora:
                ref.to(memory_format=torch.channels_last)
        self.policy = policy
        self.policy_fwd = sec.compile(policy, mode) if compiled else policy
        if lora:
            def ref_fwd(x, t, c):
                with lora_disabled(policy):
                    return self.policy_fwd(x, t, c)
            self.ref_fwd = ref_fwd
        else:
            self.ref_fwd = sec.compile(ref, mode) if compiled else ref
        self.cfg = resolve_config(TrainConfig(subject=""))
        self.opt = torch.optim.AdamW(self.params, lr=self.cfg.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8,
                                     fused=True)  # as Trainer.run
        self.sched = NoiseSchedule(SchedulerConfig())
        g = torch.Generator().manual_seed(1)
        self.x0 = torch.randn(2 * pairs, 4, self.L, self.L, generator=g).to(self.dev)
        self.cond = torch.randn(2 * pairs, 77, sec.sizes.unet.cross_attention_dim, generator=g).to(self.dev)
        self.beta = RPOOptions().beta

    def autocast(self):
        if self.sec.train_dtype is None:
            return torch.autocast(self.dev.type, enabled=False)
        return torch.autocast(self.dev.type, dtype=self.sec.train_dtype)

    def __call__(self, k: int) -> torch.Tensor:
        """One step, its random draws seeded by k (so every configuration sees the same ones)."""
        g = torch.Generator().manual_seed(k)
        B, L = self.B, self.L
        t = torch.randint(0, self.sched.cfg.num_train_timesteps, (B,), generator=g)
        eps = torch.randn((B, 4, L, L), generator=g)
        y = torch.bernoulli(torch.full((B,), 0.5), generator=g)
        t, eps, y = (v.to(self.dev, non_blocking=True) for v in (t, eps, y))
        noise, tt = torch.cat([eps, eps]), torch.cat([t, t])  # a pair shares ε and t
        x_t = self.sched.add_noise(self.x0, noise, tt)
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        out = rpo_forward(self.policy_fwd, self.ref_fwd, x_t, tt, self.cond, noise, y, self.beta, self.autocast())
        optimizer_step(out.loss, self.params, self.opt, self.cfg.grad_clip)
        return out.loss.detach()

    def measure(self, attention=None, flops=None, ceilings=None) -> dict:
        """Warm-up steps (the first compiles and allocates AdamW's state), then timed steps without a host sync
        between them, as the trainer runs. Memory: peak_gib over the whole item (build, warm-up, steps; reset
        by the caller), step_peak_gib over the timed steps alone."""
        sizes, dev = self.sec.sizes, self.dev
        losses_, k = [], iter(range(10**6))

        def step():
            losses_.append(self(next(k)))
        with sdpa(attention):
            first = timed(step, dev, sizes.warmup)
            mem = {}
            if dev.type == "cuda":
                mem = {"state_gib": torch.cuda.memory_allocated() / GiB,  # weights, AdamW state, reference
                       "warmup_peak_gib": torch.cuda.max_memory_allocated() / GiB}
                torch.cuda.reset_peak_memory_stats()
            times = back_to_back(step, dev, sizes.repeats)
        if dev.type == "cuda":
            mem |= {"step_peak_gib": torch.cuda.max_memory_allocated() / GiB,
                    "reserved_gib": torch.cuda.max_memory_reserved() / GiB}
            mem["peak_gib"] = max(mem["warmup_peak_gib"], mem["step_peak_gib"])
        else:
            mem = peak(dev)
        ms = 1e3 * statistics.median(times)
        res = {"ms": ms, "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times), "first_step_s": first[0],
               "loss1": losses_[0].item(), "trainable_m": sum(p.numel() for p in self.params) / 1e6, **mem}
        if flops:
            res["tflops"] = flops / (ms / 1e3) / 1e12
            for key, peak_ in (("mfu_pct", (ceilings or {}).get("datasheet")),
                               ("mfu_matmul_pct", (ceilings or {}).get("matmul"))):
                if peak_:
                    res[key] = 100 * res["tflops"] / peak_
        return res


def _ceilings(sec: Section) -> dict:
    m = sec.spec.get("machine", {})
    return {"datasheet": m.get("info", {}).get("datasheet_bf16_tflops"),
            "matmul": m.get("items", {}).get("bf16 matmul" if sec.cuda else "fp32 matmul", {}).get("tflops")}


def train_section(sec: Section):
    sizes, dev = sec.sizes, sec.device
    F = unet_flops(sizes.unet, sizes.latent)
    flops = step_flops(F, 1)
    sec.data["info"].update(F_tflop=F / 1e12, step_tflop=flops / 1e12, latent=sizes.latent,
                            precision="bf16 autocast" if sec.cuda else "fp32", lora_rank=sec.spec["lora_rank"],
                            compile_mode=sec.spec["compile_mode"], ceilings_tflops=_ceilings(sec))
    sec.note("FLOPs as bench/train_step.py counts them: 8·F per pair (policy forward + backward = 3·2F, reference "
             "forward 2F); checkpointing's recomputation is not counted; LoRA rows use the same count, so their MFU "
             "compares speed with the full step rather than measuring the hardware")
    mode = sec.spec["compile_mode"]

    def run(**kw):
        reset_peak(dev)
        return TrainStep(sec, **kw).measure(flops=flops, ceilings=_ceilings(sec))

    sec.item("eager", lambda: run())
    sec.item("eager + gradient checkpointing", lambda: run(checkpointing=True))
    sec.item(f"eager + LoRA r{sec.spec['lora_rank']}", lambda: run(lora=True))
    for name, kw, est in (("compiled", {}, 60), ("compiled + gradient checkpointing", {"checkpointing": True}, 60),
                          (f"compiled + LoRA r{sec.spec['lora_rank']}", {"lora": True}, 50)):
        sec.item(name, lambda: _compiled(lambda: run(compiled=True, mode=mode, **kw)), est_s=est)


def _compiled(fn):
    try:
        return fn()
    finally:
        torch._dynamo.reset()  # drop the compiled graphs (and the models they hold)


# ---------------------------------------------------------------------------------------------- sampling

def build_sd(sizes: Sizes, device, dtype) -> SimpleNamespace:
    """Random SD networks (PyTorch's default init, made on the device) in the namespace generate() takes."""
    torch.manual_seed(0)
    with torch.device(device):
        unet, vae, text = UNet(sizes.unet), AutoencoderKL(sizes.vae), CLIPTextModel(sizes.text)
    return SimpleNamespace(unet=unet.to(dtype).eval(), vae=vae.to(dtype).eval(), text_encoder=text.to(dtype).eval(),
                           tokenizer=CLIPTokenizer.from_bpe_gz(), scheduler_config=SchedulerConfig())


def sample_section(sec: Section):
    sizes, dev, dtype = sec.sizes, sec.device, sec.sample_dtype
    res, steps = sizes.resolution, sizes.sample_steps
    sec.data["info"].update(resolution=res, steps=steps, guidance=7.5, batch=1, dtype=str(dtype), scheduler="DDIM",
                            repeats=sizes.sample_repeats)
    sd = build_sd(sizes, dev, dtype)
    images, pipes = {}, {}

    def ours(unet):
        return lambda n: generate(sd, [PROMPT], negative_prompt=NEGATIVE, n=1, steps=n, guidance=7.5, seed=0,
                                  height=res, width=res, progress=False, unet=unet)[0]

    def theirs(n):
        return pipes["pipe"](PROMPT, negative_prompt=NEGATIVE, num_inference_steps=n, guidance_scale=7.5, height=res,
                             width=res, generator=torch.Generator().manual_seed(0), output_type="pt").images.float().cpu()

    def pipeline():
        if "pipe" not in pipes:
            from bench.sample import build_diffusers  # needs diffusers: bring it as a wheel (bench/README.md)
            with tempfile.TemporaryDirectory(dir=sec.scratch) as tmp:
                pipes["pipe"] = build_diffusers(sd, dev, dtype, Path(tmp))
        return pipes["pipe"]

    def measure(key, make):
        from bench.sample import PeakMemory
        fn = make()
        t0 = time.perf_counter()
        fn(1)  # warm-up: one step (compiles the U-Net when compiled)
        sync(dev)
        warm = time.perf_counter() - t0
        times = []
        for _ in range(sizes.sample_repeats):
            with PeakMemory(dev) as m:
                times += timed(lambda: images.__setitem__(key, fn(steps)), dev, 1)
        s = statistics.median(times)
        return {"s_per_image": s, "ms_per_step": 1e3 * s / steps, "warmup_s": warm, "min_s": min(times),
                "peak_above_weights_mib": m.mib}

    sec.item("tinyrpo eager", lambda: measure("tinyrpo eager", lambda: ours(sd.unet)))
    sec.item("diffusers eager", lambda: (pipeline(), measure("diffusers eager", lambda: theirs))[1])
    sec.item("tinyrpo compiled", lambda: _compiled(lambda: measure("tinyrpo compiled",
                                                                   lambda: ours(sec.compile(sd.unet)))), est_s=40)

    def diffusers_compiled():
        pipe = pipeline()
        plain = pipe.unet
        pipe.unet = sec.compile(plain)
        try:
            return measure("diffusers compiled", lambda: theirs)
        finally:
            pipe.unet = plain
    sec.item("diffusers compiled", lambda: _compiled(diffusers_compiled), est_s=45)

    def agreement():
        out = {}
        for a, b in (("tinyrpo eager", "diffusers eager"), ("tinyrpo compiled", "diffusers compiled"),
                     ("tinyrpo compiled", "tinyrpo eager")):
            if a in images and b in images:
                d = (images[a] - images[b]).abs() * 255
                out[f"{a} vs {b}"] = {"max_255": d.max().item(), "mean_255": d.mean().item(),
                                      "agree": d.mean().item() <= 1.0 and d.max().item() <= 16.0}
        if not out:
            raise RuntimeError("no pair of images to compare (see the errors above)")
        return {"pairs": out}
    sec.item("images agree", agreement)
    sec.note("'agree': mean |Δ| ≤ 1/255 and max |Δ| ≤ 16/255 over the image (tinyrpo keeps latents and guidance in "
             "fp32, diffusers in the model dtype: in fp16 they differ by rounding)")


# ---------------------------------------------------------------------------------------------- the full run

def write_random_weights(sec: Section, dest: Path) -> dict:
    """Random SD (diffusers layout) and CLIP ViT-L/14 (HF layout) at the section's sizes, fp16 files."""
    t0 = time.perf_counter()
    sd = build_sd(sec.sizes, sec.device, torch.float16)
    fixtures.write_sd_folder(dest / "sd", sd.unet.cpu(), sd.vae.cpu(), sd.text_encoder.cpu(), fp16=True)
    del sd
    torch.manual_seed(1)
    with torch.device(sec.device):
        clip = CLIPModel(sec.sizes.clip)
    fixtures.write_clip_folder(dest / "clip", clip.half().cpu(), fp16=True)
    del clip
    photos = dest / "subject"  # 4 random photos at the training resolution
    photos.mkdir()
    rng = np.random.default_rng(0)
    size = max(64, sec.sizes.resolution)
    for k in range(4):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(photos / f"{k:02d}.png")
    return {"weights_gib": folder_bytes(dest) / GiB, "write_s": time.perf_counter() - t0}


def proc_io() -> dict:
    """This process's I/O counters: wchar counts every byte passed to write(), write_bytes what reached storage
    (0 on tmpfs, and it lags until the kernel writes dirty pages back)."""
    try:
        text = Path("/proc/self/io").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split(": ") for line in text.splitlines())}


def full_run(sec: Section, data: Path, out: Path, **extra) -> dict:
    cfg = TrainConfig(subject=str(data / "subject"), out=str(out), weights=str(data / "sd"),
                      reward_model=str(data / "clip"), class_noun="dog", device=str(sec.device),
                      **(sec.sizes.fullrun | extra))
    reset_peak(sec.device)
    io0, t0 = proc_io(), time.perf_counter()
    summary = Trainer(cfg).run()
    sync(sec.device)
    wall, io1 = time.perf_counter() - t0, proc_io()
    files = {str(f.relative_to(out)): f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
    return {"total_s": wall, "phases_s": summary["seconds"], "steps_run": summary["steps_run"],
            "best_step": summary["best_step"],
            "wchar_gib": (io1.get("wchar", 0) - io0.get("wchar", 0)) / GiB,
            "write_bytes_gib": (io1.get("write_bytes", 0) - io0.get("write_bytes", 0)) / GiB,
            "run_folder_gib": folder_bytes(out) / GiB,
            "top_level_files_mib": {k: v / 2**20 for k, v in files.items()}} | peak(sec.device)


def fullrun_section(sec: Section):
    data = sec.scratch / "fullrun"
    data.mkdir(parents=True, exist_ok=True)
    defaults = resolve_config(TrainConfig(subject=""))
    sec.data["info"].update(run_dir=str(data / "run"), overrides=sec.sizes.fullrun, steps=defaults.steps,
                            val_every=defaults.val_every, save_every=defaults.save_every)
    sec.flush()
    sec.item("write random weights (fp16 files)", lambda: write_random_weights(sec, data), est_s=30)
    sec.item("default RPO run", lambda: full_run(sec, data, data / "run"), est_s=120)
    if "lora" in {f.name for f in fields(TrainConfig)}:
        sec.item(f"default RPO run, LoRA r{sec.spec['lora_rank']}",
                 lambda: full_run(sec, data, data / "run-lora", lora=sec.spec["lora_rank"]), est_s=120)
    else:
        sec.note("no LoRA full run: TrainConfig has no `lora` field yet (the train section times the LoRA step)")


# ---------------------------------------------------------------------------------------------- variants

class Forward:
    """The sampler's U-Net call: batch 2 (one image, negative and conditional halves), inference mode."""

    def __init__(self, sec: Section, channels_last=False):
        torch.manual_seed(0)
        with torch.device(sec.device):
            self.unet = UNet(sec.sizes.unet).to(sec.sample_dtype).eval()
        L, dtype = sec.sizes.latent, sec.sample_dtype
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(2, 4, L, L, generator=g).to(sec.device, dtype)
        self.c = torch.randn(2, 77, sec.sizes.unet.cross_attention_dim, generator=g).to(sec.device, dtype)
        self.t = torch.tensor(500, device=sec.device)
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.fn, self.sec = self.unet, sec

    def measure(self, attention=None) -> dict:
        sec = self.sec
        with torch.inference_mode(), sdpa(attention):
            first = timed(lambda: self.fn(self.x, self.t, self.c), sec.device, 1)[0]
            timed(lambda: self.fn(self.x, self.t, self.c), sec.device, sec.sizes.warmup)
            times = back_to_back(lambda: self.fn(self.x, self.t, self.c), sec.device, 2 * sec.sizes.repeats)
        return {"ms": 1e3 * statistics.median(times), "first_call_s": first}


def variants_section(sec: Section):
    sec.data["info"].update(train="the train section's eager step (full fine-tune, one pair)",
                            forward=f"one sampler U-Net call: batch 2, {sec.sample_dtype}, inference mode")
    base = {}

    def vs(key, res):
        if key in base and res.get("ms"):
            res["vs_baseline"] = res["ms"] / base[key]
        return res

    # The train step: one model, each attention backend in turn, then channels_last on a fresh one.
    state = {}

    def train(attention=None):
        if "step" not in state:
            state["step"] = TrainStep(sec)
        res = state["step"].measure(attention)
        if attention is None:
            base["train"] = res["ms"]
        return vs("train", res)

    sec.item("train: SDPA default", lambda: train())
    for b in SDPA:
        sec.item(f"train: SDPA {b}", lambda: train(b))
    state.clear()
    sec.item("train: channels_last", lambda: vs("train", TrainStep(sec, channels_last=True).measure()))

    # The sampler's forward: attention backends and channels_last eager, then each compile mode.
    fwd = {}

    def forward(attention=None):
        if "f" not in fwd:
            fwd["f"] = Forward(sec)
        res = fwd["f"].measure(attention)
        if attention is None:
            base["forward"] = res["ms"]
        return vs("forward", res)

    sec.item("forward: eager", lambda: forward())
    for b in SDPA:
        sec.item(f"forward: SDPA {b}", lambda: forward(b))
    sec.item("forward: channels_last", lambda: vs("forward", Forward(sec, channels_last=True).measure()))

    def compiled(mode):
        f = fwd["f"] = fwd.get("f") or Forward(sec)
        f.fn = sec.compile(f.unet, mode)
        try:
            return vs("forward", f.measure()) | {"mode": mode, "backend": sec.backend}
        finally:
            f.fn = f.unet
            torch._dynamo.reset()

    for mode, est in zip(COMPILE_MODES, (35, 40, 150)):
        sec.item(f"forward: compile {mode}", lambda: compiled(mode), est_s=est)


SECTIONS = {"machine": machine, "kernels": kernels_section, "train": train_section, "sample": sample_section,
            "fullrun": fullrun_section, "variants": variants_section}


def run(spec: dict) -> int:
    """A section's process: run it, flushing each item; 0 even when items failed (they are in the file)."""
    sec = Section(spec)
    sec.flush()
    SECTIONS[sec.name](sec)
    return 0
