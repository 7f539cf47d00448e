"""Compare training methods: every (method, subject, seed) trained by train.py and scored by DreamBench's metrics
(tinyrpo/evaluation/scores.py).

`python -m tinyrpo.compare` (tinyrpo/compare.py) is the command; its help says what goes before and after `--`.

Each cell is a train.py run folder, OUT/<method>/<subject>/seed<k>/, evaluated into its eval/ with the
evaluation's defaults (DreamBench's 25 prompts of the subject's set, 4 images each, DINO, CLIP-I, CLIP-T and
h_λ; exact metrics too where the evaluation reports them). Every cell sees the same evaluation noise
(--seed), so methods are compared on the same draws. The runner resumes: a cell with a finished eval.json
is skipped, a training run that was interrupted continues with --resume, a finished one is only evaluated.

The table (compare.md and compare.json, in the schema of tinyrpo.evaluation.pages.write_comparison_report; report.html
beside them): per method and metric, the mean ± sample standard deviation over all its cells (subjects × seeds, each
cell weighted equally) and their number, with the published DreamBench figures under it. Those are means
over DreamBench's 30 subjects: they compare with a --dreambench run, not with other subjects.

Scale-out: under torchrun (WORLD_SIZE > 1; multi-node with torchrun's rendezvous too) the cells are dealt
round-robin to the ranks, each rank training its own cells one after another on its LOCAL_RANK's GPU when
there are GPUs (its own --device otherwise). A gloo process group only coordinates: rank 0 collects every
rank's results (collective calls, no shared file system needed for the table) and writes the outputs; the
report page links run folders, so give all nodes one shared --out to see every run there.
"""
import datetime
import json
import math
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from tinyrpo.cli import fmt
from tinyrpo.errors import UserError
from tinyrpo.evaluation.pages import duration

# Published DreamBench figures (means over the 30 subjects, 25 prompts each).
PUBLISHED = [
    {"name": "Real images (DreamBooth, Table 1)", "dino": 0.774, "clip_i": 0.885, "clip_t": None},
    {"name": "DreamBooth, SD (DreamBooth, Table 1)", "dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
    {"name": "RPO, λ_val = 0.5 (Miao et al., Table 1)", "dino": None, "clip_i": 0.833, "clip_t": 0.314},
    # Wei et al. 2024, their DreamBench comparison with SD v1.4 (their DreamBooth run, then DreamBooth with their
    # two rewards); transcribed from a summary of the paper, whose PDF could not be read here.
    {"name": "DreamBooth, SD v1.4 (Wei et al.)", "dino": 0.694, "clip_i": 0.762, "clip_t": 0.282},
    {"name": "DreamBooth + look forward (Wei et al.)", "dino": 0.738, "clip_i": 0.797, "clip_t": 0.269},
    {"name": "DreamBooth + DINO reward (Wei et al.)", "dino": 0.723, "clip_i": 0.783, "clip_t": 0.270},
]
METRICS = ("dino", "clip_i", "clip_t", "harmonic")  # first in the table; other numeric metrics follow
NAMES = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "harmonic": "h_λ"}


@dataclass
class Cell:
    method: str
    subject: Path   # the subject's photo folder
    seed: int

    @property
    def run(self) -> Path:  # relative to the comparison folder
        return Path(self.method) / self.subject.name / f"seed{self.seed}"

    def label(self) -> str:
        return f"{self.method}/{self.subject.name}/seed{self.seed}"


def plan(methods: list[str], subjects: list[Path], seeds: list[int]) -> list[Cell]:
    """Every cell, method-major: the order of the table and of the work."""
    return [Cell(m, s, k) for m in methods for s in subjects for k in seeds]


def shard(cells: list, rank: int, world: int) -> list:
    """This rank's cells: round-robin, so each rank gets every method and subject in turn."""
    return cells[rank::world]


# ------------------------------------------------------------------------------------------------- the table

def flat_metrics(overall: dict) -> dict[str, float]:
    """The numeric metrics of an eval.json's "overall", nested dicts flattened as "outer/inner"."""
    out = {}
    for k, v in overall.items():
        if isinstance(v, dict):
            out |= {f"{k}/{kk}": vv for kk, vv in flat_metrics(v).items()}
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None:
            out[k] = float(v)
    return out


