"""Synthetic datasets in the competition layout, with images that look like the real ones.

The generator exists so the whole pipeline (validation, training, gating, serving) can run
end to end without the competition images. Label sets are drawn from the real joint
distribution (`label_sets.json`, counted from the real train.csv), and each image is a
confocal-like field of cells whose green channel follows the organelles in its label set,
so a model can learn something real from it.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import multiprocessing
import os
import shutil
import struct
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from protein.config import SynthConfig
from protein.errors import DataError
from protein.labels import NUM_CLASSES, format_label_set, parse_label_set

logger = logging.getLogger(__name__)

MITOCHONDRIA, NUCLEAR_BODIES, NUCLEOLI, GOLGI, NUCLEOPLASM = 0, 1, 2, 3, 4
FIBRILLAR_CENTER, CYTOSOL, PLASMA_MEMBRANE, CENTROSOME, SPECKLES = 5, 6, 7, 8, 9

SPLITS = ("train", "test")
# The real ids are integers below ~32,000; drawing from the same range keeps them looking alike.
ID_SPACE = 32_000
# In the real train.csv 4,673 of 19,236 rows (24%) list their labels out of ascending order,
# which is 54% of the multi-label rows; copying that keeps parsers honest about labels being sets.
UNSORTED_MULTI_LABEL_SHARE = 0.54
# Drawn at 512 px; every length scales with size / REFERENCE_SIZE.
REFERENCE_SIZE = 512
# Smaller images are rendered at this size and shrunk.
MIN_RENDER_SIZE = 256
# Angles at which each cell's outline is sampled.
OUTLINE_POINTS = 32


@dataclass(frozen=True)
class SynthSummary:
    """Where a generated dataset went, how many images it has, and how long it took."""

    out: Path
    truth: Path
    train: int
    test: int
    seconds: float


@functools.lru_cache(maxsize=1)
def _label_set_table() -> tuple[tuple[frozenset[int], ...], np.ndarray]:
    text = resources.files("protein").joinpath("label_sets.json").read_text(encoding="utf-8")
    counts: dict[str, int] = json.loads(text)
    sets = tuple(parse_label_set(key) for key in counts)
    weights = np.array(list(counts.values()), dtype=np.float64)
    return sets, weights / weights.sum()


def sample_label_sets(n: int, rng: np.random.Generator) -> list[frozenset[int]]:
    """Draw n label sets from the joint distribution of the real train set.

    Drawing whole sets (not classes one by one) keeps per-class frequency, labels per image
    and co-occurrence (e.g. nucleoplasm with cytosol) as in the real data.
    """
    sets, probs = _label_set_table()
    picks = rng.choice(len(sets), size=n, p=probs)
    return [sets[i] for i in picks]


def _perturb_label_set(label_set: frozenset[int], rng: np.random.Generator) -> frozenset[int]:
    others = [c for c in range(NUM_CLASSES) if c not in label_set]
    ops = (["add", "swap"] if others else []) + (["drop"] if len(label_set) > 1 else [])
    if not ops:
        return label_set
    op = ops[rng.integers(len(ops))]
    current = sorted(label_set)
    if op == "add":
        return label_set | {others[rng.integers(len(others))]}
    if op == "drop":
        return label_set - {current[rng.integers(len(current))]}
    removed = current[rng.integers(len(current))]
    return (label_set - {removed}) | {others[rng.integers(len(others))]}


def _label_cell(label_set: frozenset[int], rng: np.random.Generator) -> str:
    ordered = sorted(label_set)
    if len(ordered) > 1 and rng.random() < UNSORTED_MULTI_LABEL_SHARE:
        # A rotation is never ascending for a set of distinct ids, so the row really is unsorted.
        shift = int(rng.integers(1, len(ordered)))
        ordered = ordered[shift:] + ordered[:shift]
    return " ".join(str(c) for c in ordered)


# ---------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class _Cells:
    """Geometry of the cells in one field, one row per cell (pixel units)."""

    cx: np.ndarray  # (n,) cell centre
    cy: np.ndarray
    radii: np.ndarray  # (n, OUTLINE_POINTS) distance from the centre to the outline
    own: np.ndarray  # (n,) size before neighbours cut the cell
    nx: np.ndarray  # (n,) nucleus centre, semi-axes and orientation
    ny: np.ndarray
    na: np.ndarray
    nb: np.ndarray
    nphi: np.ndarray

    def edge_radius(self, theta: np.ndarray) -> np.ndarray:
        """(n, m) angles around each cell centre -> distance to that cell's outline."""
        pos = np.mod(theta, 2 * np.pi) * (OUTLINE_POINTS / (2 * np.pi))
        i0 = pos.astype(np.int64) % OUTLINE_POINTS
        frac = pos - np.floor(pos)
        r0 = np.take_along_axis(self.radii, i0, axis=1)
        r1 = np.take_along_axis(self.radii, (i0 + 1) % OUTLINE_POINTS, axis=1)
        return r0 + (r1 - r0) * frac

    def nucleus_radius(self, theta: np.ndarray) -> np.ndarray:
        """(n, m) angles around each nucleus centre -> distance to its (elliptical) edge."""
        c = np.cos(theta - self.nphi[:, None])
        s = np.sin(theta - self.nphi[:, None])
        a, b = self.na[:, None], self.nb[:, None]
        return a * b / np.sqrt((b * c) ** 2 + (a * s) ** 2)

    def in_nucleus(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, m) nucleus-frame coordinates in [-1, 1] (u along the long axis) -> pixel x, y."""
        cos, sin = np.cos(self.nphi)[:, None], np.sin(self.nphi)[:, None]
        du, dv = u * self.na[:, None], v * self.nb[:, None]
        return self.nx[:, None] + du * cos - dv * sin, self.ny[:, None] + du * sin + dv * cos

    def inside_nucleus(self, x: np.ndarray, y: np.ndarray, margin: float) -> np.ndarray:
        dx, dy = x - self.nx[:, None], y - self.ny[:, None]
        cos, sin = np.cos(self.nphi)[:, None], np.sin(self.nphi)[:, None]
        u = (dx * cos + dy * sin) / (self.na[:, None] * margin)
        v = (-dx * sin + dy * cos) / (self.nb[:, None] * margin)
        return u * u + v * v < 1.0


def _place_cells(size: int, rng: np.random.Generator) -> _Cells:
    scale = size / REFERENCE_SIZE
    # Skewed towards crowded fields, which is what most real crops show.
    n = 4 + int(27 * math.sqrt(rng.random()))
    fill = rng.uniform(0.6, 1.0)
    r0 = float(np.clip(math.sqrt(size * size * fill / (n * math.pi)), 40 * scale, 90 * scale))

    # Dart throwing with a minimum spacing: cells pack like a monolayer but leave some gaps,
    # and centres beyond the frame give cells cut by the border as in the real crops.
    margin = 0.1 * size
    candidates = rng.uniform(-margin, size + margin, size=(n * 8, 2))
    cand_x, cand_y = candidates[:, 0], candidates[:, 1]
    blocked = np.zeros(len(candidates), dtype=bool)
    chosen: list[int] = []
    spacing2 = (1.1 * r0) ** 2
    while len(chosen) < n:
        pick = int(np.argmin(blocked))
        if blocked[pick]:
            break
        chosen.append(pick)
        blocked |= (cand_x - cand_x[pick]) ** 2 + (cand_y - cand_y[pick]) ** 2 < spacing2
    centre = candidates[chosen]
    count = len(chosen)
    own = r0 * rng.uniform(0.95, 1.5, size=count)

    theta = np.linspace(0.0, 2 * np.pi, OUTLINE_POINTS, endpoint=False)
    elong = rng.uniform(0.0, 0.4, size=(count, 1))
    phi = rng.uniform(0.0, np.pi, size=count)
    radii = own[:, None] * (1.0 + elong * np.cos(2 * (theta[None, :] - phi[:, None])))
    harmonics = np.arange(3, 6)[None, :, None]
    amp = rng.uniform(0.0, 0.07, size=(count, 3, 1))
    shift = rng.uniform(0.0, 2 * np.pi, size=(count, 3, 1))
    radii = radii * np.prod(1.0 + amp * np.cos(harmonics * theta[None, None, :] + shift), axis=1)

    # Neighbours cut each other along power-diagram bisectors, so touching cells share an
    # edge instead of overlapping; damped weights let big cells push the border a little.
    if count > 1:
        d = centre[None, :, :] - centre[:, None, :]  # (i, j, xy): from cell i to cell j
        dist2 = np.sum(d * d, axis=-1)
        weight = (0.5 * own) ** 2
        proj = d[..., 0, None] * np.cos(theta) + d[..., 1, None] * np.sin(theta)  # (i, j, k)
        numer = (dist2 + weight[:, None] - weight[None, :])[..., None]
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(proj > 1e-6, numer / (2.0 * proj), np.inf)
        t[np.arange(count), np.arange(count), :] = np.inf
        bisector = np.maximum(t.min(axis=1), 0.3 * own[:, None])
        radii = np.minimum(radii, bisector * 0.99)

    inner = radii.min(axis=1)
    off_r = rng.uniform(0.0, 0.12, size=count) * inner
    off_t = rng.uniform(0.0, 2 * np.pi, size=count)
    na = np.minimum(own * rng.uniform(0.42, 0.55, size=count), 0.8 * (inner - off_r))
    na = np.maximum(na, 4.0 * scale)
    return _Cells(
        cx=centre[:, 0],
        cy=centre[:, 1],
        radii=radii,
        own=own,
        nx=centre[:, 0] + off_r * np.cos(off_t),
        ny=centre[:, 1] + off_r * np.sin(off_t),
        na=na,
        nb=na * rng.uniform(0.68, 0.95, size=count),
        nphi=phi + rng.normal(0.0, 0.3, size=count),
    )


def _polylines(xs: np.ndarray, ys: np.ndarray) -> list[list[float]]:
    """(n, m) x and y -> per row the flat [x0, y0, x1, y1, ...] list ImageDraw takes."""
    return np.stack([xs, ys], axis=-1).reshape(xs.shape[0], -1).tolist()


def _radial_filaments(cells: _Cells, scale: float, rng: np.random.Generator) -> list[list[float]]:
    """Per cell one zig-zag polyline of curved microtubules between nucleus and cell edge.

    Consecutive legs start at neighbouring angles, so the turns hug the nucleus and the cortex
    (where real microtubules bend) and a single draw call covers a whole cell.
    """
    n = cells.cx.size
    perimeter = 2 * np.pi * float(cells.own.mean())
    legs = max(6, int(perimeter / (rng.uniform(3.0, 5.0) * scale))) // 2 * 2
    theta = np.sort(rng.uniform(0.0, 2 * np.pi, size=(n, legs)), axis=1)
    outer_theta = theta + rng.normal(0.0, 0.5, size=(n, 1)) + rng.normal(0.0, 0.3, size=(n, legs))
    inner_r = cells.nucleus_radius(theta) * rng.uniform(1.06, 1.2, size=(n, legs))
    x0 = cells.nx[:, None] + inner_r * np.cos(theta)
    y0 = cells.ny[:, None] + inner_r * np.sin(theta)
    outer_r = cells.edge_radius(outer_theta) * rng.uniform(0.9, 1.0, size=(n, legs))
    x1 = cells.cx[:, None] + outer_r * np.cos(outer_theta)
    y1 = cells.cy[:, None] + outer_r * np.sin(outer_theta)
    frac = np.array([0.0, 0.33, 0.67, 1.0])
    bend = rng.normal(0.0, 0.15, size=(n, legs, 1)) * np.sin(np.pi * frac)
    dx, dy = (x1 - x0)[..., None], (y1 - y0)[..., None]
    xs = x0[..., None] + dx * frac - dy * bend  # (n, legs, 4)
    ys = y0[..., None] + dy * frac + dx * bend
    xs[:, 1::2] = xs[:, 1::2, ::-1]  # every other leg runs inwards: a zig-zag
    ys[:, 1::2] = ys[:, 1::2, ::-1]
    return _polylines(xs.reshape(n, -1), ys.reshape(n, -1))


def _wrapping_filaments(cells: _Cells, rng: np.random.Generator) -> list[list[float]]:
    """Per cell one long fibre winding round the nucleus at a wandering depth.

    Crossing the radial set it gives the meshwork of the real images, and it runs densest
    near the cortex, where real cells are brightest in red.
    """
    n = cells.cx.size
    points = 320
    t = np.linspace(0.0, 1.0, points)[None, :]
    turns = rng.uniform(4.0, 8.0, size=(n, 1))
    theta = rng.uniform(0.0, 2 * np.pi, size=(n, 1)) + 2 * np.pi * turns * t
    depth = 0.72 + 0.18 * np.sin(2 * np.pi * rng.uniform(3.0, 9.0, size=(n, 1)) * t + rng.uniform(0, 6, (n, 1)))
    depth += 0.08 * np.sin(2 * np.pi * rng.uniform(10.0, 25.0, size=(n, 1)) * t + rng.uniform(0, 6, (n, 1)))
    depth = np.clip(depth, 0.2, 0.97)
    rn = cells.nucleus_radius(theta)
    xn = cells.nx[:, None] + rn * np.cos(theta)
    yn = cells.ny[:, None] + rn * np.sin(theta)
    re = cells.edge_radius(theta)
    xe = cells.cx[:, None] + re * np.cos(theta)
    ye = cells.cy[:, None] + re * np.sin(theta)
    return _polylines(xn + (xe - xn) * depth, yn + (ye - yn) * depth)


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


def _mitochondria(canvas: np.ndarray, cells: _Cells, scale: float, rng: np.random.Generator) -> None:
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
    value = rng.uniform(120, 255, size=theta.shape).astype(np.uint8)
    step = 1.4 * scale
    for k in range(5):
        live = keep & (length >= k)
        _stamp(
            canvas,
            x[live] + k * step * np.cos(direction[live]),
            y[live] + k * step * np.sin(direction[live]),
            value[live],
        )


def _speckles(canvas: np.ndarray, cells: _Cells, scale: float, rng: np.random.Generator) -> None:
    """Nuclear speckles: 10-25 irregular clusters of dots spread through each nucleus."""
    n = cells.cx.size
    per_nucleus = int(rng.integers(10, 26))
    rho = np.sqrt(rng.uniform(0.0, 1.0, size=(n, per_nucleus))) * 0.8
    ang = rng.uniform(0.0, 2 * np.pi, size=(n, per_nucleus))
    cx, cy = cells.in_nucleus(rho * np.cos(ang), rho * np.sin(ang))
    value = rng.uniform(130, 255, size=(n, per_nucleus)).astype(np.uint8)
    for _ in range(6):
        jitter = rng.normal(0.0, 2.2 * scale, size=(2, n, per_nucleus))
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
    cells = _place_cells(size, rng)
    n = cells.cx.size
    line = max(1, round(scale))

    theta = np.linspace(0.0, 2 * np.pi, OUTLINE_POINTS, endpoint=False)
    outlines = _polylines(
        cells.cx[:, None] + cells.radii * np.cos(theta), cells.cy[:, None] + cells.radii * np.sin(theta)
    )
    nuc_theta = np.linspace(0.0, 2 * np.pi, 24, endpoint=False)[None, :]
    nuc_r = cells.nucleus_radius(nuc_theta) * (1.0 + rng.normal(0.0, 0.025, size=(n, 24)))
    nuc_x = cells.nx[:, None] + nuc_r * np.cos(nuc_theta)
    nuc_y = cells.ny[:, None] + nuc_r * np.sin(nuc_theta)
    nuclei = _polylines(nuc_x, nuc_y)
    # Blue has no fine structure, so it is drawn at half size and the upscale does the blur.
    half = max(8, size // 2)
    shrink = half / size
    nuclei_half = _polylines(nuc_x * shrink, nuc_y * shrink)

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
    faint = float(rng.uniform(4.0, 16.0))  # unspecific green in every compartment
    cyto_level = _level(rng.uniform(0.35, 1.0, size=n) * 110 if CYTOSOL in labels else np.full(n, faint))
    nuc_level = _level(rng.uniform(0.5, 1.0, size=n) * 220 if NUCLEOPLASM in labels else np.full(n, faint * 0.6))

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
            draw_g.ellipse(box, fill=int(rng.uniform(170, 255)))
        elif NUCLEOPLASM in labels:
            draw_g.ellipse(box, fill=int(faint))  # nucleoplasm spares the nucleoli

    for i, path in enumerate(_radial_filaments(cells, scale, rng)):
        draw_r.line(path, fill=red_fil[i], width=line)
    for i, path in enumerate(_wrapping_filaments(cells, rng)):
        draw_r.line(path, fill=red_fil2[i], width=line)
    for i in range(n):
        # Over the fibres: in crowded or cut cells they can reach the nucleus, which stays dark.
        draw_r.polygon(nuclei[i], fill=red_body[i] // 4)

    if NUCLEAR_BODIES in labels:
        count = rng.integers(2, 7, size=n)
        rho = np.sqrt(rng.uniform(0.0, 1.0, size=(n, 6))) * 0.75
        ang = rng.uniform(0.0, 2 * np.pi, size=(n, 6))
        bx, by = cells.in_nucleus(rho * np.cos(ang), rho * np.sin(ang))
        br = np.maximum(0.8, rng.uniform(2.0, 3.8, size=(n, 6)) * scale)
        level = _level(rng.uniform(220, 255, size=n))
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
        paths = _polylines(cells.nx[:, None] + r_arc * np.cos(arc), cells.ny[:, None] + r_arc * np.sin(arc))
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
        width = max(1, round(rng.uniform(1.5, 3.0) * scale))
        level = _level(rng.uniform(150, 255, size=n))
        for i in range(n):
            draw_g.line(outlines[i] + outlines[i][:2], fill=level[i], width=width, joint="curve")

    if labels & {MITOCHONDRIA, SPECKLES, FIBRILLAR_CENTER}:
        canvas = np.array(green)
        if MITOCHONDRIA in labels:
            _mitochondria(canvas, cells, scale, rng)
        if SPECKLES in labels:
            _speckles(canvas, cells, scale, rng)
        if FIBRILLAR_CENTER in labels and nucleoli:
            # Tiny dots clustered inside each nucleolus.
            fx, fy, fr = (np.array(v) for v in zip(*nucleoli, strict=True))
            jitter = rng.uniform(-0.6, 0.6, size=(2, fx.size, 5)) * fr[None, :, None]
            _stamp(canvas, fx[:, None] + jitter[0], fy[:, None] + jitter[1], 255)
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


def encode_png(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes.

    Written by hand because Pillow always tries all five PNG filters per row, which costs
    more than rendering; these mostly-black images compress as well unfiltered with RLE.
    """
    height, width, _ = rgb.shape
    raw = np.zeros((height, width * 3 + 1), dtype=np.uint8)  # column 0: filter type 0 (none)
    raw[:, 1:] = rgb.reshape(height, width * 3)
    packer = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    data = packer.compress(raw) + packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit, truecolour
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------
# Dataset


