"""Fusion on synthetic worlds where each modality carries only part of the answer.

An entry of class (shape, colour, pitch) has an image part that encodes only its shape, a text
part only its colour and an audio part only its pitch: a fixed concept vector plus noise as long
as the concept itself. A query describes all three. Ranked by one part alone, an entry can be told
only to a third (9 of the 27 classes look alike), so single modalities score about 1/9 at R@1 and
every way of fusing them has to combine evidence to do better. Frame sequences whose class is the
order of their frames show what pooling cannot see and trained temporal encoders can.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from retrieval.core.errors import UsageError
from retrieval.core.types import EARLY_FUSIONS as EARLY
from retrieval.core.types import MODALITIES
from retrieval.encoders.temporal import TemporalEncoder
from retrieval.encoders.video import pool_frames
from retrieval.query.fusion import FusedHit, early_fuse, early_fuse_query, late_fuse
from retrieval.query.gate import AttentionFusion
from retrieval.train.fusion import FusionTrainingOptions, train_attention
from retrieval.train.temporal import train_temporal

WORLD = ("image", "text", "audio")  # the modalities the synthetic entries have
DIM = 24
VALUES = 3       # values of each attribute
PER_CLASS = 4    # entries per class, alike but for their noise
NOISE = 1.0      # noise vector length relative to the unit concept vector
DEPTH = 40       # results each modality's own search hands to late fusion
WEIGHTS = {"image": 1.0, "text": 1.0, "audio": 0.5}  # e.g. soundtracks trusted less

# One orthonormal concept vector per (attribute, value); attribute m is what modality m can see.
CONCEPTS = np.linalg.qr(np.random.default_rng(0).normal(size=(DIM, DIM)))[0][:3 * VALUES]
CONCEPTS = CONCEPTS.reshape(3, VALUES, DIM).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: on two busy cores, torch's threads only contend for them (measured
    10 ms a training step with one thread, 200-700 ms with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def noisy(vectors: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return unit(vectors + NOISE * rng.normal(size=vectors.shape) / np.sqrt(DIM))


@dataclass
class World:
    parts: np.ndarray       # (N, M, d) unit part vectors
    attributes: np.ndarray  # (N, informative) the values the informative parts encode
    classes: np.ndarray     # (N,) class number, from the informative attributes

    @property
    def mask(self) -> np.ndarray:
        return np.linalg.norm(self.parts, axis=2) > 0  # entries here have no video part


@dataclass
class Queries:
    vectors: np.ndarray  # (Q, d)
    classes: np.ndarray  # (Q,) the class whose entries answer each query


def make_world(seed: int, informative: int = 3, per_class: int = PER_CLASS) -> World:
    """`per_class` entries of each class; the first `informative` modalities encode one attribute
    each, the rest are pure noise (random unit vectors)."""
    rng = np.random.default_rng(seed)
    values = np.array(list(itertools.product(range(VALUES), repeat=informative)))
    attributes = np.repeat(values, per_class, axis=0)
    parts = [noisy(CONCEPTS[m, attributes[:, m]], rng) if m < informative
             else unit(rng.normal(size=(len(attributes), DIM))) for m in range(len(WORLD))]
    parts += [np.zeros((len(attributes), DIM), np.float32)] * (len(MODALITIES) - len(WORLD))
    return World(np.stack(parts, axis=1), attributes, np.arange(len(attributes)) // per_class)


def make_queries(seed: int, count: int, informative: int = 3) -> Queries:
    """Queries describing every informative attribute of a random class."""
    rng = np.random.default_rng(seed)
    attributes = rng.integers(VALUES, size=(count, informative))
    described = sum(CONCEPTS[m, attributes[:, m]] for m in range(informative))
    return Queries(noisy(described, rng), np.ravel_multi_index(attributes.T, (VALUES,) * informative))


def recall_at_1(world: World, top: np.ndarray, queries: Queries) -> float:
    """Queries whose first result is of their class (any of its entries is right)."""
    return float(np.mean(world.classes[top] == queries.classes))


def rankings(world: World, query: np.ndarray) -> dict[str, list[tuple[int, float]]]:
    """What searching each modality's parts alone returns: its DEPTH best entries."""
    found = {}
    for m, modality in enumerate(WORLD):
        scores = world.parts[:, m] @ query
        found[modality] = [(int(e), float(scores[e])) for e in np.argsort(-scores)[:DEPTH]]
    return found


