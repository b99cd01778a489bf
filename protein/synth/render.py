"""Rendering one confocal-like field: blue nuclei, red microtubules, green protein."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from protein.synth.cells import (
    MIN_RENDER_SIZE,
    OUTLINE_POINTS,
    REFERENCE_SIZE,
    Cells,
    place_cells,
    polylines,
    radial_filaments,
    wrapping_filaments,
)

MITOCHONDRIA, NUCLEAR_BODIES, NUCLEOLI, GOLGI, NUCLEOPLASM = 0, 1, 2, 3, 4
FIBRILLAR_CENTER, CYTOSOL, PLASMA_MEMBRANE, CENTROSOME, SPECKLES = 5, 6, 7, 8, 9


def _stamp(canvas: np.ndarray, x: np.ndarray, y: np.ndarray, value: np.ndarray | int) -> None:
    """Write 2x2 dots at (x, y) into canvas; a later blur makes them round."""
    height, width = canvas.shape
    xi = np.floor(x.ravel()).astype(np.int64)
    yi = np.floor(y.ravel()).astype(np.int64)
    values = np.broadcast_to(np.asarray(value, dtype=np.uint8), x.shape).ravel()
    for ox, oy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        xx, yy = xi + ox, yi + oy
        ok = (xx >= 0) & (xx < width) & (yy >= 0) & (yy < height)
        canvas[yy[ok], xx[ok]] = values[ok]


def _mitochondria(canvas: np.ndarray, cells: Cells, scale: float, rng: np.random.Generator) -> None:
    """Many short worms in the cytoplasm, roughly along the microtubules (radially)."""
    n = cells.cx.size
    per_cell = max(4, int(np.pi * float(cells.own.mean()) ** 2 / (rng.uniform(60.0, 120.0) * scale * scale)))
    theta = rng.uniform(0.0, 2 * np.pi, size=(n, per_cell))
    rho = np.sqrt(rng.uniform(0.0, 1.0, size=(n, per_cell))) * cells.edge_radius(theta) * 0.94
    x = cells.cx[:, None] + rho * np.cos(theta)
    y = cells.cy[:, None] + rho * np.sin(theta)
    keep = ~cells.inside_nucleus(x, y, 1.1)
    direction = theta + rng.normal(0.0, 0.6, size=theta.shape)
    length = rng.integers(1, 5, size=theta.shape)
    value = rng.uniform(60, 255, size=theta.shape).astype(np.uint8)
    step = 1.4 * scale
    for k in range(5):
        live = keep & (length >= k)
        _stamp(
            canvas,
            x[live] + k * step * np.cos(direction[live]),
            y[live] + k * step * np.sin(direction[live]),
            value[live],
        )


def _speckles(canvas: np.ndarray, cells: Cells, scale: float, rng: np.random.Generator, count: tuple[int, int],
              level: tuple[float, float], spread: float) -> None:
    """Irregular clusters of dots spread through each nucleus: speckles, and (fainter, fewer)
    the granules of a nucleoplasmic stain, which is why the two are confused."""
    n = cells.cx.size
    per_nucleus = int(rng.integers(*count))
    rho = np.sqrt(rng.uniform(0.0, 1.0, size=(n, per_nucleus))) * 0.8
    ang = rng.uniform(0.0, 2 * np.pi, size=(n, per_nucleus))
    cx, cy = cells.in_nucleus(rho * np.cos(ang), rho * np.sin(ang))
    value = rng.uniform(*level, size=(n, per_nucleus)).astype(np.uint8)
    for _ in range(6):
        jitter = rng.normal(0.0, spread * scale, size=(2, n, per_nucleus))
        _stamp(canvas, cx + jitter[0], cy + jitter[1], value)


def _level(values: np.ndarray) -> list[int]:
    return np.clip(values, 0, 255).astype(np.int64).tolist()


def render_image(label_set: frozenset[int], size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one confocal-like field of cells; returns (size, size, 3) uint8 RGB.

    Blue is the nuclei (with darker nucleoli), red the microtubules, green the protein,
    placed in the compartments named by label_set.
    """
    if size >= MIN_RENDER_SIZE:
        return _render_field(label_set, size, rng)
    # Small images are drawn large and shrunk, as the real crops are: one-pixel lines and
    # dots would otherwise stand for ever thicker structures and shift the channel balance.
    field = Image.fromarray(_render_field(label_set, MIN_RENDER_SIZE, rng))
    return np.asarray(field.resize((size, size), Image.Resampling.BOX)).copy()


