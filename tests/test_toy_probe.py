"""The toy reward and evaluation towers see the subject (tinyrpo/toy/probe.py, tinyrpo/toy/towers.py)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyrpo.formats.weights import load_clip, load_dino
from tinyrpo.toy import probe as P
from tinyrpo.toy.pretrain import PretrainConfig, rules, tower_config, tower_rules
from tinyrpo.toy.subjects import HELD_OUT_PATTERNS, PROBE_PATTERNS, PROBE_SUBJECTS, SUBJECTS
from tinyrpo.toy.world import visible_cells
from tinyrpo.toy.towers import group_views, label_map, patch_labels, picture, sincos_positions
from tinyrpo.toy.world import SIZE, Picture, Thing, dataset, render

W = Path(__file__).resolve().parents[1] / "weights" / "toy"


def test_auc_against_counting_by_hand():
    assert P.auc([3, 4], [1, 2]) == 1.0 and P.auc([1, 2], [3, 4]) == 0.0
    # pairs (pos, neg): (2,1) win, (2,2) tie, (2,3) loss, (5,·) 3 wins -> (1 + 0.5 + 3) / 6
    assert P.auc([2, 5], [1, 2, 3]) == pytest.approx(4.5 / 6)


def test_shipped_towers_see_the_subject_small_probe():
    """A small probe (40 pictures a set, seconds): weights that cannot tell the subject from another layout
    of its cells cannot ship. (The first toy CLIP scored 0.00 and DINO 0.07 on the "elsewhere" row.)
    The full probe (200 a set) is `python -m tinyrpo.toy probe`, written to weights/toy/probe.json."""
    torch.set_num_threads(1)
    result = P.probe(load_clip(W / "clip"), load_dino(W / "dino"), n=40)
    assert set(result) == {"CLIP-I", "DINO"}
    assert set(result["DINO"]) == set(SUBJECTS) | set(PROBE_SUBJECTS)
    assert P.worst(result) >= 0.9, P.auc_table(result)


def test_probe_sets_are_what_the_rows_say():
    s = SUBJECTS["toy"]
    rows = P.probe_sets("toy", 20)
    same, across, elsewhere = rows["same"], rows["across"], rows["elsewhere"]
    assert all(p.thing == s.thing for p in same[0] + across[0] + elsewhere[0])
    impostors = same[1] + across[1] + elsewhere[1]
    assert all(q.thing.pattern != s.thing.pattern and len(q.thing.pattern) == 3 for q in impostors)
    assert all((q.thing.cls, q.thing.colour, q.thing.pattern_colour) == ("toy", "yellow", "black") for q in impostors)
    assert all(p.background == s.background for p in same[0] + same[1] + elsewhere[1])
    assert all(p.background != s.background for p in across[0] + across[1] + elsewhere[0])


def test_held_out_layouts_never_reach_the_towers():
    """The subjects' layouts are out of all pretraining; the probe's four are out of the towers' too."""
    world = tower_rules()
    assert set(HELD_OUT_PATTERNS + PROBE_PATTERNS) <= set(world.held_out_patterns)
    assert set(HELD_OUT_PATTERNS) <= set(rules().held_out_patterns)
    cfg = tower_config(PretrainConfig(), "clip")
    rng = np.random.default_rng(0)
    seen = [p.thing.pattern for _ in range(5) for p in sum(group_views(rng, world, cfg, (14, 22)), [])]
    seen += [picture(rng, world, (20, 28)).thing.pattern for _ in range(500)]
    assert not set(seen) & set(HELD_OUT_PATTERNS + PROBE_PATTERNS)
    _, _, pics = dataset(3, 400, rules())
    assert not {p.thing.pattern for p in pics} & set(HELD_OUT_PATTERNS)


def test_hard_negative_groups_differ_only_in_layout():
    cfg = tower_config(PretrainConfig(), "dino")
    a, b = group_views(np.random.default_rng(1), tower_rules(), cfg, (14, 22))
    assert len(a) == len(b) == cfg.groups * cfg.k
    for g in range(cfg.groups):
        things = [p.thing for p in a[g * cfg.k:(g + 1) * cfg.k]]
        assert len({(t.cls, t.colour, t.pattern_colour) for t in things}) == 1
        assert len({t.pattern for t in things}) == cfg.k
    assert [p.thing for p in a] == [p.thing for p in b]  # two views of each instance


