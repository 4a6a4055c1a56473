"""Training-free grounding: a frozen LMM's "localization heads" + SAM, no trained parameters.

After Kang et al. (CVPR 2025, "Your Large Vision-Language Model Only Needs A Few Attention Heads
For Visual Grounding"): a few attention heads of a frozen LMM attend to what a phrase names. They
are found on a calibration set of phrases by two criteria, phrase by phrase:

1. **Image attention.** A head's attention mass on the image: the phrase tokens' softmax rows
   summed over the image's grid tokens, averaged over the phrase's tokens (``image_attention``).
   Heads at or above the elbow of the sorted masses (``elbow``: the chord method, the value
   farthest below the line from the smallest to the largest) attend to the image; heads of the
   first ``skip_layers`` layers never count (Kang et al. leave out layers 0 and 1).
2. **Spatial entropy.** A head's map (sum 1 over the grid) minus ``entropy_factor`` × its mean,
   clipped at 0; the positive cells' 8-connected components; the entropy of the components'
   shares of that mass (``spatial_entropy``). Low: one concentrated blob; a map with no cell
   above the bar has infinite entropy.

Per phrase, the ``per_phrase`` image-attentive heads of lowest entropy get a vote
(``rank_heads``); over the calibration set, the heads with the most votes are the localization
heads (``HeadVotes.chosen``: ties broken by lower layer, then lower head, so the choice is a
pure function of the calibration phrases). Kang et al.'s code also drops heads with any cell of
the bottom grid row above 0.05 (an artefact of LLaVA-1.5's attention sink); not done here.

Grounding a phrase with the K chosen heads (``LocalizationHeads``; LMM grid h × w):

    combined = mean over the K heads (and the image's views) of their maps, Gaussian-smoothed
               (``sigma`` grid cells, edges replicated), rescaled to sum 1
    bar      = ``threshold`` × mean(combined)
    coarse   = log(combined / bar) on the connected component above the bar with the most mass,
               −|log(combined / bar)| elsewhere: logits whose ``sigmoid > 0.5`` is that component
    → the image's frame (``ImageGeometry``); box = the tight box of the coarse mask
    refined  = SAM (its own prompt encoder and mask decoder, frozen): the box as prompt, and with
               ``dense_prompt`` the coarse logits as the mask prompt

Only the chosen heads' rows are captured at inference (``FrozenLMM.capture_heads``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from flmm.families import ImageInputs
from flmm.geometry import ImageGeometry
from flmm.heads import Grounding
from flmm.refiner import mask_logits_to_boxes, pad_to_input_frame, postprocess_masks

FORMAT = "flmm-localization-heads"
VERSION = 1

# --------------------------------------------------------------------------------------------
# Finding the heads
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadSearchConfig:
    """per_phrase: heads voted for per calibration phrase; skip_layers: the first layers never
    chosen; entropy_factor: cells above this × the map's mean form its components."""

    per_phrase: int = 10
    skip_layers: int = 2
    entropy_factor: float = 2.0


def image_attention(maps: torch.Tensor, slots: list[slice], image: ImageInputs) -> torch.Tensor:
    """maps ``[L, H, Q, N]`` raw softmax rows of the captured query slots over the image tokens
    (``LMMOutput.token_maps[b]``) → ``[P, L, H]``: per phrase (query slots ``slots[p]``), each
    head's attention mass on the image's grid tokens (all views), mean over the phrase's
    tokens."""
    out = []
    for s in slots:
        rows = maps[:, :, s].float()  # [L, H, q, N]
        mass = sum(view.grid(rows).sum(dim=(-2, -1)) for view in image.views)  # [L, H, q]
        out.append(mass.mean(dim=-1))
    return torch.stack(out) if out else maps.new_zeros((0, *maps.shape[:2]))


