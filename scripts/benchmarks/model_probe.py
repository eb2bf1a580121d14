"""One candidate model in a process of its own, bare open_clip, as the models section runs it:

    python -m benchmarks.model_probe throughput SPEC TEXTS.json BATCH BATCHES
    python -m benchmarks.model_probe text SPEC TEXTS.json
    python -m benchmarks.model_probe image SPEC PHOTO

`throughput` loads the model and times batches of random pixels and of texts; `text` and
`image` load it and answer one query, so the whole process is a cold query. Every mode
re-parameterises the model first (MobileCLIP's towers train with branches that inference
folds into one convolution; the others have nothing to fold). Prints one JSON line.
"""

from __future__ import annotations

import json
import sys
import time

import open_clip
import torch
from PIL import Image
from timm.utils.model import reparameterize_model


def load(spec: str) -> tuple[torch.nn.Module, object, float, int]:
    """The model in eval mode, re-parameterised; its preprocessing; seconds taken; and how many
    modules were folded."""
    start = time.perf_counter()
    model, _, preprocess = open_clip.create_model_and_transforms(spec)
    folded = sum(1 for module in model.modules() if hasattr(module, "reparameterize"))
    model = reparameterize_model(model.eval(), inplace=True)  # a copy would double the memory measured
    return model, preprocess, time.perf_counter() - start, folded


def tokenizer_or_reason(spec: str) -> tuple[object | None, str | None]:
    try:
        return open_clip.get_tokenizer(spec), None
    except Exception as error:  # a missing Hugging Face tokenizer surfaces as several kinds
        return None, f"its tokenizer cannot be loaded offline ({type(error).__name__})"


@torch.inference_mode()
def throughput(spec: str, texts: list[str], batch: int, batches: int) -> dict:
    model, preprocess, load_s, folded = load(spec)
    side = preprocess(Image.new("RGB", (64, 64))).shape
    pixels = torch.randn((batch, *side), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # the first passes pay for allocation and page faults of fresh weights
        model.encode_image(pixels)
    start = time.perf_counter()
    for _ in range(batches):
        model.encode_image(pixels)
    result = {"load_s": load_s, "folded_modules": folded, "input_side": side[-1],
              "images_per_s": batch * batches / (time.perf_counter() - start)}
    tokenizer, reason = tokenizer_or_reason(spec)
    if tokenizer is None:
        return {**result, "texts_per_s": None, "text_skipped": reason}
    chunks = [texts[i:i + batch] for i in range(0, len(texts), batch)]
    model.encode_text(tokenizer(chunks[0]))
    start = time.perf_counter()
    for chunk in chunks:
        model.encode_text(tokenizer(chunk))
    return {**result, "texts_per_s": len(texts) / (time.perf_counter() - start)}


@torch.inference_mode()
def text_query(spec: str, text: str) -> dict:
    model, _, load_s, _ = load(spec)
    tokenizer, reason = tokenizer_or_reason(spec)
    if tokenizer is None:
        return {"load_s": load_s, "skipped": reason}
    start = time.perf_counter()
    model.encode_text(tokenizer([text]))
    return {"load_s": load_s, "encode_ms": (time.perf_counter() - start) * 1000}


@torch.inference_mode()
def image_query(spec: str, photo: str) -> dict:
    model, preprocess, load_s, _ = load(spec)
    start = time.perf_counter()
    model.encode_image(preprocess(Image.open(photo).convert("RGB")).unsqueeze(0))
    return {"load_s": load_s, "encode_ms": (time.perf_counter() - start) * 1000}


def main() -> None:
    mode, spec = sys.argv[1], sys.argv[2]
    if mode == "throughput":
        with open(sys.argv[3]) as file:
            texts = json.load(file)
        result = throughput(spec, texts, int(sys.argv[4]), int(sys.argv[5]))
    elif mode == "text":
        with open(sys.argv[3]) as file:
            result = text_query(spec, json.load(file)[0])
    else:
        result = image_query(spec, sys.argv[3])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
