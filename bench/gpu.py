"""Everything tinyrpo wants to know about one GPU, in one run of at most 8 minutes: one report (Markdown + JSON).

    python3 bench/gpu.py                                  # all sections, report in bench/results/gpu-<date>/
    python3 bench/gpu.py --out /tmp/r --sections train,variants --deadline 300
    python3 bench/gpu.py --sections train --compile-mode max-autotune-no-cudagraphs --budget train=400
    python3 bench/gpu.py --dry-run                        # the same code at tiny sizes: ~1 min on a CPU (CI runs it)
    python3 bench/gpu.py --dry-run --device cuda --compile-backend none   # a 30-second smoke test on the GPU

On the device machine of this workplace (bench/README.md has the details): bring diffusers as a wheel,
once, in the checkout the device tool sends,

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1

then one call, run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=600). bench/gpu.sh installs the
wheel (pip install --no-index --no-deps --target /tmp/site .whl/*.whl), installs tinyrpo
(pip install --no-deps --no-build-isolation -e .) and runs this script with PYTHONUNBUFFERED=1, the report
and the log going to $OUT.

Sections (--sections; the default is all, in this order; a `machine` section always runs first):

    kernels    the Triton loss kernels vs the PyTorch reference in float64: values and gradients, fp32 and
               bf16, odd sizes; the same under torch.compile(fullgraph=True) with Inductor; their speed
    train      the RPO step at 512 px (64x64 latents), one pair, bf16: eager, gradient checkpointing, LoRA,
               then compiled; ms/step, MFU (FLOPs as bench/train_step.py counts them), peak memory with the
               reference U-Net resident
    sample     512 px, 50 DDIM steps, CFG 7.5, batch 1, fp16: tinyrpo.pipeline.generate vs diffusers'
               StableDiffusionPipeline on the same weights, eager and compiled; s/image; do the images agree
    fullrun    train.py's default RPO run (negative set, 400 steps, 11 validations, checkpoints) through Trainer
               on random weights written as SD v1.5 (diffusers layout) and CLIP ViT-L/14 (HF layout):
               seconds per phase, bytes written, run folder size
    variants   SDPA backends (flash, efficient, cudnn, math) and channels_last on the train step and the
               sampler's U-Net call; compile modes (default, reduce-overhead, max-autotune-no-cudagraphs)

Time: each section runs in its own process (forked, so imports are paid once) under a time budget
(--budget; defaults sized for an H100/H200, where a first compile takes 1-2 minutes per model), and
the time a section leaves unused passes to the next; --deadline bounds the whole run. Items inside a
section run in order of importance, each caught and written to the report as soon as it ends, so a
failure, a CUDA out-of-memory or a time limit costs only what had not run yet. The report is rewritten
after every item; the process exits 1 if a section failed or was cut short, 0 otherwise.

--dry-run runs the same code at the tests' tiny sizes (tests/fixtures.py): on a CPU the Triton kernels
run under TRITON_INTERPRET=1 and torch.compile is skipped (--compile-backend none) except for the
kernels' fullgraph check (aot_eager); tests/test_bench_gpu.py runs it in CI.
"""
import argparse
import datetime
import faulthandler
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.gpu_report import render, targets  # noqa: E402  (no torch: the report is plain data)
from tinyrpo.cli import HelpFormatter  # noqa: E402  (no torch either)

