"""A contact sheet of what the world's pretrained base model draws: prompts x seeds without a pose, and
target poses through its OpenPose ControlNet, to look at after `make world`.

Usage: python scripts/world_contact_sheet.py [--out plots/world_base_samples.png] [--steps 25]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "a photo of a red robot on the beach",
    "a photo of a blue robot in the snow",
    "a photo of a yellow dog on top of green grass with sunflowers around it",
    "a photo of a green vase on top of a wooden floor",
    "a photo of a purple robot with a city in the background",
    "a photo of a white dog floating on top of water",
    "a photo of a robot",
    "a photo of a dog in the jungle",
]
POSES = ["data/target_poses/standing.json", "data/target_poses/arms_up.json", "data/target_poses/t_pose.json"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="plots/world_base_samples.png")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--seeds", type=int, default=4)
    args = ap.parse_args()

    from posebooth.generation import generate
    from posebooth.grid import contact_sheet
    from posebooth.models import load_components, load_controlnet, sd_pipeline
    from posebooth.poses import load_pose, render_pose

    comp = load_components("embedded:world")
    free = sd_pipeline(comp, "ddim")
    posed = sd_pipeline(comp, "ddim", load_controlnet("embedded:world-openpose"))
    seeds = list(range(args.seeds))
    common = dict(steps=args.steps, guidance_scale=6.0, resolution=64, negative_prompt="")
    rows = [(p, [None, *generate(free, p, seeds, **common)]) for p in PROMPTS]
    for path in POSES:
        pose_map = render_pose(load_pose(ROOT / path), 64, 256)  # as the world profile draws them (render_size)
        prompt = "a photo of a red robot on the beach"
        images = generate(posed, prompt, seeds, control_image=pose_map, **common)
        rows.append((f"{prompt} | pose: {Path(path).stem}", [pose_map, *images]))
    sheet = contact_sheet(rows, ["target pose"] + [f"seed {s}" for s in seeds])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
