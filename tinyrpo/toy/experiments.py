"""The RPO paper's claims, measured exactly in the toy world.

    python -m tinyrpo.toy experiment overfit    # Fig. 4: pure L_sim overfits — identity up, prompt fidelity down
    python -m tinyrpo.toy experiment table2     # Table 2: L_sim / L_pref without early stopping / early stopping
                                                #          without L_pref / full RPO; and the early-stopping gap
    python -m tinyrpo.toy experiment lambda     # Table 3: λ_val ∈ {0.3, 0.5, 0.7}
    python -m tinyrpo.toy experiment choices    # tinyrpo's two departures from the paper, decided by measurement
    python -m tinyrpo.toy experiment all        # every table from one set of runs
    python -m tinyrpo.toy experiment beyond     # beyond the paper (issue 21): label temperature, hard labels,
                                                #   on-policy negatives, β, against pure L_sim and DreamBooth

Each experiment trains RPO variants (train.py's own code, the toy preset of the subject folders) on both toy
subjects with --seeds (default 0,1,2), one run folder per (variant, subject, seed) under --out, and reads the
tables off their validation records: every validation scores 8 training prompts × 4 images with the exact
metrics (tinyrpo/toy/metrics.py: identity (pattern), body, fidelity, leak) beside the λ-Harmonic reward. A finished run is
skipped and an interrupted one resumed, so the runs of one experiment serve the others.

What is measured, and how:
- A checkpoint's numbers are those of its validation images (the same 32 images, same noise, at every
  step); mean ± std over the runs (subjects × seeds).
- "Early stopping" keeps the validation step of the highest h_λval (λ_val from --lambda-val, default 0.3,
  the paper's default); "no early stopping" keeps the last step. Both read from the same run, as the
  paper's Table 2 rows do: the selection does not change the training.
- λ_val changes only which step is kept, never the training. At the runs' own λ_val the kept step is the
  trainer's (its logged reward: the mean over the validation images of each image's h_λ). Table 3
  re-selects the same runs with other λ from the logged means of ALIGN-I and ALIGN-T, h_λ(mean ALIGN-I,
  mean ALIGN-T): close to, not the same as, training with that --lambda-val (the mean of per-image harmonic
  means is not the harmonic mean of the means).
- The exact optimum of a run is its validation step with the highest exact score, the harmonic mean of
  identity and fidelity; the early-stopping gap is the distance (in steps and in exact score) between the
  step h_λval keeps and that optimum.
- A choice is decided by the paired difference (same subject and seed) of the exact score; "within
  noise" when |mean| < its standard error × 2.
- Beyond the paper, "fidelity at matched identity": a kept checkpoint's fidelity minus that of pure L_sim's most
  faithful validation (same subject and seed) that is at least as identifiable (pure L_sim's most identifiable
  one when none is, which favours L_sim). Positive beyond noise: the preference term bought fidelity at equal
  identity, which pure L_sim with early stopping could not have had by stopping elsewhere.
"""
import json
import math
import statistics
from pathlib import Path

from tinyrpo.errors import UserError
from tinyrpo.evaluation.comparison import mean_std
from tinyrpo.rpo import harmonic_reward

