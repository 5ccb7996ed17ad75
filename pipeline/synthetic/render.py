"""Rendering for the synthetic example: arena floor, pillars, a shaded animal, keypoint markers.

Painter's algorithm per image: the static background (the floor ray-cast through the lens,
so its texture is consistent across cameras, plus per-camera exposure, tint and vignetting),
the animal's soft shadow, then pillars and body segments far to near, then the markers.

Markers are what later stages measure: each shown keypoint gets a black disc (radius
MARKER_RADIUS px, anti-aliased) and on it a Gaussian dot (sigma MARKER_SIGMA px, peak = the
keypoint's colour) centred exactly at its sub-pixel projection. Inside the disc the image is
`g * colour` with g the Gaussian, so the intensity-weighted centroid of a window symmetric
about the point, inside the disc and at least 2.5 sigma in radius (e.g. 4 px), is the point
to a few hundredths of a pixel. Markers of hidden keypoints are not drawn at all.

Every image is float32 BGR while drawing; callers get uint8.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.geometry.cameras import Camera
from pipeline.synthetic.scene import ARENA_RADIUS, KEYPOINTS, PILLARS

MARKER_SIGMA = 1.5
MARKER_RADIUS = 5.0
_MARKER_HALF = 6  # half-size (px) of the window a marker is drawn in
KEYPOINT_COLOURS = np.array([  # BGR, saturated and distinct
    cv2.cvtColor(np.uint8([[[int(180 * i / len(KEYPOINTS)), 255, 255]]]), cv2.COLOR_HSV2BGR)[0, 0]
    for i in range(len(KEYPOINTS))
], dtype=float)

_IDX = {name: i for i, name in enumerate(KEYPOINTS)}
_FUR = np.array([88.0, 104.0, 126.0])  # brown-grey (BGR)
_SKIN = np.array([150.0, 158.0, 205.0])  # pink: ears, tail, paws
# body segments as tapered capsules: (from, to, radius at from, radius at to (mm), colour)
SEGMENTS = (
    ("tail_mid", "tail_tip", 3.0, 1.6, _SKIN), ("tail_base", "tail_mid", 5.0, 3.0, _SKIN),
    ("hip", "tail_base", 15.0, 6.0, _FUR), ("spine", "hip", 17.0, 15.0, _FUR),
    ("neck", "spine", 12.5, 17.0, _FUR), ("head", "neck", 10.5, 12.5, _FUR),
    ("nose", "head", 3.5, 10.5, _FUR), ("neck", "paw_left", 4.0, 3.0, _SKIN),
    ("neck", "paw_right", 4.0, 3.0, _SKIN), ("head", "ear_left", 2.5, 6.0, _SKIN),
    ("head", "ear_right", 2.5, 6.0, _SKIN),
)
_SEG_IDX = np.array([(_IDX[a], _IDX[b]) for a, b, *_ in SEGMENTS])
_SEG_RADII = np.array([(ra, rb) for _, _, ra, rb, _ in SEGMENTS])
_LIGHT = np.array([0.35, -0.25, 0.9]) / np.linalg.norm([0.35, -0.25, 0.9])  # towards the lamp
_LIGHT_SIDE = np.array([_LIGHT[0], _LIGHT[1], 0.0]) / np.linalg.norm(_LIGHT[:2])
_PILLAR_COLOUR = np.array([196.0, 190.0, 178.0])
_ANIMAL_HEIGHT = 25.0  # mm, where pillar depth is compared with body segments
_SHIFT = 4  # cv2 fixed-point bits for sub-pixel drawing
_CIRCLE = np.stack([np.cos(np.linspace(0, 2 * np.pi, 16, endpoint=False)),
                    np.sin(np.linspace(0, 2 * np.pi, 16, endpoint=False))], -1)


@dataclass(frozen=True)
class PillarLayer:
    """One pillar pre-rendered for one camera: colour and coverage in a bounding box."""

    depth: float  # camera-frame z of its axis at the animal's height
    box: tuple[int, int, int, int]  # y0, y1, x0, x1
    colour: np.ndarray  # (h, w, 3) float32, premultiplied by alpha
    alpha: np.ndarray  # (h, w, 1) float32


@dataclass(frozen=True)
class CameraScene:
    """Everything static about one camera in one session."""

    cam: Camera
    background: np.ndarray  # (H, W, 3) float32
    pillars: tuple[PillarLayer, ...]


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


class FloorTexture:
    """A world-fixed floor texture: smooth noise at two scales plus the arena's rim."""

    EXTENT = 700.0  # mm, half-size of the textured square

    def __init__(self, rng: np.random.Generator) -> None:
        self.coarse_cell, self.fine_cell = 22.0, 3.0
        n_coarse = int(2 * self.EXTENT / self.coarse_cell) + 4
        n_fine = int(2 * self.EXTENT / self.fine_cell) + 4
        self.coarse = rng.normal(0, 1, (n_coarse, n_coarse)).astype(np.float32)
        self.fine = rng.normal(0, 1, (n_fine, n_fine)).astype(np.float32)
        self.tile = rng.uniform(45.0, 60.0)  # mm, faint tiles inside the arena

    def _sample(self, grid: np.ndarray, cell: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        map_x = ((x + self.EXTENT) / cell).astype(np.float32)
        map_y = ((y + self.EXTENT) / cell).astype(np.float32)
        return cv2.remap(grid, map_x, map_y, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)

    def shade(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """BGR floor colour (float32, ... x 3) at world floor points (x, y) in mm."""
        coarse = self._sample(self.coarse, self.coarse_cell, x, y)
        fine = self._sample(self.fine, self.fine_cell, x, y)
        r = np.hypot(x, y)
        inside = 1 - _smoothstep(ARENA_RADIUS - 1.5, ARENA_RADIUS + 1.5, r)
        rim = _smoothstep(ARENA_RADIUS - 1.5, ARENA_RADIUS + 1.5, r) * (
            1 - _smoothstep(ARENA_RADIUS + 7, ARENA_RADIUS + 10, r))
        grout = np.minimum(np.abs(x / self.tile % 1 - 0.5), np.abs(y / self.tile % 1 - 0.5))
        tiles = 1 - 0.08 * _smoothstep(0.46, 0.5, grout)
        bedding = (178 + 16 * coarse + 9 * fine) * tiles * (1 - 0.25 * (r / ARENA_RADIUS) ** 2)
        table = 92 + 10 * coarse + 4 * fine
        grey = inside * bedding + (1 - inside) * table
        grey = grey * (1 - rim) + 40 * rim
        colour = grey[..., None] * np.array([0.82, 0.92, 1.0], np.float32)
        colour[..., 0] += (1 - inside) * 18  # a bluish table outside the arena
        return colour.astype(np.float32)


def _background(rng: np.random.Generator, cam: Camera, floor: FloorTexture) -> np.ndarray:
    """The floor as seen through `cam` (lens distortion included) with its photometry."""
    width, height = cam.size
    ys, xs = np.mgrid[0:height, 0:width].astype(float)
    normalized = cam.undistort(np.stack([xs, ys], -1))
    rays = np.concatenate([normalized, np.ones((height, width, 1))], -1) @ cam.R  # world dirs
    rays = np.nan_to_num(rays, nan=0.0)
    down = rays[..., 2] < -1e-6
    t = np.where(down, -cam.center[2] / np.where(down, rays[..., 2], -1.0), 0.0)
    hit = cam.center[:2] + t[..., None] * rays[..., :2]
    image = floor.shade(hit[..., 0], hit[..., 1])
    image[~down] = 60.0
    # per camera: exposure, white balance, vignetting, a little fixed sensor grain
    gain = rng.uniform(0.85, 1.1) * rng.uniform(0.94, 1.06, 3)
    cx, cy = cam.matrix[0, 2], cam.matrix[1, 2]
    r2 = ((xs - cx) ** 2 + (ys - cy) ** 2) / (0.25 * (width**2 + height**2))
    vignette = 1 - rng.uniform(0.15, 0.3) * r2
    image = image * gain.astype(np.float32) * vignette[..., None].astype(np.float32)
    image += rng.normal(0, 2.0, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.float32)


def _pillar_layer(cam: Camera, pillar: np.ndarray) -> PillarLayer | None:
    """Shade one vertical cylinder for `cam`: lit side facets and its top cap."""
    x, y, radius, height = pillar
    width, image_h = cam.size
    angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    normals = np.stack([np.cos(angles), np.sin(angles), np.zeros_like(angles)], -1)
    heights = np.linspace(0, height, 7)
    surface = (np.array([x, y, 0.0]) + radius * normals)[None] + heights[:, None, None] * [0, 0, 1]
    pix = cam.project(surface)  # (heights, angles, 2)
    top = pix[-1]
    everything = pix.reshape(-1, 2)
    x0, y0 = np.floor(everything.min(0)).astype(int) - 2
    x1, y1 = np.ceil(everything.max(0)).astype(int) + 3
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, image_h)
    if x0 >= x1 or y0 >= y1:
        return None
    canvas = np.zeros((y1 - y0, x1 - x0, 3), np.float32)
    alpha = np.zeros((y1 - y0, x1 - x0), np.float32)
    offset = np.array([x0, y0])

    def fill(polygon: np.ndarray, colour, target: np.ndarray) -> None:
        pts = np.round((polygon - offset) * (1 << _SHIFT)).astype(np.int32)
        cv2.fillConvexPoly(target, pts, colour, cv2.LINE_AA, _SHIFT)

    fill(cv2.convexHull(everything.astype(np.float32))[:, 0], 1.0, alpha)
    fill(cv2.convexHull(everything.astype(np.float32))[:, 0], tuple(_PILLAR_COLOUR * 0.6), canvas)
    facing = normals[:, :2] @ (cam.center[:2] - [x, y]) > 0
    for j in np.flatnonzero(facing):
        k = (j + 1) % len(angles)
        lit = float((normals[j] + normals[k]) @ _LIGHT_SIDE) / 2
        shade = 0.6 + 0.4 * max(lit, -0.5)
        for h in range(len(heights) - 1):
            quad = np.array([pix[h, j], pix[h, k], pix[h + 1, k], pix[h + 1, j]])
            fill(quad, tuple(_PILLAR_COLOUR * shade), canvas)
    fill(top, tuple(_PILLAR_COLOUR * 1.1), canvas)
    depth = float((cam.R @ [x, y, _ANIMAL_HEIGHT] + cam.tvec)[2])
    return PillarLayer(depth=depth, box=(y0, y1, x0, x1), colour=canvas, alpha=alpha[..., None])


def camera_scenes(rng: np.random.Generator, cameras, pillars: np.ndarray = PILLARS
                  ) -> list[CameraScene]:
    """The static part of every camera's images in one session (one shared floor texture)."""
    floor = FloorTexture(rng)
    scenes = []
    for cam in cameras:
        layers = tuple(layer for layer in (_pillar_layer(cam, p) for p in pillars) if layer)
        scenes.append(CameraScene(cam=cam, background=_background(rng, cam, floor),
                                  pillars=layers))
    return scenes


def _capsule(p: np.ndarray, q: np.ndarray, rp: float, rq: float) -> np.ndarray:
    """Outline (n, 2) of the convex hull of two discs (a tapered capsule)."""
    pts = np.concatenate([p + rp * _CIRCLE, q + rq * _CIRCLE])
    return cv2.convexHull(pts.astype(np.float32))[:, 0]


def _fill(image: np.ndarray, outline: np.ndarray, colour) -> None:
    pts = np.round(outline * (1 << _SHIFT)).astype(np.int32)
    cv2.fillConvexPoly(image, pts, colour, cv2.LINE_AA, _SHIFT)


def _shadow(image: np.ndarray, cam: Camera, points_3d: np.ndarray) -> None:
    """A soft shadow on the floor under the body (segments projected onto z = 0)."""
    floor_pts = points_3d.copy()
    floor_pts[:, 2] = 0.0
    pix = cam.project(floor_pts)
    depth = (cam.R @ floor_pts.T)[2] + cam.tvec[2]
    focal = cam.matrix[0, 0]
    height, width = image.shape[:2]
    lo = np.floor(pix.min(0) - 30).astype(int)
    hi = np.ceil(pix.max(0) + 30).astype(int)
    x0, y0 = max(lo[0], 0), max(lo[1], 0)
    x1, y1 = min(hi[0], width), min(hi[1], height)
    if x0 >= x1 or y0 >= y1:
        return
    mask = np.zeros((y1 - y0, x1 - x0), np.float32)
    for (a, b), (ra, rb) in zip(_SEG_IDX[:7], _SEG_RADII[:7], strict=True):  # head to tail
        _fill(mask, _capsule(pix[a] - [x0, y0], pix[b] - [x0, y0], 1.1 * ra * focal / depth[a],
                             1.1 * rb * focal / depth[b]), 1.0)
    mask = cv2.GaussianBlur(mask, (0, 0), 2.5)
    image[y0:y1, x0:x1] *= 1 - 0.35 * mask[..., None]


def _draw_segment(image: np.ndarray, cam: Camera, p3: np.ndarray, q3: np.ndarray,
                  p: np.ndarray, q: np.ndarray, radii: tuple[float, float], colour: np.ndarray,
                  brightness: float) -> None:
    """A tapered capsule with a highlight on the side facing the lamp (fake cylinder shading)."""
    depth_p = float(cam.R[2] @ p3 + cam.tvec[2])
    depth_q = float(cam.R[2] @ q3 + cam.tvec[2])
    focal = cam.matrix[0, 0]
    rp, rq = radii[0] * focal / depth_p, radii[1] * focal / depth_q
    up = cam.project(np.stack([p3, p3 + _LIGHT * radii[0]]))
    towards = up[1] - up[0]
    towards = towards / max(np.linalg.norm(towards), 1e-9)
    for scale, shift, gain in ((1.0, 0.0, 0.62), (0.7, 0.22, 0.85), (0.38, 0.42, 1.05)):
        off_p, off_q = towards * shift * rp, towards * shift * rq
        _fill(image, _capsule(p + off_p, q + off_q, scale * rp, scale * rq),
              tuple(np.minimum(colour * gain * brightness, 255.0)))


# body segments that hide keypoints behind them (head to hip), and the keypoints they can hide
# (those outside the body; keypoints on the body axis are painted on its surface)
_OCCLUDERS = [i for i, (a, b, *_) in enumerate(SEGMENTS)
              if (a, b) in {("hip", "tail_base"), ("spine", "hip"), ("neck", "spine"),
                            ("head", "neck"), ("nose", "head")}]
_HIDEABLE = np.array([name in ("ear_left", "ear_right", "paw_left", "paw_right")
                      for name in KEYPOINTS])
_OCCLUDER_SCALE = 0.6  # of the drawn radii: a hidden keypoint is well inside the body outline
_OCCLUSION_MARGIN = 6.0  # mm: the body must be at least this far in front of the keypoint


def self_occluded(centers: np.ndarray, points: np.ndarray, scale: float = _OCCLUDER_SCALE,
                  hideable: np.ndarray = _HIDEABLE) -> np.ndarray:
    """(views, frames, K) True where the animal's own body hides a paw or an ear from a camera.

    centers: (views, 3) camera centres; points: (frames, K, 3). The body is approximated by
    spheres along its head-to-hip segments with `scale` (default _OCCLUDER_SCALE) of the drawn
    radii, so a
    keypoint counted as hidden is clearly behind the drawn body (one just grazed by it stays
    visible, its marker drawn over the body); a sphere containing the keypoint is ignored and
    the ray must enter a sphere _OCCLUSION_MARGIN mm before reaching the keypoint.
    """
    steps = np.linspace(0.0, 1.0, 7)
    seg = _SEG_IDX[_OCCLUDERS]  # (S, 2)
    radii = scale * (_SEG_RADII[_OCCLUDERS, :1] * (1 - steps)
                   + _SEG_RADII[_OCCLUDERS, 1:] * steps).ravel()  # (S * 7,)
    a, b = points[:, seg[:, 0]], points[:, seg[:, 1]]  # (F, S, 3)
    spheres = (a[:, :, None] * (1 - steps)[:, None] + b[:, :, None] * steps[:, None])
    spheres = spheres.reshape(len(points), -1, 3)  # (F, M, 3)
    c = centers[:, None, None, None, :]  # (V, 1, 1, 1, 3)
    d = points[None, :, :, None, :] - c  # (V, F, K, 1, 3)
    oc = c - spheres[None, :, None]  # (V, F, 1, M, 3)
    qa = (d * d).sum(-1)
    qb = 2 * (oc * d).sum(-1)
    qc = (oc * oc).sum(-1) - radii**2
    disc = qb * qb - 4 * qa * qc
    t_hit = (-qb - np.sqrt(np.maximum(disc, 0))) / (2 * qa)
    length = np.sqrt(qa)
    inside = np.linalg.norm(points[:, :, None] - spheres[:, None], axis=-1) < radii  # (F, K, M)
    hit = (disc > 0) & (t_hit > 0) & (t_hit * length < length - _OCCLUSION_MARGIN) & ~inside[None]
    return hit.any(-1) & hideable


def draw_markers(image: np.ndarray, points: np.ndarray, show: np.ndarray) -> None:
    """In place (float image): a black disc, then a Gaussian dot, per shown keypoint."""
    height, width = image.shape[:2]
    offsets = np.arange(-_MARKER_HALF, _MARKER_HALF + 1)
    windows = []
    for k in np.flatnonzero(show):
        cx, cy = np.round(points[k]).astype(int)
        xs, ys = cx + offsets, cy + offsets
        keep_x, keep_y = (xs >= 0) & (xs < width), (ys >= 0) & (ys < height)
        xs, ys = xs[keep_x], ys[keep_y]
        if xs.size == 0 or ys.size == 0:
            continue
        r2 = (xs[None] - points[k, 0]) ** 2 + (ys[:, None] - points[k, 1]) ** 2
        windows.append((k, slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1), r2))
    for _, rows, cols, r2 in windows:  # all discs first: a dot is never cut by a disc
        disc = np.clip(MARKER_RADIUS + 0.5 - np.sqrt(r2), 0.0, 1.0)
        image[rows, cols] *= (1 - disc)[..., None]
    for k, rows, cols, r2 in windows:
        dot = np.exp(-r2 / (2 * MARKER_SIGMA**2))[..., None]
        image[rows, cols] = image[rows, cols] * (1 - dot) + KEYPOINT_COLOURS[k] * dot


