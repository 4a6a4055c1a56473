"""Head training on Ray Train: the worker loop (heads only, DDP) and its checkpoints.

The frozen encoders run upstream in Ray Data actors (``pipeline.encode``); every worker of the
``TorchTrainer`` receives ``ImageFeatures`` blobs from its split of that stream and trains the
F-LMM heads — U-Net, text layer weights / projection, SAM prompt encoder + mask decoder — with
F-LMM's loss and recipe (``flmm.optim``). When training samples carry captions with their
groundable spans, a keyword selector (``flmm.selector``) is trained beside the heads on the
captions' token hidden states (its loss added to F-LMM's) and saved in the same heads file.
A run may also train the selector alone (``train="selector"``) on top of given heads: the frozen
stage then prefills only the captions (``TextFeatures``, no SAM), the workers train only the
selector's parameters, and the output is the given heads file's tensors as stored plus the
selector's.

Every worker runs exactly ``steps_per_epoch`` steps per epoch (the stream is split equally and a
worker stops at that count), so DDP's collectives always pair up. A checkpoint directory holds

    heads.safetensors   the heads' state dict (``flmm.heads.save_heads``)
    trainer.pt          optimizer + schedule state and the global step (``weights_only`` loadable)

and is reported through ``ray.train.report``. A worker that restarts after a failure, or a rerun
of the same run (same name and storage path), resumes from the latest one; within an epoch it
skips the batches already trained on.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs
import torch
from safetensors.torch import load_file
from torch.nn.utils.rnn import pad_sequence

from flmm.build import (
    HeadsConfig,
    build_heads,
    build_sam,
    load_heads,
    read_heads_file,
    sam_config,
    warn_if_other_prompt,
)
from flmm.checkpoint import read_metadata, save_tensors
from flmm.families import family_for
from flmm.heads import FLMMHeads, heads_dims, save_heads
from flmm.model import grounding_loss
from flmm.optim import OptimConfig, build_optimizer, step
from flmm.prompt import PROMPT_KEY
from flmm.selector import PREFIX, KeywordSelector, SelectorConfig, tag_loss
from pipeline.features import ImageFeatures, TextFeatures
from pipeline.spec import ModelSpec
from pipeline.uri import absolute, filesystem, is_uri

HEADS_FILE = "heads.safetensors"
STATE_FILE = "trainer.pt"


@dataclass(frozen=True)
class Recipe:
    """A named set of training settings (``jobs/train.py --recipe``; its flags override each).

    epochs; batch_size: images per worker per step; lr: AdamW's base lr (``flmm.optim``);
    unet_channels: the U-Net's level-0 width; loss_weighting: ``"masks"`` | ``"images"``
    (``flmm.model.grounding_loss``); loss_target: ``"lmm"`` (targets through the LMM's input
    frame) | ``"original"`` (``flmm.losses.mask_losses``); redraw_expressions: draw each
    object's expression afresh every epoch instead of once (``pipeline.encode``).
    """

    name: str
    epochs: int
    batch_size: int
    lr: float
    unet_channels: int
    loss_weighting: str
    loss_target: str
    redraw_expressions: bool


# F-LMM's recipe, every config of theirs alike (configs/*/frozen_*_refcoco_png.py: max_epochs 8,
# batch_size 1 per device on 8 GPUs (README: NPROC_PER_NODE=8), lr 1e-4, UNetHead
# base_channels 64); loss as FrozenLlavaSAM.compute_loss (flmm/models/frozen_llava.py); the
# RefCOCO expression drawn once (mmdet's RefCocoDataset, text_mode 'random'). Give it 8 workers
# of one GPU each for their global batch of 8.
FLMM_RECIPE = Recipe("flmm", 8, 1, 1e-4, 64, "masks", "lmm", False)
LOSS_TARGETS = ("lmm", "original")
# What a run trains: "all": the heads (and a keyword selector when samples have captions);
# "selector": the keyword selector alone, on top of given heads that stay as they are.
TRAIN_PARTS = ("all", "selector")


@dataclass(frozen=True)
class TrainConfig:
    """What a worker needs. ``batch_size``: images per worker per step; ``selector``: train a
    keyword selector of this config beside the heads (None: none, unless ``init_heads`` has
    one: it is then kept as it is); ``loss_weighting``, ``loss_target``: see ``Recipe``;
    ``train``: ``TRAIN_PARTS`` (``"selector"``: only the selector's parameters train, on
    ``TextFeatures``)."""

    heads: HeadsConfig
    sam_variant: str
    sam_checkpoint: str | None
    epochs: int
    steps_per_epoch: int
    batch_size: int
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    init_heads: str | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    selector: SelectorConfig | None = None
    loss_weighting: str = FLMM_RECIPE.loss_weighting
    loss_target: str = FLMM_RECIPE.loss_target
    train: str = "all"

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def build_trainable_heads(config: TrainConfig) -> FLMMHeads:
    """Heads on SAM's pretrained prompt encoder / mask decoder (its image encoder is not kept),
    a seeded random U-Net (and a fresh selector if configured), or ``init_heads`` when given
    (its selector, if it has one, replaces the fresh one). With ``train="selector"`` every
    parameter but the selector's is frozen."""
    torch.manual_seed(config.seed)
    sam = build_sam(sam_config(config.sam_variant), config.sam_checkpoint)
    heads = build_heads(config.heads, sam)
    if config.selector is not None:
        heads.selector = KeywordSelector(config.selector)
    if config.init_heads:
        load_heads(heads, config.init_heads)
    if config.train == "selector":
        heads.requires_grad_(False)
        heads.selector.requires_grad_(True)
    return heads.train()


