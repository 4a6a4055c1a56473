"""Small LLaVA-format checkpoints built offline: real classes, tiny sizes.

Writes a directory that loads exactly like a llava-hf checkpoint (``LlavaForConditionalGeneration``
+ ``LlavaProcessor``): a tiny CLIP vision tower, a tiny Llama, and a real BPE tokenizer trained in
process on a given corpus. Tests use it with random weights; the toy world pretrains one.
"""

from __future__ import annotations

import itertools
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)

# LLaVA-1.5's conversation layout: "USER: <image>\n{text} ASSISTANT: {answer}".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] if c['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyLlavaConfig:
    """Sizes of a tiny LLaVA (variants live in ``flmm.build``). Grid = (image/patch)² tokens."""

    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vocab_size: int
    max_positions: int = 2048
    padding_side: str = "left"
    seed: int = 0
    vision_intermediate: int | None = None  # None: 2 × vision_hidden
    embedding_rows: int | None = None  # None: the tokenizer's size (LLaVA-1.5 pads to 32064)


def train_tokenizer(
    corpus: Iterable[str],
    vocab_size: int,
    padding_side: str,
    image_token: str = IMAGE_TOKEN,
    special_tokens: tuple[str, ...] = (),
    chat_words: str = "USER: ASSISTANT:",
):
    """A Llama-style (Metaspace BPE) fast tokenizer trained on ``corpus``; BOS is prepended.
    ``image_token`` (also ``tokenizer.image_token``) and ``special_tokens`` are single tokens."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS[:4], image_token, *special_tokens],
        initial_alphabet=list(string.printable),  # no <unk> for any ASCII text
    )
    tok.train_from_iterator(itertools.chain(corpus, [chat_words]), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=[image_token, *special_tokens],
        extra_special_tokens={"image_token": image_token},
        padding_side=padding_side,
    )


def build_processor(config: TinyLlavaConfig, corpus: Iterable[str]) -> LlavaProcessor:
    size = config.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    tokenizer = train_tokenizer(corpus, config.vocab_size, config.padding_side)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
    )


def build_model(config: TinyLlavaConfig, tokenizer) -> LlavaForConditionalGeneration:
    """A randomly initialised tiny ``LlavaForConditionalGeneration`` for ``tokenizer``."""
    llava = llava_config(config, tokenizer)
    torch.manual_seed(config.seed)
    return LlavaForConditionalGeneration(llava).eval()


def llava_config(config: TinyLlavaConfig, tokenizer) -> LlavaConfig:
    """The transformers ``LlavaConfig`` of ``config`` for ``tokenizer`` (any size: the GPU
    benchmark builds LLaVA-1.5-7B's shapes from it)."""
    vision = CLIPVisionConfig(
        hidden_size=config.vision_hidden,
        intermediate_size=config.vision_intermediate or 2 * config.vision_hidden,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.vision_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        projection_dim=config.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=config.embedding_rows or len(tokenizer),
        hidden_size=config.text_hidden,
        intermediate_size=config.text_intermediate,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.text_heads,
        num_key_value_heads=config.text_kv_heads,
        max_position_embeddings=config.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    grid = config.image_size // config.patch_size
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=grid * grid,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def write_tiny_llava(config: TinyLlavaConfig, corpus: Iterable[str], out_dir: str | Path) -> Path:
    """Build a tiny LLaVA and its processor and ``save_pretrained`` both into ``out_dir``."""
    out_dir = Path(out_dir)
    processor = build_processor(config, corpus)
    model = build_model(config, processor.tokenizer)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
