"""Peak memory and time of `HFVLM.logprobs` on a long prompt: vocabulary logits at the completion
positions only (`logits_to_keep`, refloop now) vs at every position then sliced (refloop before).

    python benchmarks/logprobs_memory.py [--batch 8 --image-side 896 --answer 30 --vocab 32000]

The model is Qwen2-VL's real transformers class with random weights, a 32k vocabulary and a small
hidden size, so the [batch, positions, vocab] logits are what the two arms differ in. An 896 px
image is 1024 image tokens (one per 28x28 pixels). Each arm runs in a fresh process that reports
its peak RSS (ru_maxrss) and its RSS just before the first call (psutil); the delta is what the
calls add. Writes benchmarks/results/logprobs_memory.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ARMS = ("full_sequence_logits", "completion_logits")
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>"]
QWEN_SPECIAL += ["<|box_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_vlm(vocab: int, hidden: int, image_side: int):
    """Qwen2-VL with random weights behind HFVLM; a byte-level BPE tokenizer trained on the prompt
    text (the 32k vocabulary lives in the model; answer ids are drawn above the tokenizer's)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from refloop.models.hf import HFVLM
    from refloop.models.processors import image_only_processor
    from refloop.models.profiles import Qwen2VLProfile

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=QWEN_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["Give a short phrase that identifies the object in (120, 340),(560, 780). system user assistant"]
    bpe.train_from_iterator(corpus * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    head_dim = 32
    text = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": 2,
        "num_attention_heads": hidden // head_dim,
        "num_key_value_heads": 1,
        "head_dim": head_dim,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
        "bos_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "max_position_embeddings": 4096,
    }
    vision = {"depth": 1, "embed_dim": 32, "hidden_size": hidden, "num_heads": 2, "mlp_ratio": 2, "in_chans": 3}
    tokens = {"image": "<|image_pad|>", "video": "<|video_pad|>", "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>"}
    ids = {f"{k}_token_id": tok.convert_tokens_to_ids(t) for k, t in tokens.items()}
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision, **ids)).eval()
    pixels = image_side**2
    ip = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2)
    processor = image_only_processor(Qwen2VLProcessor, image_processor=ip, tokenizer=tok)
    return HFVLM(model, processor, Qwen2VLProfile(), name="qwen2-vl random", batch_size=64), len(tok)


def full_sequence_logprobs(vlm, images, prompts, completions) -> list:
    """refloop's former `logprobs` (decoder-only branch): vocabulary logits at every prompt and
    completion position, then the completion slice. Kept here as the comparison arm."""
    import torch

    inputs = vlm._inputs(images, prompts)
    comps = [list(c) for c in completions]
    width = max(len(c) for c in comps)
    pad = vlm.tokenizer.pad_token_id
    comp_ids = torch.tensor([c + [pad] * (width - len(c)) for c in comps])
    comp_mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in comps])
    with torch.no_grad():
        prompt_len = inputs["input_ids"].shape[1]
        for key, value in list(inputs.items()):
            if key not in ("input_ids", "attention_mask") and isinstance(value, torch.Tensor) and value.shape == inputs["input_ids"].shape:
                fill = vlm.profile.completion_fill.get(key, 0)
                inputs[key] = torch.cat([value, torch.full_like(comp_ids, fill, dtype=value.dtype)], dim=1)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], comp_ids], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], comp_mask], dim=1)
        logits = vlm.model(**inputs).logits[:, prompt_len - 1 : -1].float()
        token_lp = torch.log_softmax(logits, dim=-1).gather(-1, comp_ids[..., None]).squeeze(-1)
    return [token_lp[i, : len(c)] for i, c in enumerate(comps)]


