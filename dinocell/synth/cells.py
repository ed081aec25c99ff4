"""A fast, seeded image model of one Cell Painting field: the same cells seen through 8 channels.

What the model keeps from real JUMP fields (shared/fixtures/phenix_BR00121482_A01_s1 was the yardstick):
- one shared geometry per field: cells are lobed ellipses (random angular harmonics) that tile space like a weighted
  Voronoi diagram where they touch, each with a nucleus inside; every channel is rendered from that geometry, so all
  channels show the same cells;
- channel appearance: DNA = bright textured nuclei (G2 ones brighter, mitotic ones small, round and condensed);
  ER = reticular network, strongest around the nucleus, plus the nuclear envelope; RNA = nucleoli + cytoplasmic
  speckle; AGP = membranes at cell borders, actin-like fibres along each cell's axis and a Golgi cluster beside the
  nucleus; Mito = filaments/puncta in the cytoplasm; the three brightfield planes = low-contrast cells whose defocus
  halo flips sign between the high and low planes;
- 16-bit intensities like the fixture: backgrounds of a few hundred counts (brightfield ~21,000), foreground thousands to
  tens of thousands; shot + read noise with the fixture's variance/mean ratio (~0.4); multiplicative vignetting, which
  the plate's illumination function (see `vignetting`) divides out.

Cell sizes are given in pixels of a full 1080x1080 field. A smaller `size` shows the same field binned (down to 4x
binning at size 270); below that it shows a crop of the 4x-binned field, so tiny test images still hold whole cells.

Speed: everything is vectorised numpy/OpenCV. Texture fields are white noise drawn on a coarse grid and upsampled;
point-like structures (nucleoli, Golgi, dust) are impulses on a canvas blurred once; fields from 512 pixels up are
composed at half resolution and only the noise is drawn per output pixel. Only the cell geometry loops over cells,
each touching just its bounding box. Measured on one core of the development machine (CPU time, 15 sites of varied
phenotypes): 1080x1080 about 125 ms per 8-channel site (+5 ms TIFF encoding), 256x256 about 25 ms, 128x128 about 6 ms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import cv2
import numpy as np

from dinocell.channels import ALL_CHANNELS, BRIGHTFIELD_CHANNELS, FLUORESCENT_CHANNELS

__all__ = [
    "FULL_FIELD",
    "MIN_ZOOM",
    "FieldTruth",
    "Phenotype",
    "VignetteParams",
    "render_field",
    "vignetting",
    "zoom_for_size",
]

FULL_FIELD = 1080  # pixels across a real CPJUMP1 field
MIN_ZOOM = 0.25  # smallest binning factor; smaller images are crops of a 4x-binned field

# Background counts at the field centre and typical foreground level above it (fixture: cytoplasm 5k-15k, peaks 15k-35k).
BACKGROUND = {"DNA": 430.0, "ER": 620.0, "RNA": 300.0, "AGP": 900.0, "Mito": 700.0}
FOREGROUND = {"DNA": 15000.0, "ER": 9000.0, "RNA": 6000.0, "AGP": 9000.0, "Mito": 8000.0}
BRIGHTFIELD_LEVEL = 21000.0
NOISE_GAIN = 0.42  # variance / mean of the fixture's flat background (shot noise)
READ_NOISE = 4.0  # counts

# (defocus blur in full-field pixels, halo contrast) per brightfield plane: opposite signs above and below focus.
_BF_PLANES = {"Brightfield": (1.2, 0.05), "HighZBF": (3.0, 0.14), "LowZBF": (3.0, -0.14)}


@dataclass(frozen=True)
class Phenotype:
    """What a well looks like; plates and treatments move these numbers (lengths in full-field pixels)."""

    density: float = 60.0  # expected cells per 1080x1080 field
    cell_radius: float = 45.0  # mean equivalent cell radius
    elongation: float = 1.4  # mean aspect ratio (1 = round)
    nucleus_fraction: float = 0.4  # nucleus radius / cell radius
    irregularity: float = 0.15  # outline roughness
    clustering: float = 0.3  # share of cells placed next to an earlier cell (colonies)
    mitotic_fraction: float = 0.03
    dna_texture: float = 0.5  # chromatin texture strength, 0..1
    er_texture: float = 0.6  # reticular vs diffuse ER, 0..1
    rna_nucleoli: float = 2.0  # mean extra nucleoli per nucleus (at least one)
    agp_edges: float = 0.6  # membrane strength, 0..1
    agp_fibres: float = 0.5  # actin-like fibre strength, 0..1
    mito_filaments: float = 0.5  # 0 = punctate, 1 = filamentous
    brightness_dna: float = 1.0
    brightness_er: float = 1.0
    brightness_rna: float = 1.0
    brightness_agp: float = 1.0
    brightness_mito: float = 1.0

    def vector(self) -> np.ndarray:
        return np.array([getattr(self, f.name) for f in fields(self)], dtype=np.float64)

    def to_dict(self) -> dict:
        return asdict(self)

    def clamped(self) -> Phenotype:
        """Keep every number in the range the renderer was designed for."""
        lim = {
            "density": (5.0, 250.0),
            "cell_radius": (18.0, 90.0),
            "elongation": (1.0, 3.5),
            "nucleus_fraction": (0.25, 0.7),
            "irregularity": (0.0, 0.5),
            "clustering": (0.0, 0.95),
            "mitotic_fraction": (0.0, 0.3),
            "rna_nucleoli": (0.0, 6.0),
        }
        vals = {}
        for f in fields(self):
            v = float(getattr(self, f.name))
            lo, hi = lim.get(f.name, (0.0, 1.0) if not f.name.startswith("brightness") else (0.2, 4.0))
            vals[f.name] = min(max(v, lo), hi)
        return Phenotype(**vals)


@dataclass(frozen=True)
class VignetteParams:
    """Radial fall-off v = 1 - a r^2 - b r^4 around (cx, cy) (fractions of the half-width; r = 1 at the corners)."""

    cx: float = 0.0
    cy: float = 0.0
    a: float = 0.35
    b: float = 0.12


@dataclass
class FieldTruth:
    """The geometry a field was rendered from (for tests and evaluation)."""

    labels: np.ndarray  # int32, 0 = background, i+1 = cell i
    nucleus: np.ndarray  # bool nucleus mask
    n_cells: int
    zoom: float


def zoom_for_size(size: int) -> float:
    return max(size / FULL_FIELD, MIN_ZOOM)


def vignetting(size: int, p: VignetteParams) -> np.ndarray:
    """The multiplicative illumination field (float32, max about 1) that `render_field` applies for these params."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    dx = (coords - np.float32(p.cx)) ** 2
    dy = (coords - np.float32(p.cy)) ** 2
    r2 = (dy[:, None] + dx[None, :]) * np.float32(0.5)  # 1 at the corners of a centred field
    return (1.0 - np.float32(p.a) * r2 - np.float32(p.b) * r2 * r2).astype(np.float32)


