"""Tiny random-weight instances of the real model families, built offline.

Each builder returns (model, processor) of the family's real transformers classes, with a
byte-level BPE tokenizer trained in milliseconds on a few sentences plus the family's special
tokens (ids and names as the released tokenizers spell them), and a PIL image processor sized
for 56-112 px images. Nothing touches a hub.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from refloop.models.processors import image_only_processor

_CORPUS = [
    "the red circle left of the blue square above a small green triangle",
    'Locate the object: [{"bbox_2d": [12, 34, 560, 78], "label": "object"}] 0123456789',
    "What does the region describe? Please output the bounding box. detect caption en; a of in on",
    "<ref> </ref> <box> </box> ( ) , . : ; ! ? [ ] { } < > \" ' - _ / \n",
]


def _bpe(special: list[str], vocab_size: int = 420) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    return tok


def _tokenizer(special: list[str], added: list[str] = (), **kw) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=_bpe(special), **kw)
    if added:
        tok.add_tokens(list(added))
    return tok


# Every family's language model at the same toy size.
_LM = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}


def _seed(seed: int = 0):
    torch.manual_seed(seed)


QWEN_SPECIAL = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def _qwen_tokenizer():
    return _tokenizer(QWEN_SPECIAL, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _qwen_ids(tok) -> dict:
    return {
        "image_token_id": tok.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tok.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
    }


def _qwen_text(tok, head_dim: int = 16, mrope_section=(2, 3, 3), lm: dict | None = None, **extra) -> dict:
    return {
        "vocab_size": len(tok),
        **_LM,
        **(lm or {}),
        "head_dim": head_dim,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(mrope_section), **extra},
        "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "max_position_embeddings": 512,
    }


def _qwen_family(config_cls, model_cls, processor_cls, text: dict, vision: dict, patch_size: int = 14):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = _qwen_tokenizer()
    config = config_cls(text_config=_qwen_text(tok, **text), vision_config=vision, **_qwen_ids(tok))
    _seed()
    side = patch_size * 2  # merge 2x2 patches: one token per (2 * patch)^2 pixels
    ip = Qwen2VLImageProcessorPil(min_pixels=(2 * side) ** 2, max_pixels=(4 * side) ** 2, patch_size=patch_size, merge_size=2)
    return model_cls(config).eval(), image_only_processor(processor_cls, image_processor=ip, tokenizer=tok)


_QWEN_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32}


def _wider(head_dim: int, heads: int = 2, layers: int = 2) -> dict:
    """Text settings for `heads` attention heads of `head_dim` (vLLM's CPU attention needs >= 32)
    and `layers` blocks, the multimodal RoPE sections scaled to head_dim / 2."""
    if (head_dim, heads, layers) == (16, 2, 2):
        return {}
    hidden = heads * head_dim
    section = (head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16)
    lm = {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_attention_heads": heads, "num_hidden_layers": layers}
    return {"head_dim": head_dim, "mrope_section": section, "lm": lm}


def qwen2_vl(mrope_section=(2, 3, 3), head_dim: int = 16, heads: int = 2, layers: int = 2):
    """`head_dim`, `heads`, `layers`: a wider language model (benchmarks, the vLLM backend's tests)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    text = {"mrope_section": mrope_section} | _wider(head_dim, heads, layers)
    width = text.get("lm", {}).get("hidden_size", 32)  # the merger projects onto the language model's width
    vision = {"depth": 1, "embed_dim": 32, "hidden_size": width, "num_heads": 2, "mlp_ratio": 2, "in_chans": 3}
    return _qwen_family(Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, text, vision)


def qwen2_5_vl(head_dim: int = 16):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    text = _wider(head_dim)
    vision = _QWEN_VISION | {"window_size": 56, "fullatt_block_indexes": [1], "out_hidden_size": text.get("lm", {}).get("hidden_size", 32)}
    return _qwen_family(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor, text, vision)


def qwen3_vl():
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    vision = _QWEN_VISION | {"patch_size": 16, "num_position_embeddings": 64, "deepstack_visual_indexes": [0]}
    text = {"mrope_interleaved": True}
    return _qwen_family(Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, text, vision, patch_size=16)


def florence_2():
    """Florence-2: DaViT encoder + BART encoder-decoder, '<loc_N>' tokens (N < 1000)."""
    from transformers import CLIPImageProcessorPil, Florence2Config, Florence2ForConditionalGeneration, Florence2Processor

    locs = [f"<loc_{i}>" for i in range(1000)]
    tok = _tokenizer(
        ["<s>", "<pad>", "</s>", "<unk>"],
        added=locs,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_size = 64  # DaViT strides 4*2*2*2 = 32: a 2x2 grid, plus one pooled token
    config = Florence2Config(
        vision_config={
            "depths": [1, 1, 1, 1],
            "embed_dim": [8, 16, 16, 32],
            "num_heads": [1, 1, 1, 2],
            "num_groups": [1, 1, 1, 2],
            "window_size": 2,
            "projection_dim": 32,
            "drop_path_rate": 0.0,
        },
        text_config={
            "vocab_size": len(tok),
            "d_model": 32,
            "encoder_layers": 1,
            "decoder_layers": 1,
            "encoder_attention_heads": 2,
            "decoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "decoder_ffn_dim": 64,
            "max_position_embeddings": 256,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "decoder_start_token_id": tok.eos_token_id,
            "forced_bos_token_id": tok.bos_token_id,
        },
        image_token_id=tok.image_token_id,
    )
    _seed()
    model = Florence2ForConditionalGeneration(config).eval()
    ip = CLIPImageProcessorPil(size={"height": image_size, "width": image_size}, do_center_crop=False, image_seq_length=5)
    return model, Florence2Processor(image_processor=ip, tokenizer=tok)


def kosmos_2():
    """Kosmos-2: the processor adds '<grounding>', '<phrase>', '<object>' and 1024 '<patch_index_NNNN>' tokens."""
    from transformers import CLIPImageProcessorPil, Kosmos2Config, Kosmos2ForConditionalGeneration, Kosmos2Processor

    tok = _tokenizer(["<s>", "<pad>", "</s>", "<unk>"], bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    processor = Kosmos2Processor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size=56), tokenizer=tok)
    config = Kosmos2Config(
        text_config={
            "vocab_size": len(tok),
            "embed_dim": 32,
            "layers": 2,
            "ffn_dim": 64,
            "attention_heads": 2,
            "max_position_embeddings": 512,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": tok.bos_token_id,
            "eos_token_id": tok.eos_token_id,
        },
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 56},
        latent_query_num=64,
    )
    _seed()
    return Kosmos2ForConditionalGeneration(config).eval(), processor


def paligemma(version: int = 1):
    """PaliGemma (Gemma) and PaliGemma 2 (Gemma 2): the processor adds '<image>', '<locNNNN>', '<segNNN>'."""
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipImageProcessorPil

    tok = _tokenizer(["<pad>", "<eos>", "<bos>", "<unk>"], bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    ip = SiglipImageProcessorPil(size={"height": 56, "width": 56}, image_seq_length=16)
    processor = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)
    text = {
        "model_type": "gemma" if version == 1 else "gemma2",
        "vocab_size": len(tok),
        **_LM,
        "head_dim": 16,
        "pad_token_id": tok.pad_token_id,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    config = PaliGemmaConfig(
        text_config=text,
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
            "projection_dim": 32,
        },
        image_token_id=processor.image_token_id,
        projection_dim=32,
    )
    _seed()
    return PaliGemmaForConditionalGeneration(config).eval(), processor


def internvl():
    """InternVL (hf format): Qwen2 language model, '<img><IMG_CONTEXT>...</img>' placeholders."""
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor

    special = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<img>",
        "</img>",
        "<IMG_CONTEXT>",
        "<ref>",
        "</ref>",
        "<box>",
        "</box>",
        "<video>",
    ]
    tok = _tokenizer(
        special,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    config = InternVLConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": [56, 56],
            "patch_size": [14, 14],
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tok),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id,
        },
        image_token_id=tok.context_image_token_id,
        downsample_ratio=0.5,
    )
    _seed()
    ip = GotOcr2ImageProcessorPil(size={"height": 56, "width": 56}, crop_to_patches=False)
    # 56/14 = 4x4 patches, pixel-shuffled by 0.5: 4 tokens per image
    return InternVLForConditionalGeneration(config).eval(), image_only_processor(
        InternVLProcessor, image_processor=ip, tokenizer=tok, image_seq_length=4
    )