SUBJECTS = ("refs/toy", "refs/ball")
# train.py arguments of each variant (on top of the subject folder's preset)
VARIANTS = {
    "rpo": [],                                          # L_sim + L_pref, tinyrpo's defaults (pair, shared)
    # Pure L_sim. Without L_pref the loser is unused and --noise only moves the random stream; shared is the
    # stream README's runs were made with, so the command reproduces them.
    "lsim": ["--no-pref", "--noise", "shared"],
    "reference": ["--winner-prompt", "reference"],      # h(w) against the reference prompt ("a photo of sks toy")
    "independent": ["--noise", "independent"],          # ε and t drawn for w and l separately (paper, eq. 4)
    "beta": ["--beta", "0.1"],                          # RPO at the toy preset's β
    # Beyond the paper (issue 21), one change each from "rpo" (τ 1, soft labels, negatives never remade, β 1),
    # which is also the τ = 1, K = never and β = 1 cell of each sweep, as "beta" is its β = 0.1 cell.
    "tau0.1": ["--label-temperature", "0.1"],
    "tau0.02": ["--label-temperature", "0.02"],
    "hard": ["--labels", "hard"],
    "refresh200": ["--refresh-negatives", "200"],
    "refresh50": ["--refresh-negatives", "50"],
    "beta0.01": ["--beta", "0.01"],
    "dreambooth": ["--method", "dreambooth"],           # the baseline, at the toy preset (it has no β)
}
# Every variant runs at the paper's β = 1 (the toy preset's β would otherwise apply), but "beta", DreamBooth
# and the default run ("default": `python train.py` as it is, the toy preset, at other seeds).
PAPER = ["--beta", "1.0"]
PRESET = ("beta", "dreambooth", "default")
VARIANTS["default"] = []
EXPERIMENTS = {"overfit": ["lsim", "rpo"], "table2": ["lsim", "rpo", "beta"], "lambda": ["rpo"],
               "choices": ["rpo", "reference", "independent"]}
EXPERIMENTS["all"] = sorted({v for vs in EXPERIMENTS.values() for v in vs}, key=list(VARIANTS).index)
EXPERIMENTS["default"] = ["default"]  # the default run, its kept checkpoint evaluated against the base model
# (row label, variant, which validation is kept: "early" = the h_λval argmax, "last" = the final step)
BEYOND_ROWS = [
    ("pure L_sim (--no-pref) + early stopping", "lsim", "early"),
    ("RPO as the paper: τ 1, soft labels, negatives never remade, β 1", "rpo", "early"),
    ("RPO, label temperature τ 0.1", "tau0.1", "early"),
    ("RPO, label temperature τ 0.02", "tau0.02", "early"),
    ("RPO, hard labels", "hard", "early"),
    ("RPO, negatives remade by the policy every 200 steps", "refresh200", "early"),
    ("RPO, negatives remade by the policy every 50 steps", "refresh50", "early"),
    ("RPO, β 0.1", "beta", "early"),
    ("RPO, β 0.01", "beta0.01", "early"),
    ("DreamBooth (--method dreambooth), last step", "dreambooth", "last"),
    ("DreamBooth + early stopping", "dreambooth", "early"),
]
EXPERIMENTS["beyond"] = list(dict.fromkeys(variant for _, variant, _ in BEYOND_ROWS))
METRICS = ("identity", "body", "fidelity", "leak")


# ---------------------------------------------------------------------------------------------- runs

def run_dir(out: Path, variant: str, subject: str, seed: int) -> Path:
    return out / variant / Path(subject).name / f"seed{seed}"


def train_cell(out: Path, variant: str, subject: str, seed: int, extra: list[str]) -> Path:
    """Train one (variant, subject, seed) run with train.py's code; skip it if finished, resume it if not."""
    import train  # the repository's train.py

    run = run_dir(out, variant, subject, seed)
    if (run / "summary.json").exists():
        return run
    args = ["--subject", subject, "--out", str(run), "--seed", str(seed),
            *([] if variant in PRESET else PAPER), *VARIANTS[variant], *extra]
    if (run / "config.json").exists():
        args.append("--resume")
    train.main(args)
    return run


def read_vals(run: Path) -> list[dict]:
    """The validation records of a run (step, reward, align_i, align_t, exact), in step order."""
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if x.strip()]
    vals = sorted((r for r in records if r.get("val")), key=lambda r: r["step"])
    if not vals or "exact" not in vals[0]:
        raise UserError(f"{run} has no exact metrics in its validations: is its subject a toy one?")
    lam = json.loads((run / "config.json").read_text())["lambda_val"]
    return [v | {"lambda_val": lam} for v in vals]


# ---------------------------------------------------------------------------------------------- selection