def elbow(values: torch.Tensor) -> float:
    """The chord-method elbow of ``values`` (any shape): sorted ascending, the value farthest
    below the straight line from the first to the last (perpendicular and vertical distance
    pick the same point). Fewer than three values: the smallest."""
    y = values.flatten().double().sort().values
    if y.numel() < 3:
        return float(y[0]) if y.numel() else 0.0
    x = torch.linspace(0.0, 1.0, y.numel(), dtype=torch.float64)
    line = y[0] + (y[-1] - y[0]) * x
    return float(y[int(torch.argmax(line - y))])


def components(fg: torch.Tensor) -> torch.Tensor:
    """8-connected components of boolean maps ``[N, h, w]`` → long labels ``[N, h, w]``: 0 off
    the maps' foreground, else the largest flat index + 1 of the cell's component (labels
    spread by 3×3 max-pooling until they settle)."""
    _, h, w = fg.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32, device=fg.device).view(1, 1, h, w)
    mask = fg[:, None].float()
    labels = ids * mask
    for _ in range(h * w):
        grown = F.max_pool2d(labels, 3, stride=1, padding=1) * mask
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels[:, 0].long()


def spatial_entropy(maps: torch.Tensor, factor: float = 2.0) -> torch.Tensor:
    """maps ``[N, h, w]`` (non-negative) → ``[N]`` spatial entropies (module criterion 2); inf
    for a map with no cell above ``factor`` × its mean."""
    n = maps.shape[0]
    excess = (maps - factor * maps.mean(dim=(-2, -1), keepdim=True)).clamp(min=0)
    labels = components(excess > 0).flatten(1)  # [N, h·w]
    mass = torch.zeros(n, labels.shape[1] + 1, dtype=torch.float64, device=maps.device)
    mass.scatter_add_(1, labels, excess.flatten(1).double())
    mass = mass[:, 1:]
    total = mass.sum(dim=1, keepdim=True)
    share = mass / total.clamp(min=1e-300)
    entropy = -(share * share.clamp(min=1e-300).log()).sum(dim=1)
    return torch.where(total[:, 0] > 0, entropy, torch.full_like(entropy, math.inf)).float()


def rank_heads(mass: torch.Tensor, maps: torch.Tensor, config: HeadSearchConfig) -> list[int]:
    """One phrase's vote: mass ``[L, H]`` (``image_attention``), maps ``[L·H, h, w]`` (its
    per-head maps, views averaged) → up to ``config.per_phrase`` flat head ids (l·H + h) of the
    image-attentive heads, lowest spatial entropy first (ties: lower id)."""
    attentive = mass >= elbow(mass)
    attentive[: config.skip_layers] = False
    entropy = spatial_entropy(maps.float(), config.entropy_factor)
    entropy = torch.where(attentive.flatten(), entropy, torch.full_like(entropy, math.inf))
    order = torch.sort(entropy, stable=True).indices
    return [int(i) for i in order[: config.per_phrase] if math.isfinite(float(entropy[i]))]


@dataclass
class HeadVotes:
    """Votes over a calibration set: ``counts [L, H]`` and the phrases that voted."""

    num_layers: int
    num_heads: int
    counts: torch.Tensor = field(init=False)
    phrases: int = 0

    def __post_init__(self) -> None:
        self.counts = torch.zeros(self.num_layers, self.num_heads, dtype=torch.long)

    def add(self, ranked: list[int]) -> None:
        """One phrase's ``rank_heads``."""
        self.phrases += 1
        for i in ranked:
            self.counts.view(-1)[i] += 1

    def chosen(self, k: int) -> list[tuple[int, int]]:
        """The k most voted (layer, head) pairs, most votes first (ties: lower layer, head);
        heads with no vote are never chosen."""
        flat = self.counts.flatten()
        order = sorted(range(flat.numel()), key=lambda i: (-int(flat[i]), i))
        return [divmod(i, self.num_heads) for i in order[:k] if flat[i] > 0]

    def frequency(self, pair: tuple[int, int]) -> float:
        """The share of phrases that voted for ``pair``."""
        return float(self.counts[pair]) / max(1, self.phrases)