def test_dino_groups_are_the_stream_the_shipped_dino_was_trained_on():
    """Values printed by the code that trained weights/toy/dino (commit 5a441bc, before near groups): a
    tower without near groups must not draw one random number more, or pretrain no longer makes that file."""
    cfg = tower_config(PretrainConfig(), "dino")
    rng = np.random.default_rng(1)
    a, b = group_views(rng, tower_rules(), cfg, (14, 22))
    assert [(p.thing.cls, p.thing.pattern) for p in a[:8:4]] == [("ball", (7, 8)), ("ball", (0,))]
    assert [p.background for p in b[:3]] == ["yellow", "snow", "yellow"]
    assert int(rng.integers(10 ** 9)) == 849566497  # as many draws, not only the same first ones


def test_near_groups_are_one_cell_apart():
    """CLIP's groups (p_near 1): every instance has as many cells as the first, on visible cells, and
    differs from it by exactly one cell (counted on the rendered pictures' truth, not near_pattern's code)."""
    cfg = tower_config(PretrainConfig(), "clip")
    assert cfg.p_near == 1.0
    a, _ = group_views(np.random.default_rng(3), tower_rules(), cfg, (14, 22))
    for g in range(cfg.groups):
        things = [p.thing for p in a[g * cfg.k:(g + 1) * cfg.k]]
        first = set(things[0].pattern)
        if not first:
            continue  # a plain object has no cell to move: its group is drawn at random
        for t in things[1:]:
            assert len(t.pattern) == len(first) and set(t.pattern) <= set(visible_cells(t.cls))
            assert len(set(t.pattern) - first) == 1 and len(first - set(t.pattern)) == 1
    dino = tower_config(PretrainConfig(), "dino")
    assert dino.p_near == 0.0  # DINO's groups are random layouts (the shipped DINO)


def test_patch_labels_against_the_rendered_picture():
    """Labels read off the rendering itself (an independent oracle): pattern-coloured pixels are pattern
    labels, body-coloured ones body labels, the rest background."""
    p = Picture(Thing("box", "red", (0, 4, 8), "black"), 5, 7, 20, "blue")
    img, labels = render(p).astype(int), label_map(p)
    assert ((labels >= 10) == (np.abs(img - (20, 20, 20)).sum(-1) == 0)).all()
    assert (((labels >= 1) & (labels < 10)) == (np.abs(img - (210, 40, 40)).sum(-1) == 0)).all()
    assert set(np.unique(labels[labels >= 10]) - 10) == {0, 4, 8}
    soft = patch_labels([p], 4, dino_geometry=False)
    assert soft.shape == (1, (SIZE // 4) ** 2, 19) and torch.allclose(soft.sum(-1), torch.ones(1, 64))
    # patch (row 0, col 0) is all background; the patch holding pixel (y=8, x=6) is body or pattern of cell 0
    assert soft[0, 0, 0] == 1
    k = (8 // 4) * (SIZE // 4) + 6 // 4
    assert soft[0, k, 10] > 0  # cell 0 carries the pattern


def test_sincos_positions_tell_every_patch_apart():
    table = sincos_positions(8, 96)
    assert table.shape == (64, 96)
    d = torch.cdist(table, table) + torch.eye(64) * 1e9
    assert d.min() > 0.1
    # channels 0-23: sin x, 24-47: cos x, 48-71: sin y — patch 9 is (x=1, y=1)
    assert table[9, 0] == pytest.approx(np.sin(1.0)) and table[9, 48] == pytest.approx(np.sin(1.0))
    assert table[1, 48] == pytest.approx(0.0) and table[8, 0] == pytest.approx(0.0)


def test_a_quick_probe_never_overwrites_the_shipped_record(tmp_path, capsys):
    """`probe --pictures 4` writes WEIGHTS/probe-4.json; the 200-picture probe.json stays as shipped."""
    import shutil

    from tinyrpo.toy.__main__ import main
    weights = tmp_path / "toy"
    for kind in ("clip", "dino"):
        shutil.copytree(W / kind, weights / kind)
    (weights / "probe.json").write_text("shipped")
    assert main(["probe", "--weights", str(weights), "--pictures", "4", "--threads", "1"]) == 0
    assert (weights / "probe.json").read_text() == "shipped"
    assert json.loads((weights / "probe-4.json").read_text())["n"] == 4
    assert "worst AUC" in capsys.readouterr().out