def render(scene: CameraScene, points_3d: np.ndarray, points_2d: np.ndarray,
           show: np.ndarray) -> np.ndarray:
    """One camera image (uint8 BGR) of the animal at `points_3d` (K, 3).

    points_2d: (K, 2) its projections in this camera; show: (K,) which markers to draw.
    """
    cam = scene.cam
    image = scene.background.copy()
    _shadow(image, cam, points_3d)
    depth = (cam.R @ points_3d.T)[2] + cam.tvec[2]
    seg_depth = depth[_SEG_IDX].mean(1)
    near, far = depth.min(), depth.max() + 1e-6
    items = [(float(d), 0, i) for i, d in enumerate(seg_depth)]
    items += [(layer.depth, 1, i) for i, layer in enumerate(scene.pillars)]
    for _, kind, i in sorted(items, reverse=True):  # far to near
        if kind == 1:
            layer = scene.pillars[i]
            y0, y1, x0, x1 = layer.box
            region = image[y0:y1, x0:x1]
            region *= 1 - layer.alpha
            region += layer.colour  # premultiplied: drawn over black
            continue
        a, b = _SEG_IDX[i]
        brightness = 1.1 - 0.25 * (seg_depth[i] - near) / (far - near)  # nearer is brighter
        _draw_segment(image, cam, points_3d[a], points_3d[b], points_2d[a], points_2d[b],
                      tuple(_SEG_RADII[i]), SEGMENTS[i][4], brightness)
    draw_markers(image, points_2d, show)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
