"""Meshes and turntables from a 3D representation: marching cubes (scikit-image) with vertex colours, written as
.ply / .obj / .glb (trimesh, the ``three_d`` extra), and a turntable GIF rendered by ``rendering.render``.

Every file is written to a temporary file in the destination folder and renamed into place, so a failure leaves no
half-written file.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .rendering import VoxelGrid, orbit_cameras, render

MESH_FORMATS = ("glb", "ply", "obj")


def surface_threshold(representation: VoxelGrid, threshold: float | None) -> float:
    """The density of the surface: ``threshold``, or ``VoxelGrid.occupancy``'s default (one voxel absorbs half the
    light)."""
    return float(np.log(2) / representation.voxel_size) if threshold is None else float(threshold)


@torch.no_grad()
def extract_mesh(representation: VoxelGrid, threshold: float | None = None) -> tuple[np.ndarray, ...]:
    """Marching cubes on the representation's vertex densities at ``threshold``: ``(vertices (V, 3) world xyz,
    faces (F, 3) counter-clockwise seen from outside, colours (V, 3) in [0, 1])``. The grid is padded with empty
    space so that surfaces touching the cube's faces close there. Raises ``ValueError`` for an empty volume (no density
    above the threshold) or a full one (no surface)."""
    from skimage.measure import marching_cubes

    level = surface_threshold(representation, threshold)
    densities = representation.densities().double().numpy()
    if densities.max() <= level:
        raise ValueError(f"empty volume: no density above the surface threshold {level:.4g} (max "
                         f"{densities.max():.4g}); nothing to mesh")
    padded = np.pad(densities, 1, constant_values=0.0)
    spacing = representation.voxel_size
    # skimage returns vertices as (d, h, w) = (z, y, x) positions: flipped to (x, y, z). Its winding for a dense
    # interior ("descent") is clockwise seen from outside in (d, h, w); the flip mirrors the mesh and makes it
    # counter-clockwise, the convention of .ply / .obj / .glb (checked by the mesh's positive volume).
    vertices, faces, _, _ = marching_cubes(padded, level=level, spacing=(spacing,) * 3)
    # the padding's crossings lie outside the cube, where the renderer sees no density: moved onto its faces
    vertices = np.clip(vertices[:, ::-1] - representation.bound - spacing, -representation.bound, representation.bound)
    _, colours = representation.query(torch.from_numpy(vertices.copy()).float())
    return vertices.astype(np.float32), faces.astype(np.int64), colours.clamp(0, 1).numpy()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Calls ``write(temporary_path)`` for a file beside ``path`` with the same suffix, then renames it to ``path``;
    on any error the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp makes the file private; give it a new file's mode
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def import_trimesh():
    """trimesh, or one clear ``ImportError`` naming the extra that installs it."""
    try:
        import trimesh
    except ImportError as error:
        raise ImportError("mesh export needs trimesh: pip install 'diffusers-ext[three_d]'") from error
    return trimesh


def export_mesh(representation: VoxelGrid, path: str | os.PathLike, threshold: float | None = None) -> Path:
    """Writes the representation's surface (``extract_mesh``) with vertex colours to ``path``, a .glb, .ply or .obj
    file chosen by its suffix. Needs trimesh (``pip install diffusers-ext[three_d]``)."""
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in MESH_FORMATS:
        raise ValueError(f"path must end in one of {['.' + f for f in MESH_FORMATS]}, got {path.name!r}")
    trimesh = import_trimesh()
    vertices, faces, colours = extract_mesh(representation, threshold)
    rgba = np.concatenate([colours, np.ones_like(colours[:, :1])], axis=1)
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, vertex_colors=(rgba * 255).round().astype(np.uint8),
                           process=False)
    return write_atomically(path, lambda temporary: mesh.export(temporary, file_type=suffix))


@torch.no_grad()
def turntable_frames(representation: VoxelGrid, num_frames: int = 24, size: int = 96, elevation: float = 15.0,
                     radius: float = 2.5, background: float = 1.0) -> list:
    """``num_frames`` PIL images of the representation from an orbit at ``elevation`` degrees, starting at the
    front."""
    from diffusers.utils import numpy_to_pil

    images = render(representation, orbit_cameras(num_frames, elevation=elevation, radius=radius), size, size,
                    background=background)
    return numpy_to_pil(images.permute(0, 2, 3, 1).clamp(0, 1).numpy())


def export_turntable(representation: VoxelGrid, path: str | os.PathLike, num_frames: int = 24, size: int = 96,
                     fps: int = 12, **orbit) -> Path:
    """A turntable GIF of ``turntable_frames`` at ``path`` (a .gif)."""
    from diffusers.utils import export_to_gif

    path = Path(path)
    if path.suffix.lower() != ".gif":
        raise ValueError(f"path must end in .gif, got {path.name!r}")
    frames = turntable_frames(representation, num_frames, size, **orbit)
    return write_atomically(path, lambda temporary: export_to_gif(frames, str(temporary), fps=fps))