def mean_std(values: list[float]) -> dict:
    """mean, sample standard deviation (0 for a single value) and n."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def summarize(methods: list[str], cells: list[dict]) -> tuple[list[str], list[dict]]:
    """-> (metrics, table): per method, mean ± std over its cells of each metric."""
    seen = {k: None for c in cells for k in (c.get("eval") or {})}
    metrics = [m for m in METRICS if m in seen] + [m for m in seen if m not in METRICS and m not in
                                                   ("align_i", "align_t")]  # affine in CLIP-I / CLIP-T
    table = []
    for method in methods:
        evals = [c["eval"] for c in cells if c["method"] == method and c.get("eval")]
        row = {"method": method}
        for m in metrics:
            values = [e[m] for e in evals if e.get(m) is not None]
            if values:
                row[m] = mean_std(values)
        table.append(row)
    return metrics, table


def comparison_markdown(data: dict) -> str:
    metrics = data["metrics"]
    head = "| method | " + " | ".join(NAMES.get(m, m) for m in metrics) + " |"
    rule = "|---" * (len(metrics) + 1) + "|"
    lines = [f"# Comparison: {len(data['methods'])} methods × {len(data['subjects'])} subjects × "
             f"{len(data['seeds'])} seeds", "",
             f"mean ± std over subjects and seeds (n cells); h_λ at λ_val = {data['lambda_val']}", "", head, rule]
    for r in data["table"]:
        lines.append(f"| **{r['method']}** | " + " | ".join(
            f"{r[m]['mean']:.3f} ± {r[m]['std']:.3f} ({r[m]['n']})" if m in r else "–" for m in metrics) + " |")
    lines += ["", "Published (DreamBench, 30 subjects; they compare with a --dreambench run only):", "", head, rule]
    for p in data["published"]:
        lines.append(f"| {p['name']} | " + " | ".join(fmt(p.get(m)) for m in metrics) + " |")
    lines += ["", "| method | subject | seed | " + " | ".join(NAMES.get(m, m) for m in metrics) + " | run |",
              "|---" * (len(metrics) + 4) + "|"]
    for c in data["cells"]:
        e = c.get("eval") or {}
        lines.append(f"| {c['method']} | {c['subject']} | {c['seed']} | "
                     + " | ".join(fmt(e.get(m)) for m in metrics) + f" | {c['run']} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------- one cell

def read_finished(path: Path) -> dict | None:
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and result.get("overall") else None


def option_dests(train_args: list[str]) -> list[tuple[list[str], str | None]]:
    """train.py's arguments grouped by flag: [(the flag and its value, the setting it sets), ...]."""
    import train
    actions = train.build_parser()._option_string_actions  # flag -> argparse action (argparse has no public map)
    groups, i = [], 0
    while i < len(train_args):
        action = actions.get(train_args[i].split("=")[0])
        n = 1 if action is None or "=" in train_args[i] or action.nargs == 0 else 2
        groups.append((train_args[i:i + n], action.dest if action is not None else None))
        i += n
    return groups


def method_args(train_args: list[str], method: str) -> list[str]:
    """The train.py arguments for `method`'s cells: another method's own options (--beta for dreambooth, say)
    are left out; shared settings (--lr, --steps, ...) go to every method."""
    from tinyrpo.config import setting_names
    keep = setting_names(method)
    return [a for flags, dest in option_dests(train_args) if dest is None or dest in keep for a in flags]


def check_method_options(train_args: list[str], methods: list[str]) -> None:
    """An option that none of the compared methods has is a mistake (a typo, or the wrong --methods)."""
    from tinyrpo.config import setting_names
    known = set().union(*(setting_names(m) for m in methods))
    foreign = [flags[0].split("=")[0] for flags, dest in option_dests(train_args) if dest and dest not in known]
    if foreign:
        raise UserError(f"{', '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} not a setting of "
                        f"{' or '.join(methods)}; drop {'it' if len(foreign) == 1 else 'them'} after `--`")


def train_argv(cell: Cell, run: Path, train_args: list[str], forward: dict) -> list[str]:
    """train.py's arguments for one cell; `forward` holds this command's options train.py also takes (a flag
    given after `--` wins). A run folder that holds a run is continued with --resume."""
    args = ["--subject", str(cell.subject), "--out", str(run), "--method", cell.method, "--seed", str(cell.seed)]
    given = {a.split("=")[0] for a in train_args if a.startswith("--")}
    for flag, value in forward.items():
        if value is not None and flag not in given:
            args += [flag, str(value)]
    args += method_args(train_args, cell.method)
    if ((run / "config.json").exists() or (run / "last.pt").exists()) and "--resume" not in args:
        args.append("--resume")
    return args


