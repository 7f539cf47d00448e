"""train.py's settings: `TrainConfig`, the settings every method shares (and the method's own options), and
`resolve_config`, which fills what was not given: the method's defaults, a subject.json's preset, and for
--resume the run's own config.json.

A flag is either shared (a field of TrainConfig) or the method's own option (a field of its Options
dataclass, tinyrpo/method.py): `TrainConfig.from_args` and `setting_names` are the one place that split is
written.
"""
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from tinyrpo.errors import UserError, need
from tinyrpo.methods import METHODS
from tinyrpo.pipeline import PRECISIONS
from tinyrpo.rpo import REWARD_MEANS
from tinyrpo.runs.paths import DEFAULT_REWARD_CLIP, DEFAULT_SD
from tinyrpo.runs.presets import subject_defaults
from tinyrpo.runs.runfolder import read_json
from tinyrpo.runs.tracking import LOG_WITH

# With --lora and no --lr: diffusers' LoRA DreamBooth example (train_dreambooth_lora.py's README) trains at
# 1e-4; full fine-tunes use 5e-6, which would barely move adapters that start at B = 0.
LORA_LR = 1e-4

MAX_SEED = 2**63 - 1 - 10_000  # the seed + offsets drawn from it (validation uses seed + 1000) must fit a generator


@dataclass
class TrainConfig:
    subject: str | None = None             # the photos' folder (with --resume, the run's own by default)
    out: str | None = None                 # default runs/<subject folder name>
    weights: str = DEFAULT_SD
    reward_model: str = DEFAULT_REWARD_CLIP
    method: str = "rpo"
    token: str = "sks"
    class_noun: str | None = None
    live: bool | None = None               # None: from the class (dogs and cats are live subjects)
    prompts: str | None = None             # a file of training prompts replacing the authors' eight
    resolution: int = 512
    sample_steps: int = 50
    guidance: float = 7.5
    lambda_val: float = 0.3                # RPO paper's default for checkpoint selection
    mean: str = "harmonic"                 # the reward's mean: harmonic (eq. 5) or arithmetic (Table 6)
    lr: float | None = None                # None: the method's default (RPO, DreamBooth, DCO 5e-6; look-forward 1e-6)
    steps: int | None = None               # None: the method's default (400, 800, 1000, 2000)
    batch_size: int = 1                    # pairs (RPO) or instance images (DreamBooth) per step
    grad_clip: float = 1.0
    val_every: int = 40
    val_images_per_prompt: int = 4
    select: str | None = None              # "best" (validation argmax) or "last"; None: the method's default
    patience: int | None = None
    save_every: int = 200                  # last.pt (10 GB for SD v1.5 with AdamW) every N steps, and at the end
    train_text_encoder: bool | None = None  # None: the method's default
    lora: int | None = None                # rank of LoRA adapters on the U-Net (None: fine-tune every weight)
    lora_alpha: float | None = None        # α of eq. (3) of Hu et al.; None: = rank (scaling 1)
    lora_targets: str | None = None        # comma-separated module names; None: to_q,to_k,to_v,to_out.0
    seed: int = 0
    device: str = "auto"
    threads: int | None = None             # CPU threads for torch; None: torch's default (tiny models: 1 is fastest)
    precision: str = "auto"                # bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    gradient_checkpointing: bool = False
    gen_batch_size: int = 16               # images per U-Net pass when generating (×2 for guidance)
    log_every: int = 10
    log_with: str = "none"                 # also send the log to: none, tensorboard
    resume: bool = False
    options: dict = field(default_factory=dict)  # the method's own settings (its Options dataclass)

    @classmethod
    def from_args(cls, args) -> "TrainConfig":
        """From train.py's parsed flags (an argparse Namespace or a dict of them): the shared settings by name,
        every other flag the method's own option. An option left at None was not given, and the method's
        Options dataclass holds its default."""
        settings = vars(args) if not isinstance(args, dict) else args
        options = {k: v for k, v in settings.items() if k not in SHARED and v is not None}
        return cls(**{k: v for k, v in settings.items() if k in SHARED}, options=options)

    def validate(self):
        need(self.method in METHODS, f"--method {self.method} is not available; choose one of {', '.join(METHODS)}")
        need_finite(self)
        need(self.steps is None or self.steps >= 1, f"--steps must be at least 1 (got {self.steps})")
        need(0.0 <= self.lambda_val <= 1.0, f"--lambda-val must be in [0, 1] (got {self.lambda_val})")
        need(self.mean in REWARD_MEANS, f"--mean must be one of {', '.join(REWARD_MEANS)} (got {self.mean!r})")
        need(self.lr is None or self.lr > 0, f"--lr must be positive (got {self.lr})")
        need(self.batch_size >= 1, f"--batch-size must be at least 1 (got {self.batch_size})")
        need(self.val_every >= 1, f"--val-every must be at least 1 (got {self.val_every})")
        need(self.val_images_per_prompt >= 1,
             f"--val-images-per-prompt must be at least 1 (got {self.val_images_per_prompt})")
        need(self.sample_steps >= 1, f"--sample-steps must be at least 1 (got {self.sample_steps})")
        need(self.guidance >= 0, f"--guidance must be >= 0 (got {self.guidance})")
        need(self.resolution >= 8, f"--resolution must be at least 8 (got {self.resolution})")
        need(self.grad_clip > 0, f"--grad-clip must be positive (got {self.grad_clip})")
        need(self.select in (None, "best", "last"), f"--select must be best or last (got {self.select!r})")
        need(self.patience is None or self.patience >= 1, f"--patience must be at least 1 (got {self.patience})")
        need(self.save_every >= 1, f"--save-every must be at least 1 (got {self.save_every})")
        need(0 <= self.seed <= MAX_SEED, f"--seed must be between 0 and {MAX_SEED} (got {self.seed})")
        need(self.precision in PRECISIONS,
             f"--precision must be one of {', '.join(PRECISIONS)} (got {self.precision})")
        need(self.log_with in LOG_WITH, f"--log-with must be one of {', '.join(LOG_WITH)} (got {self.log_with!r})")
        need(self.log_every >= 1, f"--log-every must be at least 1 (got {self.log_every})")
        need(self.lora is None or self.lora >= 1, f"--lora rank must be at least 1 (got {self.lora})")
        need(self.lora_alpha is None or self.lora_alpha > 0, f"--lora-alpha must be positive (got {self.lora_alpha})")
        need(self.lora is not None or (self.lora_alpha is None and self.lora_targets is None),
             "--lora-alpha and --lora-targets need --lora RANK")
        need(not (self.lora and self.train_text_encoder),
             "--train-text-encoder with --lora is not supported: LoRA adapts the U-Net only; drop one of them")
        need(self.threads is None or self.threads >= 1, f"--threads must be at least 1 (got {self.threads})")
        need(self.gen_batch_size >= 1, f"--gen-batch-size must be at least 1 (got {self.gen_batch_size})")


