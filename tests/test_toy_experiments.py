"""The experiment tables of tinyrpo/toy/experiments.py, on hand-made validation records."""
import math
from pathlib import Path

import pytest

from tinyrpo.toy import experiments as ex


def val(step, a_i, a_t, identity, fidelity, leak=0.0):
    return {"step": step, "val": True, "align_i": a_i, "align_t": a_t,
            "exact": {"identity": identity, "fidelity": fidelity, "leak": leak}}


# Two runs whose h_0.3 peaks at step 20 and whose exact optimum is at step 40 (run a) or 20 (run b).
RUN_A = [val(0, 0.60, 0.70, 0.1, 0.9), val(20, 0.70, 0.72, 0.5, 0.8), val(40, 0.80, 0.60, 0.9, 0.7, 0.5)]
RUN_B = [val(0, 0.60, 0.70, 0.2, 0.9), val(20, 0.70, 0.71, 0.6, 0.8), val(40, 0.90, 0.50, 0.7, 0.3, 1.0)]


def test_early_stop_and_lambda_selection():
    h = lambda v, lam: 1 / (lam / v["align_i"] + (1 - lam) / v["align_t"])  # eq. 5, by hand
    assert ex.h_val(RUN_A[1], 0.3) == pytest.approx(h(RUN_A[1], 0.3))
    assert ex.early_stop(RUN_A, 0.3)["step"] == 20
    assert ex.early_stop(RUN_A, 0.9)["step"] == 40  # image alignment dominates: the later, overfit step
    assert ex.exact_score(RUN_A[2]) == pytest.approx(2 * 0.9 * 0.7 / 1.6)
    text, data = ex.lambda_table({"rpo": {"a": RUN_A, "b": RUN_B}}, lams=(0.3, 0.9))
    assert [c["step"] for c in data["λ_val = 0.3"]] == [20, 20]
    assert [c["step"] for c in data["λ_val = 0.9"]] == [40, 40]


def test_table2_rows_and_gap():
    runs = {"lsim": {"a": RUN_A, "b": RUN_B}, "rpo": {"a": RUN_B, "b": RUN_A}}
    text, data = ex.table2(runs, 0.3)
    assert [c["step"] for c in data["rows"]["pure L_sim (no L_pref, no early stopping)"]] == [40, 40]
    assert [c["step"] for c in data["rows"]["early stopping without L_pref"]] == [20, 20]
    gap_a = next(g for g in data["gaps"] if g["variant"] == "lsim" and g["run"] == "a")
    assert gap_a["best_exact_step"] == 40 and gap_a["step_gap"] == 20
    assert gap_a["score_gap"] == pytest.approx(ex.exact_score(RUN_A[2]) - ex.exact_score(RUN_A[1]))
    assert "| pure L_sim (no L_pref, no early stopping) | 0.800 ± 0.141 |" in text


def test_paired_verdicts():
    runs = {k: [val(0, 0.6, 0.7, 0.5, 0.5)] for k in "abcd"}
    better = {k: [val(0, 0.6, 0.7, 0.9 + i / 100, 0.9)] for i, k in enumerate("abcd")}
    assert ex.paired(runs, better, 0.3).endswith("better")
    assert ex.paired(better, runs, 0.3).endswith("worse")
    noisy = {k: [val(0, 0.6, 0.7, 0.5 + (0.3 if i % 2 else -0.3), 0.5)] for i, k in enumerate("abcd")}
    assert ex.paired(runs, noisy, 0.3).endswith("within noise")
    assert math.isnan(ex.spread([])[0])


def test_at_the_runs_own_lambda_the_kept_step_is_the_trainers(tmp_path):
    """The trainer keeps the step of the highest logged reward (a mean of per-image h_λ), which need not be
    the step of the highest h_λ of the mean ALIGN-I and ALIGN-T; at the run's own λ_val the tables agree
    with the trainer, at another λ they recompute."""
    import json
    run = tmp_path / "run"
    run.mkdir()
    records = [v | {"reward": r} for v, r in zip(RUN_A, (0.60, 0.62, 0.65))]  # the trainer kept step 40
    (run / "log.jsonl").write_text("".join(json.dumps(v) + "\n" for v in records))
    (run / "config.json").write_text(json.dumps({"lambda_val": 0.3}))
    vals = ex.read_vals(run)
    assert ex.early_stop(vals, 0.3)["step"] == 40 and ex.h_val(vals[2], 0.3) == 0.65
    assert ex.early_stop(vals, 0.5)["step"] == ex.early_stop(RUN_A, 0.5)["step"]


