"""Multi-view renders of small 3D scenes: one or two coloured solids (cube, sphere, cylinder) seen from
``views`` cameras on a ring around them ("a red cube beside a blue sphere", "a yellow cylinder").

The renderer is an orthographic ray caster in torch: every pixel casts a ray along the view direction, hits the
solids analytically (ray-sphere, slab test for the axis-aligned cube, side and caps of the upright cylinder),
and the nearest hit is shaded by a fixed directional light (ambient + Lambert), so the views differ in
occlusion, shape outline and shading. Each view is rendered at ``SUPERSAMPLE`` times the output resolution and
box-filtered down. No GPU, no files.

Views become the frames of a ``(3, V, H, W)`` latent, packed with a [nextframe] between views as Lumina-T2X
packs multi-view images. Camera ``k`` of an item sits at azimuth ``a0 + 2 pi k / V`` (``a0`` random per item)
and one elevation per item; the ``(V, 2)`` (azimuth, elevation) table is the item's ``cameras``, which the
model embeds per frame (:mod:`flagdit.modality`), so the view order alone never says where a camera is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .item import Item, article
from .shapes import COLORS

SOLIDS = ("cube", "sphere", "cylinder")
SOLID_COLORS = tuple(c for c in COLORS if c != "black")  # black solids vanish into their own shading
WORDS = ("beside", *SOLIDS)
VIEW_SIZE = (16, 16)
DEFAULT_VIEWS = 4
MAX_VIEWS = 64  # what the CLIs accept: 64 views of 16x16 are ~4600 tokens, one long packed sample already
ELEVATION_RANGE = (math.radians(10.0), math.radians(40.0))
SUPERSAMPLE = 2
EXTENT = 0.85  # half-width of the orthographic view, in scene units
BACKGROUND = (0.45, 0.45, 0.5)
AMBIENT, DIFFUSE = 0.3, 0.7
_LIGHT = F.normalize(torch.tensor([0.4, 0.8, 0.45]), dim=0)
_MISS = float("inf")


@dataclass
class Solid:
    kind: str  # one of SOLIDS
    color: tuple[float, float, float]
    center: tuple[float, float, float]
    size: float  # cube half-edge, sphere radius, cylinder radius (its half-height is 1.35 x that)


def ring_cameras(views: int, elevation: float, start: float = 0.0) -> torch.Tensor:
    """``(views, 2)`` (azimuth, elevation) in radians: ``views`` cameras evenly spaced from ``start``."""
    if not isinstance(views, int) or isinstance(views, bool) or views < 1:
        raise ValueError(f"views must be an int >= 1, got {views!r}")
    azimuth = start + 2 * math.pi * torch.arange(views, dtype=torch.float64) / views
    return torch.stack([azimuth, torch.full_like(azimuth, elevation)], dim=-1).float()


def _camera_rays(azimuth: float, elevation: float, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray origins ``(h*w, 3)`` on a plane in front of the scene and the shared direction ``(3,)``."""
    ce, se, ca, sa = math.cos(elevation), math.sin(elevation), math.cos(azimuth), math.sin(azimuth)
    toward_camera = torch.tensor([ce * sa, se, ce * ca])
    right = torch.tensor([ca, 0.0, -sa])
    up = torch.linalg.cross(toward_camera, right)
    scale = EXTENT / max(h, w)
    ys = (h - 2 * (torch.arange(h) + 0.5)) * scale  # top row first
    xs = (2 * (torch.arange(w) + 0.5) - w) * scale
    origins = xs.view(1, -1, 1) * right + ys.view(-1, 1, 1) * up + 4.0 * toward_camera
    return origins.reshape(-1, 3), -toward_camera


def _hit_sphere(o, d, s: Solid):
    oc = o - torch.tensor(s.center)
    b = oc @ d
    disc = b**2 - (oc * oc).sum(-1) + s.size**2
    t = -b - disc.clamp(min=0).sqrt()
    t = torch.where((disc >= 0) & (t > 0), t, _MISS)
    return t, (oc + t.clamp(max=1e3).unsqueeze(-1) * d) / s.size


def _hit_cube(o, d, s: Solid):
    center = torch.tensor(s.center)
    d_safe = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
    t1, t2 = (center - s.size - o) / d_safe, (center + s.size - o) / d_safe
    t_in, axis = torch.minimum(t1, t2).max(dim=-1)
    t_out = torch.maximum(t1, t2).min(dim=-1).values
    t = torch.where((t_in <= t_out) & (t_in > 0), t_in, _MISS)
    normal = -torch.sign(d_safe)[axis].unsqueeze(-1) * F.one_hot(axis, 3).float()
    return t, normal


