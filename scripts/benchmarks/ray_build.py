"""j. A whole build on a local Ray beside the same build run locally: what the distributed path
costs where there is nothing to distribute to, and whether both store the same vectors."""

from __future__ import annotations

import numpy as np

from .context import Context
from .engine import Index, connect_ray
from .measure import timed
from .report import table

NAME = "ray"
TITLE = "j. A build on Ray beside a local build"
SUMMARY = "(only with --only ray) a whole build on a local Ray beside the same build run locally"
NEEDS = {"model", "corpus"}
OPT_IN = True


def stored_vectors(index: Index) -> dict[str, np.ndarray]:
    """uri -> stored vector of every image and text item."""
    vectors = {}
    for modality in ("image", "text"):
        ids, rows = index.store.all_vectors(modality)
        items = index.store.items(ids.tolist())
        vectors.update({items[int(item_id)].uri: row for item_id, row in zip(ids, rows)})
    return vectors


def run(context: Context) -> tuple[dict, str]:
    corpus = context.corpus
    _, ray_start_s = timed(lambda: connect_ray(None))
    builds, vectors = {}, {}
    for engine in ("local", "ray"):
        with context.open_loaded_index(f"index-{engine}") as index:
            report, wall = timed(lambda: index.add(corpus.folder, engine=engine))  # noqa: B023
            vectors[engine] = stored_vectors(index)
        builds[engine] = {"wall_s": wall, "images": report.images_encoded, "texts": report.texts_encoded}
    difference = max(float(np.abs(vectors["ray"][uri] - vector).max())
                     for uri, vector in vectors["local"].items())
    data = {"ray_start_s": ray_start_s, "builds": builds, "max_vector_difference": difference,
            "same_items": vectors["ray"].keys() == vectors["local"].keys()}
    rows = [(engine, f"{b['images']:,}", f"{b['texts']:,}", f"{b['wall_s']:.1f}",
             f"{b['images'] / b['wall_s']:.1f}") for engine, b in builds.items()]
    return data, "\n".join([
        f"`index.add(folder, engine=...)` over {corpus.origin}, model loaded beforehand; Ray "
        f"started on this machine in {ray_start_s:.1f} s beforehand (one embedding actor with "
        "this machine's cores, no GPU).", "",
        table(("engine", "images", "texts", "wall s", "images/s over the whole wall"), rows), "",
        f"Same items: {'yes' if data['same_items'] else '**no**'}; largest difference between a "
        f"vector of the two builds: {difference:.1e}."])