def _render_field(label_set: frozenset[int], size: int, rng: np.random.Generator) -> np.ndarray:
    scale = size / REFERENCE_SIZE
    labels = frozenset(int(c) for c in label_set)
    cells = place_cells(size, rng)
    n = cells.cx.size
    line = max(1, round(scale))

    theta = np.linspace(0.0, 2 * np.pi, OUTLINE_POINTS, endpoint=False)
    outlines = polylines(
        cells.cx[:, None] + cells.radii * np.cos(theta), cells.cy[:, None] + cells.radii * np.sin(theta)
    )
    nuc_theta = np.linspace(0.0, 2 * np.pi, 24, endpoint=False)[None, :]
    nuc_r = cells.nucleus_radius(nuc_theta) * (1.0 + rng.normal(0.0, 0.025, size=(n, 24)))
    nuc_x = cells.nx[:, None] + nuc_r * np.cos(nuc_theta)
    nuc_y = cells.ny[:, None] + nuc_r * np.sin(nuc_theta)
    nuclei = polylines(nuc_x, nuc_y)
    # Blue has no fine structure, so it is drawn at half size and the upscale does the blur.
    half = max(8, size // 2)
    shrink = half / size
    nuclei_half = polylines(nuc_x * shrink, nuc_y * shrink)

    # Nucleoli: 1-4 per nucleus, within the inner part of it.
    nucleoli_count = rng.integers(1, 5, size=n)
    rho = np.sqrt(rng.uniform(0.0, 1.0, size=(n, 4))) * 0.55
    ang = rng.uniform(0.0, 2 * np.pi, size=(n, 4))
    ox, oy = cells.in_nucleus(rho * np.cos(ang), rho * np.sin(ang))
    o_r = cells.na[:, None] * rng.uniform(0.09, 0.17, size=(n, 4))
    nucleoli = [
        (float(ox[i, k]), float(oy[i, k]), float(o_r[i, k])) for i in range(n) for k in range(nucleoli_count[i])
    ]

    # Per-cell levels (0-255 layer units): expression and staining vary from cell to cell.
    blue_level = _level(rng.uniform(150, 255, size=n))
    red_body = _level(rng.uniform(5, 16, size=n))
    # Below 512 px a 1 px line stands for a thinner fibre: dim it so red mass keeps its share.
    thin = min(1.0, scale) ** 0.5
    red_fil = _level(rng.uniform(150, 255, size=n) * thin)
    red_fil2 = _level(rng.uniform(90, 170, size=n) * thin)
    faint = float(rng.uniform(4.0, 24.0))  # unspecific green in every compartment
    # Expression varies from cell to cell, and in some fields most cells barely show the protein.
    expression = rng.uniform(0.05, 1.0, size=n) ** rng.uniform(0.3, 1.5)
    # The confusable classes share a compartment and overlap in level: a speckle or nuclear-body
    # stain leaves a nucleoplasmic haze, a membrane stain leaks into the cytoplasm, so the class
    # is in the texture (dots, rims), not in where the green is or how bright.
    cytoplasm = np.maximum(faint, rng.uniform(0.3, 1.0, size=n) * 110 * expression)
    if CYTOSOL in labels:
        cyto_level = _level(cytoplasm)
    elif PLASMA_MEMBRANE in labels:
        cyto_level = _level(np.maximum(faint, cytoplasm * rng.uniform(0.2, 0.8)))
    elif MITOCHONDRIA in labels:
        cyto_level = _level(np.maximum(faint, cytoplasm * rng.uniform(0.0, 0.7)))
    else:
        cyto_level = _level(np.full(n, faint))
    nucleoplasm = np.maximum(faint, rng.uniform(0.3, 1.0, size=n) * 200 * expression)
    if NUCLEOPLASM in labels:
        nuc_level = _level(nucleoplasm)
    elif labels & {SPECKLES, NUCLEAR_BODIES}:
        haze = rng.uniform(0.2, 0.8) if SPECKLES in labels else rng.uniform(0.1, 0.6)
        nuc_level = _level(np.maximum(faint * 0.6, nucleoplasm * haze))
    else:
        nuc_level = _level(np.full(n, faint * 0.6))

    red = Image.new("L", (size, size))
    green = Image.new("L", (size, size), int(rng.uniform(0.0, 5.0)))  # weak background haze
    blue = Image.new("L", (half, half))
    draw_r, draw_g, draw_b = ImageDraw.Draw(red), ImageDraw.Draw(green), ImageDraw.Draw(blue)

    # Painter's order: bodies, then nuclei and their insides, then cytoplasmic structures,
    # then membranes, so that no neighbour's body covers them.
    for i in range(n):
        draw_r.polygon(outlines[i], fill=red_body[i])
        draw_g.polygon(outlines[i], fill=cyto_level[i])
    for i in range(n):
        draw_b.polygon(nuclei_half[i], fill=blue_level[i])
        draw_g.polygon(nuclei[i], fill=nuc_level[i])
    nucleolus_blue = rng.uniform(0.5, 0.75)
    for (x, y, r), owner in zip(nucleoli, np.repeat(np.arange(n), nucleoli_count), strict=True):
        box = (x - r, y - 0.85 * r, x + r, y + 0.85 * r)
        draw_b.ellipse([v * shrink for v in box], fill=int(blue_level[owner] * nucleolus_blue))
        if NUCLEOLI in labels:
            draw_g.ellipse(box, fill=int(rng.uniform(110, 255)))
        elif FIBRILLAR_CENTER in labels:
            draw_g.ellipse(box, fill=int(rng.uniform(faint, 110)))  # a dim nucleolus around its bright dots
        elif NUCLEOPLASM in labels:
            draw_g.ellipse(box, fill=int(faint))  # nucleoplasm spares the nucleoli

    for i, path in enumerate(radial_filaments(cells, scale, rng)):
        draw_r.line(path, fill=red_fil[i], width=line)
    for i, path in enumerate(wrapping_filaments(cells, rng)):
        draw_r.line(path, fill=red_fil2[i], width=line)
    for i in range(n):
        # Over the fibres: in crowded or cut cells they can reach the nucleus, which stays dark.
        draw_r.polygon(nuclei[i], fill=red_body[i] // 4)

    if NUCLEAR_BODIES in labels:
        count = rng.integers(1, 9, size=n)
        rho = np.sqrt(rng.uniform(0.0, 1.0, size=(n, 8))) * 0.75
        ang = rng.uniform(0.0, 2 * np.pi, size=(n, 8))
        bx, by = cells.in_nucleus(rho * np.cos(ang), rho * np.sin(ang))
        br = np.maximum(0.8, rng.uniform(1.5, 3.5, size=(n, 8)) * scale)
        level = _level(rng.uniform(120, 255, size=n))
        for i in range(n):
            for k in range(count[i]):
                x, y, r = bx[i, k], by[i, k], br[i, k]
                draw_g.ellipse((x - r, y - r, x + r, y + r), fill=level[i])

    # Golgi and centrosome sit beside the nucleus, on the side with more cytoplasm.
    side = np.arctan2(cells.cy - cells.ny, cells.cx - cells.nx) + rng.normal(0.0, 0.8, size=n)
    if GOLGI in labels:
        span = rng.uniform(0.8, 2.0, size=(n, 1))
        arc = side[:, None] + span * np.linspace(-0.5, 0.5, 8)[None, :]
        r_arc = cells.nucleus_radius(arc) + rng.uniform(2.0, 5.0, size=(n, 1)) * scale
        paths = polylines(cells.nx[:, None] + r_arc * np.cos(arc), cells.ny[:, None] + r_arc * np.sin(arc))
        widths = np.maximum(1, np.round(rng.uniform(3.0, 8.0, size=n) * scale)).astype(int).tolist()
        level = _level(rng.uniform(170, 255, size=n))
        for i in range(n):
            draw_g.line(paths[i], fill=level[i], width=widths[i], joint="curve")
    if CENTROSOME in labels:
        # Beside the Golgi rather than under it, so the two stay distinguishable.
        where = side + rng.choice([-1.0, 1.0], size=n) * rng.uniform(0.9, 1.4, size=n)
        r_c = cells.nucleus_radius(where[:, None])[:, 0] + rng.uniform(4.0, 9.0, size=n) * scale
        x, y = cells.nx + r_c * np.cos(where), cells.ny + r_c * np.sin(where)
        pair = rng.random(n) < 0.6
        r = np.maximum(0.8, rng.uniform(2.0, 3.2, size=n) * scale)
        for i in range(n):
            for k in range(1 + int(pair[i])):
                px = x[i] + k * 2.5 * r[i] * math.cos(where[i] + 1.5)
                py = y[i] + k * 2.5 * r[i] * math.sin(where[i] + 1.5)
                draw_g.ellipse((px - r[i], py - r[i], px + r[i], py + r[i]), fill=255)
    if PLASMA_MEMBRANE in labels:
        # Sometimes barely brighter than its cytoplasmic leak: then it reads like a cytosol rim.
        width = max(1, round(rng.uniform(1.5, 4.0) * scale))
        level = _level(np.asarray(cyto_level) * rng.uniform(1.3, 3.5) + 20)
        for i in range(n):
            draw_g.line(outlines[i] + outlines[i][:2], fill=level[i], width=width, joint="curve")
    elif CYTOSOL in labels and rng.random() < 0.5:
        # Cortical enrichment: many cytosolic stains are brighter at the cell edge.
        width = max(1, round(rng.uniform(1.5, 4.0) * scale))
        rim = _level(np.asarray(cyto_level) * rng.uniform(1.2, 1.8))
        for i in range(n):
            draw_g.line(outlines[i] + outlines[i][:2], fill=rim[i], width=width, joint="curve")

    granular = NUCLEOPLASM in labels and rng.random() < 0.5  # a granular nucleoplasm looks speckled
    if labels & {MITOCHONDRIA, SPECKLES, FIBRILLAR_CENTER} or granular:
        canvas = np.array(green)
        if MITOCHONDRIA in labels:
            _mitochondria(canvas, cells, scale, rng)
        if SPECKLES in labels:
            _speckles(canvas, cells, scale, rng, (6, 26), (90, 255), 2.2)
        elif granular:
            _speckles(canvas, cells, scale, rng, (4, 14), (int(max(nuc_level)), 230), 1.6)
        if FIBRILLAR_CENTER in labels and nucleoli:
            # Small dots clustered inside each nucleolus; a few per nucleolus, like nucleolar blobs.
            fx, fy, fr = (np.array(v) for v in zip(*nucleoli, strict=True))
            jitter = rng.uniform(-0.6, 0.6, size=(2, fx.size, 5)) * fr[None, :, None]
            _stamp(canvas, fx[:, None] + jitter[0], fy[:, None] + jitter[1], int(rng.uniform(170, 256)))
        green = Image.fromarray(canvas)

    # Texture, applied before the blur so it turns into soft granules: white noise per pixel
    # (fibre beading, protein speckles, chromatin grain) times a smooth ~4 px field (bundles,
    # clusters). 8-bit PIL images keep each step one cheap C pass over the image.
    ramp = np.arange(256) / 255.0
    low = rng.integers(0, 256, size=(max(2, size // 4),) * 2, dtype=np.uint8)
    coarse = Image.fromarray(low).resize((size, size), Image.Resampling.BILINEAR)
    speckle = rng.uniform(1.5, 3.0)
    red = _textured(red, rng, coarse, 0.45 + 0.55 * ramp, 0.45 + 0.55 * ramp)
    green = _textured(
        green, rng, coarse.transpose(Image.Transpose.ROTATE_90), 0.1 + 0.9 * ramp**speckle, 0.25 + 0.75 * ramp
    )
    blue = _textured(
        blue,
        rng,
        Image.fromarray(low.T.copy()).resize((half, half), Image.Resampling.BILINEAR),
        0.75 + 0.25 * ramp,
        0.6 + 0.4 * ramp,
    )

    # Optics: a blur of varying strength (fractional box radius). Then staining and exposure,
    # which differ per image; the gains also make up for the signal the texture took.
    radius = rng.uniform(0.4, 0.9) * max(scale, 0.5)
    bright = rng.uniform(0.5, 1.2)
    red = red.filter(ImageFilter.BoxBlur(radius)).point(_level(ramp * 255 * bright * rng.uniform(0.8, 1.35)))
    green = green.filter(ImageFilter.BoxBlur(radius)).point(_level(ramp * 255 * bright * rng.uniform(2.0, 3.4)))
    blue = blue.point(_level(ramp * 255 * bright * rng.uniform(0.7, 1.2)))
    blue = blue.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(Image.merge("RGB", (red, green, blue))).copy()


def _textured(
    layer: Image.Image, rng: np.random.Generator, coarse: Image.Image, grain_curve: np.ndarray, coarse_curve: np.ndarray
) -> Image.Image:
    """layer x grain x coarse; the curves map 0-1 noise to 0-1 factors."""
    grain = Image.frombytes("L", layer.size, rng.bytes(layer.size[0] * layer.size[1]))
    layer = ImageChops.multiply(layer, grain.point(_level(grain_curve * 255)))
    return ImageChops.multiply(layer, coarse.point(_level(coarse_curve * 255)))

