"""Which CoCa model writes captions, and how: what the CLI and the index record, without
importing torch (the model itself is in `captioner`)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ModelLoadError, UsageError
from ..core.types import CAPTION_METHODS
from .spec import HF_HUB, LOCAL_DIR, ModelSpec, open_clip_pretrained_alone

DEFAULT_CAPTION_MODEL = "coca_ViT-B-32"
# Both of open_clip's tags for it were trained on LAION-2B; this one was then fine-tuned on COCO
# captions, so it writes plain descriptions ("a dog running on the beach") where the LAION-only
# weights write alt-text, which scores far lower against descriptive references.
DEFAULT_CAPTION_PRETRAINED = "mscoco_finetuned_laion2b_s13b_b90k"
# open_clip's context length where a configuration names none
OPEN_CLIP_CONTEXT = 77


@dataclass(frozen=True)
class CaptionOptions:
    """How captions are generated.

    `max_length` counts the caption's tokens, not the start and end tokens. `no_repeat_ngram`
    forbids any n-gram of that many tokens to occur twice in a caption (0 allows repeats).
    Top-p sampling draws from a generator seeded with `seed` for every batch, so the same
    batch gives the same captions.
    """

    method: str = "beam"            # one of CAPTION_METHODS
    beam_width: int = 3
    length_penalty: float = 1.0     # beam scores are divided by length ** length_penalty
    top_p: float = 0.9
    temperature: float = 1.0
    max_length: int = 20
    no_repeat_ngram: int = 3
    seed: int = 0

    @property
    def writer(self) -> str:
        """How these options write, in a few words: what a caption records beside its model."""
        if self.method == "beam":
            return f"beam width {self.beam_width}, up to {self.max_length} tokens"
        return f"top-p {self.top_p:g}, up to {self.max_length} tokens"

    def __post_init__(self) -> None:
        if self.method not in CAPTION_METHODS:
            raise UsageError(f"method must be one of {', '.join(CAPTION_METHODS)}, not {self.method!r}")
        for name in ("beam_width", "max_length"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.temperature <= 0:
            raise UsageError(f"temperature must be above 0, not {self.temperature}")
        if self.no_repeat_ngram < 0:
            raise UsageError(f"no_repeat_ngram must be 0 (off) or more, not {self.no_repeat_ngram}")



def caption_model_spec(name: str | None = None, pretrained: str | None = None) -> ModelSpec:
    """The caption model a user asked for; with no name, CoCa ViT-B-32 with its COCO weights
    (trained on LAION-2B, then fine-tuned on COCO captions)."""
    if name is None:
        return ModelSpec(DEFAULT_CAPTION_MODEL, pretrained or DEFAULT_CAPTION_PRETRAINED)
    return ModelSpec.parse(name, pretrained)


def default_caption_model(index_model: ModelSpec) -> ModelSpec:
    """The index's own model when its configuration says it is a CoCa, else the default CoCa."""
    return index_model if configured_as_coca(index_model) else caption_model_spec()


def check_coca(spec: ModelSpec) -> None:
    """Refuse a model that is no CoCa, wherever its configuration can be read without weights."""
    if configured_as_coca(spec) is False:
        raise ModelLoadError(not_coca_message(spec))


def configured_as_coca(spec: ModelSpec) -> bool | None:
    """Whether `spec`'s configuration has a caption decoder; None when it cannot be read yet.
    Read without importing torch where open_clip is not imported yet."""
    model_cfg = _model_config(spec)
    return None if model_cfg is None else "multimodal_cfg" in model_cfg


def longest_caption(spec: ModelSpec) -> int | None:
    """How many tokens a caption of this CoCa may have (its contexts less the start token), as
    its configuration says; None where that cannot be read without weights."""
    model_cfg = _model_config(spec)
    if model_cfg is None or "multimodal_cfg" not in model_cfg:
        return None
    return min((model_cfg.get(section) or {}).get("context_length", OPEN_CLIP_CONTEXT)
               for section in ("text_cfg", "multimodal_cfg")) - 1


def _model_config(spec: ModelSpec) -> dict | None:
    """`spec`'s model configuration, where it can be read without weights (else None)."""
    if spec.name.startswith(HF_HUB):
        return None  # its configuration comes with its weights
    if spec.name.startswith(LOCAL_DIR):
        # A folder without a readable one: load_encoder explains what is wrong with it.
        return _read_config(Path(spec.name[len(LOCAL_DIR):]) / "open_clip_config.json", "model_cfg")
    name = spec.name.replace("/", "-")
    if "open_clip" in sys.modules:  # its own table, with configs added at run time
        return sys.modules["open_clip"].get_model_config(name)
    try:
        folder, _ = open_clip_pretrained_alone()
    except Exception:  # another open_clip layout: the load finds out
        return None
    return _read_config(folder / "model_configs" / f"{name}.json")


def _read_config(config: Path, section: str | None = None) -> dict | None:
    try:
        data = json.loads(config.read_text())
        model_cfg = data[section] if section else data
        return model_cfg if isinstance(model_cfg, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def too_long_message(spec: ModelSpec, longest: int, asked: int, parameter: str = "max_length") -> str:
    return f"{parameter} must be at most {longest} for caption model {spec.identity}, not {asked}"


def not_coca_message(spec: ModelSpec) -> str:
    return (f"caption model {spec.identity} is not a CoCa model and cannot write captions; pass a "
            f"CoCa model as `caption_model`, e.g. {DEFAULT_CAPTION_MODEL} with "
            f"`caption_pretrained` {DEFAULT_CAPTION_PRETRAINED}")