def test_a_pattern_identity_below_chance_counts_as_zero_in_the_exact_score():
    assert ex.exact_score(val(0, 0.6, 0.7, -0.2, 0.9)) == 0.0
    assert ex.exact_score(val(0, 0.6, 0.7, 0.5, 0.5)) == pytest.approx(0.5)


def test_leaks_counts_runs_not_validations():
    runs = {"lsim": {"a": RUN_A, "b": [val(0, 0.6, 0.7, 0.1, 0.9)]}, "rpo": {"a": RUN_B}}
    text, data = ex.leaks(runs)
    assert data["runs"] == 3 and data["runs_with_leak"] == 2 and data["max"] == 1.0
    assert data["max_at"] == ["rpo", "a", 40]
    assert text.startswith("- leak: 2 of 3 runs")


def test_labels_read_the_rewards_of_the_runs(tmp_path):
    """Δh of every (reference, negative) pair against the negative's own prompt, from rewards.json."""
    import json
    run = ex.run_dir(tmp_path, "rpo", "refs/toy", 0)
    run.mkdir(parents=True)
    # 2 references × 2 prompts; 4 negatives, 2 per prompt
    (run / "rewards.json").write_text(json.dumps({"reference": [[0.9, 0.5], [0.7, 0.3]],
                                                  "negatives": [0.4, 0.6, 0.2, 0.1]}))
    (run / "config.json").write_text(json.dumps({"images_per_prompt": 2}))
    text, data = ex.labels(tmp_path, {"rpo": {"toy/seed0": []}})
    deltas = [0.9 - 0.4, 0.9 - 0.6, 0.5 - 0.2, 0.5 - 0.1, 0.7 - 0.4, 0.7 - 0.6, 0.3 - 0.2, 0.3 - 0.1]
    assert data["pairs"] == 8 and data["delta_mean"] == pytest.approx(sum(deltas) / 8)
    assert data["p_max"] == pytest.approx(1 / (1 + math.exp(-0.5)))


# ------------------------------------------------------------------------------------ beyond the paper (issue 21)

def kept(step, identity, fidelity):
    """A run whose h_0.3 peaks at `step` (the kept validation), after a lower step 0."""
    return [val(0, 0.6, 0.6, 0.0, 0.95), val(step, 0.8, 0.8, identity, fidelity)]


# pure L_sim, the same trajectory on every run: (identity, fidelity) (0, .95) → (.3, .85) → (.5, .7) → (.6, .5);
# h_0.3 peaks at step 80, so L_sim + early stopping keeps (.3, .85)
LSIM = [val(0, 0.6, 0.6, 0.0, 0.95), val(80, 0.8, 0.8, 0.3, 0.85), val(160, 0.7, 0.7, 0.5, 0.7),
        val(240, 0.7, 0.6, 0.6, 0.5)]
KEYS = ("toy/seed0", "toy/seed1", "ball/seed0")


def beyond_runs():
    return {"lsim": {k: LSIM for k in KEYS},
            # identity .4: L_sim's most faithful checkpoint with identity ≥ .4 is step 160 (.5, .7): +.2, +.18, +.22
            "tau0.1": {k: kept(120, 0.4, f) for k, f in zip(KEYS, (0.9, 0.88, 0.92))},
            # identity .3: matched by step 80 (.3, .85): −.01, +.01, 0
            "rpo": {k: kept(80, 0.3, f) for k, f in zip(KEYS, (0.84, 0.86, 0.85))},
            # identity .7, above every L_sim checkpoint: against its most identifiable, (.6, .5): −.1, −.12, −.08
            "hard": {k: kept(40, 0.7, f) for k, f in zip(KEYS, (0.4, 0.38, 0.42))},
            # DreamBooth keeps its last step (.5, .75) though h peaks at step 80
            "dreambooth": {k: [val(0, 0.6, 0.6, 0.0, 0.95), val(80, 0.9, 0.9, 0.2, 0.9), val(800, 0.6, 0.6, 0.5, 0.75)]
                           for k in KEYS}}


