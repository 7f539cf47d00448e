"""The toy world: reproducible pictures and captions, its rules, and the exact metrics on hand-made pictures
whose answers are known."""
import json
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tinyrpo.data import load_subject
from tinyrpo.errors import UserError
from tinyrpo.toy import metrics
from tinyrpo.toy.metrics import SubjectTruth, fidelity, identity, read_picture, score_images
from tinyrpo.toy.pretrain import rules
from tinyrpo.toy.subjects import HELD_OUT_PATTERNS, SUBJECTS, TRAIN_PROMPTS, write_subject
from tinyrpo.toy.world import (BACKGROUNDS, COLOURS, SIZE, Picture, Thing, allowed, dataset, held_out_triples, luma,
                               parse, render, render_background, visible_cells)

ROOT = Path(__file__).resolve().parents[1]
TOY = SUBJECTS["toy"]  # yellow teddy, black cells 2 (right ear), 3 (middle left), 7 (bottom middle), on a sofa


def picture(thing=TOY.thing, x=6, y=7, size=18, background="red", bw=False) -> np.ndarray:
    return render(Picture(thing, x, y, size, background, bw))


# ------------------------------------------------------------------------------------------------- the world

def test_same_seed_same_world_other_seed_other_world():
    a_img, a_cap, a_pic = dataset(3, 24, rules())
    b_img, b_cap, b_pic = dataset(3, 24, rules())
    assert np.array_equal(a_img, b_img) and a_cap == b_cap and a_pic == b_pic
    c_img, c_cap, _ = dataset(4, 24, rules())
    assert not np.array_equal(a_img, c_img) and a_cap != c_cap
    # picture i is picture i whatever else is drawn: a later slice equals the slice of a longer draw
    d_img, d_cap, _ = dataset(3, 8, rules(), start=16)
    assert np.array_equal(d_img, a_img[16:]) and d_cap == a_cap[16:]
    assert a_img.shape == (24, SIZE, SIZE, 3) and a_img.dtype == np.uint8


def test_pretraining_world_keeps_its_rules():
    held = held_out_triples()
    assert 20 <= len(held) <= 40
    images, captions, pics = dataset(5, 600, rules())
    for img, cap, p in zip(images, captions, pics):
        t = p.thing
        assert t.pattern not in HELD_OUT_PATTERNS
        assert (t.cls, t.colour, p.background) not in held
        assert t.colour != t.pattern_colour and set(t.pattern) <= set(visible_cells(t.cls))
        asks = parse(cap)
        assert asks["class"] == t.cls and asks["bw"] == p.bw
        assert asks["colour"] in (None, t.colour) and asks["background"] in (None, p.background)
    assert {p.thing.cls for p in pics} == {"toy", "ball", "box", "cone"}
    assert {p.background for p in pics} == set(BACKGROUNDS)
    assert 0.05 < np.mean([p.bw for p in pics]) < 0.15


def test_render_draws_the_truth():
    img = picture(background="beach")
    assert (img[0, 0] == (120, 190, 235)).all() and (img[31, 0] == (225, 195, 140)).all()  # sky, sand
    assert (img[7 + 9, 6 + 9] == COLOURS["yellow"]).all()      # cell 4 (the centre) is body
    assert (img[7 + 9, 6 + 1] == (20, 20, 20)).all()           # cell 3 (middle left) is black
    assert (img[7 + 1, 6 + 17] == (20, 20, 20)).all()          # cell 2: the right ear
    assert (img[7 + 1, 6 + 9] == img[7 + 1, 0]).all()          # the notch between the ears is background
    grey = picture(bw=True)
    assert (grey[..., 0] == grey[..., 1]).all() and grey[0, 0, 0] == round(luma(COLOURS["red"]))


def test_parse():
    assert parse("a red sks toy on the beach", "sks") == {"class": "toy", "colour": "red", "background": "beach",
                                                         "bw": False}
    assert parse("a photo of a cute ball on a blue background in black and white") == {
        "class": "ball", "colour": None, "background": "blue", "bw": True}
    assert parse("a sks toy on a wooden floor", "sks")["background"] == "floor"
    assert parse("a photo of sks toy", "sks") == {"class": "toy", "colour": None, "background": None, "bw": False}


# ------------------------------------------------------------------------------------------------- reading back