def early_top(world: World, queries: Queries, strategy: str) -> np.ndarray:
    weights = None if strategy == "mean" else WEIGHTS
    entries = np.stack([early_fuse(dict(zip(WORLD, parts)), strategy, weights) for parts in world.parts])
    # concat weights sit in the entries; the query copies stay equal
    return (early_fuse_query(queries.vectors, strategy) @ entries.T).argmax(axis=1)


def late_top(world: World, queries: Queries, strategy: str) -> np.ndarray:
    return np.array([late_fuse(rankings(world, q), strategy, WEIGHTS, k=1)[0].entry for q in queries.vectors])


def attention_top(model: AttentionFusion, world: World, queries: Queries) -> np.ndarray:
    with torch.no_grad():
        scores = model(torch.from_numpy(queries.vectors), torch.from_numpy(world.parts),
                       torch.from_numpy(world.mask))
    return scores.argmax(dim=1).numpy()


def train_on(world: World, queries: Queries) -> tuple[AttentionFusion, dict]:
    answers = np.array([np.flatnonzero(world.classes == c)[0] for c in queries.classes])
    return train_attention(queries.vectors, world.parts, world.mask, answers, groups=world.classes)


# -- every strategy combines what single modalities cannot -------------------------------------

@pytest.fixture(scope="module")
def world() -> World:
    return make_world(seed=1)


@pytest.fixture(scope="module")
def test_queries() -> Queries:
    return make_queries(seed=2, count=270)


@pytest.fixture(scope="module")
def single_recalls(world, test_queries) -> dict[str, float]:
    return {modality: recall_at_1(world, (test_queries.vectors @ world.parts[:, m].T).argmax(axis=1),
                                  test_queries)
            for m, modality in enumerate(WORLD)}


@pytest.fixture(scope="module")
def attention(world) -> AttentionFusion:
    return train_on(world, make_queries(seed=3, count=540))[0]


def test_single_modalities_tell_only_a_third(single_recalls):
    # chance within the 9 classes a single attribute leaves is 1/9
    assert max(single_recalls.values()) < 0.25, single_recalls


@pytest.mark.parametrize("strategy", ["mean", "weighted", "concat", "sum", "rrf", "attention"])
def test_fusion_beats_the_best_single_modality(strategy, world, test_queries, single_recalls, attention):
    if strategy in EARLY:
        top = early_top(world, test_queries, strategy)
    elif strategy == "attention":
        top = attention_top(attention, world, test_queries)
    else:
        top = late_top(world, test_queries, strategy)
    recall = recall_at_1(world, top, test_queries)
    assert recall > max(single_recalls.values()) + 0.3, (recall, single_recalls)


def test_max_answers_one_attribute_queries_but_cannot_compose(world, test_queries):
    """Max keeps each entry's best single piece of evidence, so for queries describing all three
    attributes it is no better than one modality: whichever modality gives the top score, the top
    entry is a uniform pick among the 36 sharing that one attribute. Its strength is a query that
    only one part can answer and no fixed part answers all of: a shape named alone, a pitch hummed
    alone. There the best single modality is right for its third of the queries and by chance for
    the rest, while max takes whichever part matched."""
    rng = np.random.default_rng(4)
    attribute, value = rng.integers(3, size=270), rng.integers(VALUES, size=270)
    queries = noisy(CONCEPTS[attribute, value], rng)

    def right(top: np.ndarray) -> float:
        return float(np.mean(world.attributes[top, attribute] == value))

    single = max(right((queries @ world.parts[:, m].T).argmax(axis=1)) for m in range(len(WORLD)))
    fused = right(np.array([late_fuse(rankings(world, q), "max", k=1)[0].entry for q in queries]))
    assert single < 0.75 and fused > single + 0.25, (single, fused)
    composed = recall_at_1(world, late_top(world, test_queries, "max"), test_queries)
    assert composed < recall_at_1(world, early_top(world, test_queries, "mean"), test_queries) - 0.3


