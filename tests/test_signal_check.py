"""The signal-check head learns from maps that carry the objects, and not from noise."""

import torch
import torch.nn.functional as F

from flmm.geometry import ImageGeometry
from toyworld.scenes import make_scene, scene_seed
from toyworld.signal import miou, square_targets, train_head


def _data(n_scenes: int, seed: int, planted: bool):
    masks, geometries = [], []
    for i in range(n_scenes):
        scene = make_scene(scene_seed(seed, i))
        g = ImageGeometry.square(*scene.image.shape[:2])
        masks.extend(o.mask for o in scene.objects)
        geometries.extend(g for _ in scene.objects)
    targets = square_targets(masks, geometries)
    g = torch.Generator().manual_seed(seed)
    if planted:  # a 16×16 "attention map" that is the object's own blurred mask, on 4 channels
        maps = F.adaptive_avg_pool2d(targets, 16).repeat(1, 4, 1, 1) + 1e-3
    else:
        maps = torch.rand((len(masks), 4, 16, 16), generator=g)
    maps = maps / maps.sum((-2, -1), keepdim=True)
    return maps, targets, masks, geometries


def test_head_finds_objects_in_informative_maps_and_not_in_noise():
    scores = {}
    for planted in (True, False):
        maps, targets, _, _ = _data(60, seed=1, planted=planted)
        test_maps, _, test_masks, test_geometries = _data(20, seed=2, planted=planted)
        head = train_head(maps, targets, epochs=15, seed=0)
        scores[planted] = miou(head, test_maps, test_masks, test_geometries)
    assert scores[True] > 0.5
    assert scores[True] > scores[False] + 0.3, scores