# --------------------------------------------------------------------------- noise helpers


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], corr: tuple[float, float] | float) -> np.ndarray:
    """Band-limited noise with roughly unit variance and correlation length `corr` pixels (per axis if a pair)."""
    cy, cx = (corr, corr) if np.isscalar(corr) else corr
    gh = max(2, round(shape[0] / max(cy, 1.0)) + 2)
    gw = max(2, round(shape[1] / max(cx, 1.0)) + 2)
    coarse = rng.standard_normal((gh, gw), dtype=np.float32)
    out = cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    # Cubic upsampling of white noise shrinks the variance by about this much when enlarging a lot.
    return out * np.float32(1.45)


def _splat(shape: tuple[int, int], ys: np.ndarray, xs: np.ndarray, amps: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian spots at (ys, xs): impulses on a canvas, blurred once (peak height ~ amp)."""
    canvas = np.zeros(shape, dtype=np.float32)
    if len(ys):
        yi = np.clip(np.rint(ys).astype(np.int64), 0, shape[0] - 1)
        xi = np.clip(np.rint(xs).astype(np.int64), 0, shape[1] - 1)
        np.add.at(canvas, (yi, xi), amps.astype(np.float32))
    sigma = max(sigma, 0.5)
    canvas = cv2.GaussianBlur(canvas, (0, 0), sigma)
    canvas *= np.float32(2.0 * math.pi * sigma * sigma)
    return canvas


# --------------------------------------------------------------------------- geometry


_HARMONICS = (2, 3, 4, 5, 6)


@dataclass
class _Cells:
    cy: np.ndarray
    cx: np.ndarray
    a: np.ndarray  # semi-axes in pixels
    b: np.ndarray
    theta: np.ndarray
    harm: np.ndarray  # (n, 2 * len(_HARMONICS)) outline harmonics: (cos k.phi, sin k.phi) amplitudes
    ny: np.ndarray  # nucleus centre
    nx: np.ndarray
    na: np.ndarray
    nb: np.ndarray
    ntheta: np.ndarray
    mitotic: np.ndarray  # bool
    level: dict  # channel -> (n,) per-cell brightness multiplier

    @property
    def n(self) -> int:
        return len(self.cy)


def _place_centres(rng: np.random.Generator, n: int, size: int, radius: float, clustering: float) -> np.ndarray:
    """Cell centres with a soft minimum distance; some cells grow next to earlier ones (colonies)."""
    min_d2 = (0.9 * radius) ** 2
    pts = np.empty((n, 2), dtype=np.float64)
    count = 0
    # Candidates are drawn in one go; rejected ones are simply skipped.
    tries = 6 * n + 20
    uniform = rng.uniform(-0.5 * radius, size + 0.5 * radius, size=(tries, 2))
    near = rng.random(tries) < clustering
    which = rng.random(tries)
    ang = rng.uniform(0, 2 * math.pi, tries)
    dist = radius * rng.uniform(1.6, 2.4, tries)
    for t in range(tries):
        if count == n:
            break
        if count and near[t]:
            anchor = pts[int(which[t] * count)]
            p = anchor + dist[t] * np.array([math.sin(ang[t]), math.cos(ang[t])])
            if not (-radius <= p[0] <= size + radius and -radius <= p[1] <= size + radius):
                continue
        else:
            p = uniform[t]
        if count and np.min(np.sum((pts[:count] - p) ** 2, axis=1)) < min_d2:
            continue
        pts[count] = p
        count += 1
    return pts[:count]


def _draw_cells(rng: np.random.Generator, ph: Phenotype, size: int, zoom: float) -> _Cells:
    radius = ph.cell_radius * zoom
    # Cells whose centres fall just outside the image still show their edges: count them in the area.
    field_area = (size + radius) ** 2 / (FULL_FIELD * zoom) ** 2
    n = int(rng.poisson(ph.density * field_area))
    pts = _place_centres(rng, n, size, radius, ph.clustering)
    n = len(pts)
    mitotic = rng.random(n) < ph.mitotic_fraction
    r = radius * np.exp(rng.normal(0.0, 0.18, n))
    r[mitotic] *= 0.65  # mitotic cells round up
    aspect = 1.0 + (ph.elongation - 1.0) * rng.gamma(4.0, 0.25, n)
    aspect[mitotic] = 1.0 + 0.1 * rng.random(mitotic.sum())
    theta = rng.uniform(0, math.pi, n)
    # Lobes and protrusions: angular harmonics of the outline, weaker for higher orders (star-shaped, so connected).
    decay = np.repeat(1.0 / np.array(_HARMONICS, dtype=np.float64) ** 0.8, 2)
    harm = rng.normal(0.0, 1.0, (n, 2 * len(_HARMONICS))) * decay * (0.05 + 0.45 * ph.irregularity)
    harm[mitotic] *= 0.2
    sq = np.sqrt(aspect)
    a, b = r * sq, r / sq
    # The nucleus: a smoother, rounder ellipse, a little off-centre, aligned with the cell more often than not.
    nfrac = ph.nucleus_fraction * np.exp(rng.normal(0.0, 0.1, n))
    nfrac[mitotic] = np.minimum(0.75, nfrac[mitotic] * 1.3)
    nr = r * nfrac
    naspect = 1.0 + 0.35 * (aspect - 1.0) + 0.15 * rng.random(n)
    nsq = np.sqrt(naspect)
    off = rng.uniform(0.0, 0.25, n) * (r - nr)
    offang = rng.uniform(0, 2 * math.pi, n)
    ny = pts[:, 0] + off * np.sin(offang)
    nx = pts[:, 1] + off * np.cos(offang)
    ntheta = theta + rng.normal(0.0, 0.3, n)
    level = {ch: np.exp(rng.normal(0.0, 0.28, n)) for ch in FLUORESCENT_CHANNELS}
    # Cell cycle: G2 nuclei hold twice the DNA; condensed mitotic chromatin is brighter still.
    level["DNA"] = level["DNA"] * np.where(rng.random(n) < 0.2, 1.7, 1.0) * np.where(mitotic, 2.5, 1.0)
    return _Cells(pts[:, 0], pts[:, 1], a, b, theta, harm, ny, nx, nr * nsq, nr / nsq, ntheta, mitotic, level)


def _ellipse_distance(dy, dx, a, b, theta):
    """Normalised elliptical distance (1 on the outline) and the coordinates in the ellipse frame."""
    c, s = np.float32(math.cos(theta)), np.float32(math.sin(theta))
    u = (dx * c + dy * s) * np.float32(1.0 / a)
    v = (dy * c - dx * s) * np.float32(1.0 / b)
    rho = np.sqrt(u * u + v * v)
    return rho, u, v


_ANGLE_BINS = 128


def _outline_tables(harm: np.ndarray) -> np.ndarray:
    """Each cell's outline radius factor 1 + sum_k (h_ck cos k.phi + h_sk sin k.phi), tabulated over the angle.

    A table lookup per pixel replaces evaluating the harmonics per pixel (one arctan2 instead of ~25 array ops).
    """
    phi = (np.arange(_ANGLE_BINS) + 0.5) * (2 * math.pi / _ANGLE_BINS)
    k = np.array(_HARMONICS, dtype=np.float64)
    basis = np.concatenate([np.cos(np.outer(k, phi)), np.sin(np.outer(k, phi))])  # (2K, bins)
    coef = np.concatenate([harm[:, 0::2], harm[:, 1::2]], axis=1)  # (n, 2K) as (cos..., sin...)
    return np.maximum(1.0 + coef @ basis, 0.3).astype(np.float32)  # (n, bins)


def _rasterise(cells: _Cells, size: int, irregularity: float, zoom: float, rng: np.random.Generator):
    """Per pixel: owning cell, its normalised distance, the second-nearest cell's distance and the nucleus distance.

    Pixels go to the cell with the smallest normalised distance, so touching cells share straight-ish borders (a
    weighted Voronoi tiling) and isolated cells end at their outline (distance 1). Cells reach out to distance `cap`,
    enough for the membrane profile and the border bend below.
    """
    cap = np.float32(1.25)
    best = np.full((size, size), cap, dtype=np.float32)
    second = np.full((size, size), cap, dtype=np.float32)
    ndist = np.full((size, size), np.float32(9.0), dtype=np.float32)
    labels = np.zeros((size, size), dtype=np.int32)
    tables = _outline_tables(cells.harm)
    bin_scale = np.float32(_ANGLE_BINS / (2 * math.pi))
    for i in range(cells.n):
        table = tables[i]
        ext = float(max(cells.a[i], cells.b[i]) * table.max() * float(cap) + 2.0)
        y0, y1 = max(0, int(cells.cy[i] - ext)), min(size, int(cells.cy[i] + ext) + 1)
        x0, x1 = max(0, int(cells.cx[i] - ext)), min(size, int(cells.cx[i] + ext) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        ys = np.arange(y0, y1, dtype=np.float32)[:, None] + np.float32(0.5)
        xs = np.arange(x0, x1, dtype=np.float32)[None, :] + np.float32(0.5)
        rho, u, v = _ellipse_distance(
            ys - np.float32(cells.cy[i]), xs - np.float32(cells.cx[i]), cells.a[i], cells.b[i], cells.theta[i]
        )
        angle_bin = ((np.arctan2(v, u) + np.float32(math.pi)) * bin_scale).astype(np.int32)
        d = rho / table.take(angle_bin, mode="clip")
        nd, _, _ = _ellipse_distance(
            ys - np.float32(cells.ny[i]), xs - np.float32(cells.nx[i]), cells.na[i], cells.nb[i], cells.ntheta[i]
        )
        rb, rs = best[y0:y1, x0:x1], second[y0:y1, x0:x1]
        win = d < rb
        second[y0:y1, x0:x1] = np.where(win, rb, np.minimum(rs, d))
        best[y0:y1, x0:x1] = np.where(win, d, rb)
        labels[y0:y1, x0:x1] = np.where(win, np.int32(i + 1), labels[y0:y1, x0:x1])
        ndist[y0:y1, x0:x1] = np.where(win, nd, ndist[y0:y1, x0:x1])
    # Ruffled borders: shared smooth noise bends every outline a little (cheaper than per-cell noise). Kept within
    # +-10% so it only makes the border wavy: larger bends would seed detached fragments beside the cells.
    if irregularity > 0:
        bend = _smooth_noise(rng, (size, size), max(1.5, 6.0 * zoom)) * np.float32(0.2 * irregularity)
        bend += np.float32(1.0)
        np.clip(bend, 0.9, 1.1, out=bend)
        owned = labels > 0  # background stays background
        best = np.where(owned, best * bend, cap)
        second = np.where(owned, second * bend, cap)
    return labels, best, second, ndist


# --------------------------------------------------------------------------- rendering

# Fields of 512 pixels and more are composed at half resolution and upsampled before noise: real 1080 images are smooth
# at the pixel scale (the optics blur over ~2 pixels), and this quarters the cost of everything but the noise.
_HALF_RES_FROM = 512


def render_field(
    phenotype: Phenotype,
    size: int,
    rng: np.random.Generator,
    vignette: Mapping[str, np.ndarray] | None = None,
    brightness: float = 1.0,
) -> tuple[dict[str, np.ndarray], FieldTruth]:
    """Render the 8 channels of one field as uint16 arrays (size x size), plus the geometry they came from.

    `vignette` maps a channel name to its illumination field (size x size, see `vignetting`); channels without one are
    flat. `brightness` scales every fluorescent channel (field-to-field exposure / staining variation).
    The geometry in the returned truth is at the working resolution (size, or size/2 from 512 up): see `FieldTruth.zoom`.
    """
    if size < 16:
        raise ValueError(f"field size {size} is too small (minimum 16 pixels)")
    ph = phenotype.clamped()
    factor = 2 if size >= _HALF_RES_FROM else 1
    work = -(-size // factor)
    zoom = zoom_for_size(size) / factor  # full-field pixels -> working pixels
    shape = (work, work)
    cells = _draw_cells(rng, ph, work, zoom)
    labels, cd, second, nd = _rasterise(cells, work, ph.irregularity, zoom, rng)
    n = cells.n
    f32 = np.float32
    px = zoom

    def per_cell(values: np.ndarray) -> np.ndarray:
        table = np.concatenate([[0.0], values]).astype(np.float32)
        return table[labels]

    def noise(corr_full_px, *more):
        """Smooth noise with the correlation length given in full-field pixels (at least 1.5 working pixels)."""
        if more:
            return _smooth_noise(rng, shape, (max(1.5, corr_full_px * px), max(1.5, more[0] * px)))
        return _smooth_noise(rng, shape, max(1.5, corr_full_px * px))

    inside = labels > 0
    cyto = np.clip((f32(1.0) - cd) * f32(12.0), 0.0, 1.0)  # soft-edged cell mask
    nuc = np.clip((f32(1.0) - nd) * f32(8.0), 0.0, 1.0) * inside  # soft-edged nucleus mask (own cell only)
    cyto = np.maximum(cyto, nuc)
    peri = np.clip(f32(1.0) - cd, 0.0, 1.0) ** f32(0.7)  # stronger towards the cell centre / nucleus
    gap = np.minimum(second, f32(1.0)) - cd  # 0 on borders with a neighbour or with the outside
    membrane = np.exp(-((gap * f32(1.0 / 0.06)) ** 2))
    cyto_only = cyto * (f32(1.0) - nuc)
    signal: dict[str, np.ndarray] = {}

    # DNA: textured nuclei, a bit brighter in the middle (thicker), with chromocentre spots.
    chrom = noise(2.5)
    spots = np.maximum(noise(5.0) - f32(1.1), 0.0)
    dome = f32(0.6) + f32(0.4) * np.sqrt(np.clip(f32(1.0) - nd * nd, 0.0, 1.0))
    tex = np.maximum(f32(1.0) + f32(ph.dna_texture) * (f32(0.18) * chrom + f32(0.5) * spots), f32(0.2))
    signal["DNA"] = per_cell(cells.level["DNA"] * (ph.brightness_dna * FOREGROUND["DNA"])) * nuc * dome * tex

    # ER: a fine reticular network (zero crossings of band-limited noise), perinuclear, plus the nuclear envelope.
    reticular = np.exp(-((noise(4.0) * f32(1.0 / 0.3)) ** 2))
    envelope = np.exp(-(((nd - f32(1.0)) * f32(1.0 / 0.18)) ** 2)) * inside
    er_tex = f32(1.0 - ph.er_texture) + f32(ph.er_texture * 1.8) * reticular
    signal["ER"] = per_cell(cells.level["ER"] * (ph.brightness_er * FOREGROUND["ER"])) * (
        cyto * (f32(0.3) + f32(0.7) * peri) * er_tex * (f32(1.0) - f32(0.7) * nuc) + f32(0.25) * envelope
    )

    # RNA: nucleoli (1 + Poisson per nucleus) inside the nucleus, cytoplasmic speckle, dim nucleoplasm.
    counts = 1 + rng.poisson(ph.rna_nucleoli, n)
    owner = np.repeat(np.arange(n), counts)
    ang = rng.uniform(0, 2 * math.pi, len(owner))
    rad = np.sqrt(rng.random(len(owner))) * 0.5
    ny = cells.ny[owner] + rad * cells.nb[owner] * np.sin(ang)
    nx = cells.nx[owner] + rad * cells.na[owner] * np.cos(ang)
    nucleoli = _splat(shape, ny, nx, rng.uniform(0.6, 1.4, len(owner)), max(0.7, 3.0 * px)) * nuc
    speckle = np.maximum(noise(2.0) + f32(0.3), 0.0)
    signal["RNA"] = per_cell(cells.level["RNA"] * (ph.brightness_rna * FOREGROUND["RNA"])) * (
        cyto_only * (f32(0.4) + f32(0.45) * speckle) * (f32(0.5) + f32(0.5) * peri)
        + f32(0.3) * nuc
        + f32(2.5) * nucleoli
    )

    # AGP: membranes on every border, actin-like fibres along each cell's long axis, a Golgi blob beside the nucleus.
    along = per_cell(np.cos(cells.theta) ** 2)
    fib_x = noise(40.0, 2.5)  # long along y, thin across x: vertical streaks
    fib_y = noise(2.5, 40.0)  # horizontal streaks
    fibres = np.exp(-(((along * fib_y + (f32(1.0) - along) * fib_x) * f32(1.0 / 0.3)) ** 2))
    # Golgi: a cluster of small stacks on one side of the nucleus
    gang = np.repeat(rng.uniform(0, 2 * math.pi, n), 4) + rng.normal(0.0, 0.35, 4 * n)
    gdist = rng.uniform(1.05, 1.5, 4 * n)
    gy = np.repeat(cells.ny, 4) + gdist * np.repeat(cells.nb, 4) * np.sin(gang)
    gx = np.repeat(cells.nx, 4) + gdist * np.repeat(cells.na, 4) * np.cos(gang)
    golgi = _splat(shape, gy, gx, rng.uniform(0.4, 1.0, 4 * n), max(0.7, 3.0 * px)) * cyto
    signal["AGP"] = per_cell(cells.level["AGP"] * (ph.brightness_agp * FOREGROUND["AGP"])) * (
        cyto * (f32(0.3) + f32(0.5 * ph.agp_fibres) * fibres)
        + f32(0.9 * ph.agp_edges) * membrane * (cd < f32(1.2))
        + f32(0.8) * golgi
    )

    # Mito: filaments (thin zero-crossing lines, broken up) mixed with puncta, denser near the nucleus.
    filaments = np.exp(-((noise(4.0) * f32(1.0 / 0.22)) ** 2))
    filaments *= noise(10.0) > f32(-0.4)
    puncta = np.maximum(noise(2.0) - f32(0.8), 0.0) * f32(2.0)
    mito_tex = f32(ph.mito_filaments) * filaments + f32(1.0 - ph.mito_filaments) * puncta
    signal["Mito"] = per_cell(cells.level["Mito"] * (ph.brightness_mito * FOREGROUND["Mito"])) * (
        cyto * (f32(1.0) - f32(0.8) * nuc) * (f32(0.2) + peri) * (f32(0.25) + f32(1.2) * mito_tex)
    )

    out: dict[str, np.ndarray] = {}
    for ch in FLUORESCENT_CHANNELS:
        img = signal.pop(ch)
        img *= f32(brightness)
        img += f32(BACKGROUND[ch]) * (f32(1.0) + f32(0.03) * _smooth_noise(rng, shape, work / 3))
        out[ch] = _finish(img, size, vignette.get(ch) if vignette else None, rng)

    # Brightfield: optical thickness of the cells; defocus turns it into halos (Laplacian of the blurred thickness).
    thick = cyto * (f32(0.6) + f32(0.4) * peri) + f32(0.5) * nuc + f32(0.3) * nucleoli
    n_dust = int(rng.poisson(6 * (work / (FULL_FIELD * zoom)) ** 2))
    dust = _splat(
        shape,
        rng.uniform(0, work, n_dust),
        rng.uniform(0, work, n_dust),
        rng.uniform(0.5, 2.0, n_dust),
        max(1.0, 4.0 * px),
    )
    base = (
        f32(1.0)
        + f32(0.01) * _smooth_noise(rng, shape, work / 3)
        - f32(0.02) * thick
        - f32(0.05) * np.minimum(dust, 1.0)
    )
    for ch in BRIGHTFIELD_CHANNELS:
        sigma, contrast = _BF_PLANES[ch]
        s = max(0.6, sigma * px)
        halo = cv2.Laplacian(cv2.GaussianBlur(thick, (0, 0), s), cv2.CV_32F)
        img = (base + f32(contrast * s * s) * halo) * f32(BRIGHTFIELD_LEVEL)
        out[ch] = _finish(img, size, vignette.get(ch) if vignette else None, rng)

    truth = FieldTruth(labels=labels, nucleus=nd < 1.0, n_cells=n, zoom=zoom)
    return {ch: out[ch] for ch in ALL_CHANNELS}, truth


def _finish(img: np.ndarray, size: int, vig: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """Vignetting, shot + read noise and 16-bit quantisation (saturating at 65535 like the camera).

    `img` may be at the working resolution: mean and noise amplitude are worked out there and upsampled, only the
    noise itself is drawn per output pixel (the sum of two random bytes: zero-mean after subtracting 255).
    """
    work = img.shape[0]
    if vig is not None:
        if vig.shape != (size, size):
            raise ValueError(f"vignette shape {vig.shape} does not match the field size {size}")
        img *= vig if work == size else cv2.resize(vig, (work, work), interpolation=cv2.INTER_AREA)
    np.maximum(img, 0.0, out=img)
    # noise std per unit of the byte sum (whose std is 104.5)
    amp = np.sqrt(img * np.float32(NOISE_GAIN) + np.float32(READ_NOISE * READ_NOISE)) * np.float32(1.0 / 104.5)
    img += np.float32(0.5) - np.float32(255.0) * amp  # +0.5 rounds on the cast; -255 amp centres the byte sum
    if work != size:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_CUBIC)
        amp = cv2.resize(amp, (size, size), interpolation=cv2.INTER_LINEAR)
    raw = np.frombuffer(rng.bytes(2 * size * size), dtype=np.uint8).reshape(2, size, size)
    img += np.multiply(amp, np.add(raw[0], raw[1], dtype=np.int16), out=amp)
    np.clip(img, 0.0, 65535.0, out=img)
    return img.astype(np.uint16)
