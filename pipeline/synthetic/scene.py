"""The synthetic example's geometry: cameras around an arena, an articulated animal, occluders.

World frame: millimetres, z up, the arena floor at z = 0 centred on the origin. All randomness
comes from the numpy Generator passed in, so a seed fixes everything.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from pipeline.geometry.cameras import Camera, CameraGroup

KEYPOINTS = (
    "nose", "ear_left", "ear_right", "head", "neck", "spine", "hip", "tail_base",
    "tail_mid", "tail_tip", "paw_left", "paw_right",
)
# bones drawn as capsules: (from, to, thickness in mm)
BONES = (
    ("nose", "head", 9.0), ("head", "neck", 13.0), ("neck", "spine", 20.0),
    ("spine", "hip", 22.0), ("hip", "tail_base", 16.0), ("tail_base", "tail_mid", 5.0),
    ("tail_mid", "tail_tip", 3.5), ("neck", "paw_left", 6.0), ("neck", "paw_right", 6.0),
    ("head", "ear_left", 6.0), ("head", "ear_right", 6.0),
)
ARENA_RADIUS = 150.0
# static occluders: vertical pillars (x, y, radius, height) in mm
PILLARS = np.array([[70.0, -55.0, 16.0, 140.0], [-80.0, 65.0, 13.0, 140.0]])


@dataclass(frozen=True)
class Occlusion:
    """What hides keypoints: pillars (P, 4) x, y, radius, height (mm); the body's occluding
    spheres at `body_scale` of its drawn radii; the keypoints the body may hide."""

    pillars: np.ndarray
    body_scale: float
    hideable: tuple[str, ...]


#: example.occlusion presets: "heavy" is the hidden-keypoint study's (bench/occlusion.py)
OCCLUSION = {
    "normal": Occlusion(PILLARS, 0.6, ("ear_left", "ear_right", "paw_left", "paw_right")),
    "heavy": Occlusion(
        np.concatenate([PILLARS, [[0.0, 95.0, 14.0, 140.0], [-95.0, -45.0, 15.0, 140.0],
                                  [95.0, 40.0, 12.0, 140.0]]]),
        0.85, ("ear_left", "ear_right", "paw_left", "paw_right", "nose", "tail_base",
               "tail_mid")),
}


def view_names_for(n_views: int) -> tuple[str, ...]:
    """The example's view (= camera) names."""
    return tuple(f"cam{i}" for i in range(n_views))


def look_at(center: np.ndarray, target: np.ndarray) -> np.ndarray:
    """World->camera rotation (3, 3) of a camera at `center` looking at `target`, z up."""
    forward = (target - center) / np.linalg.norm(target - center)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.stack([right, down, forward])


def make_cameras(rng: np.random.Generator, n_views: int, size: tuple[int, int]) -> CameraGroup:
    """Cameras evenly spaced around and above the arena, with realistic intrinsics/distortion."""
    width, height = size
    cameras = []
    azimuths = np.linspace(0, 2 * np.pi, n_views, endpoint=False) + rng.uniform(0, 0.5)
    for i, azimuth in enumerate(azimuths):
        elevation = np.deg2rad(rng.uniform(30, 50))
        distance = rng.uniform(560, 640)
        center = distance * np.array([np.cos(azimuth) * np.cos(elevation),
                                      np.sin(azimuth) * np.cos(elevation), np.sin(elevation)])
        rot = look_at(center, np.array([0.0, 0.0, 25.0]) + rng.normal(0, 8, 3))
        focal = width * rng.uniform(1.45, 1.6)
        matrix = np.array([[focal, 0, width / 2 - 0.5 + rng.uniform(-0.03, 0.03) * width],
                           [0, focal * rng.uniform(0.995, 1.005),
                            height / 2 - 0.5 + rng.uniform(-0.03, 0.03) * height],
                           [0, 0, 1]])
        dist = np.array([rng.uniform(-0.25, -0.1), rng.uniform(0.0, 0.08),
                         rng.normal(0, 1e-3), rng.normal(0, 1e-3), 0.0])
        rvec = cv2.Rodrigues(rot)[0].ravel()
        cameras.append(Camera(name=view_names_for(n_views)[i], size=(width, height),
                              matrix=matrix, dist=dist, rvec=rvec, tvec=-rot @ center))
    return CameraGroup(cameras=tuple(cameras), metadata={"synthetic": True})