def child(arm: str, args: argparse.Namespace) -> dict:
    import psutil
    import torch
    from PIL import Image

    from refloop.boxes import Box

    torch.set_num_threads(args.threads)
    vlm, tokenizer_size = build_vlm(args.vocab, args.hidden, args.image_side)
    generator = torch.Generator().manual_seed(1)
    images = [Image.new("RGB", (args.image_side, args.image_side), (40 * i % 255, 90, 160)) for i in range(args.batch)]
    side = args.image_side
    prompts = [vlm.profile.reg_prompt(Box(10 + i, 20, side // 2, side // 2 + i), img.size) for i, img in enumerate(images)]
    completions = [torch.randint(tokenizer_size, args.vocab, (args.answer,), generator=generator).tolist() for _ in images]
    inputs = vlm._inputs(images, prompts)
    image_tokens, prompt_tokens = int((inputs["input_ids"][0] == vlm.model.config.image_token_id).sum()), inputs["input_ids"].shape[1]
    del inputs  # its pixel patches are made again inside each call
    run = functools.partial(full_sequence_logprobs, vlm) if arm == "full_sequence_logits" else vlm.logprobs
    baseline_mb = psutil.Process().memory_info().rss / 2**20
    seconds = []
    for _ in range(args.calls):
        started = time.perf_counter()
        logprobs = run(images, prompts, completions)
        seconds.append(time.perf_counter() - started)
    peak = peak_mb()
    return {
        "arm": arm,
        "baseline_rss_mb": round(baseline_mb, 1),
        "peak_rss_mb": round(peak, 1),
        "peak_delta_mb": round(peak - baseline_mb, 1),
        "seconds_per_call": [round(s, 3) for s in seconds],
        "image_tokens": image_tokens,
        "prompt_tokens": prompt_tokens,
        "logprobs": torch.cat(logprobs).tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-side", type=int, default=896, help="pixels; (side / 28)^2 image tokens")
    parser.add_argument("--answer", type=int, default=30, help="completion tokens per row")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--calls", type=int, default=3, help="timed logprobs calls per arm")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=ARMS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "child"]
    runs = {}
    for arm in ARMS:
        out = subprocess.run([sys.executable, __file__, "--child", arm, *forwarded], capture_output=True, text=True, check=True)
        runs[arm] = json.loads(out.stdout.strip().splitlines()[-1])
        print({k: v for k, v in runs[arm].items() if k != "logprobs"}, flush=True)
    old, new = runs["full_sequence_logits"], runs["completion_logits"]
    old_seconds, new_seconds = statistics.median(old["seconds_per_call"]), statistics.median(new["seconds_per_call"])
    positions = old["prompt_tokens"] + args.answer
    result = {
        "benchmark": "logprobs_memory",
        "model": f"Qwen2VLForConditionalGeneration, random weights, vocab {args.vocab}, hidden {args.hidden}, 2 layers, fp32, CPU",
        "batch": args.batch,
        "image_tokens": old["image_tokens"],
        "prompt_tokens": old["prompt_tokens"],
        "answer_tokens": args.answer,
        "threads": args.threads,
        "calls_per_arm": args.calls,
        "logits_mb": {
            "full_sequence": round(args.batch * positions * args.vocab * 4 / 2**20, 1),
            "completion_positions": round(args.batch * (args.answer + 1) * args.vocab * 4 / 2**20, 1),
        },
        "full_sequence_logits": {k: old[k] for k in ("baseline_rss_mb", "peak_rss_mb", "peak_delta_mb", "seconds_per_call")},
        "completion_logits": {k: new[k] for k in ("baseline_rss_mb", "peak_rss_mb", "peak_delta_mb", "seconds_per_call")},
        "peak_delta_ratio_old_over_new": round(old["peak_delta_mb"] / new["peak_delta_mb"], 2),
        "peak_rss_ratio_old_over_new": round(old["peak_rss_mb"] / new["peak_rss_mb"], 2),
        "median_seconds_ratio_old_over_new": round(old_seconds / new_seconds, 2),
        "max_abs_logprob_difference": max(abs(a - b) for a, b in zip(old["logprobs"], new["logprobs"])),
        "note": "both arms also hold the processor's pixel patches and the vision tower's activations (same in both); "
        "the difference is the [batch, positions, vocab] logits",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "logprobs_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