class CellRunner:
    """Trains and evaluates cells through train.py and evaluate_subject, loading the evaluation networks once."""

    def __init__(self, out: Path, train_args: list[str], args, settings):
        self.out, self.train_args, self.args, self.settings = out, train_args, args, settings
        self.forward = {"--weights": args.weights, "--token": args.token, "--device": args.device_given}
        self.embedders = {}  # (eval CLIP, DINO) -> the loaded networks: a subject.json may name its own

    def __call__(self, cell: Cell) -> tuple[dict, bool]:
        """-> (the cell's eval.json, whether it was done before)."""
        from tinyrpo.evaluation import scores
        from tinyrpo.formats.checkpoint import best_checkpoint
        from tinyrpo.pipeline import resolve_device

        run = self.out / cell.run
        finished = read_finished(run / "eval" / "eval.json")
        if finished is not None:
            return finished, True
        device = resolve_device(self.settings.device)
        if not ((run / "summary.json").exists() and best_checkpoint(run) is not None):
            try:
                import train  # the repository's train.py, importable when run from the repository root
            except ModuleNotFoundError:
                raise UserError("tinyrpo.compare calls train.py: run it from the tinyrpo repository root") from None
            try:
                train.main(train_argv(cell, run, self.train_args, self.forward))
            except UserError as e:
                raise UserError(f"training {cell.label()}: {e}") from None
            scores.free_memory(device)
        models = scores.eval_models(cell.subject, self.args.eval_clip, self.args.dino)
        if models not in self.embedders:
            self.embedders[models] = scores.load_embedder(*models, device)
        result = scores.evaluate_subject(cell.subject, out=run / "eval", ckpt=best_checkpoint(run),
                                         weights=self.args.weights, eval_clip=models[0], dino=models[1],
                                         token=self.args.token, settings=self.settings,
                                         embedder=self.embedders[models])
        scores.free_memory(device)
        return result, False


def run_cells(cells: list[Cell], runner, prefix: str = "") -> list[dict]:
    """Run `cells` in order with `runner`; -> one compare.json cell record each. Prints one line per cell."""
    records, spent, done_here = [], 0.0, 0
    for n, cell in enumerate(cells):
        t0 = time.perf_counter()
        result, before = runner(cell)
        metrics = flat_metrics(result["overall"])
        records.append({"method": cell.method, "subject": cell.subject.name, "seed": cell.seed,
                        "run": str(cell.run), "eval": metrics})
        head = f"{prefix}[{n + 1:2d}/{len(cells)}] {cell.label()}"
        if before:
            print(f"{head}: done before, skipped", flush=True)
            continue
        spent += time.perf_counter() - t0
        done_here += 1
        left = len(cells) - n - 1
        print(f"{head}: " + " ".join(f"{NAMES[m]} {metrics[m]:.3f}" for m in METRICS if m in metrics)
              + f" in {duration(time.perf_counter() - t0)}; {left} to go, ETA {duration(spent / done_here * left)}",
              flush=True)
    return records


# ------------------------------------------------------------------------------------------------- distributed

def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; a gloo process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist
    if not dist.is_initialized():
        # gloo: the group carries a few small objects between ranks, never tensors of the models. A long
        # timeout, because a rank that is done waits at the collect for the slowest rank's cells (hours).
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))


def gather(obj, world: int) -> list:
    """Every rank's `obj` on every rank (a list indexed by rank); [obj] without a process group."""
    if world == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------- the whole run


def compare(cells: list[Cell], out: Path, train_args: list[str], args, settings, rank: int = 0, world: int = 1,
            local_rank: int = 0) -> dict | None:
    """Run this rank's cells, collect every rank's results on rank 0 and write the table there.
    -> compare.json's content on rank 0, None on the others."""
    from tinyrpo.evaluation.pages import write_comparison_report
    from tinyrpo.runs.atomic import atomic_write_bytes, atomic_write_json

    methods = list(dict.fromkeys(c.method for c in cells))
    subjects = list(dict.fromkeys(c.subject for c in cells))
    seeds = list(dict.fromkeys(c.seed for c in cells))
    if world > 1:
        import torch
        if torch.cuda.is_available():  # one GPU per rank
            args.device_given = settings.device = f"cuda:{local_rank % torch.cuda.device_count()}"
    mine = shard(cells, rank, world)
    if rank == 0:
        print(f"comparing {', '.join(methods)} on {len(subjects)} subjects × seeds {', '.join(map(str, seeds))}: "
              f"{len(cells)} cells into {out}" + (f", over {world} ranks" if world > 1 else "")
              + f"; train.py args: {shlex.join(train_args) or '(defaults)'}", flush=True)
    t0 = time.perf_counter()
    try:
        records, error = run_cells(mine, CellRunner(out, train_args, args, settings),
                                   f"[rank {rank}] " if world > 1 else ""), None
    except UserError as e:
        if world == 1:
            raise
        records, error = [], f"rank {rank}: {e}"  # the others must still reach the collect below
    gathered = gather({"records": records, "error": error}, world)
    errors = [g["error"] for g in gathered if g["error"]]
    if errors:
        raise UserError("; ".join(errors))
    if rank != 0:
        return None
    by_cell = {(r["method"], r["subject"], r["seed"]): r for g in gathered for r in g["records"]}
    records = [by_cell[(c.method, c.subject.name, c.seed)] for c in cells]
    metrics, table = summarize(methods, records)
    data = {"methods": methods, "subjects": [s.name for s in subjects], "seeds": seeds, "metrics": metrics,
            "cells": records, "table": table, "published": PUBLISHED, "lambda_val": settings.lambda_val,
            "train_args": train_args, "ranks": world, "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(out / "compare.json", data)
    atomic_write_bytes(out / "compare.md", comparison_markdown(data).encode())
    write_comparison_report(out)
    return data
