"""A synthetic chest CT with nodules of known place, size and kind, for tests, the demo
and benchmarks.  Deterministic for a seed; no data files needed.

What is in it (HU values are the module constants below)
----------------------------------------------------------
* air outside the body (-1000) and a patient table (a hollow slab) behind it (+y, posterior);
* the body: an ellipse of muscle (40) under a layer of fat (-100);
* ribs (bone, 450 marrow / 900 cortex) running obliquely around the chest wall, and a spine
  (vertebral bodies with discs, a spinal canal and the posterior arch);
* two lungs (about -850, a little denser posteriorly) that do not touch each other, with a
  domed base, a rounded apex and the heart's dent in the left lung;
* the trachea (an air tube with a wall) from the top of the scan to the carina, and main
  bronchi that open into each lung;
* pulmonary vessels: branching, tapering tubes (40 HU, radius 4 mm down to about 1 mm)
  inside the lungs;
* nodules, spheres with a little lobulation and soft (partial volume) edges:
  ``solid`` (30), ``part-solid`` (a solid core of half the diameter in a -500 halo),
  ``ground-glass`` (-600) and ``juxta-pleural`` (solid, touching the lung wall);
* Gaussian noise of ``noise_hu`` everywhere, then clipping to [-1024, 3071].

Anatomy is laid out in fractions of the field of view (so a small test grid still holds a
whole chest); vessel and nodule sizes are in mm.  Geometry: identity direction, array
index 0 is the most inferior slice, and a non-trivial origin (about
``(-340, -FOV_y/2, -FOV_x/2)`` mm, jittered by the seed) so that coordinate bugs show.

Scan ids are DICOM-style UIDs, ``1.2.826.0.1.3680043.8.498.<digits>``, the digits a hash of
the seed (:func:`phantom_uid`), like LUNA16's seriesuids and usable as a DICOM
SeriesInstanceUID.
"""
from __future__ import annotations

import hashlib
import math
from numbers import Integral
from pathlib import Path

import numpy as np
import pandas as pd

from stages.volume import AIR_HU, MAX_VOXELS, Volume

__all__ = ["make_phantom", "write_phantom_scan", "make_luna_tree", "phantom_uid", "KINDS",
           "ANNOTATION_COLUMNS", "CANDIDATE_COLUMNS"]

KINDS = ("solid", "part-solid", "ground-glass", "juxta-pleural")
ANNOTATION_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
CANDIDATE_COLUMNS = ["seriesuid", "coordX", "coordY", "coordZ", "class"]
UID_ROOT = "1.2.826.0.1.3680043.8.498."

# ------------------------------------------------------------------ tissue values, HU
FAT_HU = -100
MUSCLE_HU = 40
LUNG_HU = -850
#: Lungs are this much denser at the back than the front (gravity), spread over +-1.
LUNG_GRADIENT_HU = 25
VESSEL_HU = 40
BONE_MARROW_HU = 450
BONE_CORTEX_HU = 900
DISC_HU = 90
CSF_HU = 15
TABLE_SHELL_HU = 300
TABLE_CORE_HU = -800
SOLID_HU = 30
GROUND_GLASS_HU = -600
PART_SOLID_HALO_HU = -500
#: Diameter of a part-solid nodule's solid core, as a fraction of the whole.
PART_SOLID_CORE_FRACTION = 0.5
#: Relative amplitude of nodule lobulation (radius varies by about this much).
LOBULATION = 0.12
MIN_HU, MAX_HU = -1024, 3071
#: Pulmonary vessel radius at the hilum and the smallest radius, mm (the first shrinks
#: with the body on a field of view under about 360 mm).
VESSEL_RADIUS_MM = (4.0, 1.0)
#: Vessel trunks per lung and generations of branching (each doubling the segments).
VESSEL_TRUNKS = 12
VESSEL_GENERATIONS = 8
#: Smallest diameter drawn for random nodules of each kind (a 3 mm ground-glass nodule is
#: invisible in noise).
MIN_DIAMETER_MM = {"solid": 3.0, "part-solid": 8.0, "ground-glass": 5.0, "juxta-pleural": 4.0}

#: Rescale (slope, intercept) pairs used by :func:`write_phantom_scan`, picked by seed.
RESCALES = ((1.0, -1024.0), (0.5, -1024.0), (1.0, -1000.0))

#: Largest noise standard deviation accepted, HU (keeps int16 arithmetic safe).
MAX_NOISE_HU = 500.0

_SLAB_VOXELS = 1 << 22  # voxels per slab when building and adding noise (~4M)


# ------------------------------------------------------------------ helpers
def phantom_uid(seed: int) -> str:
    """The phantom's scan id for ``seed``: a valid DICOM UID under pydicom's root.

    Examples
    --------
    >>> phantom_uid(0) == phantom_uid(0) != phantom_uid(1)
    True
    >>> phantom_uid(0).startswith("1.2.826.0.1.3680043.8.498.")
    True
    """
    return _uid(["lungscreen-phantom", str(int(seed))])


def _uid(parts) -> str:
    """pydicom's ``generate_uid(prefix, entropy_srcs)`` scheme without importing pydicom:
    the decimal SHA-512 of the joined parts, cut to 64 characters."""
    digits = str(int(hashlib.sha512("".join(parts).encode()).hexdigest(), 16))
    return UID_ROOT + digits[: 64 - len(UID_ROOT)]


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _vec3(name, value, *, positive=False) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be 3 numbers (z, y, x), got {value!r}") from None
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be 3 finite numbers (z, y, x), got {value!r}")
    if positive and np.any(arr <= 0):
        raise ValueError(f"{name} must be > 0 on every axis, got {arr.tolist()}")
    return arr


