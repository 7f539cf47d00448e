"""Image grids whose rows carry their labels (the prompts), and the way back from a grid to its images.

    grid = labelled_grid(images, prompts, cols=4)      # len(images) == len(prompts) * 4, row by row
    cells = grid_cells(grid, rows=len(prompts), cols=4, cell=(512, 512))   # the images again, unchanged

The trainer's validation grids (val/step_*.png) and the evaluation's grids use it, so a grid opened on its
own says which prompt each row is; the report pages (tinyrpo/evaluation/pages.py) cut grids into cells and redraw
them small. Only PIL: the report can be rebuilt without importing torch. `pipeline.image_grid` is the
unlabelled grid (no strips), which `grid_cells` reads as well.
"""
from PIL import Image, ImageDraw, ImageFont

# Layout of `labelled_grid`, row r of cells w × h: a white label strip of height s above the row, then the
# cells, so row r's cells start at y = r·(s + h) + s, x = c·w; the canvas is at least LABEL_MIN_WIDTH font
# sizes wide (so a prompt stays legible above a single small image). `grid_cells` inverts it.
LABEL_LINES = 2        # every strip holds two lines, so all rows have the same height
LABEL_MIN_WIDTH = 24   # in font sizes


def label_font(cell_height: int) -> ImageFont.ImageFont:
    """PIL's bundled font, sized to the cells: 1/16 of their height, 12 to 40 px."""
    size = max(12, min(40, round(cell_height / 16)))
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def fit_lines(text: str, font, width: float, lines: int = LABEL_LINES) -> list[str]:
    """Wrap `text` at spaces into at most `lines` lines of `width` pixels, the last one ellipsized."""
    out, words = [], text.split()
    while words and len(out) < lines:
        line = words.pop(0)
        while words and font.getlength(line + " " + words[0]) <= width:
            line += " " + words.pop(0)
        out.append(line)
    if words or (out and font.getlength(out[-1]) > width):  # what is left over, or one very long word
        last = out[-1] + " " + " ".join(words) if words else out[-1]
        lo, hi = 0, len(last)  # the longest prefix that fits with its "...", by bisection
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if font.getlength(last[:mid] + "...") <= width else (lo, mid - 1)
        out[-1] = last[:lo].rstrip() + "..."
    return out


def labelled_grid(images: list[Image.Image], row_labels: list[str], cols: int) -> Image.Image:
    """`image_grid` with each row's label (its prompt) written in a strip above the row.

    len(images) must be len(row_labels) · cols; the cells are pasted unchanged (pixel for pixel).
    """
    rows = len(row_labels)
    if rows == 0 or len(images) != rows * cols:
        raise ValueError(f"labelled_grid: {len(images)} images do not fill {rows} rows of {cols}")
    w, h = images[0].size
    font = label_font(h)
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (11, 2)
    line_h, pad = ascent + descent + 2, max(3, (ascent + descent) // 3)
    strip = LABEL_LINES * line_h + 2 * pad
    width = max(cols * w, LABEL_MIN_WIDTH * (ascent + descent))
    grid = Image.new("RGB", (width, rows * (strip + h)), "white")
    draw = ImageDraw.Draw(grid)
    for r, label in enumerate(row_labels):
        y = r * (strip + h)
        for k, line in enumerate(fit_lines(label, font, width - 2 * pad)):
            draw.text((pad, y + pad + k * line_h), line, fill=(20, 20, 20), font=font)
        for c in range(cols):
            grid.paste(images[r * cols + c], (c * w, y + strip))
    return grid


def grid_cells(grid: Image.Image, rows: int, cols: int, cell: tuple[int, int]) -> list[Image.Image]:
    """The cells of a grid of `rows` × `cols` images of size `cell` = (w, h), from `image_grid` or
    `labelled_grid` (the label strip's height is what the canvas has beyond the cells)."""
    w, h = cell
    strip = grid.height // rows - h
    if grid.height % rows or strip < 0 or grid.width < cols * w:
        raise ValueError(f"a {grid.width}x{grid.height} grid does not hold {rows} rows of {cols} {w}x{h} images")
    return [grid.crop((c * w, r * (strip + h) + strip, (c + 1) * w, (r + 1) * (strip + h)))
            for r in range(rows) for c in range(cols)]