def train_on_batch(
    model: torch.nn.Module,
    features: list[ImageFeatures],
    device: torch.device,
    weighting: str = FLMM_RECIPE.loss_weighting,
    target: str = FLMM_RECIPE.loss_target,
) -> dict[str, torch.Tensor]:
    """Heads forward over one batch of images and F-LMM's loss parts (BCE + Dice, U-Net and
    refined). ``model`` is ``FLMMHeads`` or its DDP wrapper; ``weighting``, ``target``: the
    loss's mask weighting and target frame (``Recipe.loss_weighting`` / ``loss_target``)."""
    if target not in LOSS_TARGETS:
        raise ValueError(f"loss target {target!r}: one of {LOSS_TARGETS}")
    text_hidden = [_text_hidden(f, model) for f in features]
    outputs = model(
        [f.attention.float() for f in features],
        [[h.float() for h in f.hidden] for f in features],
        torch.stack([f.embedding for f in features]).to(device, torch.float32),
        [f.geometry for f in features],
        [f.sam_input_size for f in features],
        text_hidden=text_hidden,
    )
    tags = [f.text_tags if h is not None else None for f, h in zip(features, text_hidden)]
    sizes = [f.lmm_pixels for f in features] if target == "lmm" else None
    masks = [f.masks.float() for f in features]
    return grounding_loss(outputs, masks, tags, weighting, sizes)


def train_selector_on_batch(
    selector: torch.nn.Module, features: list[TextFeatures], device: torch.device
) -> dict[str, torch.Tensor]:
    """The keyword selector alone (``KeywordSelector`` or its DDP wrapper) over one batch of
    captions: one forward of their hidden states padded to ``[B, T, L, D]`` (padding masked:
    real tokens' logits as unpadded), ``flmm.selector.tag_loss`` as ``selector`` and ``total``."""
    lengths = [len(f.tags) for f in features]
    hidden = pad_sequence([f.hidden for f in features], batch_first=True)
    mask = torch.arange(hidden.shape[1])[None] < torch.tensor(lengths)[:, None]
    logits = selector(hidden.to(device, torch.float32), mask.to(device))
    loss = tag_loss([logits[b, :n] for b, n in enumerate(lengths)], [f.tags for f in features])
    return {"selector": loss, "total": loss}


def _text_hidden(features: ImageFeatures, model: torch.nn.Module) -> torch.Tensor | None:
    """The image's caption hidden states for the selector, if both exist (a run without a
    selector ignores the captions)."""
    heads = getattr(model, "module", model)  # DDP wraps the heads
    if features.text_hidden is None or heads.selector is None:
        return None
    return features.text_hidden.float()


