"""Geometry of a field of cells: outlines, nuclei and the microtubule paths drawn over them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Drawn at 512 px; every length scales with size / REFERENCE_SIZE.
REFERENCE_SIZE = 512
# Smaller images are rendered at this size and shrunk.
MIN_RENDER_SIZE = 256
# Angles at which each cell's outline is sampled.
OUTLINE_POINTS = 32


@dataclass(frozen=True)
class Cells:
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


def place_cells(size: int, rng: np.random.Generator) -> Cells:
    scale = size / REFERENCE_SIZE
    # Crowded fields of touching cells, as most real crops show (20-35 cells in a 512 px crop);
    # a sparse field is the exception.
    n = 8 + int(30 * math.sqrt(rng.random()))
    fill = rng.uniform(0.9, 1.1)
    r0 = float(np.clip(math.sqrt(size * size * fill / (n * math.pi)), 30 * scale, 80 * scale))

    # Dart throwing with a minimum spacing: cells pack like a monolayer but leave some gaps,
    # and centres beyond the frame give cells cut by the border as in the real crops.
    margin = 0.1 * size
    candidates = rng.uniform(-margin, size + margin, size=(n * 12, 2))
    cand_x, cand_y = candidates[:, 0], candidates[:, 1]
    blocked = np.zeros(len(candidates), dtype=bool)
    chosen: list[int] = []
    spacing2 = (0.95 * r0) ** 2
    while len(chosen) < n:
        pick = int(np.argmin(blocked))
        if blocked[pick]:
            break
        chosen.append(pick)
        blocked |= (cand_x - cand_x[pick]) ** 2 + (cand_y - cand_y[pick]) ** 2 < spacing2
    centre = candidates[chosen]
    count = len(chosen)
    own = r0 * rng.uniform(1.05, 1.6, size=count)  # larger than the spacing: neighbours touch

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
    return Cells(
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


def polylines(xs: np.ndarray, ys: np.ndarray) -> list[list[float]]:
    """(n, m) x and y -> per row the flat [x0, y0, x1, y1, ...] list ImageDraw takes."""
    return np.stack([xs, ys], axis=-1).reshape(xs.shape[0], -1).tolist()


def radial_filaments(cells: Cells, scale: float, rng: np.random.Generator) -> list[list[float]]:
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
    return polylines(xs.reshape(n, -1), ys.reshape(n, -1))


def wrapping_filaments(cells: Cells, rng: np.random.Generator) -> list[list[float]]:
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
    return polylines(xn + (xe - xn) * depth, yn + (ye - yn) * depth)
