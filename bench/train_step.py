"""One RPO training step at SD v1.5 size: tinyrpo eager, tinyrpo + torch.compile, and diffusers' U-Net.

    python3 bench/train_step.py --no-compile                  # CPU: fp32, 32x32 latent, 3 timed steps each
    python3 bench/train_step.py --repeats 2                   # CPU with torch.compile too (compiles for minutes)
    python3 bench/train_step.py --device cuda                 # GPU: bf16 autocast, 64x64 latent (512 px)
    python3 bench/train_step.py --device cuda --channels-last --compile-mode max-autotune-no-cudagraphs
    python3 bench/train_step.py --device cuda --gradient-checkpointing --variants eager,compile
    python3 bench/train_step.py --device cuda --full-run-estimate
    python3 bench/train_step.py --device cuda --adamw foreach     # the default torch AdamW, vs the trainer's fused
    python3 bench/train_step.py --lora 16 --variants eager           # LoRA rank 16 vs the full fine-tune
    python3 bench/train_step.py --lora 16 --variants eager --channels 160 --latent 16   # the same, a smaller CPU run

The step is the training loop's own code (tinyrpo.rpo.rpo_forward and tinyrpo.trainer.optimizer_step): B pairs, so
the policy U-Net runs forward and backward on 2B latents and the frozen reference U-Net forward on the
same 2B; the RPO loss (eqs. 7-9, the fused kernel on a GPU); backward; gradient clipping; AdamW on fp32
master weights (the trainer's hyper-parameters). As in the trainer, the forwards run under autocast at
--precision and the reference is stored in that dtype (bf16 on a GPU, fp32 on the CPU). Variants:

    eager              tinyrpo.unet.UNet
    compile            the same, both U-Nets through torch.compile(mode=--compile-mode)
    diffusers          diffusers' UNet2DConditionModel holding the same random weights, called as
                       `lambda x, t, c: unet(x, t, c).sample`: only the network differs
    diffusers-compile  the same, compiled (not run unless named in --variants)
    lora               with --lora RANK (added to --variants): LoRA adapters on the attention projections
                       (tinyrpo/lora.py); AdamW on the adapters only, and the reference is the same U-Net with
                       its adapters off (no second copy), as train.py --lora
    lora-compile       the same, compiled (not run unless named in --variants)

--channels C runs a U-Net C/320 as wide as SD v1.5's (levels C, 2C, 4C, 4C; C a multiple of 32), for a
quicker, smaller comparison on a busy CPU; the default is SD v1.5 itself.

On the CPU the compiled step was slower than eager in every run so far (bench/README.md has the figures).

Each variant runs in its own fresh process: --warmup steps (compilation happens there), then --repeats
timed steps; the median is shown. A process per variant keeps one variant's memory out of another's
peak and lets a real-size CPU step fit in RAM (policy weights + grads + AdamW's two moments + the
reference are ~17 GB in fp32), at the price of no interleaving between variants. Memory is the peak of
the whole process: torch.cuda.max_memory_allocated on a GPU (weights, grads, optimizer state, reference
and activations: what a user's card must hold), ru_maxrss on the CPU (that plus the Python runtime).

FLOPs: F = one U-Net forward on one latent, counted by torch.utils.flop_counter on the meta device (SD
v1.5 at 64x64: 0.80 TFLOP). Model FLOPs per step = 3·2B·F (policy forward + backward) + 2B·F (reference
forward); gradient-checkpointing's recomputation is not counted (it is not useful work).
MFU = model FLOPs per step / (seconds per step × --peak-tflops).
"""
import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import diffusers_unet, machine, peak_rss_mib, rss_mib, run_child, sync  # noqa: E402
from tinyrpo.cli import HelpFormatter  # noqa: E402
from tinyrpo.pipeline import DTYPES  # noqa: E402
from tinyrpo import dreambench  # noqa: E402
from tinyrpo.lora import add_lora, lora_disabled  # noqa: E402
from tinyrpo.schedulers import NoiseSchedule, SchedulerConfig  # noqa: E402
from tinyrpo.rpo import RPOOptions, rpo_forward  # noqa: E402
from tinyrpo.config import TrainConfig, resolve_config  # noqa: E402
from tinyrpo.trainer import optimizer_step  # noqa: E402
from tinyrpo.unet import UNet, UNetConfig  # noqa: E402

