"""Evaluation: per-voxel r over time, noise ceilings, the ridge baseline, maps and plots."""