def perturb_cameras(rng: np.random.Generator, group: CameraGroup) -> CameraGroup:
    """A session's calibration: each camera nudged (about 1 degree, a few mm)."""
    cameras = []
    for cam in group.cameras:
        rot = cv2.Rodrigues(rng.normal(0, np.deg2rad(0.7), 3))[0] @ cam.R
        cameras.append(Camera(name=cam.name, size=cam.size, matrix=cam.matrix, dist=cam.dist,
                              rvec=cv2.Rodrigues(rot)[0].ravel(),
                              tvec=cam.tvec + rng.normal(0, 4.0, 3)))
    return CameraGroup(cameras=tuple(cameras), metadata=group.metadata)


def _smooth_noise(rng: np.random.Generator, n: int, scale: float, width: int) -> np.ndarray:
    """A smooth random signal of length n (Gaussian-filtered white noise)."""
    kernel = np.exp(-0.5 * (np.arange(-3 * width, 3 * width + 1) / width) ** 2)
    kernel /= np.sqrt((kernel**2).sum())
    return scale * np.convolve(rng.normal(size=n + 6 * width), kernel, mode="valid")[:n]


def animal_motion(rng: np.random.Generator, n_frames: int,
                  pillars: np.ndarray = PILLARS) -> np.ndarray:
    """Keypoints (frames, keypoints, 3) of a rodent-like animal walking in the arena."""
    t = np.arange(n_frames)
    size = rng.uniform(0.9, 1.1)
    turn = _smooth_noise(rng, n_frames, 0.08, 6)
    speed = 2.5 + np.abs(_smooth_noise(rng, n_frames, 1.5, 10))
    heading = np.empty(n_frames)
    pos = np.empty((n_frames, 2))
    heading[0], pos[0] = rng.uniform(0, 2 * np.pi), rng.uniform(-40, 40, 2)
    for i in range(1, n_frames):  # integrate the walk; steer away from walls and pillars
        h = heading[i - 1] + turn[i]
        ahead = pos[i - 1] + 40 * np.array([np.cos(h), np.sin(h)])
        obstacles = [(np.zeros(2), ARENA_RADIUS - 50, -1.0)] + [
            (p[:2], p[2] + 55, 1.0) for p in pillars]
        for centre, radius, sign in obstacles:
            offset = ahead - centre
            dist = np.linalg.norm(offset)
            if sign * (radius - dist) > 0:  # too close to a pillar / too far out
                away = np.arctan2(*(sign * offset)[::-1])
                h += 0.35 * np.sin(away - h)
        heading[i] = h
        pos[i] = pos[i - 1] + speed[i] * np.array([np.cos(h), np.sin(h)])
    head_turn = _smooth_noise(rng, n_frames, 0.5, 5)
    bend = _smooth_noise(rng, n_frames, 0.25, 8)
    swing = _smooth_noise(rng, n_frames, 0.6, 4)
    gait = 2 * np.pi * t / rng.uniform(7, 10)
    # body frame: u forward, v left, z up (mm)
    local = np.zeros((n_frames, len(KEYPOINTS), 3))
    idx = {name: i for i, name in enumerate(KEYPOINTS)}
    head = {"nose": (26, 0, 22), "head": (10, 0, 27), "ear_left": (4, 9, 33),
            "ear_right": (4, -9, 33)}
    cos_h, sin_h = np.cos(head_turn), np.sin(head_turn)
    for name, (u, v, z) in head.items():  # rotate the head about the neck
        local[:, idx[name]] = np.stack([22 + u * cos_h - v * sin_h, u * sin_h + v * cos_h,
                                        np.full(n_frames, z) + 3 * np.sin(gait / 2)], -1)
    local[:, idx["neck"]] = [22, 0, 27]
    local[:, idx["spine"]] = [0, 0, 31]
    for name, (u, z) in {"hip": (-24, 27), "tail_base": (-40, 20), "tail_mid": (-68, 10),
                         "tail_tip": (-96, 5)}.items():
        angle = bend + swing * max(0.0, (u + 40) / -56)  # the tail swings beyond its base
        local[:, idx[name]] = np.stack([u * np.cos(angle), u * np.sin(angle),
                                        np.full(n_frames, z)], -1)
    for name, side in (("paw_left", 1), ("paw_right", -1)):
        phase = gait + (0 if side > 0 else np.pi)
        local[:, idx[name]] = np.stack([14 + 6 * np.sin(phase), np.full(n_frames, 13.0 * side),
                                        1.5 + 7 * np.maximum(np.cos(phase), 0)], -1)
    local *= size
    cos_t, sin_t = np.cos(heading)[:, None], np.sin(heading)[:, None]
    world = np.empty_like(local)
    world[..., 0] = pos[:, None, 0] + cos_t * local[..., 0] - sin_t * local[..., 1]
    world[..., 1] = pos[:, None, 1] + sin_t * local[..., 0] + cos_t * local[..., 1]
    world[..., 2] = local[..., 2]
    return world