def exact_score(v: dict) -> float:
    """One exact number per checkpoint: the harmonic mean of identity and fidelity (both must be high). The
    pattern identity is chance-corrected and can dip below 0 (worse than chance): counted as 0 here."""
    i, f = max(v["exact"].get("identity", 0.0), 0.0), v["exact"].get("fidelity", 0.0)
    return 2 * i * f / (i + f) if i + f > 0 else 0.0


def h_val(v: dict, lam: float) -> float:
    """The validation reward h_λ (eq. 5) of a logged validation: the trainer's own at the run's λ_val, else
    computed from the logged mean ALIGN-I and ALIGN-T (per-image values are not logged)."""
    if abs(lam - v.get("lambda_val", float("nan"))) < 1e-12:
        return v["reward"]
    import torch
    return harmonic_reward(torch.tensor(v["align_i"]), torch.tensor(v["align_t"]), lam).item()


def early_stop(vals: list[dict], lam: float) -> dict:
    return max(vals, key=lambda v: (h_val(v, lam), -v["step"]))  # ties: the earlier step, as the trainer


def row_of(v: dict, lam: float) -> dict:
    return {"step": v["step"], "h": h_val(v, lam), "score": exact_score(v), **{m: v["exact"].get(m) for m in METRICS}}


def spread(xs: list[float]) -> tuple[float, float]:
    """(mean, sample std) of the values that are numbers (tinyrpo.evaluation.comparison.mean_std); NaNs if none."""
    xs = [x for x in xs if x is not None and x == x]
    if not xs:
        return float("nan"), float("nan")
    ms = mean_std(xs)
    return ms["mean"], ms["std"]


def pm(xs: list[float], digits: int = 3) -> str:
    m, s = spread(xs)
    return "—" if m != m else f"{m:.{digits}f} ± {s:.{digits}f}"