VARIANTS = ("eager", "compile", "diffusers", "diffusers-compile", "lora", "lora-compile")
H100_BF16_TFLOPS = 989.0  # H100 SXM dense bf16 tensor-core peak (NVIDIA datasheet, without sparsity)


# ---------------------------------------------------------------------------------------------- FLOPs

def unet_config(channels: int) -> UNetConfig:
    """SD v1.5's U-Net, or one `channels`/320 as wide."""
    return UNetConfig(block_out_channels=(channels, 2 * channels, 4 * channels, 4 * channels))


def forward_flops(latent: int, channels: int = 320) -> tuple[float, int]:
    """FLOPs of one U-Net forward on one latent, and its parameter count (meta device: free)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        unet = UNet(unet_config(channels))
        x, t, c = torch.empty(1, 4, latent, latent), torch.zeros(1, dtype=torch.long), torch.empty(1, 77, 768)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(x, t, c)
    return float(counter.get_total_flops()), sum(p.numel() for p in unet.parameters())


def step_flops(F: float, pairs: int) -> float:
    n = 2 * pairs  # latents per U-Net call: winners and losers
    return 3 * n * F + n * F  # policy forward + backward (≈ 2× forward), reference forward


# ---------------------------------------------------------------------------------------------- one variant

def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=DTYPES[precision])


def build(variant: str, args, device):
    """Policy (fp32 master weights, train mode), the parameters AdamW trains, and the two callables rpo_forward
    uses (policy and frozen reference)."""
    torch.manual_seed(0)  # every variant starts from the same random weights
    policy = UNet(unet_config(args.channels)).to(device)
    if variant.startswith("lora"):
        params = add_lora(policy, args.lora)  # freezes the U-Net; A and B train
        policy.gradient_checkpointing = args.gradient_checkpointing
        policy.train()
        if args.channels_last:
            policy.to(memory_format=torch.channels_last)
        policy_fwd = torch.compile(policy, mode=args.compile_mode) if variant.endswith("compile") else policy

        def ref_fwd(x, t, c):  # the base model: the same U-Net with its adapters off
            with lora_disabled(policy):
                return policy_fwd(x, t, c)
        return policy, params, policy_fwd, ref_fwd
    if variant.startswith("diffusers"):
        policy = diffusers_unet(policy)  # takes over the tensors; the tinyrpo module is dropped
        if args.gradient_checkpointing:
            policy.enable_gradient_checkpointing()

        def wrap(unet):
            return lambda x, t, c: unet(x, t, c).sample
    else:
        policy.gradient_checkpointing = args.gradient_checkpointing

        def wrap(unet):
            return unet
    ref = copy.deepcopy(policy).to(DTYPES[args.precision]).requires_grad_(False).eval()  # as Trainer.setup
    policy.train()
    if args.channels_last:
        policy.to(memory_format=torch.channels_last)
        ref.to(memory_format=torch.channels_last)
    policy_fwd, ref_fwd = policy, ref
    if variant.endswith("compile"):
        policy_fwd = torch.compile(policy, mode=args.compile_mode)
        ref_fwd = torch.compile(ref, mode=args.compile_mode)
    return policy, list(policy.parameters()), wrap(policy_fwd), wrap(ref_fwd)


def child(args):
    """Build one variant, warm up, time --repeats steps; print one JSON line for the parent."""
    device = torch.device(args.device)
    base_mib = rss_mib()
    policy, params, policy_fwd, ref_fwd = build(args.child, args, device)
    cfg, rpo = resolve_config(TrainConfig(subject="")), RPOOptions()
    # Trainer.run's AdamW; its implementation: fused on a GPU and the default (a per-tensor loop) on the CPU.
    impl = {"trainer": dict(fused=device.type == "cuda"), "fused": dict(fused=True),
            "foreach": dict(foreach=True), "loop": dict(foreach=False)}[args.adamw]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, **impl)
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    sched = NoiseSchedule(SchedulerConfig())
    B, L = args.pairs, args.latent

    # Latents and text states of the pairs, resident on the device as in the trainer (random here).
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2 * B, 4, L, L, generator=g).to(device)
    cond = torch.randn(2 * B, 77, 768, generator=g).to(device)

    def step(k: int) -> torch.Tensor:
        """Trainer.run's loop body, with the random draws seeded by the step number."""
        g = torch.Generator().manual_seed(k)
        t = torch.randint(0, sched.cfg.num_train_timesteps, (B,), generator=g)
        eps = torch.randn((B, 4, L, L), generator=g)
        y = torch.bernoulli(torch.full((B,), 0.5), generator=g)
        t, eps, y = (v.to(device, non_blocking=True) for v in (t, eps, y))
        noise, tt = torch.cat([eps, eps]), torch.cat([t, t])  # a pair shares ε and t
        x_t = sched.add_noise(x0, noise, tt)
        if args.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        out = rpo_forward(policy_fwd, ref_fwd, x_t, tt, cond, noise, y, rpo.beta, autocast(device, args.precision))
        optimizer_step(out.loss, params, opt, cfg.grad_clip, scaler)
        return out.loss.detach()

    def timed(fn, *a):
        """(wall seconds, CPU seconds of this process's threads, result); the CPU time moves less under load."""
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        r = fn(*a)
        sync(device)
        return time.perf_counter() - t0, time.process_time() - c0, r

    ready_mib = rss_mib()  # weights + reference
    res = {"variant": args.child, "warmup": [], "times": [], "cpu_times": [], "losses": [],
           "trainable": sum(p.numel() for p in params)}
    for k in range(args.warmup + args.repeats):
        s, cpu, loss = timed(step, k)
        res["losses"].append(loss.item())
        if k < args.warmup:
            res["warmup"].append(s)
            print(f"  {args.child}: warm-up step {k + 1}/{args.warmup} {s:.2f} s", file=sys.stderr, flush=True)
            continue
        if k == args.warmup:  # the steady state after warm-up (which includes compilation)
            res["state_mib"] = torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else rss_mib()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
        res["times"].append(s)
        res["cpu_times"].append(cpu)
        print(f"  {args.child}: step {k + 1 - args.warmup}/{args.repeats} {s:.2f} s", file=sys.stderr, flush=True)
    res["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mib()
    res |= {"base_mib": base_mib, "ready_mib": ready_mib}

    if args.full_run_estimate:
        # Generation (negative set, validations) is U-Net forwards on 2 × gen_batch_size latents (guidance).
        n = 2 * cfg.gen_batch_size
        xg, cg = torch.randn(n, 4, L, L, generator=g).to(device), torch.randn(n, 77, 768, generator=g).to(device)
        tg = torch.full((n,), 500, device=device)
        policy.eval()
        with torch.no_grad(), autocast(device, args.precision):
            timed(policy_fwd, xg, tg, cg)  # warm-up (and compilation for the new shape)
            res["gen_forward_s"] = statistics.median(timed(policy_fwd, xg, tg, cg)[0] for _ in range(args.repeats))
        policy.train()

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            timed(step, args.warmup + args.repeats)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"\nprofile of one {args.child} step, by {key}:\n"
              + prof.key_averages().table(sort_by=key, row_limit=args.profile), file=sys.stderr, flush=True)
    print(json.dumps(res))


