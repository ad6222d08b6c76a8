"""3D pipelines: multi-view diffusion and score distillation to meshes, and 3D inverse problems solved with 2D
diffusion priors on slices."""
