"""Labelled grids (tinyrpo/evaluation/grids.py): every cell pasted unchanged, every row's label drawn, and back."""
import numpy as np
import pytest
from PIL import Image

from tinyrpo.evaluation.grids import fit_lines, grid_cells, label_font, labelled_grid
from tinyrpo.pipeline import image_grid

PROMPTS = ["a sks toy on the beach", "a sks toy in the snow", "a red sks toy"]


def noise_images(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def strips_and_cells(grid: Image.Image, rows: int, cols: int, w: int, h: int):
    """Cut a labelled grid by its documented layout (not by grid_cells): label strip above each row."""
    a = np.asarray(grid)
    s = grid.height // rows - h
    strips = [a[r * (s + h):r * (s + h) + s] for r in range(rows)]
    cells = [a[r * (s + h) + s:(r + 1) * (s + h), c * w:(c + 1) * w] for r in range(rows) for c in range(cols)]
    return strips, cells


def test_labelled_grid_cells_unchanged_and_labels_drawn():
    images = noise_images(6, size=48)
    labels = PROMPTS[:2] + [PROMPTS[0]]
    grid = labelled_grid(images, labels, cols=2)
    assert grid.height % 3 == 0 and grid.height // 3 > 48 and grid.width >= 96
    strips, cells = strips_and_cells(grid, 3, 2, 48, 48)
    for cell, im in zip(cells, images):
        assert np.array_equal(cell, np.asarray(im))            # pixel for pixel, not resampled
    ink = [int((s < 128).any(axis=2).sum()) for s in strips]
    assert all(k > 50 for k in ink)                             # text is there
    assert not np.array_equal(strips[0], strips[1])             # ... and it is the row's own text
    assert np.array_equal(strips[0], strips[2])
    a, s = np.asarray(grid), grid.height // 3 - 48
    for r in range(3):  # beside the cells, where the canvas was widened for the labels: white
        assert (a[r * (s + 48) + s:(r + 1) * (s + 48), 96:] == 255).all()
    # the inverse used by the report, on labelled and unlabelled grids
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(grid_cells(grid, 3, 2, (48, 48)), images))
    plain = image_grid(images, cols=2)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(grid_cells(plain, 3, 2, (48, 48)), images))
    with pytest.raises(ValueError):
        labelled_grid(images, labels, cols=4)
    with pytest.raises(ValueError):
        grid_cells(plain, 3, 2, (64, 64))


def test_long_labels_wrap_then_ellipsize():
    font = label_font(512)
    long = "a photo of sks dog " * 30
    lines = fit_lines(long, font, 300)
    assert len(lines) == 2 and lines[1].endswith("...") and all(font.getlength(x) <= 300 for x in lines)
    assert fit_lines("a sks dog", font, 300) == ["a sks dog"]
    one_word = fit_lines("x" * 200, font, 100)
    assert len(one_word) == 1 and one_word[0].endswith("...") and font.getlength(one_word[0]) <= 100
    # a long prompt above a single small image stays inside the canvas, which is widened for it
    grid = labelled_grid(noise_images(1, 16), [long], cols=1)
    assert grid.width > 16 and np.asarray(grid)[:, grid.width - 1].min() == 255
