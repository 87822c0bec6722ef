"""A procedural world for pretraining a tiny Stable-Diffusion-architecture model on a CPU: small scenes of
robots (OpenPose-18 keypoints), dogs (a custom quadruped skeleton) and vases, in the contexts DreamBench's
prompts name, each with its ground truth (attributes, pose, keypoints, caption) and deterministic for a
seed. Drawn bold enough to read at 64 px (REFERENCE.md section 10).

    from posebooth.world import iter_scenes, render, caption
    for scene in iter_scenes(seed=0, n=1000):
        image, keypoints = render(scene, size=64)
"""

from posebooth.world.backgrounds import CONTEXTS, Context
from posebooth.world.drawing import PALETTE
from posebooth.world.scenes import (
    CLASSES,
    SUBJECT,
    Instance,
    Placement,
    Scene,
    background,
    caption,
    iter_scenes,
    keypoints_xy,
    render,
    sample_instance,
    sample_placement,
    sample_scene,
    scene_pose,
    subject_photos,
)

__all__ = [
    "CLASSES",
    "CONTEXTS",
    "PALETTE",
    "SUBJECT",
    "Context",
    "Instance",
    "Placement",
    "Scene",
    "background",
    "caption",
    "iter_scenes",
    "keypoints_xy",
    "render",
    "sample_instance",
    "sample_placement",
    "sample_scene",
    "scene_pose",
    "subject_photos",
]
