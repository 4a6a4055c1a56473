"""Signal check: do a frozen LMM's phrase→image attention maps carry grounding? (F-LMM's premise)

A small fixed head (conv3×3 → ReLU → conv1×1) is trained briefly on the captured attention maps
``[L·H, h, w]`` of toy-world phrases and scored by held-out mIoU at the original resolution. Run
on the pretrained toy LMM and on its random-init control, same scenes, same head, same budget:

    python -m toyworld.signal --lmm models/toy/llava [--train 1500 --test 300 --epochs 15]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flmm.geometry import ImageGeometry
from flmm.lmm import FrozenLMM
from flmm.losses import dice_loss
from toyworld.scenes import make_scene, scene_seed
from toyworld.vqa import TOY_PROMPT

TEST_OFFSET = 1_000_000  # held-out scenes use indices from here on
SIDE = 64  # head output side in the square frame


def phrase_maps(lmm: FrozenLMM, indices: range, seed: int, batch: int = 16):
    """Attention maps, GT masks and geometries of one expression per object of each scene.

    Returns maps ``[N, L·H, h, w]`` float32, masks: N bool ``[H, W]``, geometries: N.
    """
    maps, masks, geometries = [], [], []
    rng = np.random.default_rng(seed)
    scenes = [make_scene(scene_seed(seed, i)) for i in indices]
    for start in range(0, len(scenes), batch):
        chunk = scenes[start : start + batch]
        samples = []
        for scene in chunk:
            phrases = [o.expressions[rng.integers(len(o.expressions))] for o in scene.objects]
            samples.append(lmm.prepare(torch.from_numpy(scene.image), phrases))
            masks.extend(o.mask for o in scene.objects)
            geometries.extend(samples[-1].geometry for _ in scene.objects)
        with torch.inference_mode():
            maps.extend(lmm(samples).attention)
    return torch.cat(maps), masks, geometries


def square_targets(masks, geometries) -> torch.Tensor:
    """GT masks placed in the square frame and resized (nearest) to ``[N, 1, SIDE, SIDE]``."""
    out = []
    for mask, g in zip(masks, geometries):
        square = g.paste(torch.from_numpy(mask).float())
        out.append(F.interpolate(square[None, None], (SIDE, SIDE), mode="nearest")[0])
    return torch.stack(out)


class ConvHead(nn.Module):
    """``[N, C, h, w]`` attention maps (each summing to 1) → ``[N, 1, SIDE, SIDE]`` logits."""

    def __init__(self, in_channels: int, hidden: int = 64):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.out = nn.Conv2d(hidden, 1, 1)

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        x = maps * maps.shape[-1] * maps.shape[-2]  # mean 1 per channel
        x = self.out(torch.relu(self.conv(x)))
        return F.interpolate(x, (SIDE, SIDE), mode="bilinear")


def train_head(maps, targets, epochs: int, seed: int) -> ConvHead:
    torch.manual_seed(seed)
    head = ConvHead(maps.shape[1])
    optim = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    for _ in range(epochs):
        for idx in torch.randperm(len(maps)).split(32):
            logits = head(maps[idx])
            loss = F.binary_cross_entropy_with_logits(logits, targets[idx])
            loss = loss + dice_loss(logits, targets[idx])
            optim.zero_grad()
            loss.backward()
            optim.step()
    return head


def miou(head: ConvHead, maps, masks, geometries: list[ImageGeometry]) -> float:
    """Mean IoU at the original resolution (logit > 0); an empty union counts 0."""
    with torch.inference_mode():
        logits = head(maps)
    ious = []
    for logit, mask, g in zip(logits, masks, geometries):
        pred = g.to_original(logit[None])[0, 0] > 0
        gt = torch.from_numpy(mask)
        union = (pred | gt).sum().item()
        ious.append((pred & gt).sum().item() / union if union else 0.0)
    return float(np.mean(ious))


def signal(lmm_path: str, n_train: int, n_test: int, epochs: int, seed: int) -> dict:
    """Train the head on ``n_train`` scenes' maps from ``lmm_path``; held-out mIoU and timings."""
    start = time.perf_counter()
    lmm = FrozenLMM.from_pretrained(lmm_path, prompt=TOY_PROMPT)
    train = phrase_maps(lmm, range(n_train), seed)
    test = phrase_maps(lmm, range(TEST_OFFSET, TEST_OFFSET + n_test), seed)
    extract = time.perf_counter() - start
    head = train_head(train[0], square_targets(train[1], train[2]), epochs, seed)
    return {
        "miou": miou(head, *test),
        "train_phrases": len(train[0]),
        "test_phrases": len(test[0]),
        "extract_s": extract,
        "total_s": time.perf_counter() - start,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--lmm", default="models/toy/llava")
    p.add_argument("--train", type=int, default=1500)
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(2)
    from toyworld.lmm import write_control

    results = {"pretrained": signal(args.lmm, args.train, args.test, args.epochs, args.seed)}
    with tempfile.TemporaryDirectory() as tmp:
        control = write_control(Path(tmp) / "control", args.seed)
        results["random_init"] = signal(str(control), args.train, args.test, args.epochs, args.seed)
    for name, r in results.items():
        print(
            f"{name:12s} held-out mIoU {r['miou']:.3f}  ({r['train_phrases']} train / "
            f"{r['test_phrases']} test phrases, {r['total_s']:.0f}s)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