def _hit_cylinder(o, d, s: Solid):
    center = torch.tensor(s.center)
    radius, half = s.size, 1.35 * s.size
    oc = o - center
    oxz, dxz = oc[:, [0, 2]], d[[0, 2]]
    a = (dxz * dxz).sum().clamp(min=1e-12)
    b = oxz @ dxz
    disc = b**2 - a * ((oxz * oxz).sum(-1) - radius**2)
    t_side = (-b - disc.clamp(min=0).sqrt()) / a
    y_side = oc[:, 1] + t_side * d[1]
    t_side = torch.where((disc >= 0) & (y_side.abs() <= half) & (t_side > 0), t_side, _MISS)
    n_side = torch.zeros_like(o)
    n_side[:, [0, 2]] = (oxz + t_side.clamp(max=1e3).unsqueeze(-1) * dxz) / radius
    t, normal = t_side, n_side
    dy = d[1] if abs(float(d[1])) > 1e-12 else 1e-12
    for cap_y, sign in ((half, 1.0), (-half, -1.0)):
        t_cap = (cap_y - oc[:, 1]) / dy
        p = oxz + t_cap.unsqueeze(-1) * dxz
        hit = ((p * p).sum(-1) <= radius**2) & (t_cap > 0) & (t_cap < t)
        t = torch.where(hit, t_cap, t)
        normal = torch.where(hit.unsqueeze(-1), torch.tensor([0.0, sign, 0.0]), normal)
    return t, normal


_HIT = {"cube": _hit_cube, "sphere": _hit_sphere, "cylinder": _hit_cylinder}


def render(scene: list[Solid], cameras: torch.Tensor, size: tuple[int, int] = VIEW_SIZE) -> torch.Tensor:
    """``(3, V, H, W)`` in [-1, 1]: the scene seen from each ``(azimuth, elevation)`` row of ``cameras``."""
    if cameras.dim() != 2 or cameras.shape[-1] != 2 or cameras.shape[0] < 1:
        raise ValueError(f"cameras must be (views >= 1, 2) (azimuth, elevation), got {tuple(cameras.shape)}")
    h, w = size
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size}")
    sh, sw = h * SUPERSAMPLE, w * SUPERSAMPLE
    views = []
    for azimuth, elevation in cameras.tolist():
        o, d = _camera_rays(azimuth, elevation, sh, sw)
        color = torch.tensor(BACKGROUND).expand(o.shape[0], 3).clone()
        nearest = torch.full((o.shape[0],), _MISS)
        for solid in scene:
            t, normal = _HIT[solid.kind](o, d, solid)
            shade = AMBIENT + DIFFUSE * (normal @ _LIGHT).clamp(min=0)
            closer = t < nearest
            color = torch.where(closer.unsqueeze(-1), shade.unsqueeze(-1) * torch.tensor(solid.color), color)
            nearest = torch.where(closer, t, nearest)
        img = color.T.reshape(3, 1, sh, sw)
        views.append(F.avg_pool2d(img, SUPERSAMPLE)[:, 0])
    return torch.stack(views, dim=1) * 2 - 1


def _pick(g: torch.Generator, options):
    return options[int(torch.randint(len(options), (1,), generator=g))]


def _uniform(g: torch.Generator, a: float, b: float) -> float:
    return a + (b - a) * float(torch.rand(1, generator=g))


def make_multiview(g: torch.Generator, views: int = DEFAULT_VIEWS, size: tuple[int, int] = VIEW_SIZE) -> Item:
    """One scene of one or two solids seen from ``views`` cameras on a ring at a random start and elevation."""
    if not isinstance(views, int) or isinstance(views, bool) or views < 1:
        raise ValueError(f"views must be an int >= 1, got {views!r}")
    n_solids = 1 if float(torch.rand(1, generator=g)) < 0.4 else 2
    names = list(SOLID_COLORS)
    first = _pick(g, names)
    colors = [
        first,
        names[(names.index(first) + 1 + int(torch.randint(len(names) - 1, (1,), generator=g))) % len(names)],
    ]
    scene, words = [], []
    for i in range(n_solids):
        kind = _pick(g, SOLIDS)
        x = 0.0 if n_solids == 1 else (-0.45 if i == 0 else 0.45) + _uniform(g, -0.05, 0.05)
        z = _uniform(g, -0.1, 0.1)
        scene.append(Solid(kind, COLORS[colors[i]], (x, 0.0, z), _uniform(g, 0.28, 0.36)))
        words.append(f"{article(colors[i])} {colors[i]} {kind}")
    cameras = ring_cameras(views, _uniform(g, *ELEVATION_RANGE), start=_uniform(g, 0.0, 2 * math.pi))
    return Item(render(scene, cameras, size), " beside ".join(words), "multiview", cameras)
