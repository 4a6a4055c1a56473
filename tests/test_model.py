"""F-LMM end to end on tiny real models: shapes, frames, what trains, heads checkpoints."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_image

from flmm.build import build_flmm, build_sam, load_heads, sam_config
from flmm.convert import to_flmm_state_dict
from flmm.heads import save_heads
from flmm.lmm import FrozenLMM
from flmm.model import grounding_loss

ROOT = Path(__file__).resolve().parents[1]

IMAGES = [
    ((40, 70), ["the red circle", "a small blue square below the big green triangle"]),
    ((60, 30), ["the yellow star"]),
]


@pytest.fixture
def flmm(tiny_llava_dir):
    torch.manual_seed(0)
    return build_flmm(FrozenLMM.from_pretrained(str(tiny_llava_dir)), build_sam(sam_config("tiny")))


def _inputs(model):
    return [model.prepare(random_image(h, w, seed=i), ph) for i, ((h, w), ph) in enumerate(IMAGES)]


def _gt(model, inputs):
    masks = []
    for x in inputs:
        g = x.lmm.geometry
        m = torch.zeros((len(x.lmm.phrase_tokens), g.height, g.width))
        m[:, : g.height // 2, : g.width // 2] = 1
        masks.append(m)
    return masks


def test_outputs_are_in_the_documented_frames(flmm):
    inputs = _inputs(flmm)
    with torch.inference_mode():
        outputs = flmm(inputs)
    for x, out, ((h, w), phrases) in zip(inputs, outputs, IMAGES):
        assert out.coarse.shape == out.refined.shape == (len(phrases), 1, h, w)
        # U-Net: 4×4 grid upsampled to 64×64 in the square frame, cropped to the image region
        side = max(h, w)
        assert out.unet.shape[-2:] == (int(64 * h / side + 0.5), int(64 * w / side + 0.5))
        assert torch.isfinite(out.refined).all()


def test_gradients_reach_the_heads_only(flmm):
    inputs = _inputs(flmm)
    loss = grounding_loss(flmm(inputs), _gt(flmm, inputs))
    assert set(loss) == {"unet_bce", "unet_dice", "sam_bce", "sam_dice", "total"}
    loss["total"].backward()
    heads = flmm.heads
    for name, module in [
        ("U-Net", heads.mask_decoder),
        ("SAM prompt encoder", heads.refiner.prompt_encoder),
        ("SAM mask decoder", heads.refiner.mask_decoder),
        ("text proj", heads.refiner.text_proj),
    ]:
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), name
    assert heads.refiner.text_layer_weights.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in flmm.lmm.parameters())
    assert all(p.grad is None and not p.requires_grad for p in flmm.image_encoder.parameters())


def test_a_few_steps_reduce_the_loss(flmm):
    inputs = _inputs(flmm)
    gt = _gt(flmm, inputs)
    with torch.inference_mode():
        lmm_out, embeddings = flmm.encode(inputs)
    attention = [a.clone() for a in lmm_out.attention]
    hidden = [[h.clone() for h in hh] for hh in lmm_out.hidden]
    embeddings = embeddings.clone()
    optim = torch.optim.AdamW([p for p in flmm.heads.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(20):
        loss = grounding_loss(flmm.decode(inputs, attention, hidden, embeddings), gt)["total"]
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_heads_checkpoint_round_trip_gives_identical_masks(tiny_llava_dir, tmp_path):
    torch.manual_seed(0)
    sam = build_sam(sam_config("tiny"))
    sam_path = tmp_path / "sam.pth"
    torch.save(sam.state_dict(), sam_path)
    flmm = build_flmm(FrozenLMM.from_pretrained(str(tiny_llava_dir)), sam)
    path = save_heads(flmm.heads, tmp_path / "heads.safetensors")
    torch.manual_seed(123)  # heads of the second model start from a different random init
    sam = build_sam(sam_config("tiny"), sam_path)
    other = build_flmm(FrozenLMM.from_pretrained(str(tiny_llava_dir)), sam, path)
    inputs = _inputs(flmm)
    with torch.inference_mode():
        a, b = flmm(inputs), other(inputs)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.refined, y.refined)


def test_narrow_unet_checkpoint_builds_a_unet_of_its_width(tiny_llava_dir, tmp_path):
    from flmm.build import HeadsConfig, build_heads
    from flmm.model import FLMM

    lmm = FrozenLMM.from_pretrained(str(tiny_llava_dir))
    sam = build_sam(sam_config("tiny"))
    config = HeadsConfig(lmm.num_layers, lmm.num_heads, lmm.hidden_size, unet_base_channels=16)
    torch.manual_seed(5)
    narrow = build_heads(config, sam).eval()
    path = save_heads(narrow, tmp_path / "narrow.safetensors")
    loaded = build_flmm(lmm, sam, path)
    assert loaded.heads.mask_decoder.conv_seg.in_channels == 16
    reference = FLMM(lmm, loaded.image_encoder, narrow)
    inputs = _inputs(loaded)
    with torch.inference_mode():
        for x, y in zip(loaded(inputs), reference(inputs)):
            torch.testing.assert_close(x.unet, y.unet)
    with pytest.raises(ValueError, match="mask_decoder"):  # a 64-wide U-Net refuses it
        load_heads(build_flmm(lmm, sam).heads, path)


def test_heads_checkpoint_with_wrong_shapes_is_refused(flmm, tmp_path):
    state = dict(flmm.heads.state_dict())
    state["refiner.text_layer_weights"] = torch.ones(7)
    del state["mask_decoder.conv_seg.bias"]
    from flmm.checkpoint import save_tensors

    path = save_tensors(state, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="refiner.text_layer_weights") as err:
        load_heads(flmm.heads, path)
    assert "mask_decoder.conv_seg.bias" in str(err.value)


def test_flmm_release_checkpoint_loads_directly_and_through_the_cli(flmm, tiny_llava_dir, tmp_path):
    theirs = to_flmm_state_dict(flmm.heads.state_dict())
    theirs["sam.model.image_encoder.patch_embed.proj.weight"] = torch.zeros(3)
    src = tmp_path / "flmm_release.pth"
    torch.save({"state_dict": theirs, "meta": {"note": "mmengine-style wrapper"}}, src)

    before = {k: v.clone() for k, v in flmm.heads.state_dict().items()}
    with torch.no_grad():
        for p in flmm.heads.parameters():
            p.zero_()
    load_heads(flmm.heads, src)  # converted on the fly
    for k, v in flmm.heads.state_dict().items():
        torch.testing.assert_close(v, before[k])

    # a release saved with trainable parameters only lacks SAM's buffer: the one the heads were
    # built with (their SAM's) is kept, with a warning
    pe = "sam.model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    partial = tmp_path / "trainable_only.pth"
    torch.save({k: v for k, v in theirs.items() if k != pe}, partial)
    with torch.no_grad():
        for p in flmm.heads.parameters():
            p.zero_()
    with pytest.warns(UserWarning, match="lacks SAM's refiner.prompt_encoder.pe_layer"):
        load_heads(flmm.heads, partial)
    for k, v in flmm.heads.state_dict().items():
        torch.testing.assert_close(v, before[k])

    dst = tmp_path / "converted.safetensors"
    run = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "convert.py"), str(src), str(dst), "--sam", "tiny"]
        + ["--lmm", str(tiny_llava_dir)],  # D 64: no head dim of 128 to infer the heads from
        check=False,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "dropped 1" in run.stdout
    load_heads(flmm.heads, dst)
    for k, v in flmm.heads.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_without_autocast_dtype_a_callers_autocast_stays_in_force(flmm):
    """Training wraps the model in its own autocast; the model must not switch it off."""
    x = _inputs(flmm)[0]
    with torch.inference_mode():
        plain = flmm.embed(x.sam_pixels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under_autocast = flmm.embed(x.sam_pixels)
    assert not torch.equal(plain, under_autocast)  # bf16 matmuls ran: the autocast held
