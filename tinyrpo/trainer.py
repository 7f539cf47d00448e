"""The training run shared by every method: models, run folder, the step loop, validation, checkpoints, resume.

    load      subject photos, base SD model, reward CLIP (nothing is written before they all load)
    prepare   the method's data, cached in the run folder (RPO: negative set + rewards; DreamBooth and look
              forward: class images)
    step      batch = method.draw(gen); loss = method.loss(batch); backward, clip, AdamW; method.after_step
    validate  every --val-every steps: generate the training prompts with fixed seeds, score the
              λ_val-Harmonic reward (eq. 5 of RPO) in fp32; --select best keeps its argmax as the checkpoint
    save      last.pt every --save-every steps, at the end and on Ctrl-C/SIGTERM, for an exact --resume

What a method is: tinyrpo/method.py; the methods: tinyrpo/rpo.py, tinyrpo/dreambooth.py, tinyrpo/dpg.py,
tinyrpo/dco.py (registered in tinyrpo/methods.py). This file is the loop that
calls them, plus what a user needs from it: a run folder nobody can corrupt (tinyrpo/runs/runfolder.py), a log,
atomic checkpoints and an exact resume.
"""
import contextlib
import copy
import math
import signal
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from tinyrpo import dreambench
from tinyrpo.config import TrainConfig, method_options, resolve_config
from tinyrpo.data import Subject, load_subject, read_prompt_file
from tinyrpo.errors import REASONS, UserError
from tinyrpo.evaluation.grids import labelled_grid
from tinyrpo.evaluation.pages import write_report
from tinyrpo.formats.checkpoint import BEST, LAST, save_checkpoint
from tinyrpo.formats.weights import load_clip, load_sd
from tinyrpo.lora import (DEFAULT_TARGETS, _matches, add_lora, load_lora_state_dict, lora_config, lora_disabled,
                          lora_state_dict)
from tinyrpo.method import RunContext
from tinyrpo.methods import METHODS
from tinyrpo.pipeline import DTYPES, generate, resolve_device, to_pil
from tinyrpo.reward import CLIPScorer, Scores, score
from tinyrpo.runs.atomic import WriteError, atomic_save_image, atomic_torch_save, atomic_write_json
from tinyrpo.runs.runfolder import JsonlLog, RunFolder
from tinyrpo.runs.tracking import Tracker, make_tracker

# Measured on refs/toy at its preset (800 steps, β 0.1; exact identity of the validation images, 0.25 = the base
# model): --lora 4 stays at 0.24-0.26 with the preset's lr 1e-4 (= LORA_LR), 0.21-0.29 at 1e-3 and peaks at 0.34
# at 3e-3, while the full fine-tune reaches 0.45-0.50 (README, the toy world). Rank 32 at 3e-3 peaks at 0.37
# (step 80) and falls back to 0.27-0.29 by step 320; adding the feed-forward layers (ff.net.0.proj, ff.net.2)
# at rank 32 / 3e-3 stays at 0.16-0.26 and loses the prompts (fidelity 0.25 at step 320). Neither the rate, the
# rank nor the targets make a toy preset for LoRA: the warning says to drop it.
TOY_LORA = ("--lora on the toy world learns almost nothing (measured over its 800 steps: identity 0.25 flat at the "
            "preset's lr 1e-4, at most 0.34 at lr 3e-3, vs 0.45-0.50 fully fine-tuned); drop --lora for the toy "
            "world: LoRA is meant for SD v1.5's large U-Net")