def test_every_picture_reads_back_as_its_truth():
    images, _, pics = dataset(7, 300, rules())
    for img, p in zip(images, pics):
        r = read_picture(img)
        assert r.background == p.background and r.cls == p.thing.cls, p
        assert (r.found.x, r.found.y, r.found.w, r.found.h) == (p.x, p.y, p.size, p.size), p
        if not p.bw:
            assert r.colour == p.thing.colour, p
        assert metrics.agreement(metrics.read_cells(img, p.thing), p.thing.pattern) == 1.0, p
        assert r.grey == (p.bw or metrics.is_grey(render(Picture(p.thing, p.x, p.y, p.size, p.background)))), p


def test_reading_tolerates_generation_noise():
    g = np.random.default_rng(0)
    for bg in ("red", "beach", "moon"):
        img = np.clip(picture(background=bg) + g.normal(0, 8, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        assert identity(img, TOY.thing) == pytest.approx(1.0)
        assert fidelity(img, f"a sks toy {BACKGROUNDS[bg].phrase}", "sks") == 1.0


# ------------------------------------------------------------------------------------------------- exact metrics

def test_identity_is_the_chance_corrected_pattern_score_on_constructed_pictures():
    """The oracle is counted by hand: the teddy shows 8 cells, its pattern is 3 of them (55 other 3-cell
    layouts: 10 share no cell with it, 30 one, 15 two). A reading R agrees with a layout L on 8 − |L Δ R|
    cells. For the teddy itself the other layouts agree on (10·2 + 30·4 + 15·6) / (55·8) = 23/44 on average,
    so the score is (agreement − chance) / (1 − 23/44)."""
    t = TOY.thing
    assert visible_cells("toy") == (0, 2, 3, 4, 5, 6, 7, 8)  # cell 1 is the notch
    z = 1 - 23 / 44
    for bg in ("sofa", "red", "snow", "beach"):
        # the subject anywhere, any size, any background: 1
        assert identity(picture(background=bg), t) == pytest.approx(1.0)
        assert identity(picture(x=12, y=2, size=14, background=bg), t) == pytest.approx(1.0)
        # a plain yellow teddy agrees with every layout alike: 0 (the old cell score gave it 5/8)
        assert identity(picture(Thing("toy", "yellow", (), "black"), background=bg), t) == pytest.approx(0.0)
        # the layout (0, 4, 8), no cell shared: agrees on 2 of 8. All 56 layouts agree with it on
        # (1·8 + 15·6 + 30·4 + 10·2) / 8 = 238/8 in sum; without the subject's 2/8: mean 236/440 = 59/110
        assert identity(picture(Thing("toy", "yellow", (0, 4, 8), "black"), background=bg), t) == \
            pytest.approx((2 / 8 - 59 / 110) / z)
        # the right layout in another pattern colour: the 5 body cells agree, the 3 pattern cells show
        # neither colour; others agree on (10·2 + 30·3 + 15·4) / 440 = 17/44
        assert identity(picture(Thing("toy", "yellow", (2, 3, 7), "blue"), background=bg), t) == \
            pytest.approx((5 / 8 - 17 / 44) / z)
    # every other 3-cell layout, averaged: exactly −1/55 (all 56 layouts, the subject's included, sum to 0)
    others = [L for L in combinations(visible_cells("toy"), 3) if L != t.pattern]
    scores = [identity(picture(Thing("toy", "yellow", L, "black"), background="blue"), t) for L in others]
    assert np.mean(scores) == pytest.approx(-1 / 55)
    # a red body: the 5 body cells show neither colour, unless the prompt asked for a red one
    red = picture(Thing("toy", "red", (2, 3, 7), "black"), background="blue")
    assert identity(red, t) == pytest.approx((3 / 8 - 6 / 44) / z)  # others share (30·1 + 15·2) / 440
    assert identity(red, t, colour="red") == pytest.approx(1.0)
    # black and white: read in grey levels (yellow's luma 195 vs black's 20)
    assert identity(picture(bw=True), t) == pytest.approx(1.0)
    assert identity(picture(Thing("toy", "yellow", (), "black"), bw=True), t) == pytest.approx(0.0)
    # no object at all
    assert identity(render_background("red"), t) == 0.0
    assert read_picture(render_background("red")).cls is None


def test_body_colour_is_scored_apart_from_the_pattern():
    t = TOY.thing
    score = lambda img, prompt: score_images([Image.fromarray(img)], [prompt], TOY)["per_image"][0]  # noqa: E731
    plain = score(picture(Thing("toy", "yellow", (), "black"), background="blue"), "a sks toy on a blue background")
    assert plain["body"] == 1.0 and plain["identity"] == pytest.approx(0.0)
    red = picture(Thing("toy", "red", (2, 3, 7), "black"), background="blue")
    assert score(red, "a sks toy on a blue background")["body"] == 0.0
    assert score(red, "a red sks toy on a blue background")["body"] == 1.0
    assert score(red, "a red sks toy on a blue background")["identity"] == pytest.approx(1.0)
    assert np.isnan(score(picture(bw=True), "a sks toy in black and white")["body"])
    assert t.colour == "yellow"


def test_fidelity_on_constructed_pictures():
    assert fidelity(picture(background="red"), "a sks toy on a red background", "sks") == 1.0
    assert fidelity(picture(background="blue"), "a sks toy on a red background", "sks") == 0.0  # wrong background
    assert fidelity(picture(background="beach"), "a sks toy on the beach", "sks") == 1.0
    red_on_beach = picture(Thing("toy", "red", (2, 3, 7), "black"), background="beach")
    assert fidelity(red_on_beach, "a red sks toy on the beach", "sks") == 1.0
    assert fidelity(picture(background="beach"), "a red sks toy on the beach", "sks") == 0.5  # colour wrong
    assert fidelity(picture(bw=True), "a sks toy in black and white", "sks") == 1.0
    assert fidelity(picture(), "a sks toy in black and white", "sks") == 0.0
    assert np.isnan(fidelity(picture(), "a photo of sks toy", "sks"))  # asks nothing checkable


def test_score_images_reference_copy_leaks_the_sofa(tmp_path):
    folder = write_subject(tmp_path / "toy", "toy")
    reference = Image.open(folder / "00.png")
    images = [Image.fromarray(picture(background="red")), reference, Image.fromarray(picture(background="blue"))]
    prompts = ["a sks toy on a red background", "a sks toy on the beach", "a sks toy on a red background"]
    s = score_images(images, prompts, TOY)
    assert s["identity"] == 1.0                      # all three are the subject
    assert s["fidelity"] == pytest.approx(1 / 3)     # only the first is where it was asked to be
    assert s["background"] == pytest.approx(1 / 3)
    assert s["leak"] == pytest.approx(1 / 3)         # the reference copy is on the sofa
    assert [r["background_read"] for r in s["per_image"]] == ["red", "sofa", "blue"]
    assert s["class"] == 1.0 and np.isnan(s["bw"])
    # the same images as a float tensor in [0, 1], as the pipeline returns them
    x = torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1) for im in images])
    assert score_images(x, prompts, TOY)["per_image"] == s["per_image"]
    # another subject's truth: the ball's pattern is not the toy's
    assert score_images(images, prompts, SUBJECTS["ball"])["identity"] < 0.5


