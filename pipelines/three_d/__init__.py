"""3D pipelines: multi-view diffusion and score distillation to meshes, and 3D inverse problems solved with 2D
diffusion priors on slices."""

from .mesh_export import export_mesh, export_turntable, extract_mesh
from .multiview_attention import (
    CameraEmbedding,
    MultiViewAttnProcessor,
    add_multiview_attention,
    attach_camera_embedding,
    detach_camera_embedding,
    make_multiview,
    remove_multiview,
    remove_multiview_attention,
    single_view_attention,
)
from .pipeline_diffusion_mbir import DiffusionMBIRPipeline, DiffusionMBIRPipelineOutput, volume_montage
from .pipeline_multiview import MultiViewDiffusionPipeline, MultiViewPipelineOutput, view_grid
from .rendering import (
    VoxelGrid,
    camera_azimuth_elevation,
    fit_voxel_grid,
    orbit_cameras,
    random_cameras,
    render,
    voxel_iou,
)
from .score_distillation import (
    DistillationPrior,
    MultiViewPrior,
    ScoreDistillation,
    ScoreDistillationOutput,
    TextToImagePrior,
)
from .shapes import Box, Cylinder, Sphere, random_shape, voxelize
from .volume_operators import (
    ParallelBeamProjection,
    ThroughPlaneDownsampling,
    VolumeMask,
    filtered_back_projection,
    interpolate_through_plane,
    limited_angle_angles,
    sparse_view_angles,
)

__all__ = ["Box", "CameraEmbedding", "Cylinder", "DiffusionMBIRPipeline", "DiffusionMBIRPipelineOutput",
           "DistillationPrior", "MultiViewAttnProcessor", "MultiViewDiffusionPipeline", "MultiViewPipelineOutput", "MultiViewPrior",
           "ParallelBeamProjection", "ScoreDistillation", "ScoreDistillationOutput", "Sphere", "TextToImagePrior",
           "ThroughPlaneDownsampling", "VolumeMask", "VoxelGrid", "add_multiview_attention",
           "attach_camera_embedding", "camera_azimuth_elevation", "detach_camera_embedding", "export_mesh",
           "export_turntable", "extract_mesh", "filtered_back_projection", "fit_voxel_grid", "interpolate_through_plane",
           "limited_angle_angles", "make_multiview", "orbit_cameras", "random_cameras", "random_shape",
           "remove_multiview", "remove_multiview_attention", "render", "single_view_attention", "sparse_view_angles",
           "view_grid", "volume_montage", "voxel_iou", "voxelize"]
