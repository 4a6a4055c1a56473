"""Small checkpoints of every supported LMM family, built offline: real classes, tiny sizes.

``write_tiny_lmm(model_type, corpus, out_dir)`` saves a directory that loads like a hub checkpoint
of that family (``AutoModelForImageTextToText`` + ``AutoProcessor``): the family's own vision tower
and projector, a small decoder, a real BPE tokenizer trained in process on ``corpus`` and a chat
template in the family's layout. Weights are random (seeded) and every branch is live: DeepSeek-VL
hybrid's high-resolution (SAM) tower gets a normal init and a non-zero mixing weight
(transformers' defaults, 1e-10 and 0, would make its features constant). LLaVA-1.5 comes from
``flmm.tiny_llava``; the sizes of the others are one ``TinyLMMConfig``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as hf

from flmm.tiny_llava import TinyLlavaConfig, train_tokenizer, write_tiny_llava


@dataclass(frozen=True)
class TinyLMMConfig:
    """Sizes of a tiny LMM. Images: ``image_size`` px towers with ``patch_size`` patches (Qwen:
    ``image_size`` is the most pixels per side; LLaVA-NeXT tiles up to 2 × 2 of them)."""

    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 128
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    image_size: int = 56
    patch_size: int = 14
    vocab_size: int = 320
    high_res_size: int | None = None  # DeepSeek-VL hybrid's SAM tower input (None: 4 × image)
    high_res_alpha: float = 1.0  # the hybrid's weight of the SAM tower's global features
    padding_side: str = "left"
    seed: int = 0


def _llama(config: TinyLMMConfig, tokenizer) -> dict:
    return {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": config.text_hidden,
        "intermediate_size": config.text_intermediate,
        "num_hidden_layers": config.text_layers,
        "num_attention_heads": config.text_heads,
        "num_key_value_heads": config.text_kv_heads,
        "max_position_embeddings": 4096,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }


def _vit(config: TinyLMMConfig, model_type: str) -> dict:
    """A ViT tower's config (CLIP's or SigLIP's) of ``config``'s vision sizes."""
    return {
        "model_type": model_type,
        "hidden_size": config.vision_hidden,
        "intermediate_size": 2 * config.vision_hidden,
        "num_hidden_layers": config.vision_layers,
        "num_attention_heads": config.vision_heads,
        "image_size": config.image_size,
        "patch_size": config.patch_size,
    }


def _user_assistant_template(image_token: str, user: str, assistant: str) -> str:
    """``{user}: <image>\\n{text} {assistant}:`` (LLaVA's and DeepSeek-VL's layout)."""
    return (
        "{% for message in messages %}"
        f"{{{{ '{user}: ' if message['role'] == 'user' else '{assistant}: ' }}}}"
        "{% for c in message['content'] if c['type'] == 'image' %}"
        f"{{{{ '{image_token}\\n' }}}}{{% endfor %}}"
        "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endfor %}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ '{assistant}:' }}}}{{% endif %}}"
    )


QWEN_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>")
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _llava_next(config: TinyLMMConfig, corpus: list[str]):
    tok = train_tokenizer(corpus, config.vocab_size, config.padding_side)
    size, pinpoints = (
        config.image_size,
        [[config.image_size * a, config.image_size * b] for a, b in ((1, 2), (2, 1), (2, 2))],
    )
    image_processor = hf.LlavaNextImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=pinpoints,
    )
    processor = hf.LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, dropped by the 'default' strategy
        chat_template=_user_assistant_template("<image>", "USER", "ASSISTANT"),
    )
    model_config = hf.LlavaNextConfig(
        vision_config={**_vit(config, "clip_vision_model"), "projection_dim": config.vision_hidden},
        text_config=_llama(config, tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    return model_config, processor, hf.LlavaNextForConditionalGeneration


def _deepseek(config: TinyLMMConfig, corpus: list[str], hybrid: bool):
    image_token = "<image_placeholder>"
    tok = train_tokenizer(
        corpus, config.vocab_size, config.padding_side, image_token, chat_words="User: Assistant:"
    )
    grid = config.image_size // config.patch_size
    template = _user_assistant_template(image_token, "User", "Assistant")
    siglip = _vit(config, "siglip_vision_model")
    common = {"text_config": _llama(config, tok), "vision_config": siglip}
    common["image_token_id"] = tok.convert_tokens_to_ids(image_token)
    size = {"height": config.image_size, "width": config.image_size}
    if not hybrid:
        processor = hf.DeepseekVLProcessor(
            hf.DeepseekVLImageProcessor(size=size), tok, template, num_image_tokens=grid * grid
        )
        return hf.DeepseekVLConfig(**common), processor, hf.DeepseekVLForConditionalGeneration
    high = config.high_res_size or 4 * config.image_size  # the SAM tower's input (7B: 1024)
    processor = hf.DeepseekVLHybridProcessor(
        hf.DeepseekVLHybridImageProcessor(size=size, high_res_size={"height": high, "width": high}),
        tok,
        template,
        num_image_tokens=grid * grid,
    )
    sam = {
        "model_type": "sam_vision_model",
        "hidden_size": config.vision_hidden,
        "output_channels": config.vision_hidden,
        "num_hidden_layers": config.vision_layers,
        "num_attention_heads": config.vision_heads,
        "image_size": high,
        "patch_size": 16,
        "mlp_dim": 2 * config.vision_hidden,
        "global_attn_indexes": [config.vision_layers - 1],
        "window_size": 2,
        "initializer_range": 0.02,  # SAM's default, 1e-10, leaves the tower's output constant
    }
    model_config = hf.DeepseekVLHybridConfig(**common, high_res_vision_config=sam)
    return model_config, processor, hf.DeepseekVLHybridForConditionalGeneration


QWEN_CLASSES = {  # processor, video processor, config, model
    "2.5": (
        hf.Qwen2_5_VLProcessor,
        hf.Qwen2VLVideoProcessor,
        hf.Qwen2_5_VLConfig,
        hf.Qwen2_5_VLForConditionalGeneration,
    ),
    "3": (
        hf.Qwen3VLProcessor,
        hf.Qwen3VLVideoProcessor,
        hf.Qwen3VLConfig,
        hf.Qwen3VLForConditionalGeneration,
    ),
}


def _qwen(config: TinyLMMConfig, corpus: list[str], version: str):
    tok = train_tokenizer(
        corpus,
        config.vocab_size,
        config.padding_side,
        "<|image_pad|>",
        QWEN_TOKENS,
        "user assistant",
    )
    ids = {
        "image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
    }
    patch, merge = config.patch_size, 2
    unit = patch * merge
    image_processor = hf.Qwen2VLImageProcessor(
        min_pixels=unit * unit * 4,
        max_pixels=config.image_size * config.image_size,
        patch_size=patch,
        merge_size=merge,
        temporal_patch_size=2,
    )
    head_dim = config.text_hidden // config.text_heads
    half = head_dim // 2
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    rope["mrope_section"] = [half - 2 * (half // 3), half // 3, half // 3]
    text = {**_llama(config, tok), "rope_parameters": rope}
    text.pop("model_type")
    vision = {
        "depth": config.vision_layers,
        "hidden_size": config.vision_hidden,
        "intermediate_size": 2 * config.vision_hidden,
        "num_heads": config.vision_heads,
        "out_hidden_size": config.text_hidden,
        "patch_size": patch,
        "spatial_merge_size": merge,
        "temporal_patch_size": 2,
    }
    if version == "2.5":
        full = list(range(7, config.vision_layers, 8)) or [config.vision_layers - 1]  # 7B: 7, ..
        vision.update(window_size=112, fullatt_block_indexes=full)
    else:
        grid = config.image_size // patch
        vision.update(num_position_embeddings=grid * grid, deepstack_visual_indexes=[0])
        rope["mrope_interleaved"] = True
        text["head_dim"] = head_dim
        ids["vision_end_token_id"] = tok.convert_tokens_to_ids("<|vision_end|>")
    processor_class, video_class, config_class, model_class = QWEN_CLASSES[version]
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_class(),
        chat_template=QWEN_TEMPLATE,
    )
    return config_class(vision_config=vision, text_config=text, **ids), processor, model_class


BUILDERS: dict[str, Callable] = {
    "llava_next": _llava_next,
    "deepseek_vl": lambda c, corpus: _deepseek(c, corpus, hybrid=False),
    "deepseek_vl_hybrid": lambda c, corpus: _deepseek(c, corpus, hybrid=True),
    "qwen2_5_vl": lambda c, corpus: _qwen(c, corpus, "2.5"),
    "qwen3_vl": lambda c, corpus: _qwen(c, corpus, "3"),
}
MODEL_TYPES = ("llava", *BUILDERS)


def build_tiny_lmm(model_type: str, corpus: Iterable[str], config: TinyLMMConfig = TinyLMMConfig()):
    """``(model config, processor, model class)`` of a tiny ``model_type`` (not LLaVA-1.5, which
    is ``flmm.tiny_llava``'s): the processor trained on ``corpus``, the model not built."""
    if model_type not in BUILDERS:
        raise ValueError(f"no tiny builder for {model_type!r}; have: {', '.join(MODEL_TYPES)}")
    return BUILDERS[model_type](config, list(corpus))


def write_tiny_lmm(
    model_type: str,
    corpus: Iterable[str],
    out_dir: str | Path,
    config: TinyLMMConfig = TinyLMMConfig(),
) -> Path:
    """Build a tiny random LMM of ``model_type`` (one of ``MODEL_TYPES``) with its processor and
    ``save_pretrained`` both into ``out_dir``."""
    corpus = list(corpus)
    if model_type == "llava":
        llava = TinyLlavaConfig(
            image_size=config.image_size,
            patch_size=config.patch_size,
            vision_hidden=config.vision_hidden,
            vision_layers=config.vision_layers,
            vision_heads=config.vision_heads,
            text_hidden=config.text_hidden,
            text_layers=config.text_layers,
            text_heads=config.text_heads,
            text_kv_heads=config.text_kv_heads,
            text_intermediate=config.text_intermediate,
            vocab_size=config.vocab_size,
            padding_side=config.padding_side,
            seed=config.seed,
        )
        return write_tiny_llava(llava, corpus, out_dir)
    model_config, processor, model_class = build_tiny_lmm(model_type, corpus, config)
    torch.manual_seed(config.seed)
    model = model_class(model_config)
    if model_type == "deepseek_vl_hybrid":  # transformers initialises it to 0 (the 7B's is learned)
        model.model.high_res_vision_alpha.data.fill_(config.high_res_alpha)
    out_dir = Path(out_dir)
    model.eval().save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