def test_matched_fidelity_is_lsims_most_faithful_checkpoint_at_least_as_identifiable():
    assert ex.matched_fidelity(val(1, 0, 0, 0.4, 0.9), LSIM) == pytest.approx((0.9 - 0.7, 0.4 - 0.5))
    assert ex.matched_fidelity(val(1, 0, 0, 0.3, 0.8), LSIM) == pytest.approx((0.8 - 0.85, 0.0))
    assert ex.matched_fidelity(val(1, 0, 0, 0.0, 0.9), LSIM) == pytest.approx((0.9 - 0.95, 0.0))
    assert ex.matched_fidelity(val(1, 0, 0, 0.7, 0.6), LSIM) == pytest.approx((0.6 - 0.5, 0.7 - 0.6))  # none reaches .7


def test_beyond_table_and_its_reading():
    minutes = {"lsim": dict(zip(KEYS, (5.0, 6.0, 7.0))), "rpo": dict(zip(KEYS, (8.0, 8.0, 8.0)))}
    text, data = ex.beyond(beyond_runs(), 0.3, minutes)
    reading = data["reading"]
    tau = reading["RPO, label temperature τ 0.1"]
    assert tau["fidelity_diff"] == pytest.approx(0.2) and tau["identity_diff"] == pytest.approx(-0.1)
    assert tau["se"] == pytest.approx(0.02 / math.sqrt(3)) and tau["verdict"] == "buys fidelity" and tau["n"] == 3
    paper = reading["RPO as the paper: τ 1, soft labels, negatives never remade, β 1"]
    assert paper["fidelity_diff"] == pytest.approx(0.0, abs=1e-12) and paper["verdict"] == "within noise"
    hard = reading["RPO, hard labels"]
    assert hard["fidelity_diff"] == pytest.approx(-0.1) and hard["identity_diff"] == pytest.approx(0.1)
    assert hard["verdict"] == "loses fidelity"
    db = reading["DreamBooth (--method dreambooth), last step"]
    assert db["fidelity_diff"] == pytest.approx(0.05) and db["identity_diff"] == pytest.approx(0.0)
    assert [c["step"] for c in data["rows"]["DreamBooth (--method dreambooth), last step"]] == [800] * 3
    assert [c["step"] for c in data["rows"]["DreamBooth + early stopping"]] == [80] * 3
    # only the variants that ran have rows; the columns: identity, fidelity, exact score, kept step, wall minutes
    assert "β 0.01" not in text and "every 50 steps" not in text
    score = 2 * 0.3 * 0.85 / 1.15
    assert f"| pure L_sim (--no-pref) + early stopping | 0.300 ± 0.000 | 0.850 ± 0.000 | {score:.3f} ± 0.000 | 80 ± 0 | 6.0 ± 1.0 |" in text
    assert "| RPO, hard labels | 0.700 ± 0.000 | 0.400 ± 0.020 |" in text and text.count("| — |") >= 3  # no minutes
    assert data["conclusion"] == ("- reading: L_pref buys fidelity at equal identity over pure L_sim with early "
                                  "stopping with: RPO, label temperature τ 0.1 (+0.200)")
    assert "- RPO, label temperature τ 0.1: fidelity at matched identity +0.200 ± 0.012 (paired, n = 3" in text
    # in hindsight, L_sim's best step within a 0.05 drop is step 0 (step 80 drops 0.10); the most identity, 240
    assert data["hindsight"]["lsim"]["toy"] | {} == {"step": 0, "gain": 0.0, "drop": 0.0, "most_step": 240,
                                                    "most_gain": pytest.approx(0.6), "most_drop": pytest.approx(0.45)}
    assert "| lsim | +0.000 (+0.000) @ 0 | +0.600 (+0.450) @ 240 |" in text


def test_beyond_reading_when_nothing_buys_fidelity():
    runs = beyond_runs()
    del runs["tau0.1"]
    _, data = ex.beyond(runs, 0.3, {})
    assert data["conclusion"] == ("- reading: no change makes L_pref buy fidelity at equal identity over pure L_sim "
                                  "with early stopping (1 of 2 RPO rows within noise, 1 losing fidelity)")
    one = {v: {"toy/seed0": r["toy/seed0"]} for v, r in runs.items()}  # one run each: nothing to read
    assert ex.beyond(one, 0.3, {})[1]["conclusion"].startswith("- reading: too few runs to read")