def optimizer_step(loss, params: list, opt, grad_clip: float, scaler=None) -> torch.Tensor:
    """Backward, gradient-norm clip (really applied), AdamW step; returns the pre-clip norm (no host sync)."""
    if scaler is not None:  # fp16: scale the loss so small gradients don't underflow
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    else:
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, after last.pt was saved; the message says how to resume."""


class Trainer:
    def __init__(self, cfg: TrainConfig, given: set[str] | None = None):
        self.cfg = cfg = resolve_config(cfg, given)
        self.given = given
        self.method_cls = METHODS[cfg.method]
        self.options = method_options(cfg)
        self.times = {}
        self.device = resolve_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.precision = cfg.precision if cfg.precision != "auto" else ("bf16" if self.device.type == "cuda" else "fp32")
        self.amp_dtype = None if self.precision == "fp32" else DTYPES[self.precision]  # None: no autocast
        self.out = Path(cfg.out or Path("runs") / Path(cfg.subject).name)
        self.folder = RunFolder(self.out, cfg.resume)
        self.stop_signal, self.saved_step = None, None
        self.tracker = Tracker()  # --log-with's, once the run starts
        self.t_start, self.seconds_before, self.last_val = time.perf_counter(), {}, None

    def seconds(self) -> dict:
        """The time of each phase and the total, over every process of the run (a resumed run adds its own)."""
        now = self.times | {"total": time.perf_counter() - self.t_start}
        before = self.seconds_before
        return {k: round(before.get(k, 0.0) + now.get(k, 0.0), 2) for k in [*before, *now] if k in before or k in now}

    @contextlib.contextmanager
    def phase(self, name):
        """Add the time spent inside the block to phase `name` (summary.json's "seconds")."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ---------------------------------------------------------------- run folder
    def check_run_folder(self):
        """Refuse a folder that cannot take this run, before anything is loaded or written."""
        raw = asdict(self.cfg) | asdict(self.options)
        self.folder.check({k: v for k, v in raw.items() if v not in (None, "auto")})

    def settings(self) -> dict:
        """config.json: every setting, resolved, flat (the method's options beside the shared ones)."""
        cfg = asdict(self.cfg)
        cfg.pop("options")
        cfg.pop("resume")
        return cfg | asdict(self.options) | {
            "out": str(self.out), "class_noun": self.subject.class_noun, "live": self.subject.live,
            "device": str(self.device), "precision": self.precision, "train_prompts": self.prompts,
            "reference_prompt": self.subject.reference_prompt}

    def start_run_folder(self):
        self.resolved = self.folder.start(self.settings())

    # ---------------------------------------------------------------- models (writes nothing)
    def load(self):
        cfg = self.cfg
        self.subject: Subject = load_subject(cfg.subject, cfg.token, cfg.class_noun, cfg.live, cfg.resolution)
        if cfg.prompts:
            templates = read_prompt_file(cfg.prompts)
        elif self.subject.train_prompts:  # the subject's own set (subject.json), e.g. the toy world's
            templates = self.subject.train_prompts
        else:
            templates = dreambench.LIVE_TRAIN_PROMPTS if self.subject.live else dreambench.OBJECT_TRAIN_PROMPTS
        if cfg.lora and self.subject.exact_metrics is not None:  # the toy world's subjects are scored exactly
            warnings.warn(TOY_LORA)
        self.prompts = [self.subject.prompt(t) for t in templates]
        with self.phase("load"):
            # Master weights in fp32; autocast runs the forwards in bf16/fp16 on a GPU.
            self.sd = load_sd(cfg.weights, device=self.device, dtype=torch.float32)
            factor = self.sd.vae.downsample_factor
            if cfg.resolution % factor:
                raise UserError(f"--resolution {cfg.resolution} is not a multiple of the VAE's factor {factor}")
            self.scorer = CLIPScorer(load_clip(cfg.reward_model, device=self.device, dtype=torch.float32))
            self.schedule = self.sd.scheduler
            self.sd.vae.requires_grad_(False).eval()
            self.policy = self.sd.unet
            self.policy.gradient_checkpointing = cfg.gradient_checkpointing
            self.train_text_encoder = bool(cfg.train_text_encoder)
            self.sd.text_encoder.requires_grad_(self.train_text_encoder).train(self.train_text_encoder)
            self.params, self.policy_fwd, self.ref_fwd = build_policy(
                self.policy, cfg, self.amp_dtype, self.method_cls.uses_reference)
            if self.train_text_encoder:
                self.params += list(self.sd.text_encoder.parameters())
        self._text_cache = {}
        self.method = self.method_cls(self.method_context(), self.options)
        self.method.load()  # what the method needs beyond these models (look forward's DINO), still unwritten

    def method_context(self) -> RunContext:
        """All a method sees of this run (tinyrpo/method.py)."""
        return RunContext(cfg=self.cfg, device=self.device, out=self.out, subject=self.subject, prompts=self.prompts,
                          sd=self.sd, policy_fwd=self.policy_fwd, ref_fwd=self.ref_fwd, text_states=self.text_states,
                          reward=self.reward, autocast=self.autocast, phase=self.phase)

    def text_states(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder conditioning [N, 77, D]: computed once per prompt list while the text encoder is
        frozen, recomputed (with gradients) at every call when it is trained."""
        if self.train_text_encoder:
            with self.autocast():
                return self.sd.text_encoder(self.sd.tokenizer(prompts).to(self.device))
        key = tuple(prompts)
        if key not in self._text_cache:
            with torch.no_grad():
                self._text_cache[key] = self.sd.text_encoder(self.sd.tokenizer(prompts).to(self.device)).float()
        return self._text_cache[key]

    def reward(self, images, prompts: list[str], lam: float, image_embs=None) -> Scores:
        """The reward of each image (eq. 5, or the arithmetic mean with --mean arithmetic), always in fp32
        and outside autocast, so training and validation rewards are on the same scale."""
        with torch.autocast(self.device.type, enabled=False):
            return score(self.scorer, images, prompts, self.ref_embs, self.cfg.token, lam, image_embs=image_embs,
                         mean=self.cfg.mean)

    # ---------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self, step: int) -> dict:
        """Generate with fixed seeds (the same noise at every validation) and score h_λval (eq. 5)."""
        cfg = self.cfg
        self.policy.eval()
        self.sd.text_encoder.eval()
        with self.phase("validation"):
            with self.autocast():
                images, _ = generate(self.sd, self.prompts, n=cfg.val_images_per_prompt, steps=cfg.sample_steps,
                                     guidance=cfg.guidance, seed=cfg.seed + 1000, height=cfg.resolution,
                                     width=cfg.resolution, batch_size=cfg.gen_batch_size, progress=True,
                                     unet=self.policy_fwd, desc=f"validation @ {step}")
            pils = to_pil(images)
            prompts = [p for p in self.prompts for _ in range(cfg.val_images_per_prompt)]
            s = self.reward(pils, prompts, cfg.lambda_val)
        self.policy.train()
        self.sd.text_encoder.train(self.train_text_encoder)
        grid = labelled_grid(pils, self.prompts, cfg.val_images_per_prompt)  # each row labelled by its prompt
        atomic_save_image(grid, self.out / "val" / f"step_{step:05d}.png")
        self.tracker.log_images(step, {"val/grid": grid})
        record = {"step": step, "val": True, **s.mean()}
        if self.subject.exact_metrics is not None:  # the toy world: identity and prompt fidelity, off the pixels
            columns = self.subject.exact_metrics(self.subject.meta, pils, prompts, cfg.token)
            means = {k: torch.nanmean(v.double()).item() for k, v in columns.items()}
            record["exact"] = {k: m for k, m in means.items() if m == m}  # NaN: no prompt asks what k checks
        return record

    # ---------------------------------------------------------------- checkpoints
    def meta(self, step: int, reward: float | None) -> dict:
        return {"base": str(self.cfg.weights), "base_fingerprint": self.sd.fingerprint, "method": self.cfg.method,
                "token": self.cfg.token, "class_noun": self.subject.class_noun, "live": self.subject.live,
                "step": step, "reward": reward, "lambda_val": self.cfg.lambda_val,
                "reward_model": str(self.cfg.reward_model), "config": self.resolved}

    def trained_unet_state(self) -> dict:
        """What training changed in the U-Net: the adapters with --lora, else every weight."""
        return lora_state_dict(self.policy) if self.cfg.lora else self.policy.state_dict()

    def save_best(self, step: int, reward: float | None):
        lora = lora_config(self.policy) if self.cfg.lora else None
        text_encoder = self.sd.text_encoder.state_dict() if self.train_text_encoder else None
        save_checkpoint(self.out / BEST, self.trained_unet_state(), self.meta(step, reward), lora=lora,
                        text_encoder=text_encoder)

    def save_last(self, step: int):
        state = {"unet": self.trained_unet_state(), "optimizer": self.opt.state_dict(),
                 "rng": self.gen.get_state(), "step": step, "best": self.best, "bad_vals": self.bad_vals,
                 "last_val": self.last_val, "seconds": self.seconds(),
                 "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                 "method": self.method.state_dict()}
        if self.train_text_encoder:
            state["text_encoder"] = self.sd.text_encoder.state_dict()
        atomic_torch_save(state, self.out / LAST)
        self.saved_step = step

    def load_last(self) -> int:
        path = self.out / LAST
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if self.cfg.lora:
                load_lora_state_dict(self.policy, state["unet"], str(path))
            else:
                self.policy.load_state_dict(state["unet"])
            if self.train_text_encoder:
                self.sd.text_encoder.load_state_dict(state["text_encoder"])
            self.opt.load_state_dict(state["optimizer"])
            self.method.load_state_dict(state.get("method", {}))
        except Exception as e:  # a truncated or foreign file: say so instead of a traceback
            raise UserError(f"cannot resume from {path} ({e.__class__.__name__}: {e}); delete it to start the "
                            f"run over from its cached images") from None
        self.gen.set_state(state["rng"])
        self.best, self.bad_vals = state["best"], state["bad_vals"]
        self.last_val = state.get("last_val")
        self.seconds_before = state.get("seconds") or {}  # the phases of the run's earlier processes
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.saved_step = state["step"]
        return state["step"]

    def after_validation(self, v: dict) -> bool:
        """Track the validation-reward argmax (saved as best.safetensors with --select best); True when
        patience runs out."""
        self.last_val = v
        if self.best is None or v["reward"] > self.best["reward"]:
            self.best = {k: v[k] for k in ("step", "reward", "align_i", "align_t", "exact") if k in v}
            self.bad_vals = 0
            if self.cfg.select == "best":
                self.save_best(v["step"], v["reward"])
        else:
            self.bad_vals += 1
        return self.cfg.patience is not None and self.bad_vals >= self.cfg.patience

    # ---------------------------------------------------------------- Ctrl-C / SIGTERM
    def _on_signal(self, signum, frame):
        if self.stop_signal is not None:  # a second Ctrl-C: stop now, last.pt as of the last save
            raise KeyboardInterrupt
        self.stop_signal = signum
        tqdm.write("stopping after this step: saving last.pt (Ctrl-C again to stop at once)")

    # ---------------------------------------------------------------- the run
    def run(self) -> dict | None:
        """Train; -> the summary, or None when a resumed run is already finished (it says so, changes nothing)."""
        self.t_start = time.perf_counter()
        self.check_run_folder()
        if (done := self.check_resume()) is not None:
            print(done)
            return None
        self.load()
        new_folders = [p for p in (self.out, *self.out.parents) if not p.exists()]
        try:
            self.start_run_folder()
        except WriteError:  # config.json could not be written: leave no folder behind for a run that never began
            self.folder.release()
            if new_folders:
                (self.out / ".lock").unlink(missing_ok=True)
                for p in new_folders:
                    if p.is_dir() and not any(p.iterdir()):
                        p.rmdir()
            raise
        try:
            return self._run()
        except WriteError as e:
            raise self.write_failed(e) from None
        except KeyboardInterrupt as e:
            if isinstance(e, TrainingInterrupted):
                raise
            kept = (f"last.pt holds step {self.saved_step}" if self.saved_step is not None
                    else "the images generated so far are kept")
            raise TrainingInterrupted(f"interrupted; {kept}. Continue with: {self.folder.resume_command()}") from None
        finally:
            self.tracker.close()
            self.folder.release()

    def write_failed(self, e: WriteError) -> UserError:
        """A full disk or read-only folder mid-run: one line saying what was kept and the command that continues."""
        reason, action = REASONS[e.errno]
        kept = (f"last.pt holds step {self.saved_step}" if self.saved_step is not None
                else "no step is saved yet, the images generated so far are kept")
        return UserError(f"cannot write {e.path}: {reason}; {action}, then continue the run ({kept}) with: "
                         f"{self.folder.resume_command()}")

    def check_resume(self) -> str | None:
        """For --resume, before anything is loaded or written: the message of a finished run (None otherwise)."""
        return self.folder.check_resume(self.cfg.steps, self.cfg.patience) if self.cfg.resume else None

    def _run(self) -> dict:
        """The training loop: a step, the log, validation and early stopping, last.pt; -> the summary."""
        cfg = self.cfg
        log, start, end = self.set_up()
        pending = []  # per-step values stay on the device until the next log flush (no host sync per step)
        stopped_early, step = end < cfg.steps, start
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = None
        try:
            for s in handlers:
                signal.signal(s, self._on_signal)
            bar = tqdm(range(start + 1, end + 1), initial=start, total=cfg.steps, desc="training", unit="step")
            for step in bar:
                pending.append(self.train_step(step))
                validating = step % cfg.val_every == 0 or step == cfg.steps
                if step % cfg.log_every == 0 or validating or self.stop_signal is not None:
                    records = flush(pending, self.method.diverged_hint)
                    log.write(records)
                    bar.set_postfix(loss=f"{records[-1]['loss']:.4f}")
                stop = False
                if validating:
                    stop = self.validation(step, log)
                    bar.set_postfix(loss=f"{records[-1]['loss']:.4f}", reward=f"{self.last_val['reward']:.4f}",
                                    best=f"{self.best['reward']:.4f}@{self.best['step']}")
                if step % cfg.save_every == 0 or step == cfg.steps or stop or self.stop_signal is not None:
                    self.save_last(step)
                if self.stop_signal is not None:
                    raise TrainingInterrupted(f"interrupted at step {step}; saved {self.out / LAST}. "
                                              f"Continue with: {self.folder.resume_command()}")
                if stop:
                    stopped_early = True
                    tqdm.write(f"stopping early: {cfg.patience} validations without improvement")
                    break
        finally:  # the handlers as they were, whatever happened after they were set
            if bar is not None:
                bar.close()
            for s, h in handlers.items():
                signal.signal(s, h)
        return self.finish(step, stopped_early)

    def set_up(self) -> tuple["TrackedLog", int, int]:
        """Everything before the first step: the method's data, the optimizer and the run's one generator, or
        for a resumed run their state from last.pt; -> (the log, the last step done, the last step to run)."""
        cfg = self.cfg
        with self.phase("rewards"):
            self.ref_embs = self.scorer.embed_images(self.subject.images)  # ALIGN-I's references
        self.method.prepare()
        # fused=True: one kernel for the whole update and no full-size temporary (the default foreach path
        # allocates one, 3.4 GB for SD's U-Net: it matters for the 24 GB budget); 15-20 % faster steps on CPU.
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8,
                                     fused=True)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        # One generator draws everything random in the loop, on the CPU, so a resumed run continues exactly.
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.best, self.bad_vals, self.saved_step = None, 0, None
        log = TrackedLog(self.out / "log.jsonl")
        start, end = 0, cfg.steps
        if (self.out / LAST).exists():
            start = self.load_last()
            log.truncate(start)
            if self.last_val is None:  # a last.pt from before it kept the last validation: the log has it
                self.last_val = next((r for r in reversed(log.records()) if r.get("val")), None)
            if cfg.patience is not None and self.bad_vals >= cfg.patience:
                end = start  # it had stopped early: only its summary and report are left to write
        self.tracker = log.tracker = make_tracker(cfg.log_with, self.out, resume_step=start if start else None)
        if start:
            best = f"best so far: step {self.best['step']}, reward {self.best['reward']:.4f}" if self.best else ""
            print(f"resuming {self.out} at step {start} ({best})")
        else:
            log.reset()
            self.validation(0, log)
        return log, start, end

    def train_step(self, step: int) -> dict:
        """One optimizer step on the method's loss; -> the step's log values, still on the device."""
        with self.phase("train"):
            batch = self.method.draw(self.gen)
            out = self.method.loss(batch)
            grad_norm = optimizer_step(out.loss, self.params, self.opt, self.cfg.grad_clip, self.scaler)
            self.method.after_step(batch, out)
        return {"step": step, "loss": out.loss.detach(), "grad_norm": grad_norm.detach(),
                **{k: v.detach() for k, v in out.terms.items()}}

    def validation(self, step: int, log: "TrackedLog") -> bool:
        """Validate, log it, keep the best checkpoint and rebuild report.html; True when patience runs out."""
        v = self.validate(step)
        log.write([v])
        stop = self.after_validation(v)
        self.write_report()
        return stop

    def finish(self, step: int, stopped_early: bool) -> dict:
        """The kept checkpoint (--select last: the final step's), summary.json and the final report."""
        cfg = self.cfg
        if cfg.select == "last":
            self.save_best(step, None)
        chosen = self.best if cfg.select == "best" else self.last_val
        summary = {"method": cfg.method, "select": cfg.select, "chosen_step": chosen["step"],
                   "best_step": self.best["step"], "best_reward": self.best["reward"],
                   "best_align_i": self.best["align_i"], "best_align_t": self.best["align_t"],
                   "steps_run": step, "stopped_early": stopped_early,
                   "seconds": self.seconds(),
                   "best_ckpt": str(self.out / BEST), "example_prompt": self.prompts[0]}
        if "exact" in chosen:  # a subject scored exactly (the toy world): the kept checkpoint's validation images
            summary["chosen_exact"] = chosen["exact"]
        atomic_write_json(self.out / "summary.json", summary)
        self.write_report()
        return summary

    def write_report(self):
        """report.html, rebuilt from the run folder; a failure to draw it must not end a training run."""
        try:
            write_report(self.out)
        except Exception as e:  # noqa: BLE001 (the report is a view of the run, never the run)
            tqdm.write(f"warning: could not write {self.out / 'report.html'} ({type(e).__name__}: {e})", file=sys.stderr)


def build_policy(policy, cfg: TrainConfig, amp_dtype, uses_reference: bool):
    """What trains and how the U-Nets are called: -> (parameters to optimize, policy forward, reference forward).

    Full fine-tune: every U-Net weight trains in fp32 and the frozen reference (methods that use one: RPO, DCO) is
    a copy of the base. --lora: only the adapters train and the reference is the same U-Net with its
    adapters switched off. --compile compiles the forwards.
    """
    params = list(policy.parameters())
    if cfg.lora:
        # The base stays frozen in the autocast dtype (no fp32 master copy needed); the adapters are fp32
        # master weights.
        policy.to(amp_dtype or torch.float32)
        targets = cfg.lora_targets.split(",") if cfg.lora_targets else DEFAULT_TARGETS
        check_lora_rank(policy, cfg.lora, targets)
        with torch.random.fork_rng(devices=[]):  # A's random init from --seed: reproducible runs
            torch.manual_seed(cfg.seed)
            params = add_lora(policy, cfg.lora, cfg.lora_alpha, targets)
    policy_fwd, ref_fwd = (torch.compile(policy) if cfg.compile else policy), None
    if uses_reference and cfg.lora:
        ref_fwd = adapters_off(policy, policy_fwd)
    elif uses_reference:
        # A copy of the base stored in the autocast dtype: it only ever runs forwards, so it needs no fp32
        # master copy (fp32 when training in fp32).
        ref_unet = copy.deepcopy(policy).to(amp_dtype or torch.float32).requires_grad_(False).eval()
        ref_fwd = torch.compile(ref_unet) if cfg.compile else ref_unet
    return params, policy_fwd, ref_fwd


def check_lora_rank(model, rank: int, targets) -> None:
    """Refuse a rank above every adapted layer's min(in, out): B·A is then no longer low-rank, it only costs
    (a rank of 100000 took minutes a step) and learns nothing a rank of min(in, out) could not."""
    dims = {name: min(m.in_features, m.out_features) for name, m in model.named_modules()
            if type(m) is torch.nn.Linear and _matches(name, tuple(targets))}
    if dims and rank > max(dims.values()):
        name = max(dims, key=dims.get)
        raise UserError(f"--lora {rank} is more than the adapted layers' largest min(in, out), {dims[name]} "
                        f"({name}): a rank above it is no longer low-rank and adds nothing; use --lora "
                        f"{dims[name]} or less (LoRAs usually use 4-64)")


def adapters_off(model, fwd):
    """The frozen reference with --lora (RPO, DCO): the same U-Net (compiled or not) with its adapters switched off."""
    def ref(x, t, c):
        with lora_disabled(model):
            return fwd(x, t, c)
    return ref


class TrackedLog(JsonlLog):
    """log.jsonl, and the same records sent to the --log-with tracker."""

    tracker = None

    def write(self, records: list[dict]) -> None:
        super().write(records)
        if self.tracker is not None:
            self.tracker.log_records(records)


def flush(pending: list, hint: str = "lower --lr or use --precision fp32") -> list[dict]:
    """Move the buffered per-step values to the host in one go and turn them into log records; a loss that
    is not finite ends the run, with `hint` (the method's advice)."""
    records = [{k: (v if isinstance(v, int) else (v.item() if v.numel() == 1 and v.ndim == 0 else v.float().tolist()))
                for k, v in r.items()} for r in pending]
    pending.clear()
    for r in records:
        if not math.isfinite(r["loss"]):
            raise UserError(f"the loss became {r['loss']} at step {r['step']}; {hint}")
    return records