# -- early fusion ------------------------------------------------------------------------------

def test_concat_inner_product_is_the_weighted_sum_of_cosines():
    rng = np.random.default_rng(5)
    parts = {"image": unit(rng.normal(size=DIM)), "audio": unit(rng.normal(size=DIM))}  # no text
    query = unit(rng.normal(size=DIM))
    entry_weights = {"image": 2.0, "text": 3.0, "audio": 0.5}
    query_weights = {"image": 0.25, "text": 1.0, "audio": 4.0, "video": 1.0}
    entry = early_fuse(parts, "concat", entry_weights)
    fused_query = early_fuse_query(query, "concat", query_weights)
    assert entry.shape == fused_query.shape == (len(MODALITIES) * DIM,)
    assert np.linalg.norm(entry) == pytest.approx(1, abs=1e-6)
    weighted = sum(entry_weights[m] * query_weights[m] * float(parts[m] @ query) for m in parts)
    norms = np.sqrt((2.0 ** 2 + 0.5 ** 2) * sum(w ** 2 for w in query_weights.values()))
    assert float(entry @ fused_query) * norms == pytest.approx(weighted, abs=1e-6)
    assert np.all(entry[DIM:2 * DIM] == 0)  # the missing text part


def test_mean_and_weighted_are_normalised_sums_queried_as_they_are():
    rng = np.random.default_rng(6)
    parts = dict(zip(MODALITIES, unit(rng.normal(size=(3, DIM)))))
    total = parts["image"] + parts["text"] + parts["audio"]
    assert np.allclose(early_fuse(parts), total / np.linalg.norm(total), atol=1e-6)
    leaning = 3 * parts["image"] + parts["text"] + parts["audio"]
    assert np.allclose(early_fuse(parts, "weighted", {"image": 3.0}), leaning / np.linalg.norm(leaning),
                       atol=1e-6)
    assert np.allclose(early_fuse_query(parts["text"], "weighted"), parts["text"], atol=1e-7)


# -- late fusion -------------------------------------------------------------------------------

HAND_MADE = {"image": [(3, 0.9), (1, 0.5), (3, 0.4)],  # entry 3 twice: counted once, at its best
             "text": [(2, 0.8), (1, 0.7)],
             "audio": [(2, 0.6)]}


def test_sum_contributions_add_up_to_the_score():
    hits = late_fuse(HAND_MADE, "sum", {"text": 2.0})
    assert [hit.entry for hit in hits] == [2, 1, 3]
    assert hits[0] == FusedHit(2, pytest.approx(2 * 0.8 + 0.6), {"text": pytest.approx(1.6),
                                                                   "audio": pytest.approx(0.6)})
    for hit in hits:
        assert sum(hit.contributions.values()) == pytest.approx(hit.score)
    assert hits[2].contributions == {"image": pytest.approx(0.9)}  # absent from text and audio


def test_max_credits_the_modality_that_counted():
    hits = late_fuse(HAND_MADE, "max", {"audio": 2.0})
    assert [(hit.entry, hit.contributions) for hit in hits] == [
        (2, {"audio": pytest.approx(1.2)}), (3, {"image": pytest.approx(0.9)}),
        (1, {"text": pytest.approx(0.7)})]
    assert all(hit.score == next(iter(hit.contributions.values())) for hit in hits)