def save_checkpoint(directory: Path, heads: FLMMHeads, optim, schedule, global_step: int) -> None:
    save_heads(heads, directory / HEADS_FILE, {"step": str(global_step)})
    state = {"optimizer": optim.state_dict(), "schedule": schedule.state_dict()}
    torch.save({**state, "step": global_step}, directory / STATE_FILE)


def restore_training_state(directory: Path, heads: FLMMHeads) -> dict:
    """Load the heads in place; returns the trainer state (optimizer, schedule, step)."""
    load_heads(heads, directory / HEADS_FILE)
    return torch.load(directory / STATE_FILE, weights_only=True)


def train_loop_per_worker(loop_config: dict) -> None:
    """The ``TorchTrainer`` worker function (``loop_config = {"config": TrainConfig}``): the
    recipe, step by step (each step is a method of ``_WorkerRun``)."""
    run = _WorkerRun(loop_config["config"])
    while not run.finished:
        for features, seconds in run.remaining_batches():
            parts, grad_norm = run.train_step(features)
            run.report(parts, run.metrics(parts, grad_norm, len(features), seconds))
            if run.finished:
                break


class _WorkerRun:
    """One DDP worker's training state: heads (restored from Ray Train's latest checkpoint when
    there is one), optimizer, schedule, the global step, and this worker's data shard."""

    def __init__(self, config: TrainConfig):
        import ray.train
        import ray.train.torch

        self.config = config
        self.selector_only = config.train == "selector"
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.heads = build_trainable_heads(config)
        state = self._restore()
        if self.selector_only:  # DDP over what trains; the frozen rest never runs
            self.model = ray.train.torch.prepare_model(self.heads.selector)
        else:  # SAM's IoU head and multimask tokens get no gradient (single-mask output).
            self.model = ray.train.torch.prepare_model(
                self.heads, parallel_strategy_kwargs={"find_unused_parameters": True}
            )
        self.optim, self.schedule = build_optimizer(self.heads, config.total_steps, config.optim)
        self.global_step = self.resumed_from = 0
        if state is not None:
            self._resume(state)
        self.shard = ray.train.get_dataset_shard("train")
        self.started = time.perf_counter()
        self.autocast = torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda")

    @property
    def finished(self) -> bool:
        return self.global_step >= self.config.total_steps

    def _restore(self) -> dict | None:
        """Heads from the latest checkpoint, in place; the trainer state (None: a fresh run)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as directory:
            return restore_training_state(Path(directory), self.heads)

    def _resume(self, state: dict) -> None:
        self.optim.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.global_step = self.resumed_from = int(state["step"])
        if self.rank == 0:
            print(f"resumed from step {self.global_step} of {self.config.total_steps}")

    def remaining_batches(self):
        """One pass over the shard: ``(features, seconds since the previous batch)`` of the
        batches of this epoch not yet trained on (a resumed epoch skips its first ones)."""
        config = self.config
        skip = self.global_step % config.steps_per_epoch
        batches = self.shard.iter_batches(batch_size=config.batch_size, batch_format="numpy")
        tick = time.perf_counter()
        for i, batch in enumerate(batches):
            if i >= config.steps_per_epoch:
                return
            if i < skip:
                tick = time.perf_counter()
                continue
            kind = TextFeatures if self.selector_only else ImageFeatures
            features = [kind.from_bytes(blob) for blob in batch["features"]]
            yield features, time.perf_counter() - tick
            tick = time.perf_counter()

    def train_step(self, features: list) -> tuple[dict, float]:
        """Forward, loss, backward, clipped optimizer step; the loss parts and the grad norm."""
        config = self.config
        with self.autocast:
            if self.selector_only:
                parts = train_selector_on_batch(self.model, features, self.device)
            else:
                parts = train_on_batch(
                    self.model, features, self.device, config.loss_weighting, config.loss_target
                )
        grad_norm = step(parts["total"], self.model, self.optim, self.schedule, config.optim)
        self.global_step += 1
        return parts, grad_norm

    def metrics(self, parts: dict, grad_norm: float, n_images: int, seconds: float) -> dict:
        return {
            "step": self.global_step,
            "epoch": (self.global_step - 1) // self.config.steps_per_epoch,
            **{k: float(v) for k, v in parts.items() if k != "total"},
            "loss": float(parts["total"]),
            "resumed_from": self.resumed_from,
            "world_size": self.world,
            "ddp": isinstance(self.model, torch.nn.parallel.DistributedDataParallel),
            "lr": self.schedule.get_last_lr()[0],
            "grad_norm": grad_norm,
            "samples_per_s": n_images * self.world / max(seconds, 1e-9),
        }

    def eta(self) -> float:
        """Seconds left at this run's pace so far (steps since the start or resume)."""
        done = self.global_step - self.resumed_from
        left = self.config.total_steps - self.global_step
        return (time.perf_counter() - self.started) / max(1, done) * left

    def report(self, parts: dict, metrics: dict) -> None:
        """Metrics to Ray Train (with a checkpoint every ``checkpoint_every`` steps and at the
        end), and a log line on rank 0 every ``log_every`` steps."""
        import ray.train

        config, last = self.config, self.finished
        if self.global_step % config.checkpoint_every == 0 or last:
            _report_with_checkpoint(
                metrics, self.heads, self.optim, self.schedule, self.global_step, self.rank
            )
        elif self.global_step % config.log_every == 0:
            ray.train.report(metrics)
        if self.rank == 0 and (self.global_step % config.log_every == 0 or last):
            parts_text = " ".join(f"{k} {float(v):.3f}" for k, v in parts.items() if k != "total")
            print(
                f"step {self.global_step}/{config.total_steps} loss {metrics['loss']:.4f} "
                f"({parts_text}) lr {metrics['lr']:.2e} {metrics['samples_per_s']:.1f} img/s, "
                f"ETA {self.eta():.0f} s"
            )


