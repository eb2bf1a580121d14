"""open_clip's plain towers written as ONNX graphs operator by operator (`onnx_graphs`): equal
to open_clip's own for every variant of them the writer takes, refused with nothing left
behind for any other, and written without holding the model's weights in memory."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx
import open_clip
import pytest
import torch
from support.tiny_model import TINY_MODEL_CFG, write_local_dir_model

from retrieval.encoders.clip import load_encoder
from retrieval.encoders.onnx_checks import INT8_AGREEMENT
from retrieval.encoders.onnx_export import export_towers
from retrieval.encoders.onnx_graphs import Unsupported, give_back_pages, write_image_graph, write_text_graph
from retrieval.encoders.onnx_towers import open_session
from retrieval.encoders.spec import ModelSpec

TOLERANCE = 1e-4  # on normalised vectors, as the export's own check
TEXTS = ["a dog in the park", "", "x", "two cats asleep on a red sofa by the window", "word " * 100]

# Each changes one part of the tiny CLIP the writer must follow.
VARIANTS = {
    "plain": {},
    "quick GELU": {"quick_gelu": True},
    "layer scale": {"vision_cfg": {"ls_init_value": 0.5}, "text_cfg": {"ls_init_value": 0.5}},
    "tanh GELU, other epsilon": {
        "vision_cfg": {"act_kwargs": {"approximate": "tanh"}, "norm_kwargs": {"eps": 1e-6}},
        "text_cfg": {"act_kwargs": {"approximate": "tanh"}, "norm_kwargs": {"eps": 1e-6}}},
    "no norm before the blocks, norm after pooling": {
        "vision_cfg": {"no_ln_pre": True, "final_ln_after_pool": True}},
    "rectangular images": {"vision_cfg": {"image_size": [32, 48]}},
    "end-token pooling, projection with a bias": {
        "text_cfg": {"pool_type": "eos", "eos_id": 49407, "proj_bias": True}},
    "first-token pooling, no projection": {"text_cfg": {"pool_type": "first", "proj_type": "none"}},
}

# Each makes one tower something the writer does not know.
REFUSED = {
    "attentional pooling": ("image", {"vision_cfg": {"attentional_pool": True, "attn_pooler_queries": 4,
                                                     "attn_pooler_heads": 2}}),
    "average pooling": ("image", {"vision_cfg": {"pool_type": "avg"}}),
    "normed queries and keys": ("image", {"vision_cfg": {"qk_norm": True}}),
    "no causal mask": ("text", {"text_cfg": {"no_causal_mask": True}}),
    "last-token pooling": ("text", {"text_cfg": {"pool_type": "last"}}),
}


def tiny_clip(change: dict) -> open_clip.CLIP:
    """The suite's tiny CLIP with `change` merged into its configuration, every weight (layer
    norms and scales too) seeded at random."""
    config = {key: dict(value) if isinstance(value, dict) else value for key, value in TINY_MODEL_CFG.items()}
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    torch.manual_seed(0)
    model = open_clip.CLIP(**config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def normalised(features: torch.Tensor | np.ndarray) -> np.ndarray:
    features = np.asarray(features, np.float32)
    return features / np.linalg.norm(features, axis=1, keepdims=True)


@pytest.mark.parametrize("change", VARIANTS.values(), ids=VARIANTS)
def test_written_towers_equal_open_clip(change, tmp_path):
    model = tiny_clip(change)
    write_image_graph(model.visual, tmp_path / "image.onnx")
    write_text_graph(model, tmp_path / "text.onnx", twin=tmp_path / "text.int8.onnx")
    height, width = np.broadcast_to(model.visual.image_size, 2)
    pixels = torch.randn(3, 3, int(height), int(width))
    tokens = open_clip.get_tokenizer("ViT-B-32")(TEXTS)
    with torch.no_grad():
        images, texts = model.encode_image(pixels), model.encode_text(tokens)  # untrimmed, 77 tokens
    image_session = open_session(tmp_path / "image.onnx")
    got = image_session.run(None, {"pixels": pixels.numpy()})[0]
    assert np.abs(normalised(got) - normalised(images)).max() < TOLERANCE
    assert np.abs(normalised(image_session.run(None, {"pixels": pixels[:1].numpy()})[0])
                  - normalised(images[:1])).max() < TOLERANCE
    text_session = open_session(tmp_path / "text.onnx")
    longest = int(np.flatnonzero(tokens.numpy().any(axis=0)).max()) + 1
    got = text_session.run(None, {"tokens": tokens[:, :longest].numpy()})[0]
    assert np.abs(normalised(got) - normalised(texts)).max() < TOLERANCE
    for row, text_tokens in enumerate(tokens.numpy()):  # each text alone, cut to its own length
        own = text_tokens[:int(np.flatnonzero(text_tokens).max()) + 1][None]
        got = text_session.run(None, {"tokens": own})[0]
        assert np.abs(normalised(got) - normalised(texts[row:row + 1])).max() < TOLERANCE
    twin = open_session(tmp_path / "text.int8.onnx").run(None, {"tokens": tokens[:, :longest].numpy()})[0]
    assert (normalised(twin) * normalised(texts)).sum(axis=1).min() >= INT8_AGREEMENT


def test_the_8_bit_twin_multiplies_every_weight_in_integers(tmp_path):
    """Every product by a weight matrix runs on 8-bit weights, kept in the twin's own file; its
    other weights are the fp32 graph's, read from that graph's file."""
    model = tiny_clip({})
    write_text_graph(model, tmp_path / "text.onnx", twin=tmp_path / "text.int8.onnx")
    graph, twin = (onnx.load(str(tmp_path / name), load_external_data=False)
                   for name in ("text.onnx", "text.int8.onnx"))
    weights = {tensor.name for tensor in graph.graph.initializer}
    products = [node for node in graph.graph.node if node.op_type == "MatMul" and node.input[1] in weights]
    blocks = len(model.transformer.resblocks)
    assert len(products) == 4 * blocks + 1  # q/k/v, out, two MLP layers a block; the projection
    integer = [node for node in twin.graph.node if node.op_type == "MatMulInteger"]
    assert len(integer) == len(products)
    assert not any(node.op_type == "MatMul" and node.input[1] in weights for node in twin.graph.node)
    files = {entry.value for tensor in twin.graph.initializer for entry in tensor.external_data
             if entry.key == "location"}
    assert files == {"text.onnx.data", "text.int8.onnx.data"}


@pytest.mark.parametrize("tower, change", REFUSED.values(), ids=REFUSED)
def test_other_towers_are_refused_with_nothing_left_behind(tower, change, tmp_path):
    model = tiny_clip(change)
    with pytest.raises(Unsupported) as refused:
        if tower == "image":
            write_image_graph(model.visual, tmp_path / "image.onnx")
        else:
            write_text_graph(model, tmp_path / "text.onnx")
    assert str(refused.value).startswith("its ")  # completes "the ... tower was left out: ..."
    assert list(tmp_path.iterdir()) == []


def mapped_kib(path: Path) -> int:
    """How much of file `path`, as this process maps it, is resident (KiB)."""
    resident, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            resident += int(line.split()[1])
    return resident


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_an_export_gives_the_weights_pages_back(tmp_path, monkeypatch):
    """The checkpoint is mapped; once the export has written the graphs and encoded the probes,
    its pages no longer count in the process's memory."""
    spec = write_local_dir_model(tmp_path / "model", None, 0)
    os.sync()  # a page the kernel has yet to write out cannot be given back
    encoder = load_encoder(ModelSpec.parse(spec), "cpu")
    weights = next((tmp_path / "model").glob("*.safetensors")).resolve()
    with torch.no_grad():
        for tensor in encoder.model.state_dict().values():
            tensor.sum()  # every page in
    size = weights.stat().st_size // 1024
    assert mapped_kib(weights) > size // 2  # mapped, and read
    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path / "cache"))
    export_towers(encoder, tmp_path / "index")
    assert mapped_kib(weights) < size // 10


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_pages_given_back_keep_their_values(tmp_path):
    """A mapped file's pages leave the process (and are mapped again when read); pages of the
    process's own, a tensor in memory or a mapped page it wrote, keep their values."""
    expected = torch.arange(1_000_000, dtype=torch.float32)
    own = expected.clone()
    give_back_pages([own])
    assert torch.equal(own, expected)
    path = tmp_path / "weights.bin"
    expected.numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=False, size=expected.numel())
    assert torch.equal(mapped, expected) and mapped_kib(path) > 3000
    give_back_pages([mapped])
    assert mapped_kib(path) < 100
    assert torch.equal(mapped, expected)  # read again
    mapped[0] = -1  # now that page is the process's own copy
    give_back_pages([mapped])
    assert mapped[0] == -1 and torch.equal(mapped[1:], expected[1:])