# ---------------------------------------------------------------------------------------------- the table

def full_run_estimate(r: dict) -> tuple[float, float, int]:
    """Seconds of U-Net work in a default `train.py` run (training, generation) and the generation forwards."""
    cfg, rpo = resolve_config(TrainConfig(subject="")), RPOOptions()
    prompts = len(dreambench.OBJECT_TRAIN_PROMPTS)  # the live-subject list has as many
    vals = 1 + cfg.steps // cfg.val_every  # at step 0, 40, ..., 400
    batches = (-(-prompts * rpo.images_per_prompt // cfg.gen_batch_size)  # the negative set
               + vals * -(-prompts * cfg.val_images_per_prompt // cfg.gen_batch_size))
    forwards = batches * cfg.sample_steps
    return cfg.steps * statistics.median(r["times"]), forwards * r["gen_forward_s"], forwards


def report(results: dict, args, F: float, params: int):
    cuda = torch.device(args.device).type == "cuda"
    flops = step_flops(F, args.pairs)
    n = 2 * args.pairs
    size = "SD v1.5 U-Net" if args.channels == 320 else f"U-Net {args.channels}/320 of SD v1.5's width"
    print(f"\nRPO training step, {size} ({params / 1e6:.0f}M params, random weights): {machine(args.device)}")
    print(f"  {args.pairs} pair(s): policy forward+backward on {n} latents of {args.latent}x{args.latent}, reference "
          f"forward on {n}; precision {args.precision} (reference stored in it); AdamW ({args.adamw}) on fp32 "
          f"master weights; channels_last={args.channels_last}, gradient_checkpointing={args.gradient_checkpointing}, "
          f"compile mode {args.compile_mode}; median of {args.repeats} steps after {args.warmup} warm-up")
    print(f"  FLOPs: F = U-Net forward per latent at {args.latent}x{args.latent} = {F / 1e12:.3f} TFLOP "
          f"(FlopCounterMode); per step 3·{n}·F + {n}·F = {flops / 1e12:.3f} TFLOP")
    if args.peak_tflops:
        print(f"  MFU = {flops / 1e12:.3f} TFLOP / (s/step × {args.peak_tflops:g} TFLOP/s)")
    if not cuda:  # other processes on the same cores slow every variant down: say how busy the machine was
        print("  load average over the last 1 / 5 / 15 min at the end: "
              + " / ".join(f"{x:.1f}" for x in os.getloadavg()))

    ok = {v: r for v, r in results.items() if isinstance(r, dict)}
    med = {v: statistics.median(r["times"]) for v, r in ok.items()}
    mem = "peak CUDA allocated" if cuda else "peak RSS (process)"
    cpu_col = "" if cuda else f" {'CPU s/step':>10}"
    print(f"\n{'variant':<18} {'s/step':>8} {'min':>7} {'max':>7} {'vs diffusers':>12}{cpu_col} {'1st step':>9} "
          f"{'TFLOP/s':>8} {'MFU':>6} {mem:>20}  loss@1")
    for v, r in results.items():
        if v not in ok:
            print(f"{v:<18} {r}")
            continue
        vs = f"{med[v] / med['diffusers']:.3f}" if "diffusers" in med else "-"
        cpu = "" if cuda else f" {statistics.median(r['cpu_times']):>10.2f}"
        mfu = f"{100 * flops / (med[v] * args.peak_tflops * 1e12):.1f}%" if args.peak_tflops else "-"
        print(f"{v:<18} {med[v]:>8.3f} {min(r['times']):>7.3f} {max(r['times']):>7.3f} {vs:>12}{cpu} "
              f"{r['warmup'][0]:>9.1f} {flops / med[v] / 1e12:>8.3f} {mfu:>6} {r['peak_mib'] / 1024:>16.2f} GiB  "
              f"{r['losses'][0]:.6f}")
    if ok and cuda:
        print("\nallocated between steps (weights, AdamW state, reference; gradients are freed): "
              + ", ".join(f"{v} {r['state_mib'] / 1024:.2f} GiB" for v, r in ok.items()))
    elif ok:
        print("\nRSS after imports / with policy + reference built / after warm-up (+ AdamW state):")
        for v, r in ok.items():
            print(f"  {v:<18} " + " / ".join(f"{r[k] / 1024:.2f}" for k in ("base_mib", "ready_mib", "state_mib"))
                  + " GiB")
    if "lora" in ok and "eager" in ok:
        lora, full = ok["lora"], ok["eager"]
        print(f"\nLoRA rank {args.lora} vs the full fine-tune (eager, same run): step time "
              f"{med['lora']:.3f} / {med['eager']:.3f} s = {med['lora'] / med['eager']:.2f}x (CPU time "
              f"{statistics.median(lora['cpu_times']) / statistics.median(full['cpu_times']):.2f}x), peak memory "
              f"{lora['peak_mib'] / 1024:.2f} / {full['peak_mib'] / 1024:.2f} GiB = "
              f"{lora['peak_mib'] / full['peak_mib']:.2f}x, trained parameters {lora['trainable'] / 1e6:.2f}M / "
              f"{full['trainable'] / 1e6:.0f}M ({100 * lora['trainable'] / full['trainable']:.2f} %)")
    if args.full_run_estimate and ok:
        print("\nfull default train.py run, U-Net work only (no weight loading, text encoding, VAE, CLIP scoring):")
        for v, r in ok.items():
            train_s, gen_s, forwards = full_run_estimate(r)
            print(f"  {v:<18} training {train_s:.0f} s + generation {gen_s:.0f} s ({forwards} forwards of "
                  f"{r['gen_forward_s']:.3f} s) = {train_s + gen_s:.0f} s")


# ---------------------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: %(default)s)")
    p.add_argument("--latent", type=int, help="latent height = width (default: 64 = 512 px on cuda, 32 on cpu)")
    p.add_argument("--pairs", type=int, default=1,
                   help="(w, l) pairs per step; the U-Net batch is twice this (default: %(default)s)")
    p.add_argument("--precision", choices=list(DTYPES),
                   help="autocast dtype of the forwards, storage dtype of the reference (default: bf16 on cuda, "
                        "fp32 on cpu)")
    p.add_argument("--variants", default="eager,compile,diffusers",
                   help=f"comma-separated, any of {', '.join(VARIANTS)} (default: %(default)s)")
    p.add_argument("--no-compile", action="store_true", help="drop the compiled variants")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode (default: %(default)s)")
    p.add_argument("--channels-last", action="store_true", help="U-Nets and inputs in channels-last memory format")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the policy's activations in backward")
    p.add_argument("--adamw", default="trainer", choices=["trainer", "fused", "foreach", "loop"],
                   help="AdamW implementation; trainer = as train.py: fused on cuda, a per-tensor loop on cpu "
                        "(default: %(default)s)")
    p.add_argument("--warmup", type=int, help="untimed steps first, at least 1 (default: 3 on cuda, 1 on cpu)")
    p.add_argument("--repeats", type=int, help="timed steps per variant (default: 10 on cuda, 3 on cpu)")
    p.add_argument("--peak-tflops", type=float,
                   help=f"device peak for the MFU (default: {H100_BF16_TFLOPS:g}, H100 SXM dense bf16, on cuda; "
                        "no MFU on cpu)")
    p.add_argument("--full-run-estimate", action="store_true",
                   help="also time a generation forward and estimate the U-Net time of a default train.py run")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="after timing, profile one step of each variant and print this many rows (default: off)")
    p.add_argument("--lora", type=int, default=None, metavar="RANK",
                   help="add the lora variant: LoRA of this rank on the attention projections (default: off)")
    p.add_argument("--channels", type=int, default=320,
                   help="width of the U-Net's first level: 320 = SD v1.5, smaller for a quicker CPU run "
                        "(default: %(default)s)")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    return p


def parse_args():
    p = build_parser()
    args = p.parse_args()

    cuda = torch.device(args.device).type == "cuda"
    args.latent = args.latent or (64 if cuda else 32)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.repeats = args.repeats or (10 if cuda else 3)
    args.peak_tflops = args.peak_tflops or (H100_BF16_TFLOPS if cuda else None)
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.lora and not any(v.startswith("lora") for v in args.variant_list):
        args.variant_list.append("lora")
    if any(v.startswith("lora") for v in args.variant_list) and not args.lora:
        p.error("the lora variants need --lora RANK")
    if args.channels < 32 or args.channels % 32:
        p.error("--channels must be a positive multiple of 32 (GroupNorm's 32 groups)")
    if args.no_compile:
        args.variant_list = [v for v in args.variant_list if not v.endswith("compile")]
    bad = [v for v in args.variant_list if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first step allocates AdamW's state, and compiles)")
    return args


def main():
    args = parse_args()
    if args.child:
        return child(args)
    flags = [f"--device={args.device}", f"--latent={args.latent}", f"--pairs={args.pairs}",
             f"--precision={args.precision}", f"--compile-mode={args.compile_mode}", f"--adamw={args.adamw}",
             f"--warmup={args.warmup}", f"--repeats={args.repeats}", f"--profile={args.profile}",
             f"--channels={args.channels}"] + ([f"--lora={args.lora}"] if args.lora else [])
    flags += [f for f, on in (("--channels-last", args.channels_last),
                              ("--gradient-checkpointing", args.gradient_checkpointing),
                              ("--full-run-estimate", args.full_run_estimate)) if on]
    results = {}
    for v in args.variant_list:
        print(f"{v}: building, {args.warmup} warm-up + {args.repeats} timed steps ...", file=sys.stderr, flush=True)
        rc, r = run_child(__file__, ["--child", v, *flags])
        results[v] = r if r is not None else (
            "killed (out of memory?)" if rc in (-9, 137) else f"failed (exit code {rc})")
    report(results, args, *forward_flops(args.latent, args.channels))


if __name__ == "__main__":
    main()