def test_rrf_matches_the_hand_computed_scores():
    # ranks: image 3 (1st), 1 (2nd); text 2 (1st), 1 (2nd); audio 2 (1st)
    hits = late_fuse(HAND_MADE, "rrf", k=3, rrf_k=60)
    assert [(hit.entry, hit.score) for hit in hits] == [
        (2, pytest.approx(2 / 61)), (1, pytest.approx(2 / 62)), (3, pytest.approx(1 / 61))]
    weighted = late_fuse(HAND_MADE, "rrf", {"image": 3.0}, k=2, rrf_k=60)
    assert [(hit.entry, hit.score) for hit in weighted] == [
        (1, pytest.approx(3 / 62 + 1 / 62)), (3, pytest.approx(3 / 61))]


# -- attention ---------------------------------------------------------------------------------

def test_attention_scores_are_gated_cosines_over_the_parts_an_entry_has():
    torch.manual_seed(0)
    model = AttentionFusion(DIM)
    torch.nn.init.normal_(model.gate[-1].weight)  # unequal weights, unlike a fresh gate's
    rng = np.random.default_rng(7)
    query = torch.from_numpy(unit(rng.normal(size=(2, DIM))))
    parts = torch.from_numpy(unit(rng.normal(size=(2, len(MODALITIES), DIM))))
    parts[1, 1:] = 0
    mask = torch.tensor([[True] * len(MODALITIES), [True] + [False] * (len(MODALITIES) - 1)])
    with torch.no_grad():
        scores, weights = model(query, parts, mask), model.weights(query)
    cosines = torch.einsum("bd,nmd->bnm", query, parts)
    assert weights.std(dim=1).min() > 0.05
    assert torch.allclose(scores[:, 0], (weights * cosines[:, 0]).sum(dim=1), atol=1e-6)
    assert torch.allclose(scores[:, 1], cosines[:, 1, 0], atol=1e-6)  # image only: its cosine


def test_attention_gate_turns_away_from_a_noise_modality():
    """Audio parts are random vectors here, and queries describe shape and colour: mean fusion
    adds the audio cosines' noise to every score, a trained gate learns to leave them out."""
    world = make_world(seed=8, informative=2, per_class=12)  # as many entries as the main world
    model, report = train_on(world, make_queries(seed=9, count=540, informative=2))
    queries = make_queries(seed=10, count=270, informative=2)
    with torch.no_grad():
        image, text, audio, _ = model.weights(torch.from_numpy(queries.vectors)).mean(dim=0).tolist()
    assert audio < 0.15 and min(image, text) > 0.35, (image, text, audio)
    gated = recall_at_1(world, attention_top(model, world, queries), queries)
    mean = recall_at_1(world, early_top(world, queries, "mean"), queries)
    assert gated > mean + 0.05, (gated, mean)
    assert len(report["epochs"]) == 30 and report["held_out"] == 108
    assert report["epochs"][-1]["recall_at_1"] > 0.85


# -- temporal ----------------------------------------------------------------------------------

ORDERS = [(a, b) for a in range(4) for b in range(4) if a != b]  # class: concept a, then b


@dataclass
class Sequences:
    frames: list[np.ndarray]
    classes: np.ndarray