def _report_with_checkpoint(metrics, heads, optim, schedule, global_step: int, rank: int) -> None:
    """Every worker reports (a barrier); rank 0 attaches the checkpoint directory."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save_checkpoint(Path(tmp), heads, optim, schedule, global_step)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainJob:
    """One head-training run. ``name`` + ``storage`` identify it: running the same job again
    resumes from its latest checkpoint (and only exports the heads when it had finished).

    workers / cpus_per_worker / gpus_per_worker: the ``TorchTrainer``'s DDP workers;
    encode_actors / encode_gpus / encode_batch: the frozen stage's actor pool, GPUs per actor and
    images per LMM forward; batch_size: images per worker per step; unet_channels: the U-Net's
    level-0 width; loss_weighting, loss_target, redraw_expressions: see ``Recipe``; train:
    ``TRAIN_PARTS`` (``"selector"``: the keyword selector alone on the captioned samples, on top
    of ``spec.heads``, which it needs; batch_size then counts captions). The defaults are
    F-LMM's recipe (``FLMM_RECIPE``; ``--workers 8`` makes their global batch).
    """

    shards: tuple[str, ...]
    spec: ModelSpec
    output: str
    storage: str
    name: str = "flmm-heads"
    epochs: int = FLMM_RECIPE.epochs
    batch_size: int = FLMM_RECIPE.batch_size
    workers: int = 1
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    encode_actors: int = 1
    encode_gpus: float = 0.0
    encode_cpus: float = 1.0
    encode_batch: int = 8
    unet_channels: int = FLMM_RECIPE.unet_channels
    checkpoint_every: int = 50
    log_every: int = 10
    max_failures: int = 3
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    describe_prompt: str | None = None  # recorded with a trained selector (see SelectorConfig)
    loss_weighting: str = FLMM_RECIPE.loss_weighting
    loss_target: str = FLMM_RECIPE.loss_target
    redraw_expressions: bool = FLMM_RECIPE.redraw_expressions
    train: str = "all"

    def __post_init__(self) -> None:
        if self.train not in TRAIN_PARTS:
            raise ValueError(f"train {self.train!r}: one of {TRAIN_PARTS}")
        if self.train == "selector" and not self.spec.heads:
            raise ValueError(
                "training the keyword selector alone (--train selector) needs the heads it is "
                "added to (--init-heads: a trained .safetensors or an F-LMM release .pth)"
            )
        if self.spec.heads and not Path(self.spec.heads).is_file():
            raise ValueError(f"initial heads {self.spec.heads}: no such file")

    def train_config(self, steps_per_epoch: int, captioned: int) -> TrainConfig:
        """What its workers get: heads sized for its LMM, and a keyword selector when some
        samples have captions (``captioned`` of them)."""
        heads = lmm_dims(self.spec.lmm, self.unet_channels)
        selector = None
        if captioned:
            selector = SelectorConfig(
                heads.num_layers, heads.hidden_size, describe_instruction=self.describe_prompt
            )
        return TrainConfig(
            heads=heads,
            sam_variant=self.spec.sam_variant,
            sam_checkpoint=self.spec.sam_checkpoint,
            epochs=self.epochs,
            steps_per_epoch=steps_per_epoch,
            batch_size=self.batch_size,
            checkpoint_every=self.checkpoint_every,
            log_every=self.log_every,
            seed=self.seed,
            init_heads=self.spec.heads,
            optim=self.optim,
            selector=selector,
            loss_weighting=self.loss_weighting,
            loss_target=self.loss_target,
            train=self.train,
        )


def _storage(storage: str) -> tuple[str, pafs.FileSystem | None]:
    """Ray Train's storage path and filesystem: a local path made absolute (Ray's own local
    filesystem); a URI's filesystem, its query's options applied (``pipeline.uri``), and the path
    on it (Ray would keep the query in the path)."""
    if not is_uri(storage):
        return absolute(storage), None
    fs, path = filesystem(storage)
    return path, fs


def heads_width(path: str) -> int:
    """The U-Net level-0 width of a heads file (ours or an F-LMM release ``.pth``); a
    localization-heads file has none: ValueError."""
    return heads_dims(read_heads_file(path)[0])["unet_base_channels"]


def lmm_dims(lmm: str, unet_channels: int = HeadsConfig.unet_base_channels) -> HeadsConfig:
    """Heads sized for an LMM (its family's views × layers × heads), read from its config alone
    (no weights loaded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(lmm)
    text = config.text_config
    return HeadsConfig(
        text.num_hidden_layers,
        text.num_attention_heads,
        text.hidden_size,
        unet_channels,
        num_views=family_for(config.model_type).num_views,
    )


def fit_heads(job: TrainJob) -> dict:
    """Train (or resume, or just export) the heads; write them to ``job.output``; returns a
    summary (steps, samples, final metrics, seconds, checkpoint path)."""
    from pipeline.encode import count_training_samples
    from pipeline.sources import resolve_shards, shard_name

    start = time.perf_counter()
    uris = {shard_name(uri): uri for uri in resolve_shards(list(job.shards))}
    usable, unusable, captioned = count_training_samples(uris)
    samples = _samples_per_epoch(job, len(uris), usable, unusable, captioned)
    config = job.train_config(samples // (job.batch_size * job.workers), captioned)
    if job.train == "selector":
        warn_if_other_prompt(job.spec.heads, job.spec.prompt_config().instruction)
        print(
            f"training the keyword selector alone on {captioned} captions of {len(uris)} shards "
            f"({usable - captioned} uncaptioned and {unusable} unusable samples skipped), on top "
            f"of {job.spec.heads}: {job.epochs} epochs x {config.steps_per_epoch} steps of "
            f"{job.batch_size} captions x {job.workers} workers"
        )
    else:
        print(
            f"training heads: {usable} samples ({unusable} unusable, skipped) in {len(uris)} "
            f"shards, {job.epochs} epochs x {config.steps_per_epoch} steps of {job.batch_size} "
            f"images x {job.workers} workers"
            + (f"; keyword selector on {captioned} captions" if captioned else "")
        )
    result = _trainer(job, config, uris).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {job.name} produced no checkpoint")
    with result.checkpoint.as_directory() as directory:
        step_done = export_heads(job, Path(directory))
    return {
        "train": job.train,
        "steps": step_done,
        "total_steps": config.total_steps,
        "samples": samples,
        "unusable_samples": unusable,
        "captioned_samples": captioned,
        "metrics": result.metrics,
        "checkpoint": result.checkpoint.path,
        "output": job.output,
        "seconds": round(time.perf_counter() - start, 1),
    }


def _samples_per_epoch(job: TrainJob, shards: int, usable: int, unusable: int, captioned: int):
    """How many samples an epoch trains on (the captioned ones when the selector trains
    alone); ValueError when that is fewer than one step."""
    if job.train == "selector" and not captioned:
        raise ValueError(
            f"--train selector: none of the {usable} usable samples ({unusable} unusable) in "
            f"{shards} shards has a caption with its objects' spans to train the keyword "
            "selector on (schemas/INPUT_FORMAT.md: `caption` and the objects' `spans`)"
        )
    samples, kind = (captioned, "captioned") if job.train == "selector" else (usable, "usable")
    if samples < job.batch_size * job.workers:
        raise ValueError(
            f"{samples} {kind} training samples ({unusable} unusable) in {shards} shards: "
            f"fewer than one step of {job.batch_size} x {job.workers} workers"
        )
    return samples


def _trainer(job: TrainJob, config: TrainConfig, uris: dict[str, str]):
    """The run's ``TorchTrainer``: its workers, storage and checkpoints, and the frozen stage's
    stream (``pipeline.encode.features_dataset``) as their ``train`` dataset."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.encode import features_dataset

    storage_path, storage_filesystem = _storage(job.storage)
    resources = {"CPU": job.cpus_per_worker}
    if job.gpus_per_worker:
        resources["GPU"] = job.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config},
        scaling_config=ray.train.ScalingConfig(
            num_workers=job.workers,
            use_gpu=job.gpus_per_worker > 0,
            resources_per_worker=resources,
        ),
        run_config=ray.train.RunConfig(
            name=job.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets={
            "train": features_dataset(
                uris,
                job.spec,
                job.encode_batch,
                actors=job.encode_actors,
                gpus_per_actor=job.encode_gpus,
                cpus_per_actor=job.encode_cpus,
                draw_seed=None if job.redraw_expressions else job.seed,
                selector_only=job.train == "selector",
            )
        },
    )


def export_heads(job: TrainJob, directory: Path) -> int:
    """The heads of a checkpoint ``directory`` → ``job.output`` with the run's metadata (its
    steps, LMM and prompt); returns the steps trained. The worker validated the heads when it
    saved them; the driver only copies them (it need not have the SAM checkpoint, nor build
    SAM). When the selector trained alone, the output holds the given heads file's tensors as
    stored (bit for bit) and metadata, plus the selector's (``selector_steps``: its steps)."""
    step_done = int(torch.load(directory / STATE_FILE, weights_only=True)["step"])
    heads_file = directory / HEADS_FILE
    tensors, metadata = load_file(heads_file), read_metadata(heads_file)
    if job.train == "selector":
        tensors, metadata = _selector_on(job.spec.heads, tensors, metadata)
        metadata["selector_steps"] = str(step_done)
    else:
        metadata["steps"] = str(step_done)
    metadata["lmm"] = job.spec.lmm
    metadata[PROMPT_KEY] = job.spec.prompt_config().instruction  # build_flmm warns on others
    save_tensors(tensors, job.output, metadata)
    return step_done


def _selector_on(
    init_heads: str, trained: dict[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The ``selector.*`` tensors and metadata of a checkpoint's heads, on the tensors of the
    ``init_heads`` file as read (``read_heads_file``: ours as stored, an F-LMM ``.pth``
    converted) and its metadata (a ``.safetensors``'), its own selector's left out."""
    heads, _ = read_heads_file(init_heads)
    given = read_metadata(init_heads) if Path(init_heads).suffix == ".safetensors" else {}
    selector = {k: v for k, v in trained.items() if k.startswith(PREFIX)}
    kept = {k: v for k, v in given.items() if not k.startswith(PREFIX)}
    return {**heads, **selector}, {
        **kept,
        **{k: v for k, v in metadata.items() if k.startswith(PREFIX)},
    }