# --------------------------------------------------------------------------------------------
# Grounding with the chosen heads
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalizationConfig:
    """A localization-heads file's grounding settings (see the module).

    heads: the chosen (layer, head) pairs, in vote order; num_layers, num_heads, num_views: the
    LMM they were found on (checked when loaded); sigma: Gaussian smoothing, grid cells;
    threshold: the bar, × the combined map's mean; dense_prompt: the coarse logits also go to SAM
    as its mask prompt.
    """

    heads: tuple[tuple[int, int], ...]
    num_layers: int
    num_heads: int
    num_views: int = 1
    sigma: float = 1.0
    threshold: float = 1.0
    dense_prompt: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple((int(a), int(b)) for a, b in self.heads))
        if not self.heads:
            raise ValueError("a localization-heads file needs at least one head")
        for layer, head in self.heads:
            if not (0 <= layer < self.num_layers and 0 <= head < self.num_heads):
                raise ValueError(
                    f"head ({layer}, {head}) is outside {self.num_layers} layers x "
                    f"{self.num_heads} heads"
                )
        if self.sigma < 0 or self.threshold <= 0:
            raise ValueError(
                f"sigma must be >= 0 and threshold > 0 (got {self.sigma}, {self.threshold})"
            )


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """maps ``[P, h, w]`` → Gaussian-smoothed (``sigma`` cells; kernel radius ⌈3σ⌉, edges
    replicated); sigma 0: unchanged."""
    if sigma <= 0:
        return maps
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = F.pad(maps[:, None], (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    return F.conv2d(out, kernel.view(1, 1, -1, 1))[:, 0]


def combine(maps: torch.Tensor, num_views: int, sigma: float) -> torch.Tensor:
    """maps ``[P, V·K, h, w]`` (view-major, each sums to 1) → ``[P, h, w]``: mean over views and
    heads, smoothed, rescaled to sum 1."""
    p, _, h, w = maps.shape
    mean = maps.float().view(p, num_views, -1, h, w).mean(dim=(1, 2))
    out = smooth(mean, sigma)
    return out / out.sum(dim=(-2, -1), keepdim=True).clamp(min=1e-12)


def grid_logits(combined: torch.Tensor, threshold: float) -> torch.Tensor:
    """combined ``[P, h, w]`` (sum 1) → coarse logits ``[P, 1, h, w]`` on the LMM grid: positive
    exactly on the most massive component above ``threshold`` × the map's mean (see module)."""
    bar = threshold * combined.mean(dim=(-2, -1), keepdim=True)
    ratio = torch.log(combined.clamp(min=1e-12) / bar)
    fg = ratio > 0
    labels = components(fg).flatten(1)  # [P, h·w]
    mass = torch.zeros(labels.shape[0], labels.shape[1] + 1, device=combined.device)
    mass.scatter_add_(1, labels, (combined * fg).flatten(1).float())
    best = mass[:, 1:].argmax(dim=1) + 1  # the heaviest label (an empty fg: no cell has it)
    keep = (labels == best[:, None]).view_as(fg) & fg
    return torch.where(keep, ratio, -ratio.abs())[:, None]


def coarse_logits(
    maps: torch.Tensor, geometry: ImageGeometry, config: LocalizationConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's maps ``[P, V·K, h, w]`` → (grid logits cropped to the image ``[P, 1, hc, wc]``,
    coarse logits in the original frame ``[P, 1, H, W]``)."""
    grid = grid_logits(combine(maps, config.num_views, config.sigma), config.threshold)
    return geometry.crop(grid), geometry.to_original(grid)


class LocalizationHeads(nn.Module):
    """Training-free heads: the chosen heads' maps → coarse mask → SAM box (+ mask) prompt.

    Takes the place of ``flmm.heads.FLMMHeads`` in ``flmm.model.FLMM`` (same ``forward``); it has
    no trained parameters and no keyword selector (captions and image-only samples need trained
    heads). prompt_encoder, mask_decoder: SAM's own (frozen); image_size: S of SAM's input frame.
    """

    selector = None

    def __init__(
        self,
        config: LocalizationConfig,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        image_size: int,
    ):
        super().__init__()
        self.config = config
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = image_size
        self.transform = ResizeLongestSide(image_size)
        self.requires_grad_(False)

    def forward(
        self,
        attention: list[torch.Tensor],
        hidden: list[list[torch.Tensor]],
        embeddings: torch.Tensor,
        geometries: list[ImageGeometry],
        sam_input_sizes: list[tuple[int, int]],
        text_hidden: list[torch.Tensor | None] | None = None,
    ) -> list[Grounding]:
        """attention: per image ``[P, V·K, h, w]`` (the chosen heads); embeddings ``[B, C, He,
        We]``; hidden is not read (no text prompt). ``Grounding.unet`` holds the coarse grid
        logits (there is no U-Net), ``coarse`` them in the original frame, ``refined`` SAM's."""
        if text_hidden is not None and any(t is not None for t in text_hidden):
            raise ValueError("localization heads have no keyword selector")
        out = []
        for b, maps in enumerate(attention):
            geometry = geometries[b]
            size = (geometry.height, geometry.width)
            unet, coarse = coarse_logits(maps.to(embeddings.device), geometry, self.config)
            refined = self.refine(embeddings[b : b + 1], coarse, sam_input_sizes[b], size)
            out.append(Grounding(unet, coarse, refined))
        return out

    def refine(
        self,
        embedding: torch.Tensor,
        coarse: torch.Tensor,
        input_size: tuple[int, int],
        original_size: tuple[int, int],
    ) -> torch.Tensor:
        """SAM on one image: embedding ``[1, C, He, We]``, coarse logits ``[P, 1, H, W]``
        (original frame) → refined logits ``[P, 1, H, W]``."""
        boxes = self.transform.apply_boxes_torch(mask_logits_to_boxes(coarse), original_size)
        masks = None
        if self.config.dense_prompt:
            masks = pad_to_input_frame(coarse, input_size, self.image_size)
            masks = F.interpolate(
                masks, self.prompt_encoder.mask_input_size, mode="bilinear", align_corners=False
            )
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=masks)
        low_res, _ = self.mask_decoder(
            image_embeddings=embedding,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse.to(embedding.dtype),
            dense_prompt_embeddings=dense.to(embedding.dtype),
            multimask_output=False,
        )
        return postprocess_masks(low_res.float(), self.image_size, input_size, original_size)


# --------------------------------------------------------------------------------------------
# The file
# --------------------------------------------------------------------------------------------


def is_localization_file(path: str | Path) -> bool:
    """Whether ``path`` names a localization-heads file (``.json``) rather than trained heads."""
    return Path(path).suffix == ".json"


def save_localization(config: LocalizationConfig, path: str | Path, metadata: dict) -> Path:
    """Write ``config`` and ``metadata`` (the LMM id, prompt, calibration figures) as JSON."""
    record = {"format": FORMAT, "version": VERSION, **metadata, **asdict(config)}
    record["heads"] = [list(pair) for pair in config.heads]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_localization(path: str | Path) -> tuple[LocalizationConfig, dict]:
    """A localization-heads file → (its config, the rest of its record); ValueError for a file
    that is not one, or of another version."""
    record = json.loads(Path(path).read_text())
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path} is not a localization-heads file (format {FORMAT!r})")
    if record.get("version") != VERSION:
        raise ValueError(f"{path}: version {record.get('version')}, this code reads {VERSION}")
    names = LocalizationConfig.__dataclass_fields__
    config = LocalizationConfig(**{k: v for k, v in record.items() if k in names})
    return config, {k: v for k, v in record.items() if k not in names}