def test_experiment_beyond_writes_its_tables_from_the_run_folders(tmp_path, monkeypatch):
    """The command end to end on fabricated run folders: each cell's wall time is its summary.json's total, and
    beyond.md / beyond.json are written; a cell shared with the paper's tables (rpo, beta) is one folder."""
    import json
    subjects = []
    for name in ("toy", "ball"):
        (tmp_path / "refs" / name).mkdir(parents=True)
        (tmp_path / "refs" / name / "subject.json").write_text("{}")
        subjects.append(str(tmp_path / "refs" / name))
    runs, made = beyond_runs(), []

    def fake_cell(out, variant, subject, seed, extra):
        run = ex.run_dir(out, variant, subject, seed)
        run.mkdir(parents=True, exist_ok=True)
        key = f"{Path(subject).name}/seed{seed}"
        vals = runs.get(variant, {}).get(key, LSIM)
        (run / "log.jsonl").write_text("".join(json.dumps(v | {"reward": ex.h_val(v, 0.3)}) + "\n" for v in vals))
        (run / "config.json").write_text(json.dumps({"lambda_val": 0.3, "images_per_prompt": 1}))
        (run / "summary.json").write_text(json.dumps({"seconds": {"total": 60.0 * (1 + len(made))}}))
        (run / "rewards.json").write_text(json.dumps({"reference": [0.6], "negatives": [0.5]}))
        made.append((variant, key))
        return run
    monkeypatch.setattr(ex, "train_cell", fake_cell)
    data = ex.run_experiment("beyond", tmp_path / "out", seeds=(0,), subjects=subjects)
    assert [v for v, _ in made] == [v for v in ex.EXPERIMENTS["beyond"] for _ in subjects]
    assert set(ex.EXPERIMENTS["beyond"]) == {"lsim", "rpo", "tau0.1", "tau0.02", "hard", "refresh200", "refresh50",
                                             "beta", "beta0.01", "dreambooth"}
    md = (tmp_path / "out" / "beyond.md").read_text()
    assert data["conclusion"] in md and "| RPO, β 0.01 |" in md
    # wall minutes: pure L_sim's two cells were the 1st and 2nd made: 1 and 2 minutes
    assert [c["minutes"] for c in data["rows"]["pure L_sim (--no-pref) + early stopping"]] == [1.0, 2.0]
    assert json.loads((tmp_path / "out" / "beyond.json").read_text())["experiment"] == "beyond"


def test_beyond_variants_change_one_thing_from_the_papers_rpo():
    assert ex.VARIANTS["tau0.1"] == ["--label-temperature", "0.1"] and ex.VARIANTS["hard"] == ["--labels", "hard"]
    assert ex.VARIANTS["refresh50"] == ["--refresh-negatives", "50"] and ex.VARIANTS["beta0.01"] == ["--beta", "0.01"]
    assert "dreambooth" in ex.PRESET and "beta0.01" not in ex.PRESET  # DreamBooth has no β; β 0.01 overrides β 1
    assert ex.EXPERIMENTS["all"] == ["rpo", "lsim", "reference", "independent", "beta"]  # unchanged by beyond


def test_train_args_after_the_double_dash_in_any_order():
    """What follows `--` is train.py's, wherever the experiment's own options stand."""
    from tinyrpo.toy.__main__ import parse_args
    for argv in (["experiment", "beyond", "--seeds", "0", "--", "--steps", "40"],
                 ["experiment", "--seeds", "0", "beyond", "--", "--steps", "40"]):
        args = parse_args(argv)
        assert (args.name, args.seeds, args.train_args) == ("beyond", "0", ["--steps", "40"])
    assert parse_args(["experiment", "all"]).train_args == []


def test_hindsight_is_the_best_common_step_within_the_drop():
    """The step whose mean fidelity drop from step 0 stays within 0.05 and whose mean identity gain is largest;
    a step beyond the drop is never it, however much identity it has."""
    runs = [[val(0, .5, .5, 0.0, 0.90), val(80, .5, .5, 0.30, 0.88), val(160, .5, .5, 0.50, 0.80)],
            [val(0, .5, .5, 0.1, 0.95), val(80, .5, .5, 0.30, 0.91), val(160, .5, .5, 0.70, 0.85)]]
    h = ex.hindsight(runs)
    assert h["step"] == 80 and h["gain"] == pytest.approx(0.25) and h["drop"] == pytest.approx(0.03)
    assert h["most_step"] == 160 and h["most_gain"] == pytest.approx(0.55) and h["most_drop"] == pytest.approx(0.10)
    worse = [[val(0, .5, .5, 0.0, 0.9), val(80, .5, .5, 0.3, 0.7)]]
    assert ex.hindsight(worse)["step"] == 0  # only step 0 keeps the drop (gain 0)