def _check_nodules(nodules) -> list[dict]:
    out = []
    for i, nod in enumerate(nodules):
        if not isinstance(nod, dict):
            raise TypeError(f"nodules[{i}] must be a dict with centre_zyx_mm, diameter_mm, kind; "
                            f"got {type(nod).__name__}")
        missing = {"centre_zyx_mm", "diameter_mm"} - nod.keys()
        if missing:
            raise ValueError(f"nodules[{i}] lacks {sorted(missing)}; give centre_zyx_mm (world LPS mm, "
                             "z, y, x), diameter_mm and kind")
        kind = nod.get("kind", "solid")
        if kind not in KINDS:
            raise ValueError(f"nodules[{i}] kind must be one of {KINDS}, got {kind!r}")
        d = float(nod["diameter_mm"])
        if not (math.isfinite(d) and d > 0):
            raise ValueError(f"nodules[{i}] diameter_mm must be > 0, got {nod['diameter_mm']!r}")
        out.append({"centre_zyx_mm": _vec3(f"nodules[{i}] centre_zyx_mm", nod["centre_zyx_mm"]),
                    "diameter_mm": d, "kind": kind})
    return out


# ------------------------------------------------------------------ the layout
class _Layout:
    """Every anatomical size, in local mm (``index * spacing``), for one grid."""

    def __init__(self, shape, spacing, rng):
        self.shape = shape
        self.spacing = spacing
        nz, ny, nx = shape
        sz, sy, sx = spacing
        self.lz, self.ly, self.lx = (nz - 1) * sz, (ny - 1) * sy, (nx - 1) * sx
        self.cy, self.cx = 0.47 * self.ly, 0.5 * self.lx
        self.by, self.bx = 0.30 * self.ly, 0.42 * self.lx          # body semi-axes
        # lungs: (centre y, centre x, semi y, semi x, dome height t); right lung at -x (LPS)
        self.lungs = {
            1: (self.cy + 0.02 * self.by, self.cx - 0.47 * self.bx, 0.64 * self.by, 0.34 * self.bx, 0.30),
            2: (self.cy + 0.02 * self.by, self.cx + 0.47 * self.bx, 0.64 * self.by, 0.32 * self.bx, 0.26),
        }
        self.t_low, self.t_mid, self.t_apex = 0.10, 0.60, 0.93      # fractions of the z extent
        self.heart = (self.cy - 0.30 * self.by, self.cx + 0.15 * self.bx, 0.36,   # y, x, t
                      0.45 * self.by, 0.33 * self.bx, 0.17)                       # semi y, x, t
        self.spine_y = self.cy + 0.55 * self.by
        self.spine_r = 0.11 * self.bx
        self.rib_pitch = max(0.085 * self.lz, 3 * sz)
        self.rib_thick = 0.45 * self.rib_pitch
        self.rib_tilt = 0.6 * self.rib_pitch
        self.rib_phase = rng.uniform(0, self.rib_pitch)
        self.disc_pitch = 0.1 * self.lz
        self.t_carina = 0.68
        self.trachea_y = self.cy - 0.05 * self.by

    def t_of(self, z_idx):
        return np.asarray(z_idx, dtype=np.float64) * self.spacing[0] / max(self.lz, 1e-9)

    def hilum(self, lab):
        ly, lx, ay, ax, _ = self.lungs[lab]
        side = -1 if lab == 1 else 1
        return np.array([0.58 * self.lz, ly - 0.05 * ay, lx - side * 0.45 * ax])