def test_black_and_white_asks_no_colour():
    """"a red sks toy ... in black and white": a grey picture has no colour to read (this one's body reads as
    green), so the colour the prompt names is not checked, in fidelity, score_images or quality; in colour it is."""
    red = Thing("toy", "red", (2, 3, 7), "black")
    assert allowed(Picture(red, 6, 7, 18, "beach", bw=True))
    grey_red, red_img = picture(red, background="beach", bw=True), picture(red, background="beach")
    asked = "a red sks toy on the beach in black and white"
    assert read_picture(grey_red).colour != "red" and read_picture(red_img).colour == "red"
    assert fidelity(grey_red, asked, "sks") == 1.0                             # background and grey, both right
    assert fidelity(red_img, asked, "sks") == 0.5                              # background right, not grey
    assert fidelity(red_img, "a red sks toy on the beach", "sks") == 1.0
    assert fidelity(picture(background="beach"), "a red sks toy on the beach", "sks") == 0.5  # in colour: checked
    s = score_images(grey_red, [asked], TOY)
    assert (s["fidelity"], s["background"], s["bw"]) == (1.0, 1.0, 1.0) and np.isnan(s["colour"])
    assert "colour" not in s["per_image"][0] and s["per_image"][0]["identity"] == 1.0  # asked red, read in grey
    q = metrics.quality(np.stack([grey_red, red_img]), ["a red toy on the beach in black and white",
                                                         "a red toy on the beach"])
    assert q == {"background": 1.0, "colour": 1.0, "class": 1.0, "n": 2}  # colour over the second alone


