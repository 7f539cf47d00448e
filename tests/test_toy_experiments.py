"""The experiment tables of tinyrpo/toy/experiments.py, on hand-made validation records."""
import math

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
    assert math.isnan(ex.mean_std([])[0])


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