def _fields_2d(lay: _Layout):
    """Per-slice templates: body/spine/table HU, lung ellipse fields and rib band."""
    ny, nx = lay.shape[1:]
    y = (np.arange(ny) * lay.spacing[1]).astype(np.float32)[:, None]
    x = (np.arange(nx) * lay.spacing[2]).astype(np.float32)[None, :]
    rho2 = ((y - lay.cy) / lay.by) ** 2 + ((x - lay.cx) / lay.bx) ** 2
    base = np.full((ny, nx), AIR_HU, np.int16)
    # table: a hollow slab behind the body
    t0 = lay.cy + lay.by + 0.02 * lay.ly
    t1 = t0 + 0.035 * lay.ly
    shell = max(0.006 * lay.ly, lay.spacing[1])
    in_x = np.abs(x - lay.cx) < 0.45 * lay.lx
    table = (y >= t0) & (y <= t1) & in_x
    base[np.broadcast_to(table, base.shape)] = TABLE_CORE_HU
    tshell = table & ((y < t0 + shell) | (y > t1 - shell))
    base[np.broadcast_to(tshell, base.shape)] = TABLE_SHELL_HU
    body = rho2 <= 1.0
    base[body] = FAT_HU
    base[rho2 <= 0.94 ** 2] = MUSCLE_HU
    # spine: vertebral body (cortex rim), canal, posterior arch
    dv = np.sqrt((y - lay.spine_y) ** 2 + (x - lay.cx) ** 2)
    rim = max(2.0, lay.spacing[1])
    vert = dv <= lay.spine_r
    base[vert] = BONE_CORTEX_HU
    base[dv <= lay.spine_r - rim] = BONE_MARROW_HU
    canal_y = lay.spine_y + lay.spine_r + 0.045 * lay.bx
    dc = np.sqrt((y - canal_y) ** 2 + (x - lay.cx) ** 2)
    arch = (dc <= 0.08 * lay.bx) & body
    base[arch] = BONE_CORTEX_HU
    base[dc <= 0.045 * lay.bx] = CSF_HU
    spine = vert | arch
    # lungs
    allowed = (rho2 < 0.86 ** 2) & ~(dv <= lay.spine_r + 0.02 * lay.bx) & ~arch
    lung_e, lung_hu, boxes = {}, {}, {}
    for lab, (ly, lx, ay, ax, _) in lay.lungs.items():
        e = ((y - ly) / ay) ** 2 + ((x - lx) / ax) ** 2
        e = np.where(allowed, e, np.float32(np.inf)).astype(np.float32)
        lung_e[lab] = e
        lung_hu[lab] = np.rint(LUNG_HU + LUNG_GRADIENT_HU * np.clip((y - ly) / ay, -1, 1)
                               + 0 * x).astype(np.int16)
        ys = np.flatnonzero(np.isfinite(e).any(axis=1) & (e.min(axis=1) <= 1))
        xs = np.flatnonzero((e <= 1).any(axis=0))
        boxes[lab] = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    hy, hx, _, hay, hax, _ = lay.heart
    heart_e = (((y - hy) / hay) ** 2 + ((x - hx) / hax) ** 2).astype(np.float32)
    # rib band: a ring in the chest wall, not at the front (costal cartilage)
    theta = np.arctan2(y - lay.cy, x - lay.cx)
    band = (rho2 >= 0.87 ** 2) & (rho2 <= 0.93 ** 2) & (np.abs(theta + np.pi / 2) > 0.35)
    band_idx = np.flatnonzero(band)
    rho = np.sqrt(rho2).ravel()[band_idx]
    rib = {"idx": band_idx, "offset": (lay.rib_tilt * np.sin(theta)).ravel()[band_idx],
           "radial": np.abs(rho - 0.90) / 0.03}
    vert_idx = np.flatnonzero((dv <= lay.spine_r - rim).ravel())
    return dict(base=base, lung_e=lung_e, lung_hu=lung_hu, boxes=boxes, heart_e=heart_e,
                rib=rib, vert_idx=vert_idx, spine=spine)