def test_leak_counts_only_prompts_that_ask_another_background():
    """Leak: the references' background where the prompt asks another. A prompt that asks the references' own
    background (the toy's sofa, the ball's wooden floor) or none cannot leak: NaN, out of the mean."""
    ball = SUBJECTS["ball"]
    for truth, own in ((TOY, "on a sofa"), (ball, "on a wooden floor")):
        cls, bg = truth.thing.cls, truth.background
        on_own, on_beach = picture(truth.thing, background=bg), picture(truth.thing, background="beach")
        prompts = [f"a sks {cls} {own}", f"a red sks {cls}", f"a sks {cls} on the beach", f"a sks {cls} on the beach"]
        s = score_images(np.stack([on_own, on_own, on_own, on_beach]), prompts, truth)
        leaks = [r["leak"] for r in s["per_image"]]
        assert np.isnan(leaks[0]) and np.isnan(leaks[1]) and leaks[2:] == [1.0, 0.0], (cls, leaks)
        assert s["leak"] == 0.5, cls
        assert s["per_image"][0]["background"] == 1.0  # the own background, asked and drawn: right, not a leak
        assert np.isnan(score_images(on_own, [f"a sks {cls} {own}"], truth)["leak"])


# ------------------------------------------------------------------------------------------------- subjects

def test_shipped_subject_folders_are_what_the_command_writes(tmp_path):
    for name in SUBJECTS:
        fresh = write_subject(tmp_path / name, name)
        shipped = ROOT / "refs" / name
        files = sorted(p.name for p in fresh.iterdir())
        assert files == sorted(p.name for p in shipped.iterdir()), name
        for f in files:
            if f.endswith(".png"):
                assert np.array_equal(np.asarray(Image.open(fresh / f)), np.asarray(Image.open(shipped / f))), f
            else:
                assert json.loads((fresh / f).read_text()) == json.loads((shipped / f).read_text()), f


def test_references_share_the_background_and_show_the_subject():
    for name, truth in SUBJECTS.items():
        meta = json.loads((ROOT / "refs" / name / "subject.json").read_text())
        assert SubjectTruth.from_json(meta["toy"]) == truth
        assert meta["train_prompts"] == TRAIN_PROMPTS and len(meta["eval_prompts"]) >= 15
        places = set()
        for ref in meta["toy"]["references"]:
            img = np.asarray(Image.open(ROOT / "refs" / name / ref["file"]))
            r = read_picture(img)
            assert r.background == truth.background and identity(img, truth.thing) == 1.0
            places.add((ref["x"], ref["y"], ref["size"]))
        assert len(places) == len(meta["toy"]["references"]) >= 4
        assert len({s for _, _, s in places}) >= 4  # varied sizes


@pytest.mark.filterwarnings("ignore:.*px")  # 32-px pictures are below the 256-px advice for photos
def test_load_subject_reads_subject_json(tmp_path):
    s = load_subject(ROOT / "refs" / "toy", resolution=32)
    assert (s.class_noun, s.live, len(s.images)) == ("toy", False, 5)
    assert s.train_prompts == TRAIN_PROMPTS and s.eval_prompts[0] == "a {0} {1} on a red background"
    assert s.prompt(s.train_prompts[1]) == "a sks toy on the moon"
    # explicit flags win
    s = load_subject(ROOT / "refs" / "toy", class_noun="teddy", live=True, resolution=32)
    assert (s.class_noun, s.live) == ("teddy", True)
    # a broken file is one clear error
    folder = write_subject(tmp_path / "toy", "toy")
    (folder / "subject.json").write_text("{not json")
    with pytest.raises(UserError, match="subject.json"):
        load_subject(folder, resolution=32)
    (folder / "subject.json").write_text(json.dumps({"class_noun": 3}))
    with pytest.raises(UserError, match="class_noun"):
        load_subject(folder, resolution=32)


def test_every_subject_prompt_can_be_drawn_by_the_rules():
    """What the subjects' prompts ask is a picture the world allows (every pixel of the subject visible)."""
    from dataclasses import replace

    from tinyrpo.toy.subjects import eval_prompts, references
    from tinyrpo.toy.world import allowed
    for name, truth in SUBJECTS.items():
        for template in TRAIN_PROMPTS + eval_prompts(truth):
            asks = parse(template.format("sks", truth.thing.cls), "sks")
            thing = replace(truth.thing, colour=asks["colour"] or truth.thing.colour)
            for ref in references(name):
                p = replace(ref.picture, thing=thing, background=asks["background"] or "white", bw=asks["bw"])
                assert asks["background"] is None or allowed(p), (name, template, p)