@dataclass(frozen=True)
class _Job:
    path: str
    labels: tuple[int, ...]
    size: int
    seed: int
    split: int
    index: int


def _image_rng(seed: int, split: int, index: int) -> np.random.Generator:
    # Keyed by position, not by draw order, so any worker renders the same image.
    return np.random.default_rng([seed, split, index])


def _render_job(job: _Job) -> None:
    rgb = render_image(frozenset(job.labels), job.size, _image_rng(job.seed, job.split, job.index))
    Path(job.path).write_bytes(encode_png(rgb))


def _render_chunk(jobs: Sequence[_Job]) -> int:
    for job in jobs:
        _render_job(job)
    return len(jobs)


def _chunks(jobs: Sequence[_Job], n: int) -> Iterable[Sequence[_Job]]:
    for start in range(0, len(jobs), n):
        yield jobs[start : start + n]


@dataclass(frozen=True)
class _Plan:
    """Everything about a dataset except its pixels; train rows first, then test rows."""

    ids: list[str]
    true_sets: list[frozenset[int]]  # what the images show
    recorded: list[frozenset[int]]  # what train.csv and the truth file say (after label noise)
    train_cells: list[str]  # train.csv label cells, some deliberately out of ascending order


def _plan(config: SynthConfig) -> _Plan:
    # Independent streams, so the amount of label noise never changes ids, images or label order.
    ids_rng, sets_rng, noise_rng, order_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence([config.seed, 7]).spawn(4)
    )
    total = config.train + config.test
    ids = [str(i) for i in ids_rng.choice(max(ID_SPACE, 2 * total), size=total, replace=False).tolist()]
    true_sets = sample_label_sets(total, sets_rng)
    recorded: list[frozenset[int]] = []
    for label_set in true_sets:
        # Drawn for every image, so a higher noise level perturbs a superset of the same images.
        hit = noise_rng.random() < config.label_noise
        perturbed = _perturb_label_set(label_set, noise_rng)
        recorded.append(perturbed if hit else label_set)
    train_cells = [_label_cell(s, order_rng) for s in recorded[: config.train]]
    return _Plan(ids, true_sets, recorded, train_cells)