def _build_dense(lay: _Layout, f2):
    """Int16 HU volume and uint8 lung labels, slab by slab (no 3-D float temporaries)."""
    nz, ny, nx = lay.shape
    vol = np.empty(lay.shape, np.int16)
    lungs = np.zeros(lay.shape, np.uint8)
    slab = max(1, _SLAB_VOXELS // (ny * nx))
    rib = f2["rib"]
    hy, hx, ht, hay, hax, hat = lay.heart
    for z0 in range(0, nz, slab):
        z1 = min(z0 + slab, nz)
        n = z1 - z0
        zi = np.arange(z0, z1)
        t = lay.t_of(zi)
        z_mm = zi * lay.spacing[0]
        v = vol[z0:z1]
        v[...] = f2["base"]
        flat = v.reshape(n, -1)
        # discs between vertebral bodies
        disc = ((z_mm + 0.3 * lay.disc_pitch) % lay.disc_pitch) < 0.2 * lay.disc_pitch
        if disc.any():
            flat[np.ix_(np.flatnonzero(disc), f2["vert_idx"])] = DISC_HU
        # ribs: bands in (angle, z) that rise towards the back
        ph = (z_mm[:, None] - rib["offset"][None, :] + lay.rib_phase) % lay.rib_pitch
        in_rib = ph < lay.rib_thick
        dist = np.maximum(rib["radial"][None, :], np.abs(ph - lay.rib_thick / 2) / (lay.rib_thick / 2))
        hu = np.where(dist < 0.6, BONE_MARROW_HU, BONE_CORTEX_HU).astype(np.int16)
        cur = flat[:, rib["idx"]]
        flat[:, rib["idx"]] = np.where(in_rib, hu, cur)
        # lungs: ellipse cross-section that narrows to the apex, above a domed base
        s2 = np.where(t <= lay.t_mid, 1.0,
                      1.0 - ((t - lay.t_mid) / (lay.t_apex - lay.t_mid)) ** 2).astype(np.float32)
        s2[t > lay.t_apex] = -1.0
        h2 = (1.0 - ((t - ht) / hat) ** 2).astype(np.float32)
        for lab, (_, _, _, _, t_dome) in lay.lungs.items():
            ys, xs = f2["boxes"][lab]
            e = f2["lung_e"][lab][ys, xs]
            tb = (lay.t_low + (t_dome - lay.t_low) * (1.0 - np.minimum(e, 1.0))).astype(np.float32)
            m = (e[None] <= s2[:, None, None]) & (tb[None] <= t.astype(np.float32)[:, None, None])
            m &= ~(f2["heart_e"][ys, xs][None] <= h2[:, None, None])
            lungs[z0:z1, ys, xs][m] = lab
            np.copyto(v[:, ys, xs], f2["lung_hu"][lab][ys, xs][None], where=m)
    return vol, lungs


# ------------------------------------------------------------------ tubes and spheres
def _box(lay, lo_mm, hi_mm):
    """Index slices covering local-mm box [lo, hi] (clipped), or None when empty."""
    sp = np.asarray(lay.spacing)
    lo = np.maximum(np.floor(np.asarray(lo_mm) / sp).astype(int), 0)
    hi = np.minimum(np.ceil(np.asarray(hi_mm) / sp).astype(int) + 1, lay.shape)
    if np.any(hi <= lo):
        return None
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def _axes_mm(lay, box):
    sp = lay.spacing
    return [(np.arange(b.start, b.stop) * s).astype(np.float32).reshape(
        [-1 if k == ax else 1 for k in range(3)]) for ax, (b, s) in enumerate(zip(box, sp))]


def _capsule(lay, a, b, r0, r1):
    """(box, distance - radius) of a tapering tube from a to b (local mm); None off-grid."""
    pad = max(r0, r1) + 2 * max(lay.spacing)
    box = _box(lay, np.minimum(a, b) - pad, np.maximum(a, b) + pad)
    if box is None:
        return None, None
    z, y, x = _axes_mm(lay, box)
    d = (b - a).astype(np.float32)
    dd = float(d @ d) or 1.0
    pz, py, px = z - np.float32(a[0]), y - np.float32(a[1]), x - np.float32(a[2])
    tau = np.clip((pz * d[0] + py * d[1] + px * d[2]) / dd, 0, 1)
    dist = np.sqrt((pz - tau * d[0]) ** 2 + (py - tau * d[1]) ** 2 + (px - tau * d[2]) ** 2)
    return box, dist - (r0 + (r1 - r0) * tau)


def _edge_fraction(lay, signed_mm):
    """Partial-volume fraction of a voxel from its signed distance to a surface."""
    w = np.float32(np.mean(lay.spacing))
    return np.clip(0.5 - signed_mm / w, 0.0, 1.0)


def _paint_airways(lay, vol, lungs):
    """Trachea and main bronchi: lumen of air everywhere, wall only outside the lungs."""
    airway = np.zeros(lay.shape, bool)
    top = np.array([lay.lz + 20.0, lay.trachea_y, lay.cx])
    carina = np.array([lay.t_carina * lay.lz, lay.trachea_y, lay.cx])
    r_tr = 0.06 * lay.bx
    tubes = [(top, carina, r_tr, r_tr)]
    for lab in (1, 2):
        h = lay.hilum(lab)
        end = h + 0.5 * (h - carina) * np.array([0.3, 0.3, 0.3])
        tubes.append((carina, end, 0.7 * r_tr, 0.55 * r_tr))
    wall = max(1.5, 0.5 * min(lay.spacing))
    for a, b, r0, r1 in tubes:
        box, sd = _capsule(lay, a, b, r0 + wall, r1 + wall)
        if box is None:
            continue
        v, l = vol[box], lungs[box]
        np.copyto(v, np.int16(MUSCLE_HU), where=(sd <= 0) & (l == 0))
        box2, sd2 = _capsule(lay, a, b, r0, r1)
        lumen = sd2 <= 0
        np.copyto(vol[box2], np.int16(AIR_HU), where=lumen)
        airway[box2] |= lumen
    lungs[airway] = 0
    return airway


def _vessel_tree(lay, lungs, rng):
    """Segments (a, b, r0, r1) of branching vessels from each hilum."""
    segs = []
    height = (lay.t_apex - lay.t_low) * lay.lz
    for lab in (1, 2):
        side = -1 if lab == 1 else 1
        root = lay.hilum(lab) + np.array([0.0, 0.0, side * 0.04 * lay.bx])
        # trunks fan out from the hilum: up, down, lateral, front and back
        trunks = []
        for k in range(VESSEL_TRUNKS):
            elev = np.pi * (k + 0.5) / VESSEL_TRUNKS - np.pi / 2 + rng.uniform(-0.2, 0.2)
            azim = rng.uniform(-1.2, 1.2)
            trunks.append(np.array([np.sin(elev), np.cos(elev) * np.sin(azim),
                                    side * np.cos(elev) * np.cos(azim)]))
        r0 = max(VESSEL_RADIUS_MM[0] * min(1.0, lay.bx / 150.0), 1.5 * VESSEL_RADIUS_MM[1])
        stack = [(root, t / np.linalg.norm(t), r0, 0.2 * height, 0) for t in trunks]
        while stack:
            a, d, r, length, gen = stack.pop()
            b = a + d * length * rng.uniform(0.8, 1.2)
            r_end = max(VESSEL_RADIUS_MM[1], 0.75 * r)
            segs.append((lab, a, b, r, r_end))
            if gen >= VESSEL_GENERATIONS - 1 or _lookup(lay, lungs, b) != lab:
                continue
            perp = np.cross(d, rng.standard_normal(3))
            perp /= np.linalg.norm(perp) + 1e-12
            for sgn in (-1, 1):
                ang = rng.uniform(0.35, 0.65)
                nd = np.cos(ang) * d + sgn * np.sin(ang) * perp
                nd /= np.linalg.norm(nd)
                stack.append((b, nd, r_end, length * 0.72, gen + 1))
    return segs


def _paint_vessels(lay, vol, lungs, rng):
    for lab, a, b, r0, r1 in _vessel_tree(lay, lungs, rng):
        box, sd = _capsule(lay, a, b, r0, r1)
        if box is None:
            continue
        f = _edge_fraction(lay, sd)
        v = vol[box]
        inside = (lungs[box] == lab) & (f > 0)
        new = np.rint(v + f * (VESSEL_HU - v.astype(np.float32))).astype(np.int16)
        np.copyto(v, np.maximum(v, new), where=inside)


_DIRS = np.array([(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)
                  if (i, j, k) != (0, 0, 0)], np.float64)
_DIRS /= np.linalg.norm(_DIRS, axis=1, keepdims=True)


def _lookup(lay, mask, p_mm):
    idx = np.rint(np.asarray(p_mm) / np.asarray(lay.spacing)).astype(int)
    ok = np.all((idx >= 0) & (idx < np.asarray(lay.shape)), axis=-1)
    out = np.zeros(idx.shape[:-1], mask.dtype)
    out[ok] = mask[tuple(idx[ok].T)]
    return out


def _overlaps_wall(lay, lungs, c, r, lab) -> bool:
    """True when some voxel centre within ``r`` of ``c`` lies outside lung ``lab`` while
    most of the ball is inside it: the nodule then touches the wall in the voxel masks."""
    box = _box(lay, c - r, c + r)
    if box is None:
        return False
    z, y, x = _axes_mm(lay, box)
    ball = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= r * r
    in_lung = lungs[box] == lab
    return bool((ball & ~in_lung).any()) and (ball & in_lung).sum() >= 0.5 * ball.sum()


def _place_nodules(lay, lungs, rng, n, diameter_range_mm):
    """Random nodules (local mm centres) of the cycled kinds, inside a lung or on its wall."""
    placed = []
    lo_d, hi_d = diameter_range_mm
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        for _ in range(400):
            d_lo = min(max(lo_d, MIN_DIAMETER_MM[kind]), hi_d)
            d = float(np.exp(rng.uniform(np.log(d_lo), np.log(hi_d))))
            r = d / 2
            lab = int(rng.integers(1, 3))
            ly, lx, ay, ax, _ = lay.lungs[lab]
            p = np.array([rng.uniform(0.3, 0.85) * lay.lz, ly + rng.uniform(-0.8, 0.8) * ay,
                          lx + rng.uniform(-0.8, 0.8) * ax])
            if _lookup(lay, lungs, p) != lab:
                continue
            if kind == "juxta-pleural":
                ang = rng.uniform(0, 2 * np.pi)
                step = np.array([0.0, np.sin(ang), np.cos(ang)]) * 0.5 * min(lay.spacing[1:])
                q = p.copy()
                for _ in range(4000):
                    if _lookup(lay, lungs, q + step) != lab:
                        break
                    q = q + step
                out = np.array([0.0, np.sin(ang), np.cos(ang)])
                c = q - out * 0.6 * r
                back = _DIRS[_DIRS @ out <= 0.0]
                ok = np.all(_lookup(lay, lungs, c + (r + 1.0) * back) == lab)
                ok &= _lookup(lay, lungs, c) == lab
                ok = ok and _overlaps_wall(lay, lungs, c, (1 - LOBULATION) * r, lab)
            else:
                c = p
                clear = r * (1 + LOBULATION) + max(2.0, max(lay.spacing))
                ok = np.all(_lookup(lay, lungs, c + clear * _DIRS) == lab)
            if ok and all(np.linalg.norm(c - q["c"]) > r + q["r"] + 3.0 for q in placed):
                placed.append({"c": c, "r": r, "kind": kind})
                break
        else:
            raise RuntimeError(f"could not place nodule {i} ({kind}); use a larger grid or fewer nodules")
    return placed


def _paint_nodules(lay, vol, nod_mask, nodules, rng):
    for k, nod in enumerate(nodules, start=1):
        c, r, kind = nod["c"], nod["r"], nod["kind"]
        dirs = rng.standard_normal((3, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        pad = r * (1 + 2 * LOBULATION) + 2 * max(lay.spacing)
        box = _box(lay, c - pad, c + pad)
        if box is None:
            continue
        z, y, x = _axes_mm(lay, box)
        pz, py, px = z - np.float32(c[0]), y - np.float32(c[1]), x - np.float32(c[2])
        dist = np.sqrt(pz ** 2 + py ** 2 + px ** 2)
        safe = np.maximum(dist, 1e-6)
        u = [(pz * dv[0] + py * dv[1] + px * dv[2]) / safe for dv in dirs]
        lob = 1 + LOBULATION * (0.6 * (u[0] ** 2 - u[1] ** 2) + 0.4 * u[2] ** 3)
        v = vol[box]
        cur = v.astype(np.float32)
        if kind == "part-solid":
            layers = [(r, PART_SOLID_HALO_HU), (r * PART_SOLID_CORE_FRACTION, SOLID_HU)]
        else:
            layers = [(r, GROUND_GLASS_HU if kind == "ground-glass" else SOLID_HU)]
        for radius, hu in layers:
            f = _edge_fraction(lay, dist - radius * lob)
            cur = np.maximum(cur, cur + f * (hu - cur))
        v[...] = np.rint(cur).astype(np.int16)
        inside = dist <= r * lob
        nm = nod_mask[box]
        nm[inside] = k
        near = np.rint(c / np.asarray(lay.spacing)).astype(int)
        if np.all((near >= 0) & (near < np.asarray(lay.shape))):
            nod_mask[tuple(near)] = k  # a tiny nodule still owns the voxel at its centre


def _noise_table(noise_hu: float) -> np.ndarray:
    """int16 Gaussian quantiles: entry ``u`` is ``rint(noise_hu * Phi^-1((u + 0.5) / 65536))``."""
    from scipy.special import ndtri

    q = (np.arange(65536, dtype=np.float64) + 0.5) / 65536.0
    return np.rint(noise_hu * ndtri(q)).astype(np.int16)


def _add_noise(vol, noise_hu, rng):
    """Add rounded Gaussian noise (tails cut at 4.3 sd) and clip, slab by slab, in int16.

    Noise is drawn as uniform 16-bit integers mapped through the quantile table: the same
    as rounding ``hu + noise_hu * N(0, 1)`` (``hu`` is whole), several times faster.
    """
    nz, ny, nx = vol.shape
    slab = max(1, _SLAB_VOXELS // (ny * nx))
    table = _noise_table(noise_hu) if noise_hu > 0 else None
    for z0 in range(0, nz, slab):
        v = vol[z0:z0 + slab]
        if table is not None:
            u = np.frombuffer(rng.bytes(2 * v.size), dtype=np.uint16).reshape(v.shape)
            v += table[u]  # |v| <= 3071 + 4.3 * MAX_NOISE_HU: no int16 overflow
        np.clip(v, MIN_HU, MAX_HU, out=v)


# ------------------------------------------------------------------ public
def make_phantom(shape_zyx=(120, 256, 256), spacing_mm=(2.5, 1.4, 1.4), *, seed: int = 0,
                 nodules=None, n_nodules: int = 4, scan_id: str | None = None,
                 noise_hu: float = 20.0, origin_mm=None, diameter_range_mm=(3.0, 25.0),
                 return_truth: bool = False):
    """A synthetic chest CT and its nodule annotations (LUNA16 format).

    Parameters
    ----------
    shape_zyx : tuple of int, shape (3,)
        Array shape ``(Z, Y, X)``; each at least 16.  The anatomy scales to the field of
        view ``(n - 1) * spacing``, so a small grid still holds a whole chest.
    spacing_mm : tuple of float, shape (3,)
        Voxel spacing ``(z, y, x)`` in mm.
    seed : int
        Everything random (origin jitter, ribs, vessels, nodules, noise) comes from it; the
        same arguments give the same bytes.
    nodules : list of dict, optional
        Explicit nodules instead of random ones: each ``{"centre_zyx_mm": (z, y, x) world LPS
        mm, "diameter_mm": float, "kind": one of KINDS}`` (kind defaults to "solid").  They
        are drawn wherever they are put.  ``n_nodules`` is then ignored.
    n_nodules : int
        Number of random nodules, kinds cycling through ``KINDS`` (solid, part-solid,
        ground-glass, juxta-pleural), diameters log-uniform in ``diameter_range_mm`` (with a
        per-kind minimum, ``MIN_DIAMETER_MM``), placed inside a lung (juxta-pleural ones on
        its wall), apart from each other.
    scan_id : str, optional
        Default: :func:`phantom_uid` of the seed (a DICOM UID).
    noise_hu : float
        Standard deviation of the Gaussian noise added everywhere, in HU (0: none).
    origin_mm : tuple of float, optional
        World (LPS) position of voxel (0, 0, 0), ``(z, y, x)``.  Default about
        ``(-340, -FOV_y / 2, -FOV_x / 2)`` mm plus up to 10 mm of seeded jitter per axis.
    diameter_range_mm : tuple of float
        Range of random nodule diameters, mm.
    return_truth : bool
        Also return the ground truth masks (see Returns).

    Returns
    -------
    vol : Volume
        int16 HU, identity direction, ``scan_id`` as above, ``meta={"phantom_seed": seed}``.
    annotations : pandas.DataFrame
        One row per nodule, LUNA16 ``annotations.csv`` columns ``seriesuid, coordX, coordY,
        coordZ, diameter_mm`` (world LPS mm) plus ``kind``.  Row ``i`` is label ``i + 1``
        in ``nodule_mask``.
    truth : dict, only with ``return_truth=True``
        ``lung_mask`` (uint8: 1 right lung (lower x), 2 left lung (higher x), 0 elsewhere;
        airways excluded, vessels and nodules inside a lung included; a juxta-pleural
        nodule reaches past it into the chest wall, as real ones do), ``nodule_mask``
        (uint8: row index + 1, 0 elsewhere), ``airway_mask`` (bool: trachea and main
        bronchi lumen).  All on ``vol``'s grid.

    Raises
    ------
    ValueError
        For a shape below 16 per axis or too large, bad spacing, bad nodule dicts or
        ranges; ``RuntimeError`` if random nodules cannot be placed (grid too small).
    TypeError
        If ``seed`` is not a non-negative int.

    Examples
    --------
    >>> vol, ann = make_phantom((32, 64, 64), (8.0, 5.0, 5.0), seed=1, n_nodules=2)
    >>> vol.array.dtype, vol.shape, list(ann.columns)
    (dtype('int16'), (32, 64, 64), ['seriesuid', 'coordX', 'coordY', 'coordZ', 'diameter_mm', 'kind'])
    >>> ann["kind"].tolist()
    ['solid', 'part-solid']
    """
    seed = _check_seed(seed)
    shape = tuple(int(n) for n in np.asarray(shape_zyx).reshape(-1))
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape_zyx must be 3 sizes of at least 16, got {shape_zyx!r}")
    if math.prod(shape) > MAX_VOXELS:
        raise ValueError(f"shape_zyx {shape} exceeds {MAX_VOXELS} voxels")
    spacing = tuple(float(s) for s in _vec3("spacing_mm", spacing_mm, positive=True))
    if not (math.isfinite(float(noise_hu)) and 0 <= noise_hu <= MAX_NOISE_HU):
        raise ValueError(f"noise_hu must be in 0..{MAX_NOISE_HU}, got {noise_hu!r}")
    lo_d, hi_d = (float(v) for v in diameter_range_mm)
    if not (0 < lo_d <= hi_d):
        raise ValueError(f"diameter_range_mm must be (low, high) with 0 < low <= high, got {diameter_range_mm!r}")
    if nodules is not None:
        nodules = _check_nodules(nodules)
    elif isinstance(n_nodules, bool) or not isinstance(n_nodules, Integral) or n_nodules < 0:
        raise ValueError(f"n_nodules must be an int >= 0, got {n_nodules!r}")

    rng = np.random.default_rng(seed)
    lay = _Layout(shape, spacing, rng)
    if origin_mm is None:
        jitter = np.round(rng.uniform(-10, 10, 3), 2)
        origin = np.array([-340.0, -lay.ly / 2, -lay.lx / 2]) + jitter
    else:
        origin = _vec3("origin_mm", origin_mm)
        rng.uniform(-10, 10, 3)  # keep the random stream the same either way
    scan_id = phantom_uid(seed) if scan_id is None else str(scan_id)

    f2 = _fields_2d(lay)
    vol, lungs = _build_dense(lay, f2)
    airway = _paint_airways(lay, vol, lungs)
    _paint_vessels(lay, vol, lungs, rng)
    if nodules is None:
        placed = _place_nodules(lay, lungs, rng, int(n_nodules), (lo_d, hi_d))
    else:
        placed = [{"c": n["centre_zyx_mm"] - origin, "r": n["diameter_mm"] / 2, "kind": n["kind"]}
                  for n in nodules]
    if len(placed) > 255:
        raise ValueError(f"at most 255 nodules fit the uint8 nodule mask, got {len(placed)}")
    nod_mask = np.zeros(shape, np.uint8)
    _paint_nodules(lay, vol, nod_mask, placed, rng)
    _add_noise(vol, float(noise_hu), rng)

    volume = Volume(vol, spacing_mm=spacing, origin_mm=tuple(origin), scan_id=scan_id,
                    meta={"phantom_seed": seed})
    rows = []
    for nod in placed:
        zyx = nod["c"] + origin
        rows.append((scan_id, zyx[2], zyx[1], zyx[0], 2 * nod["r"], nod["kind"]))
    ann = pd.DataFrame(rows, columns=ANNOTATION_COLUMNS + ["kind"])
    ann = ann.astype({"seriesuid": str, "coordX": float, "coordY": float, "coordZ": float,
                      "diameter_mm": float, "kind": str})
    if return_truth:
        return volume, ann, {"lung_mask": lungs, "nodule_mask": nod_mask, "airway_mask": airway}
    return volume, ann


def _rescale_for(seed: int) -> tuple[float, float]:
    return RESCALES[seed % len(RESCALES)]


def write_phantom_scan(folder, fmt: str = "dicom", **make_phantom_kwargs):
    """Generate a phantom (:func:`make_phantom`) and write it to disk.

    Parameters
    ----------
    folder : str or Path
        For ``fmt="dicom"`` the series folder (one file per slice, shuffled hex names);
        otherwise the folder that gets ``<scan_id>.<ext>``.
    fmt : {"dicom", "mhd", "nrrd", "nii"}
        DICOM goes through :func:`synth.dicomio.write_dicom_series` with the
        SeriesInstanceUID = ``scan_id`` and a rescale (slope, intercept) chosen by the seed
        from ``RESCALES`` (1/-1024, 0.5/-1024, 1/-1000: the last needs signed pixels);
        the rest through :func:`pipeline.io.write_volume` (``.mhd`` + ``.raw``, ``.nrrd``,
        ``.nii.gz``).
    **make_phantom_kwargs
        Passed on to :func:`make_phantom` (``return_truth`` is not allowed here).

    Returns
    -------
    path : Path
        The series folder (DICOM) or the image file.
    annotations : pandas.DataFrame
        As from :func:`make_phantom`.

    Raises
    ------
    ValueError
        For an unknown ``fmt`` or ``return_truth`` in the keywords.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path, ann = write_phantom_scan(tmp, fmt="nrrd", shape_zyx=(32, 64, 64),
    ...                                    spacing_mm=(8.0, 5.0, 5.0), n_nodules=1)
    ...     path.suffix, len(ann)
    ('.nrrd', 1)
    """
    exts = {"mhd": ".mhd", "nrrd": ".nrrd", "nii": ".nii.gz"}
    if fmt != "dicom" and fmt not in exts:
        raise ValueError(f"fmt must be 'dicom', 'mhd', 'nrrd' or 'nii', got {fmt!r}")
    if "return_truth" in make_phantom_kwargs:
        raise ValueError("write_phantom_scan does not take return_truth; call make_phantom for the masks")
    vol, ann = make_phantom(**make_phantom_kwargs)
    folder = Path(folder)
    seed = _check_seed(make_phantom_kwargs.get("seed", 0))
    if fmt == "dicom":
        from synth.dicomio import write_dicom_series

        slope, intercept = _rescale_for(seed)
        study = _uid(["lungscreen-phantom-study", vol.scan_id])
        write_dicom_series(vol, folder, slope=slope, intercept=intercept, shuffle_names=True,
                           series_uid=vol.scan_id, study_uid=study, seed=seed)
        return folder, ann
    from pipeline.io import write_volume

    path = folder / f"{vol.scan_id}{exts[fmt]}"
    write_volume(vol, path)
    return path, ann


def make_luna_tree(root, n_scans: int = 3, subsets: int = 1, seed: int = 0, *,
                   negatives_per_scan: int = 20, **make_phantom_kwargs):
    """Write a small tree laid out like LUNA16, with phantom scans.

    Layout::

        root/subset<k>/<seriesuid>.mhd (+ .raw)     scans dealt round-robin over subsets
        root/annotations.csv                          seriesuid,coordX,coordY,coordZ,diameter_mm
        root/candidates_V2.csv                        seriesuid,coordX,coordY,coordZ,class
        root/evaluationScript/annotations/seriesuids.csv   one uid a line, no header

    Candidates: each nodule once at its centre and once jittered by up to a quarter of
    its radius (class 1), and ``negatives_per_scan`` points in the lungs away from every
    nodule, half of them on vessels (class 0), in shuffled order.

    Parameters
    ----------
    root : str or Path
        Created if missing.
    n_scans : int
        Number of scans (1..1000).  Scan ``i`` uses seed ``seed * 1000 + i``.
    subsets : int
        Number of ``subset<k>`` folders (1..10).
    seed : int
        Base seed.
    negatives_per_scan : int
        Class-0 candidates per scan.
    **make_phantom_kwargs
        For :func:`make_phantom`; by default a small grid, ``shape_zyx=(48, 96, 96)``,
        ``spacing_mm=(6.0, 3.6, 3.6)``, ``n_nodules=2``, ``diameter_range_mm=(6.0, 25.0)``.

    Returns
    -------
    annotations, candidates : pandas.DataFrame
        What was written to the two CSV files (``annotations`` also has ``kind``, which
        the CSV leaves out, and ``subset``).

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     ann, cand = make_luna_tree(tmp, n_scans=1, shape_zyx=(32, 64, 64),
    ...                                spacing_mm=(8.0, 5.0, 5.0), negatives_per_scan=4)
    ...     sorted(p.name for p in Path(tmp).iterdir())
    ['annotations.csv', 'candidates_V2.csv', 'evaluationScript', 'subset0']
    """
    from pipeline.io import write_csv, write_text, write_volume

    seed = _check_seed(seed)
    for name, val, hi in (("n_scans", n_scans, 1000), ("subsets", subsets, 10)):
        if isinstance(val, bool) or not isinstance(val, Integral) or not 1 <= val <= hi:
            raise ValueError(f"{name} must be an int in 1..{hi}, got {val!r}")
    if make_phantom_kwargs.keys() & {"seed", "return_truth", "scan_id"}:
        raise ValueError("make_luna_tree sets seed, scan_id and return_truth itself; pass seed= only")
    kw = dict(shape_zyx=(48, 96, 96), spacing_mm=(6.0, 3.6, 3.6), n_nodules=2,
              diameter_range_mm=(6.0, 25.0))
    kw.update(make_phantom_kwargs)
    root = Path(root)
    anns, cands, uids = [], [], []
    for i in range(n_scans):
        s = seed * 1000 + i
        vol, ann, truth = make_phantom(seed=s, return_truth=True, **kw)
        subset = f"subset{i % subsets}"
        write_volume(vol, root / subset / f"{vol.scan_id}.mhd")
        uids.append(vol.scan_id)
        anns.append(ann.assign(subset=subset))
        rng = np.random.default_rng([s, 7])
        rows = []
        for _, a in ann.iterrows():
            c = np.array([a.coordX, a.coordY, a.coordZ])
            rows.append((vol.scan_id, *c, 1))
            jit = rng.standard_normal(3)
            jit *= 0.25 * a.diameter_mm / 2 * rng.uniform() / np.linalg.norm(jit)
            rows.append((vol.scan_id, *(c + jit), 1))
        rows += _negatives(vol, ann, truth, rng, negatives_per_scan)
        order = rng.permutation(len(rows))
        cands.append(pd.DataFrame([rows[k] for k in order], columns=CANDIDATE_COLUMNS))
    ann_df = pd.concat(anns, ignore_index=True)
    cand_df = pd.concat(cands, ignore_index=True).astype({"class": int})
    write_csv(ann_df[ANNOTATION_COLUMNS], root / "annotations.csv")
    write_csv(cand_df, root / "candidates_V2.csv")
    write_text("".join(u + "\n" for u in uids), root / "evaluationScript" / "annotations" / "seriesuids.csv")
    return ann_df, cand_df


def _negatives(vol, ann, truth, rng, n):
    """Class-0 candidate rows: lung voxels (half on vessels) far from every nodule."""
    lung = truth["lung_mask"] > 0
    vessel = lung & (vol.array > -300) & (truth["nodule_mask"] == 0)
    centres = ann[["coordZ", "coordY", "coordX"]].to_numpy(float)
    radii = ann["diameter_mm"].to_numpy(float) / 2
    rows = []
    for want, pool in ((n - n // 2, lung & ~vessel), (n // 2, vessel)):
        idx = np.argwhere(pool)
        if len(idx) == 0:
            idx = np.argwhere(lung)
        if len(idx) == 0:
            continue
        got, tries = 0, 0
        while got < want and tries < 100 * max(want, 1):
            tries += 1
            w = vol.index_to_world(idx[rng.integers(len(idx))])
            if len(centres) and np.any(np.linalg.norm(centres - w, axis=1) < radii + 10.0):
                continue
            rows.append((vol.scan_id, w[2], w[1], w[0], 0))
            got += 1
    return rows
