"""The memory plan against measured peaks: per LMM family, mode and batch size.

For every family a tiny random checkpoint of the real classes (``flmm.tiny_lmms``), a tiny SAM
and random heads with a keyword selector that tags every token (so that captions and
descriptions have phrases to ground) run the model stage's own path
(``pipeline.grounding.GroundingActor.run``) on B copies of one image, under ``flmm.peak``'s
tracker of live tensor bytes, stage by stage; ``flmm.memory.estimate`` is made from the configs
for the workload that ran (phrases, their tokens, the text's tokens: counts read from the run).

    python bench/memory.py [--families llava qwen3_vl] [--size mid] [--device cuda] [--json out.json]

Modes: ``given`` (phrases given, one prefill), ``caption`` (a caption's spans picked by the
selector and grounded in place), ``describe`` (an image-only sample: a description generated,
its spans picked and grounded listed, in a second prefill). Prints one table (MB; ratio =
estimate / measured) and writes the rows as JSON; ``tests/test_memory.py`` runs it and holds
every ratio within 20%.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from flmm.build import build_flmm, build_sam, sam_config
from flmm.heads import save_heads
from flmm.lmm import FrozenLMM
from flmm.memory import Workload, estimate
from flmm.peak import measure, module_bytes
from flmm.selector import SelectorConfig, tagging_every_token
from flmm.shapes import model_shapes
from flmm.tiny_lmms import MODEL_TYPES, TinyLMMConfig, write_tiny_lmm
from pipeline.grounding import GroundingActor
from pipeline.spec import ModelSpec

CORPUS = [
    "the red circle on the left",
    "a small blue square below the big green triangle",
    "Please give me a description of the image.",
] * 10
PHRASES = ["the red circle", "a small blue square"]
CAPTION = "a small blue square below the big green triangle"
IMAGE = (96, 128)  # H, W
NEW_TOKENS = 12
CASES = (("given", 1), ("given", 3), ("caption", 2), ("describe", 2))
STAGES = {"describe_s": "generate", "lmm_s": "lmm", "sam_s": "sam", "heads_s": "heads"}
SIZES = {  # tiny: the tests' checkpoints; mid: the LMM's stages ~4× larger (4 layers × 8 heads,
    # hidden 256, 112 px images), closer to the heads' share
    "tiny": TinyLMMConfig(),
    "mid": TinyLMMConfig(
        text_hidden=256,
        text_layers=4,
        text_heads=8,
        text_kv_heads=4,
        text_intermediate=704,
        vision_hidden=64,
        image_size=112,
    ),
}


def tiny_spec(model_type: str, out: Path, size: str = "tiny", device: str = "cpu") -> ModelSpec:
    """A ``size`` checkpoint of ``model_type``, tiny SAM and random heads whose selector tags
    every token (each token of a text its own span), written under ``out``."""
    lmm_dir = write_tiny_lmm(model_type, CORPUS, out / model_type, SIZES[size])
    torch.manual_seed(0)
    sam = build_sam(sam_config("tiny"))
    lmm = FrozenLMM.from_pretrained(str(lmm_dir))
    heads = build_flmm(lmm, sam).heads
    heads.selector = tagging_every_token(SelectorConfig(lmm.num_layers, lmm.hidden_size))
    path = save_heads(heads, out / f"{model_type}.safetensors")
    return ModelSpec(str(lmm_dir), "tiny", heads=str(path), device=device)


def rows_of(mode: str, batch: int) -> list[dict]:
    """B decoded rows of ``mode``, as the model stage reads them."""
    row = {"source": "given", "phrases": PHRASES, "text": "", "question": "", "warning": ""}
    if mode == "caption":
        row = {**row, "source": "caption", "phrases": [], "text": CAPTION}
    elif mode == "describe":
        row = {**row, "source": "generated", "phrases": []}
    return [dict(row) for _ in range(batch)]


def workload_of(mode: str, actor: GroundingActor, texts, selections) -> Workload:
    """The workload a run asked for, counted from it: its phrases per image, their most tokens,
    its text's tokens (all images alike: B copies of one image)."""
    tokenizer = actor.model.lmm.processor.tokenizer

    def tokens(text: str) -> int:
        return len(tokenizer(" " + text, add_special_tokens=False)["input_ids"])

    if mode == "given":
        return Workload(len(PHRASES), max(map(tokens, PHRASES)), image_size=IMAGE)
    text = texts[0].text
    spans = [text[a:b] for a, b in selections[0].spans] if selections else []
    return Workload(
        phrases=len(spans),
        phrase_tokens=max(map(tokens, spans), default=1),
        text_tokens=tokens(text),
        listed=mode == "describe",
        new_tokens=NEW_TOKENS if mode == "describe" else 0,
        image_size=IMAGE,
    )