def occluded(centers: np.ndarray, points: np.ndarray, pillars: np.ndarray = PILLARS
             ) -> np.ndarray:
    """(views, frames, keypoints) True where a pillar blocks the sight line camera->point.

    centers: (views, 3) camera centres; points: (frames, keypoints, 3); pillars (P, 4).
    """
    c = centers[:, None, None, None, :]  # (V, 1, 1, 1, 3)
    d = points[None, :, :, None, :] - c  # (V, F, K, 1, 3)
    pc = pillars[None, None, None, :, :2]  # (1, 1, 1, P, 2)
    oc = c[..., :2] - pc
    a = (d[..., :2] ** 2).sum(-1)
    b = 2 * (oc * d[..., :2]).sum(-1)
    cc = (oc**2).sum(-1) - pillars[:, 2] ** 2
    disc = b * b - 4 * a * cc
    root = np.sqrt(np.maximum(disc, 0))
    s = (-b - root) / (2 * a)  # first entry into the infinite cylinder
    z = c[..., 2] + s * d[..., 2]
    hit = (disc > 0) & (s > 0) & (s < 1) & (z >= 0) & (z <= pillars[:, 3])
    return hit.any(axis=-1)


@dataclass(frozen=True)
class SessionScene:
    """One session: its calibration, 3D keypoints (frames, K, 3) and what each camera sees."""

    cameras: CameraGroup
    points_3d: np.ndarray
    points_2d: np.ndarray  # (views, frames, K, 2) exact projections
    visible: np.ndarray  # (views, frames, K) inside the image and not behind a pillar


def make_session(rng: np.random.Generator, base: CameraGroup, n_frames: int,
                 pillars: np.ndarray = PILLARS) -> SessionScene:
    cameras = perturb_cameras(rng, base)
    points_3d = animal_motion(rng, n_frames, pillars)
    points_2d = cameras.project(points_3d)
    width, height = cameras.cameras[0].size
    inside = ((points_2d >= 0) & (points_2d <= np.array([width - 1, height - 1]))).all(-1)
    centers = np.stack([cam.center for cam in cameras.cameras])
    visible = inside & ~occluded(centers, points_3d, pillars)
    return SessionScene(cameras=cameras, points_3d=points_3d, points_2d=points_2d,
                        visible=visible)