SHARED = frozenset(f.name for f in fields(TrainConfig)) - {"options"}  # the settings every method takes


def setting_names(method: str) -> set[str]:
    """Every setting of train.py --method `method`: the shared ones and the method's own options."""
    return SHARED | {f.name for f in fields(METHODS[method].Options)}


def resolve_config(cfg: TrainConfig, given: set[str] | None = None) -> TrainConfig:
    """Fill the method's defaults (lr, steps, select, ...) and, for --resume, the run's own settings.

    A resumed run takes every setting from its config.json except the flags given on the command line
    (`given`; None means all of them), which are then checked against it in Trainer.
    """
    if not cfg.resume:  # a resumed run is checked once its own settings are in (its --lora counts)
        cfg.validate()
    if cfg.subject is None and not (cfg.resume and cfg.out):
        raise UserError("pass --subject DIR, a folder with 3-6 photos of your subject (e.g. refs/dog), "
                        "or --out RUN --resume to continue a run")
    if cfg.resume:
        out = Path(cfg.out or Path("runs") / Path(cfg.subject).name)
        if (out / "config.json").exists():
            old = read_json(out / "config.json", "the run's settings")
            keep = {k: old[k] for k in SHARED if k in old and (given is not None and k not in given)}
            method = METHODS.get(keep.get("method", cfg.method), METHODS[cfg.method])
            opts = {f.name: old[f.name] for f in fields(method.Options) if f.name in old}
            opts |= {k: v for k, v in cfg.options.items() if given is None or k in given}
            cfg = TrainConfig(**(asdict(cfg) | keep | {"options": opts, "out": str(out), "resume": True}))
        cfg.validate()
    elif given is not None:
        cfg = subject_defaults(cfg, given)
    method = METHODS[cfg.method]
    if cfg.lora:  # adapters train at a LoRA learning rate (the method's, else LORA_LR), and on the U-Net alone
        cfg.lr = method.defaults.get("lora_lr", LORA_LR) if cfg.lr is None else cfg.lr
        cfg.train_text_encoder = False
    for key, value in method.defaults.items():
        if key != "lora_lr" and getattr(cfg, key) is None:
            setattr(cfg, key, value)
    unknown = set(cfg.options) - {f.name for f in fields(method.Options)}
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in sorted(unknown))
        one = len(unknown) == 1
        raise UserError(f"{flags} {'is' if one else 'are'} not a setting of --method {cfg.method}; drop "
                        f"{'it' if one else 'them'} (python train.py --help lists each method's own settings)")
    return cfg



def need_finite(settings) -> None:
    """Every float setting (of TrainConfig or a method's options) is a number: nan or inf passes checks like
    `guidance >= 0` and then trains on nonsense."""
    for f in fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, float):
            need(math.isfinite(value), f"--{f.name.replace('_', '-')} must be a finite number (got {value})")


def method_options(cfg: TrainConfig):
    """The method's options (its Options dataclass) from a resolved config, checked."""
    options = METHODS[cfg.method].Options.from_dict(cfg.options)
    need_finite(options)
    options.validate(need)
    return options