SECTIONS = ("kernels", "train", "sample", "fullrun", "variants")
# Seconds per section on an H100/H200, 475 in all. A first compile there takes 1-2 minutes per model (the
# train step's policy and reference, each pipeline's U-Net); the full run is given its target (3 min) plus the
# writing of its weights; the variants get 25 s plus whatever the others left (rerun them alone for more).
BUDGETS = {"machine": 10, "kernels": 25, "train": 120, "sample": 95, "fullrun": 200, "variants": 25}
REPORT_RESERVE = 3  # seconds kept back from --deadline to write the final report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", help="report folder (default: bench/results/gpu-<date>, or gpu-dry-<date>)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, in any order (default: all)")
    p.add_argument("--deadline", type=float, default=480, help="seconds for the whole run (default: %(default)s)")
    p.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS",
                   help="a section's time budget (repeatable; defaults: "
                        + ", ".join(f"{k} {v}" for k, v in BUDGETS.items()) + ")")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes (tests/fixtures.py): checks the code, not the GPU")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu (default: auto: cuda when torch sees one)")
    p.add_argument("--compile-backend", default="auto", choices=["auto", "inductor", "aot_eager", "eager", "none"],
                   help="torch.compile backend of the compiled rows (default auto: inductor, or none in a dry run "
                        "on a CPU, where compiling takes minutes)")
    p.add_argument("--compile-mode", default="default",
                   choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode of the train section's compiled step (default: %(default)s; the "
                        "variants section times the others on the sampler's forward)")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA rank of the LoRA rows (default: %(default)s)")
    p.add_argument("--peak-tflops", type=float,
                   help="the device's dense bf16 peak for MFU (default: from the device name: H100 SXM / H200 989, "
                        "H100 PCIe 756, H100 NVL / H200 NVL 835, A100 312)")
    p.add_argument("--scratch", help="where the full run writes its weights and run folder (~30 GB at full "
                                     "size; default: the system's temp folder); deleted at the end")
    p.add_argument("--keep-scratch", action="store_true", help="keep the scratch folder")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    args.section_list = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in args.section_list if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    args.budgets = dict(BUDGETS)
    for b in args.budget:
        name, _, secs = b.partition("=")
        if name not in BUDGETS or not secs.replace(".", "", 1).isdigit():
            p.error(f"--budget {b}: expected SECTION=SECONDS with SECTION one of {', '.join(BUDGETS)}")
        args.budgets[name] = float(secs)
    if args.lora_rank < 1:
        p.error("--lora-rank must be at least 1")
    kind = "gpu-dry" if args.dry_run else "gpu"
    args.out = Path(args.out or ROOT / "bench" / "results" / f"{kind}-{datetime.date.today().isoformat()}")
    return args


def resolve_device(name: str) -> str:
    """cuda or cpu, asking NVML rather than the CUDA runtime: CUDA must not start before the sections fork."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"bench/gpu.py: --device {name}, but this PyTorch sees no CUDA GPU; use --device cpu --dry-run")
    return name


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Report:
    """report.json and report.md in --out, rewritten (atomically) whenever a section's file changes."""

    def __init__(self, args, device: str, backend: str):
        self.out = args.out
        self.data = {"tool": "bench/gpu.py", "command": " ".join([sys.executable, *sys.argv]),
                     "dry_run": args.dry_run, "device": device, "compile_backend": backend,
                     "commit": git_commit(), "started": datetime.datetime.now().isoformat(timespec="seconds"),
                     "deadline_s": args.deadline, "budgets_s": args.budgets, "sections": {}, "targets": []}

    def write(self):
        self.data["targets"] = targets(self.data)
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("report.json", json.dumps(self.data, indent=1)), ("report.md", render(self.data))):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


class Interrupted(Exception):
    pass


def run_section(name: str, spec: dict, timeout: float, on_change) -> tuple[str, float]:
    """Fork; the child runs the section and exits; kill its process group after `timeout` s -> (status, seconds)."""
    from bench import gpu_sections

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the section's process
        code = 1
        try:
            os.setpgid(0, 0)  # its own group: a time-out also ends the compile workers it starts
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            # Where it was when the time limit came (a compile, a write), in the log before the kill: the
            # parent sends SIGUSR1 first. Not faulthandler.dump_traceback_later: its watchdog thread reads
            # the main thread's frames without the GIL and crashed a section mid-import (exit -11 in CI).
            faulthandler.register(signal.SIGUSR1, all_threads=True)
            code = gpu_sections.run(spec)
        except BaseException:  # noqa: BLE001 (report it, then leave without running the parent's cleanup)
            import traceback
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    try:
        os.setpgid(pid, pid)
    except OSError:  # the child got there first
        pass
    t0, mtime = time.time(), None
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            path = Path(spec["partial"])
            if path.exists() and path.stat().st_mtime != mtime:
                mtime = path.stat().st_mtime
                on_change()
            if done:
                code = os.waitstatus_to_exitcode(status)
                return ("ok" if code == 0 else f"failed (exit code {code})"), time.time() - t0
            if time.time() - t0 > timeout:
                _kill(pid, dump_first=True)
                return f"cut off at its time limit ({timeout:.0f} s)", time.time() - t0
            time.sleep(0.1)
    except Interrupted:
        _kill(pid)
        raise


def _kill(pid: int, dump_first: bool = False):
    try:
        if dump_first:  # the section's traceback into the log (faulthandler, registered in the child)
            os.kill(pid, signal.SIGUSR1)
            time.sleep(0.5)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)