def table(rows: list[tuple[str, list[dict]]], cols=("identity", "body", "fidelity", "leak", "score", "h", "step")) -> str:
    names = {"identity": "identity ↑", "body": "body colour", "fidelity": "fidelity ↑", "leak": "leak ↓", "score": "exact score ↑",
             "h": "h_λval", "step": "step kept", "minutes": "wall min"}
    digits = {"step": 0, "minutes": 1}
    lines = ["| | " + " | ".join(names[c] for c in cols) + " |", "| --- |" + " --- |" * len(cols)]
    for name, cells in rows:
        lines.append(f"| {name} | " + " | ".join(pm([cell[col] for cell in cells], digits.get(col, 3))
                                                 for col in cols) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the tables

def overfit(runs: dict, lam: float) -> tuple[str, dict]:
    """Fig. 4: the exact metrics at every validation step of pure L_sim (and of RPO beside it)."""
    out, data = [], {}
    for variant in ("lsim", "rpo"):
        if variant not in runs:
            continue
        steps = sorted({v["step"] for vals in runs[variant].values() for v in vals})
        rows = []
        for s in steps:
            at = [next(v for v in vals if v["step"] == s) for vals in runs[variant].values()
                  if any(v["step"] == s for v in vals)]
            rows.append((s, [row_of(v, lam) for v in at]))
        data[variant] = {s: {m: spread([c[m] for c in cells]) for m in (*METRICS, "score", "h")}
                         for s, cells in rows}
        title = "pure L_sim (--no-pref)" if variant == "lsim" else "RPO (L_sim + L_pref)"
        out.append(f"**{title}**, validation images, mean ± std over {len(runs[variant])} runs\n\n"
                   + table([(f"step {s}", cells) for s, cells in rows], cols=("identity", "body", "fidelity",
                                                                               "leak", "score", "h")))
    return "\n\n".join(out), data


def table2(runs: dict, lam: float) -> tuple[str, dict]:
    rows = [("pure L_sim (no L_pref, no early stopping)", [row_of(v[-1], lam) for v in runs["lsim"].values()]),
            ("L_pref without early stopping", [row_of(v[-1], lam) for v in runs["rpo"].values()]),
            ("early stopping without L_pref", [row_of(early_stop(v, lam), lam) for v in runs["lsim"].values()]),
            ("RPO: L_sim + L_pref + early stopping", [row_of(early_stop(v, lam), lam) for v in runs["rpo"].values()])]
    if "beta" in runs:
        rows.append(("RPO with β = 0.1 (the toy preset) + early stopping",
                     [row_of(early_stop(v, lam), lam) for v in runs["beta"].values()]))
    gaps = []
    for variant in ("lsim", "rpo"):
        for key, vals in runs[variant].items():
            kept, best = early_stop(vals, lam), max(vals, key=lambda v: (exact_score(v), -v["step"]))
            gaps.append({"variant": variant, "run": key, "kept_step": kept["step"], "best_exact_step": best["step"],
                         "step_gap": abs(kept["step"] - best["step"]),
                         "score_gap": exact_score(best) - exact_score(kept)})
    text = table(rows) + "\n\n" + "\n".join(
        f"- early stopping by h_{lam} vs the exact optimum, {name}: |step gap| {pm([g['step_gap'] for g in gaps if g['variant'] == v], 0)}, "
        f"exact score lost {pm([g['score_gap'] for g in gaps if g['variant'] == v])}"
        for v, name in (("rpo", "RPO"), ("lsim", "pure L_sim")))
    return text, {"rows": {n: cells for n, cells in rows}, "gaps": gaps}


def lambda_table(runs: dict, lams=(0.3, 0.5, 0.7)) -> tuple[str, dict]:
    rows = [(f"λ_val = {lam}", [row_of(early_stop(v, lam), lam) for v in runs["rpo"].values()]) for lam in lams]
    return table(rows), {n: cells for n, cells in rows}


def paired(a: dict, b: dict, lam: float) -> str:
    """The paired difference b − a of the kept checkpoints' exact score, with its verdict."""
    diffs = [exact_score(early_stop(b[k], lam)) - exact_score(early_stop(a[k], lam)) for k in a if k in b]
    if len(diffs) < 2:
        return "too few runs to compare"
    m, s = spread(diffs)
    se = s / math.sqrt(len(diffs))
    verdict = "within noise" if abs(m) < 2 * se else ("better" if m > 0 else "worse")
    return f"{m:+.3f} ± {se:.3f} (paired, n = {len(diffs)}): {verdict}"


def choices(runs: dict, lam: float) -> tuple[str, dict]:
    """tinyrpo's defaults (h(w) vs the pair's prompt, one ε and t per pair) against each other choice, the
    rest unchanged; the verdict is the paired difference other − default."""
    def kept(variant):
        return [row_of(early_stop(v, lam), lam) for v in runs[variant].values()]
    rows = [("default: h(w) vs the pair's training prompt (authors' code), one ε and t per pair", kept("rpo")),
            ("(a) h(w) vs the reference prompt (--winner-prompt reference)", kept("reference")),
            ("(b) ε and t drawn for w and l separately (--noise independent, paper eq. 4)", kept("independent"))]
    verdicts = {k: paired(runs["rpo"], runs[k], lam) for k in ("reference", "independent")}
    text = table(rows) + "\n\n" + "\n".join(f"- exact score, {name} minus the default: {verdicts[k]}"
                                            for k, name in (("reference", "(a)"), ("independent", "(b)")))
    return text, {"rows": {n: cells for n, cells in rows}, "verdicts": verdicts}


def matched_fidelity(kept: dict, lsim_vals: list[dict]) -> tuple[float, float]:
    """A kept checkpoint against pure L_sim's most faithful validation (same subject and seed) that is at least as
    identifiable (its most identifiable one when none is): -> (fidelity difference, identity difference)."""
    identity = kept["exact"]["identity"]
    reached = [v for v in lsim_vals if v["exact"]["identity"] >= identity]
    match = (max(reached, key=lambda v: (v["exact"]["fidelity"], -v["step"])) if reached
             else max(lsim_vals, key=lambda v: (v["exact"]["identity"], -v["step"])))
    return kept["exact"]["fidelity"] - match["exact"]["fidelity"], identity - match["exact"]["identity"]


def verdict(diffs: list[float], words=("better", "worse")) -> tuple[str, float, float]:
    """-> (verdict, mean, standard error) of paired differences: within noise when |mean| < 2 standard errors."""
    m, s = spread(diffs)
    se = s / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    if len(diffs) < 2:
        return "too few runs to compare", m, se
    return ("within noise" if abs(m) < 2 * se else (words[0] if m > 0 else words[1])), m, se


def beyond(runs: dict, lam: float, minutes: dict) -> tuple[str, dict]:
    """Issue 21: each change beyond the paper (label temperature, hard labels, on-policy negatives, β) and
    DreamBooth, against pure L_sim with early stopping; the reading is computed from the numbers: which
    change, if any, makes L_pref buy fidelity at equal identity. `minutes`: variant -> run -> wall minutes."""
    rows, reading, lines = [], {}, []
    for name, variant, rule in BEYOND_ROWS:
        if variant not in runs:
            continue
        kept = {key: early_stop(vals, lam) if rule == "early" else vals[-1] for key, vals in runs[variant].items()}
        rows.append((name, [row_of(v, lam) | {"minutes": minutes.get(variant, {}).get(key)} for key, v in kept.items()]))
        if variant == "lsim" or "lsim" not in runs:
            continue
        pairs = [matched_fidelity(v, runs["lsim"][key]) for key, v in kept.items() if key in runs["lsim"]]
        said, m, se = verdict([d for d, _ in pairs], ("buys fidelity", "loses fidelity"))
        gap = spread([g for _, g in pairs])[0]
        reading[name] = {"variant": variant, "fidelity_diff": m, "se": se, "identity_diff": gap, "n": len(pairs),
                         "verdict": said}
        exact = f"; exact score minus L_sim + early stopping {paired(runs['lsim'], runs[variant], lam)}" if rule == "early" else ""
        lines.append(f"- {name}: fidelity at matched identity {m:+.3f} ± {se:.3f} (paired, n = {len(pairs)}; "
                     f"identity {gap:+.3f} vs the matched L_sim checkpoints): {said}{exact}")
    text = table(rows, cols=("identity", "fidelity", "score", "step", "minutes"))
    rpo_rows = [n for n, r in reading.items() if r["variant"] != "dreambooth"]
    buys = [n for n in rpo_rows if reading[n]["verdict"] == "buys fidelity"]
    if buys:
        conclusion = ("- reading: L_pref buys fidelity at equal identity over pure L_sim with early stopping with: "
                      + "; ".join(f"{n} ({reading[n]['fidelity_diff']:+.3f})" for n in buys))
    elif rpo_rows and all(reading[n]["n"] >= 2 for n in rpo_rows):
        conclusion = ("- reading: no change makes L_pref buy fidelity at equal identity over pure L_sim with early "
                      f"stopping ({sum(reading[n]['verdict'] == 'within noise' for n in rpo_rows)} of {len(rpo_rows)} "
                      "RPO rows within noise, "
                      f"{sum(reading[n]['verdict'] == 'loses fidelity' for n in rpo_rows)} losing fidelity)")
    else:
        conclusion = ("- reading: too few runs to read: every RPO row needs pure L_sim runs of at least 2 of its "
                      "(subject, seed) pairs")
    lines.append(conclusion)
    frontier, best = hindsight_table(runs)
    return text + "\n\n" + "\n".join(lines) + "\n\n" + frontier, {
        "rows": {n: c for n, c in rows}, "reading": reading, "conclusion": conclusion, "hindsight": best}


def hindsight_table(runs: dict) -> tuple[str, dict]:
    """Per variant and subject, `hindsight` over its seeds: the most identity any fixed step gives within the
    default run's fidelity-drop target, and the most at any step (does any variant reach the target?)."""
    subjects = list(dict.fromkeys(key.split("/")[0] for rs in runs.values() for key in rs))
    best, lines = {}, [f"identity gain (fidelity drop) of the best fixed step within a drop of {TARGET_DROP}, and of "
                       f"the step with the most identity, exact metrics on the training prompts, mean over seeds "
                       f"(target: ≥ {TARGET_GAIN} within {TARGET_DROP}):", "",
                       "| variant | " + " | ".join(f"{s}: within the drop | {s}: most identity" for s in subjects)
                       + " |", "| --- |" + " --- | --- |" * len(subjects)]
    for variant, rs in runs.items():
        cells = []
        for s in subjects:
            vals = [v for key, v in rs.items() if key.split("/")[0] == s]
            if not vals:
                cells += ["—", "—"]
                continue
            h = best.setdefault(variant, {})[s] = hindsight(vals)
            cells.append("—" if h["step"] is None else f"{h['gain']:+.3f} ({h['drop']:+.3f}) @ {h['step']}")
            cells.append(f"{h['most_gain']:+.3f} ({h['most_drop']:+.3f}) @ {h['most_step']}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines), best


def labels(out: Path, runs: dict) -> tuple[str, dict]:
    """What the Bradley–Terry labels (eq. 6) look like in the RPO runs at the paper's settings: the reward
    differences h(w) − h(l) of every (reference, negative) pair, each against the negative's training prompt
    (the runs' rewards.json), and P(w preferred) = σ(h(w) − h(l))."""
    import torch
    deltas = []
    for key in runs.get("rpo", {}):
        subject, seed = key.split("/seed")
        run = run_dir(out, "rpo", subject, int(seed))
        r = json.loads((run / "rewards.json").read_text())
        per_prompt = json.loads((run / "config.json").read_text())["images_per_prompt"]
        h_w, h_l = torch.tensor(r["reference"]), torch.tensor(r["negatives"])
        prompt = torch.arange(len(h_l)) // per_prompt  # the negative set is generated prompt by prompt
        deltas.append((h_w[:, prompt] if h_w.ndim == 2 else h_w[:, None]) - h_l[None, :])
    if not deltas:
        return "no RPO runs", {}
    d = torch.cat([x.flatten() for x in deltas])
    p = torch.sigmoid(d)
    data = {"delta_mean": d.mean().item(), "delta_std": d.std().item(), "p_mean": p.mean().item(),
            "p_min": p.min().item(), "p_max": p.max().item(), "pairs": len(d)}
    text = (f"- reward difference h(w) − h(l) over the {len(d)} (reference, negative) pairs of the RPO runs: "
            f"{data['delta_mean']:+.3f} ± {data['delta_std']:.3f}; P(w preferred) = σ(Δh) = "
            f"{data['p_mean']:.3f} on average, between {data['p_min']:.3f} and {data['p_max']:.3f} (h ∈ [0, 1] keeps "
            f"it within [0.27, 0.73])")
    return text, data


def leaks(runs: dict) -> tuple[str, dict]:
    """How often the references' background showed up at any validation of any run."""
    cells = [(variant, key, v["step"], v["exact"].get("leak", 0.0)) for variant, rs in runs.items()
             for key, vals in rs.items() for v in vals]
    leaky = sorted({(variant, key) for variant, key, _, leak in cells if leak > 0})
    worst = max(cells, key=lambda c: c[3])
    data = {"runs": sum(len(rs) for rs in runs.values()), "runs_with_leak": len(leaky), "max": worst[3],
            "max_at": list(worst[:3])}
    text = (f"- leak: {len(leaky)} of {data['runs']} runs leaked the references' background at some validation"
            + (f"; the most, {worst[3]:.3f}, in {worst[0]} {worst[1]} at step {worst[2]}" if leaky else ""))
    return text, data


def evaluated(out: Path, ckpt: Path | None, subject: str) -> dict:
    """`python -m tinyrpo.evaluate` of a kept checkpoint (or, with None, the base model) on the subject's
    evaluation prompts, as a user runs it; done once (its eval.json is kept)."""
    from tinyrpo.evaluate import main as evaluate
    if not (out / "eval.json").exists():
        evaluate(["--subject", subject, "--out", str(out), "--no-progress"]
                 + (["--ckpt", str(ckpt)] if ckpt else []))
    return json.loads((out / "eval.json").read_text())["overall"]


TARGET_GAIN, TARGET_DROP = 0.4, 0.05  # what the default run is asked for: pattern identity +0.4 over the base
                                      # model at a fidelity drop of at most 0.05, mean over seeds


def hindsight(vals: list[list[dict]]) -> dict:
    """Of the validation steps every run logged, the one whose mean (over the runs) fidelity drop from step 0 is
    within TARGET_DROP with the largest mean identity gain: what a preset that trains that many steps and keeps
    the last would give, i.e. the best any selection rule can do with these runs. Exact metrics on the
    validation (training) prompts, which the selection sees; None where no step keeps the drop."""
    steps = sorted(set.intersection(*({v["step"] for v in vs} for vs in vals)))
    at = {s: [next(v for v in vs if v["step"] == s)["exact"] for vs in vals] for s in steps}
    gain = {s: statistics.fmean(e["identity"] - b["identity"] for e, b in zip(at[s], at[steps[0]])) for s in steps}
    drop = {s: statistics.fmean(b["fidelity"] - e["fidelity"] for e, b in zip(at[s], at[steps[0]])) for s in steps}
    ok = [s for s in steps if drop[s] <= TARGET_DROP]
    best = max(ok, key=lambda s: gain[s]) if ok else None
    most = max(steps, key=lambda s: gain[s])
    return {"step": best, "gain": gain.get(best), "drop": drop.get(best),
            "most_step": most, "most_gain": gain[most], "most_drop": drop[most]}


def default_run(out: Path, runs: dict, subjects, seeds) -> tuple[str, dict]:
    """The default run's kept checkpoint vs the base model, on the evaluation prompts (not the validation
    ones the selection saw): pattern identity, body colour, fidelity; wall time of the run."""
    rows, data = [], {}
    cols = ("identity", "body", "fidelity", "leak")
    for subject in subjects:
        name = Path(subject).name
        base = evaluated(out / "base" / name, None, subject)
        kept = []
        for seed in seeds:
            run = run_dir(out, "default", subject, seed)
            summary = json.loads((run / "summary.json").read_text())
            kept.append(evaluated(run / "eval", run / "best.safetensors", subject)
                        | {"step": summary["chosen_step"], "minutes": summary["seconds"]["total"] / 60})
        rows.append((f"{name}: the base model", [base]))
        rows.append((f"{name}: `python train.py --subject {subject}`, kept checkpoint", kept))
        gain = [k["identity"] - base["identity"] for k in kept]
        drop = [base["fidelity"] - k["fidelity"] for k in kept]
        data[name] = {"base": base, "kept": kept, "identity_gain": spread(gain), "fidelity_drop": spread(drop),
                      "hindsight": hindsight([runs["default"][f"{name}/seed{seed}"] for seed in seeds])}
    lines = ["| | " + " | ".join(cols) + " | step kept | minutes |", "| --- |" + " --- |" * (len(cols) + 2)]
    for label, cells in rows:
        lines.append(f"| {label} | " + " | ".join(pm([c.get(k) for c in cells]) for k in cols) + " | "
                     + " | ".join(pm([c.get(k) for c in cells], d) if k in cells[0] else "—"
                                  for k, d in (("step", 0), ("minutes", 1))) + " |")
    notes = [f"- {n}: pattern identity {pm([k['identity'] for k in d['kept']])} vs the base model's "
             f"{d['base']['identity']:.3f} (gain {d['identity_gain'][0]:+.3f} ± {d['identity_gain'][1]:.3f}); "
             f"fidelity {pm([k['fidelity'] for k in d['kept']])} vs {d['base']['fidelity']:.3f} (drop "
             f"{d['fidelity_drop'][0]:+.3f} ± {d['fidelity_drop'][1]:.3f})" for n, d in data.items()]
    for n, d in data.items():
        h = d["hindsight"]
        best = (f"step {h['step']}: gain {h['gain']:+.3f} at drop {h['drop']:+.3f}" if h["step"] is not None
                else f"none keeps the drop within {TARGET_DROP}")
        notes.append(f"- {n}, in hindsight (exact metrics at every validation, training prompts, mean over the "
                     f"{len(seeds)} runs): the best fixed step with a drop ≤ {TARGET_DROP} is {best}; the most "
                     f"identity at any step, step {h['most_step']}: gain {h['most_gain']:+.3f} at drop "
                     f"{h['most_drop']:+.3f} (the target: gain ≥ {TARGET_GAIN} at drop ≤ {TARGET_DROP})")
    return "\n".join(lines) + "\n\n" + "\n".join(notes), data


TABLES = {"overfit": overfit, "table2": table2, "lambda": lambda runs, lam: lambda_table(runs), "choices": choices}


def run_experiment(name: str, out="runs/toy-experiments", seeds=(0, 1, 2), subjects=SUBJECTS,
                   lam: float = 0.3, extra: list[str] | None = None) -> dict:
    if name not in EXPERIMENTS:
        raise UserError(f"no experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    for s in subjects:
        if not (Path(s) / "subject.json").exists():
            raise UserError(f"{s} is not a toy subject folder (no subject.json); run from the repository root "
                            f"or regenerate it with python -m tinyrpo.toy subjects")
    out, extra = Path(out), list(extra or [])
    runs, wall = {}, {}
    cells = [(v, s, k) for v in EXPERIMENTS[name] for s in subjects for k in seeds]
    for i, (variant, subject, seed) in enumerate(cells):
        print(f"[{i + 1}/{len(cells)}] {variant} {subject} seed {seed}", flush=True)
        run = train_cell(out, variant, subject, seed, extra)
        key = f"{Path(subject).name}/seed{seed}"
        runs.setdefault(variant, {})[key] = read_vals(run)
        # The run's own clock (summary.json, over all its processes), not this call's: finished runs are skipped.
        wall.setdefault(variant, {})[key] = json.loads((run / "summary.json").read_text())["seconds"]["total"] / 60
    if name == "default":
        text, data = default_run(out, runs, subjects, seeds)
        sections = [text]
        names = []
    elif name == "beyond":
        text, data = beyond(runs, lam, wall)
        sections, names = [f"### beyond\n\n{text}"], []
    else:
        names = [n for n in TABLES if n != "all"] if name == "all" else [name]
        sections, data = [], {}
    for n in names:
        text, data[n] = TABLES[n](runs, lam)
        sections.append(f"### {n}\n\n{text}")
    notes = [leaks(runs)]
    if "rpo" in runs:
        notes.append(labels(out, runs))
    sections.append("### notes\n\n" + "\n".join(text for text, _ in notes))
    data["leak"], data["labels"] = notes[0][1], notes[1][1] if len(notes) > 1 else {}
    per_run = [m for by_run in wall.values() for m in by_run.values()]
    minutes = sum(per_run)
    header = (f"Toy world, subjects {', '.join(Path(s).name for s in subjects)}, seeds {', '.join(map(str, seeds))}, "
              f"λ_val {lam}; {len(cells)} runs of {min(per_run):.1f}-{max(per_run):.1f} min, {minutes:.0f} min "
              f"of training in all "
              f"(`python -m tinyrpo.toy experiment {name}`)")
    md = header + "\n\n" + "\n\n".join(sections) + "\n"
    (out / f"{name}.md").write_text(md)
    (out / f"{name}.json").write_text(json.dumps({"experiment": name, "seeds": list(seeds), "subjects": list(subjects),
                                                  "lambda_val": lam, "minutes": minutes, "tables": data},
                                                 indent=2, default=str) + "\n")
    print("\n" + md)
    print(f"wrote {out / (name + '.md')} and {out / (name + '.json')}")
    return data