def _check_config(config: SynthConfig) -> None:
    if config.train < 0 or config.test < 0:
        raise ValueError(f"train and test counts must be >= 0, got {config.train} and {config.test}")
    if not 16 <= config.size <= 4096:
        raise ValueError(f"size must be 16-4096 px, got {config.size}")
    if not 0.0 <= config.label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {config.label_noise}")
    if config.workers < 1:
        raise ValueError(f"workers must be >= 1, got {config.workers}")
    if config.seed < 0:
        raise ValueError(f"seed must be >= 0, got {config.seed}")


def _refuse_existing(out: Path, truth: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"refusing to write the synthetic dataset into {out}: it exists and is not empty")
    if truth.exists():
        raise DataError(f"refusing to overwrite the test truth file {truth}: it already exists")
    if truth.resolve().is_relative_to(out.resolve()):
        raise DataError(f"the test truth file {truth} must be outside the dataset folder {out}")


def _write_csv(path: Path, rows: Iterable[tuple[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("Image", "Label"))
        writer.writerows(rows)


def generate_dataset(
    config: SynthConfig,
    out: Path,
    truth: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> SynthSummary:
    """Write a synthetic dataset in the competition layout to out, and the hidden test labels to truth.

    truth defaults to the sibling file "<out>-test-labels.csv". Everything is built beside out
    and renamed into place at the end; an existing non-empty out raises DataError. The same
    config gives byte-identical files whatever the number of workers. progress, if given,
    is called with the number of images just finished.
    """
    _check_config(config)
    started = time.perf_counter()
    out = Path(out)
    truth = Path(truth) if truth is not None else out.with_name(f"{out.name}-test-labels.csv")
    _refuse_existing(out, truth)
    out.parent.mkdir(parents=True, exist_ok=True)
    truth.parent.mkdir(parents=True, exist_ok=True)

    plan = _plan(config)
    ids, true_sets, recorded = plan.ids, plan.true_sets, plan.recorded

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp_truth: Path | None = None
    try:
        os.chmod(tmp, 0o755)
        jobs: list[_Job] = []
        for split_index, split in enumerate(SPLITS):
            (tmp / split).mkdir()
            offset = 0 if split == "train" else config.train
            count = config.train if split == "train" else config.test
            for index in range(count):
                name = tmp / split / f"{ids[offset + index]}.png"
                labels = tuple(sorted(true_sets[offset + index]))
                jobs.append(_Job(str(name), labels, config.size, config.seed, split_index, index))
        logger.info(
            "rendering %d train + %d test images at %d px with %d worker(s)",
            config.train,
            config.test,
            config.size,
            config.workers,
        )
        _render_all(jobs, config.workers, progress)

        train_rows = list(zip(ids[: config.train], plan.train_cells, strict=True))
        test_ids = ids[config.train :]
        _write_csv(tmp / "train.csv", train_rows)
        _write_csv(tmp / "sample_submission.csv", [(i, "0") for i in test_ids])
        fd, name = tempfile.mkstemp(prefix=f".{truth.name}.tmp-", dir=truth.parent)
        os.close(fd)
        tmp_truth = Path(name)
        os.chmod(tmp_truth, 0o644)
        test_labels = [format_label_set(s) for s in recorded[config.train :]]
        _write_csv(tmp_truth, zip(test_ids, test_labels, strict=True))

        try:
            os.replace(tmp, out)
        except OSError as exc:  # someone filled out while we worked
            raise DataError(f"could not move the synthetic dataset into {out}: {exc}") from exc
        os.replace(tmp_truth, truth)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if tmp_truth is not None:
            tmp_truth.unlink(missing_ok=True)
        raise

    seconds = time.perf_counter() - started
    logger.info("wrote %s (%d train, %d test) and %s in %.1f s", out, config.train, config.test, truth, seconds)
    return SynthSummary(out=out, truth=truth, train=config.train, test=config.test, seconds=seconds)


def _render_all(jobs: Sequence[_Job], workers: int, progress: Callable[[int], None] | None) -> None:
    if workers == 1 or len(jobs) < 2:
        for job in jobs:
            _render_job(job)
            if progress is not None:
                progress(1)
        return
    # Spawn, not fork: the caller may hold threads (torch, Prefect) that fork would copy mid-flight.
    context = multiprocessing.get_context("spawn")
    chunk = max(1, min(16, len(jobs) // (workers * 4)))
    chunks = list(_chunks(jobs, chunk))
    with context.Pool(processes=min(workers, len(chunks))) as pool:
        for done in pool.imap_unordered(_render_chunk, chunks):
            if progress is not None:
                progress(done)