def merge(report: Report, name: str, partial: Path, **status):
    entry = report.data["sections"].setdefault(name, {})
    entry.update(status)
    if partial.exists():
        try:
            entry.update(json.loads(partial.read_text()))
        except ValueError:  # caught mid-write: the next change brings it
            pass
    if status.get("status", "ok") not in ("ok", "running"):
        for item in entry.get("items", {}).values():
            if item.get("status") == "running":
                item.update(status="killed", why=f"the section ended while it ran: {status['status']}")
    report.write()


def salvage_full_run(entry: dict):
    """A full run cut off by the time limit: how far it got, from its own log and folder."""
    run_dir = Path(entry.get("info", {}).get("run_dir", ""))
    item = entry.get("items", {}).get("default RPO run")
    if not item or item.get("status") != "killed" or not run_dir.is_dir():
        return
    steps = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()] \
        if (run_dir / "log.jsonl").exists() else []
    from bench.gpu_record import GiB, folder_bytes
    item.update(reached_step=max((r["step"] for r in steps), default=0),
                run_folder_gib=folder_bytes(run_dir) / GiB,
                files=sorted(str(f.relative_to(run_dir)) for f in run_dir.iterdir()))


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    until = t_start + args.deadline
    os.environ.setdefault("TQDM_MININTERVAL", "10")  # before torch imports tqdm: the trainer's bars, not a flood
    device = resolve_device(args.device)
    if device == "cpu" and not args.dry_run:
        sys.exit("bench/gpu.py: SD v1.5 sizes on a CPU take hours, not minutes; add --dry-run (tiny sizes), or run "
                 "bench/train_step.py and bench/sample.py, which are sized for a CPU")
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported: kernels on CPU tensors
    backend = args.compile_backend
    if backend == "auto":
        backend = "none" if args.dry_run and device == "cpu" else "inductor"
    report = Report(args, device, backend)
    report.write()
    print(f"bench/gpu.py: {'dry run, ' if args.dry_run else ''}device {device}, compile backend {backend}, "
          f"deadline {args.deadline:.0f} s, report in {args.out}", flush=True)

    import torch  # noqa: F401  (torch, tinyrpo and Triton once, here; the sections fork from this process)
    import bench.gpu_sections  # noqa: F401
    if device == "cuda" and torch.cuda.is_initialized():
        raise RuntimeError("CUDA started before the sections forked; they could not use it")

    scratch_root = Path(args.scratch) if args.scratch else Path(tempfile.gettempdir())
    scratch_root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="tinyrpo-gpu-", dir=scratch_root))

    def stop(signum, frame):
        raise Interrupted(signal.Signals(signum).name)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    spec = {"device": device, "dry_run": args.dry_run, "compile_backend": backend, "compile_mode": args.compile_mode,
            "lora_rank": args.lora_rank, "peak_tflops": args.peak_tflops, "scratch": str(scratch)}
    carry, failed = 0.0, False
    try:
        for name in ["machine", *args.section_list]:
            budget = args.budgets[name] + carry
            timeout = min(budget, until - time.time() - REPORT_RESERVE)
            partial = scratch / f"{name}.json"
            if timeout < 1:
                why = "its budget is under 1 s" if budget < 1 else "the --deadline was reached"
                merge(report, name, partial, status=f"skipped: {why}", budget_s=budget)
                failed = True
                continue
            print(f"== {name}: up to {timeout:.0f} s (budget {args.budgets[name]:.0f} + {carry:.0f} carried over)",
                  flush=True)
            merge(report, name, partial, status="running", budget_s=round(budget, 1))
            section_spec = spec | {"section": name, "partial": str(partial), "until": time.time() + timeout,
                                   "machine": report.data["sections"].get("machine", {})}
            status, used = run_section(name, section_spec, timeout,
                                       lambda: merge(report, name, partial, status="running"))
            merge(report, name, partial, status=status, seconds=round(used, 1))
            if name == "fullrun":
                salvage_full_run(report.data["sections"][name])
            items = report.data["sections"][name].get("items", {}).values()
            failed |= status != "ok" or any(i.get("status") in ("error", "killed") for i in items)
            carry = max(0.0, budget - used)
    except Interrupted as e:
        report.data["interrupted"] = str(e)
        failed = True
    finally:
        report.data["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        report.data["elapsed_s"] = round(time.time() - t_start, 1)
        report.write()
        if not args.keep_scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    print("\n" + render(report.data, brief=True), flush=True)
    print(f"wrote {args.out / 'report.md'} and report.json in {time.time() - t_start:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