def run_case(spec: ModelSpec, model, mode: str, batch: int) -> dict:
    """One (mode, batch): measured and estimated bytes, stage by stage and at the peak."""
    layout = "listed" if mode == "describe" else "in-place"
    actor = GroundingActor(spec, model=model, caption_layout=layout, max_new_tokens=NEW_TOKENS)
    image = torch.randint(0, 256, (*IMAGE, 3), dtype=torch.uint8, generator=torch.Generator())
    rows = rows_of(mode, batch)
    device = torch.device(spec.resolved_device())
    (texts, _, selections, _), measured = measure(
        lambda clock: actor.run(rows, [image] * batch, clock), device
    )
    work = workload_of(mode, actor, texts, selections)
    shapes = model_shapes(spec.lmm, sam_config(spec.sam_variant), spec.heads, torch.float32,
                          image_size=IMAGE)  # fmt: skip
    est = estimate(*shapes, work, batch)
    weights = module_bytes(model)
    stages = {STAGES[k]: v for k, v in measured.stages.items() if k in STAGES and v}
    if work.phrases == 0:  # (a description with nothing picked: no heads ran)
        stages.pop("heads", None)
    return {
        "mode": mode,
        "batch": batch,
        "phrases": work.phrases,
        "weights": weights,
        "weights_estimate": est.weights,
        "stages": stages,
        "stages_estimate": {k: est.stages[k] for k in stages},
        "peak": weights + measured.tensors,
        "peak_estimate": est.peak,
        "cuda_peak": None if measured.cuda is None else weights + measured.cuda,
    }


def ratios(row: dict) -> dict[str, float]:
    """estimate / measured: at the peak and per stage that ran."""
    out = {"peak": row["peak_estimate"] / row["peak"]}
    for stage, value in row["stages"].items():
        out[stage] = row["stages_estimate"][stage] / value
    return out


def report(rows: list[dict]) -> None:
    mb = 1e6
    print("| family | mode | B | P | weights MB | peak MB (measured / estimate) | ratio | "
          "stages: estimate / measured |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        stages = ", ".join(f"{k} {v:.2f}" for k, v in ratios(r).items() if k != "peak")
        if r["cuda_peak"] is not None:
            stages += f"; cuda allocator peak {r['cuda_peak'] / mb:.1f} MB"
        print(
            f"| {r['family']} | {r['mode']} | {r['batch']} | {r['phrases']} | "
            f"{r['weights'] / mb:.1f} | {r['peak'] / mb:.1f} / {r['peak_estimate'] / mb:.1f} | "
            f"{ratios(r)['peak']:.3f} | {stages} |"
        )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--families", nargs="+", default=list(MODEL_TYPES), choices=MODEL_TYPES)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="the LMMs' size")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (also reads the allocator's peak)")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            spec = tiny_spec(family, Path(tmp), args.size, args.device)
            model = spec.build()
            rows += [{"family": family, **run_case(spec, model, *case)} for case in CASES]
    report(rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