def make_sequences(seed: int, per_class: int, classes: list[int]) -> Sequences:
    """6-12 noisy frames of one concept, then of another, switching somewhere in the middle."""
    rng = np.random.default_rng(seed)
    frames, labels = [], []
    for label in classes:
        for _ in range(per_class):
            length = int(rng.integers(6, 13))
            switch = int(rng.integers(length // 3, 2 * length // 3 + 1))
            concepts = np.array([ORDERS[label][0]] * switch + [ORDERS[label][1]] * (length - switch))
            frames.append(noisy(CONCEPTS.reshape(-1, DIM)[concepts], rng))
            labels.append(label)
    return Sequences(frames, np.array(labels))


@pytest.fixture(scope="module")
def captions() -> np.ndarray:
    """The vector each order class should land next to, as its caption's would be."""
    return unit(np.random.default_rng(11).normal(size=(len(ORDERS), DIM)))


@pytest.fixture(scope="module")
def mirrored() -> Sequences:
    """Held-out sequences, each beside itself reversed: the same frames, the opposite class."""
    forward = make_sequences(12, 8, [c for c, (a, b) in enumerate(ORDERS) if a < b])
    backward = [ORDERS.index((b, a)) for a, b in (ORDERS[c] for c in forward.classes)]
    return Sequences(forward.frames + [f[::-1] for f in forward.frames],
                     np.concatenate([forward.classes, backward]))


@pytest.mark.parametrize("strategy", ["mean", "max"])
def test_pooling_cannot_tell_frame_order(strategy, mirrored):
    pooled = np.stack([pool_frames(frames, strategy) for frames in mirrored.frames])
    half = len(pooled) // 2
    assert np.allclose(pooled[:half], pooled[half:], atol=1e-6)
    training = make_sequences(13, 30, list(range(len(ORDERS))))
    train_pooled = np.stack([pool_frames(frames, strategy) for frames in training.frames])
    centroids = unit(np.stack([train_pooled[training.classes == c].mean(axis=0) for c in range(len(ORDERS))]))
    guess = (pooled @ centroids.T).argmax(axis=1)
    unordered = [set(ORDERS[c]) == set(ORDERS[t]) for c, t in zip(guess, mirrored.classes)]
    # the concepts are plain to see; their order is a coin toss, at most one of each mirrored pair
    assert np.mean(unordered) > 0.9
    assert np.mean(guess == mirrored.classes) <= 0.5


@pytest.mark.parametrize("kind", ["bilstm", "transformer"])
def test_temporal_encoders_learn_frame_order(kind, mirrored, captions):
    training = make_sequences(13, 30, list(range(len(ORDERS))))
    model, report = train_temporal(training.frames, captions[training.classes], kind,
                                   FusionTrainingOptions(epochs=20))
    found = (model.encode(mirrored.frames) @ captions.T).argmax(axis=1)
    assert np.mean(found == mirrored.classes) >= 0.9
    assert report["held_out"] == 72 and report["epochs"][-1]["recall_at_1"] >= 0.9
    assert isinstance(model, TemporalEncoder) and model.architecture == kind


# -- mistakes ----------------------------------------------------------------------------------

VECTOR = unit(np.ones(DIM))


@pytest.mark.parametrize("call", [
    lambda: early_fuse({"image": VECTOR}, "median"),
    lambda: early_fuse({"smell": VECTOR}),
    lambda: early_fuse_query(VECTOR, "rrf"),
    lambda: late_fuse({"image": [(0, 1.0)]}, "mean"),
    lambda: late_fuse({"smell": [(0, 1.0)]}, "sum"),
    lambda: late_fuse({"image": [(0, 1.0)]}, "sum", {"audio ": 1.0}),
    lambda: pool_frames(np.stack([VECTOR, VECTOR]), "median"),
    lambda: TemporalEncoder(DIM, "gru"),
    lambda: train_temporal([np.stack([VECTOR])] * 2, np.stack([VECTOR] * 2), "attention"),
])
def test_unknown_names_are_refused_in_one_line_listing_the_choices(call):
    with pytest.raises(UsageError, match="choose one of") as refused:
        call()
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("call, message", [
    (lambda: early_fuse({}), "at least one part"),
    (lambda: early_fuse({"image": VECTOR}, "weighted", {"image": 0.0}), "zero vector"),
    (lambda: early_fuse({"image": VECTOR}, "weighted", {"image": -1.0}), "must be a finite number >= 0"),
    (lambda: early_fuse({"image": VECTOR, "text": VECTOR[:4]}), "vectors of one length"),
    (lambda: late_fuse({"image": [(0, 1.0)]}, k=0), "k >= 1"),
])
def test_nothing_to_fuse_is_refused(call, message):
    with pytest.raises(UsageError, match=message):
        call()


def test_learnt_pooling_names_point_to_the_trainer():
    with pytest.raises(UsageError, match="train_temporal"):
        pool_frames(np.stack([VECTOR, VECTOR]), "bilstm")
