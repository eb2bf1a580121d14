"""Contrastive fine-tuning of an open_clip model on captioned images, saved as a local-dir model.

Every caption is a training pair with its image. Each step scores a batch of pairs image
against text with the model's learned temperature and applies CLIP's symmetric cross-entropy;
pairs that share an image or a caption text are positives for each other, so a dataset that
repeats captions does not push apart what belongs together. A share of the images is held
out, and retrieval recall on them is measured before training and after every epoch.

What trains: everything (`all`), only the two projections (`projections`), or low-rank
adapters on the towers' linear layers (`adapters`, LoRA, merged into the weights on saving);
`freeze` keeps a tower as it is in any mode. The temperature always trains.

After every epoch the output folder gets open_clip_config.json and
open_clip_model.safetensors (a plain open_clip model: `--model local-dir:FOLDER`), and
training_state.pt, from which `resume` continues the run where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from tqdm import tqdm

from ..core.concurrency import default_workers, prefetch_map
from ..core.errors import UsageError, counted
from ..core.files import read_metadata, replacing, write_tensors
from ..encoders.captioner import CONTRASTIVE_LOSS_WEIGHT, caption_loss, coca_outputs
from ..encoders.clip import ClipEncoder, load_encoder, text_features
from ..encoders.spec import HF_HUB, LOCAL_DIR, ModelSpec
from ..media.images import ImageDecodeError, load_image
from ..media.pairs import CaptionedImages
from .evaluation import DirectionScores, exact_ranks
from .loop import EpochReport, Optimisation, batch_count, recall_line, symmetric_info_nce, train_epochs

TRAIN_MODES = ("all", "projections", "adapters")
TOWERS = ("image", "text")

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"  # the name open_clip looks for first in a local dir
STATE_NAME = "training_state.pt"
STATE_FORMAT = 1
# Parameters (or modules, by name prefix) that map a tower's features into the shared space.
PROJECTIONS = ("visual.proj", "visual.attnpool.c_proj", "visual.head", "text_projection", "text.proj")
# Options a resumed run may change; any other must match the run being resumed.
RESUME_MAY_CHANGE = ("epochs", "device", "progress")
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
NO_DECAY = ("bn", "ln", "bias", "embed", "logit_scale")  # name parts open_clip training exempts


@dataclass(frozen=True)
class TrainingOptions:
    """How to fine-tune; a value, so a run's options cannot change under it."""

    epochs: int = 5
    batch_size: int = 64
    learning_rate: float = 1e-5
    warmup_steps: int = 50          # linear warm-up, then cosine decay to 0 over all steps
    weight_decay: float = 0.1
    train: str = "all"              # one of TRAIN_MODES
    freeze: tuple[str, ...] = ()    # towers kept as they are: "image", "text"
    adapter_rank: int = 4
    held_out: float | int = 0.1     # images held out to measure recall: a share, or a count
    seed: int = 0
    device: str = "auto"
    progress: bool = False


@dataclass
class TrainingReport:
    output: str
    model: str                  # the local-dir: spec of the saved checkpoint
    pairs: int                  # training pairs (captions of the images not held out)
    held_out_images: int
    trainable_parameters: int
    before: dict                # held-out recall before any training, as EpochReport.held_out
    epochs: list[EpochReport]   # the epochs this call ran (after the resumed one, if any)
    seconds: float

    def summary(self) -> str:
        """One line: how long, on what, held-out R@1 before and after, where it was saved."""
        after = self.epochs[-1].held_out if self.epochs else self.before
        recall = ", ".join(f"{direction} {self.before[direction]['R@1']:.3f} -> "
                           f"{after[direction]['R@1']:.3f}" for direction in after) or "no held-out images"
        return (f"trained {counted(len(self.epochs), 'epoch')} on {counted(self.pairs, 'pair')} in "
                f"{self.seconds:.1f} s; "
                f"held-out R@1 {recall}; saved as {self.model}")

    def to_dict(self) -> dict:
        return asdict(self)


def fine_tune(spec: ModelSpec, data: CaptionedImages, output: str | Path,
              options: TrainingOptions = TrainingOptions(), resume: bool = False,
              log: Callable[[str], None] = lambda line: None) -> TrainingReport:
    """Fine-tune the model `spec` names on `data`, saving it into `output` after every epoch.

    `resume` continues the run saved in `output` up to `options.epochs` epochs in all.
    """
    return FineTuner(spec, data, output, options, resume, log).run()


class FineTuner:
    """One fine-tuning run: the model in training (`encoder.model`), its data, optimiser and
    schedule, ready to `run`; built from `output`'s saved state when resuming."""

    def __init__(self, spec: ModelSpec, data: CaptionedImages, output: str | Path,
                 options: TrainingOptions = TrainingOptions(), resume: bool = False,
                 log: Callable[[str], None] = lambda line: None) -> None:
        check_options(options)
        self.spec, self.options, self.log = spec, options, log
        self.output = Path(output).expanduser().resolve()
        self.digest = _digest(data)
        state = _read_state(self.output, spec, options, self.digest) if resume else None
        if not resume:
            _claim_output(self.output)
        torch.manual_seed(options.seed)
        # Adapters never change the base weights, so a resumed adapter run starts from the
        # original model again (exactly, where unmerging the checkpoint would round) and takes
        # what it trained from the saved state.
        restart_from_checkpoint = state is not None and options.train != "adapters"
        source = ModelSpec.parse(LOCAL_DIR + str(self.output)) if restart_from_checkpoint else spec
        self.encoder: ClipEncoder = load_encoder(source, options.device, options.batch_size)
        self.config = _checkpoint_config(spec, self.encoder.model)
        self.keys = list(self.encoder.model.state_dict())  # open_clip's names, before any adapter
        self.trainable = _make_trainable(self.encoder.model, options, spec)

        training, held = data.split(options.held_out, options.seed)
        self.train_data, self.train_pixels = self._decode(training)
        self.held_data, self.held_pixels = self._decode(held)
        if len(self.train_data.captions) < 2:
            raise UsageError(f"training needs at least 2 captioned images, found "
                             f"{len(self.train_data.captions)} outside the held-out ones")
        self.tokens = self.encoder.tokenizer(self.train_data.captions)
        self.text_ids = torch.tensor(_text_ids(self.train_data.captions))
        self.caption_image = torch.from_numpy(self.train_data.caption_image)

        total_steps = options.epochs * batch_count(len(self.train_data.captions), options.batch_size)
        # On the CPU the fused kernel updates all weights in one pass: about 5x faster than torch's
        # default per-tensor loop, which took a third of each step (the token table is large).
        self.optimizer = torch.optim.AdamW(_parameter_groups(self.trainable, options.weight_decay),
                                           lr=options.learning_rate,
                                           fused=True if self.encoder.device == "cpu" else None)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _warmup_cosine(options.warmup_steps, total_steps))
        self.generator = torch.Generator().manual_seed(options.seed)  # shuffles and flips
        self.epoch, self.before = 0, None
        if state is not None:
            self._restore(state)

    # -- running -----------------------------------------------------------------------------

    def run(self) -> TrainingReport:
        """Train the remaining epochs, measuring and saving after each; the model ends in eval mode."""
        started = time.perf_counter()
        trainable = sum(p.numel() for p in self.trainable.values())
        self.log(f"training {trainable:,} parameters "
                 f"({self.options.train}) on {counted(len(self.train_data.captions), 'pair')}, "
                 f"{counted(len(self.held_data.images), 'held-out image')}, {self.encoder.device}")
        if self.before is None:
            self.before = self.held_out_recall()
            self.log(f"before training: {recall_line(self.before)}")
        report = TrainingReport(str(self.output), LOCAL_DIR + str(self.output),
                                len(self.train_data.captions), len(self.held_data.images),
                                trainable, self.before, [], 0.0)
        optimisation = Optimisation(self.optimizer, self.schedule, self.encoder.model.logit_scale)
        report.epochs = list(train_epochs(
            self.encoder.model, self._loss, self.held_out_recall, np.arange(len(self.train_data.captions)),
            len(self.held_data.images), optimisation, self.generator,
            range(self.epoch + 1, self.options.epochs + 1), self.options.batch_size,
            name="fine-tuning", progress=self.options.progress, train_mode=train_mode,
            headline=lambda measures: measures["text->image"]["R@1"], after_epoch=self._save, log=self.log))
        self.encoder.model.eval()
        report.seconds = time.perf_counter() - started
        return report

    def held_out_recall(self) -> dict:
        """R@K both ways on the held-out images and their captions; {} when none are held out."""
        if not self.held_data.images:
            return {}
        self.encoder.model.eval()
        with parametrize.cached():  # adapters: merge each weight once, not once per batch
            images = np.concatenate([self.encoder.encode_image_tensors(chunk.float())
                                     for chunk in self.held_pixels.split(self.options.batch_size)])
            texts = self.encoder.encode_texts(self.held_data.captions)
        text_ranks, image_ranks = exact_ranks(images, texts, self.held_data.caption_image,
                                              self.held_data.captions_of())
        return {"text->image": _recall(text_ranks), "image->text": _recall(image_ranks)}

    def _loss(self, batch: np.ndarray, scale: torch.Tensor) -> torch.Tensor:
        """CLIP's loss on a batch of pairs, each image flipped or not at random (and a CoCa's
        captioning loss beside it)."""
        model, device = self.encoder.model, self.encoder.device
        batch = torch.from_numpy(batch)
        images = self.caption_image[batch]
        pixels = _flipped(self.train_pixels[images].float(), self.generator).to(device)
        tokens = self.tokens[batch].to(device)
        if isinstance(model, open_clip.CoCa):
            # CoCa's combined objective: the contrastive part (ours: soft positives, as a batch
            # may hold several captions of one image) plus its captioning part, weighted as
            # open_clip trains it, so fine-tuning also teaches the decoder to write the captions.
            outputs = coca_outputs(model, pixels, tokens)
            image_features, texts = outputs.image_features, outputs.text_features
            written = caption_loss(model, outputs)
        else:
            image_features = F.normalize(model.encode_image(pixels), dim=-1)
            texts = F.normalize(text_features(model, tokens), dim=-1)
            written = 0
        logits = scale * image_features @ texts.T
        contrastive = symmetric_info_nce(logits, _positives(images, self.text_ids[batch]).to(device))
        return CONTRASTIVE_LOSS_WEIGHT * contrastive + written

    # -- data --------------------------------------------------------------------------------

    def _decode(self, data: CaptionedImages) -> tuple[CaptionedImages, torch.Tensor]:
        """The images preprocessed once, kept in memory; unreadable ones dropped with their captions.

        Caching the eval preprocess (plus a random flip per step) instead of decoding and
        augmenting every epoch keeps training fast; the sets fine-tuned here are small
        (thousands of images: ~0.3 MB each at 224 px in float16, far finer than 8-bit pixels).
        """
        def prepare(path: Path) -> torch.Tensor | None:
            try:
                image = load_image(path, min_side=2 * self.encoder.input_side)
                return self.encoder.preprocess_image(image).half()
            except ImageDecodeError:
                return None

        pixels = list(tqdm(prefetch_map(prepare, data.images, default_workers(), 64),
                           total=len(data.images), unit="img", desc="images",
                           disable=not self.options.progress))
        readable = [i for i, tensor in enumerate(pixels) if tensor is not None]
        if len(readable) < len(pixels):
            self.log(f"skipped {len(pixels) - len(readable)} unreadable images, e.g. "
                     f"{next(data.images[i] for i, t in enumerate(pixels) if t is None)}")
            data = data.subset(readable)
        if not readable:
            return data, torch.empty(0)
        return data, torch.stack([pixels[i] for i in readable])

    # -- saving and resuming -----------------------------------------------------------------

    def _save(self, epoch: int) -> None:
        """The checkpoint of `epoch` as a plain open_clip model, then the state to resume from,
        each atomically. The weights carry their epoch, so a crash between the two files is
        noticed on resume.
        """
        self.epoch = epoch
        with replacing(self.output / CONFIG_NAME) as temporary:
            temporary.write_text(json.dumps(self.config, indent=2), encoding="utf-8")
        write_tensors(self.output / WEIGHTS_NAME, _plain_state(self.encoder.model, self.keys),
                      {"epoch": str(self.epoch)})
        with replacing(self.output / STATE_NAME) as temporary:
            torch.save(self._state(), temporary)

    def _state(self) -> dict:
        return {"format": STATE_FORMAT, "epoch": self.epoch, "model": self.spec.identity,
                "data": self.digest, "options": _fixed_options(self.options), "before": self.before,
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                # Adapter runs resume from the original model plus what they trained (small).
                "trained": ({name: p.detach().cpu() for name, p in self.trainable.items()}
                            if self.options.train == "adapters" else {})}

    def _restore(self, state: dict) -> None:
        if self.options.train == "adapters":
            if set(self.trainable) != set(state["trained"]):
                raise UsageError(f"cannot resume {self.output}: its saved adapters do not fit this "
                                 "model; train again into a new folder")
            with torch.no_grad():
                for name, parameter in self.trainable.items():
                    parameter.copy_(state["trained"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch, self.before = state["epoch"], state["before"]


def check_options(options: TrainingOptions) -> None:
    """Refuse options that name nothing or leave nothing to train, with one line each."""
    if options.train not in TRAIN_MODES:
        raise UsageError(f"`train` must be one of {', '.join(TRAIN_MODES)}, not {options.train!r}")
    unknown = [tower for tower in options.freeze if tower not in TOWERS]
    if unknown:
        raise UsageError(f"`freeze` takes {' or '.join(TOWERS)}, not {unknown[0]!r}")
    if set(options.freeze) >= set(TOWERS):
        raise UsageError("both towers are frozen, so nothing would train; freeze at most one of "
                         f"{', '.join(TOWERS)}")
    for name, value, least in (("epochs", options.epochs, 1), ("batch size", options.batch_size, 2),
                               ("adapter rank", options.adapter_rank, 1),
                               ("warm-up steps", options.warmup_steps, 0)):
        if value < least:
            raise UsageError(f"{name} must be at least {least}, not {value}")
    if not options.learning_rate > 0 or not options.weight_decay >= 0:
        raise UsageError("the learning rate must be above 0 and the weight decay at least 0")


# -- what trains -----------------------------------------------------------------------------

class LowRankDelta(nn.Module):
    """LoRA as a parametrisation: the weight a layer uses is its frozen W plus `up @ down`.

    `up` starts at zero, so training starts from the model as it was; because the layer's
    `weight` attribute itself is replaced, this works however the layer's owner reads it
    (attention modules read their output projection's weight directly).
    """

    def __init__(self, weight: torch.Tensor, rank: int) -> None:
        super().__init__()
        rows, columns = weight.shape
        self.down = nn.Parameter(torch.empty(rank, columns, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.up = nn.Parameter(torch.zeros(rows, rank, dtype=weight.dtype, device=weight.device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.up @ self.down


def _make_trainable(model: nn.Module, options: TrainingOptions, spec: ModelSpec) -> dict[str, nn.Parameter]:
    """Freeze the model, attach adapters if asked, and unfreeze what `options` trains, by name."""
    model.requires_grad_(False)
    towers = [tower for tower in TOWERS if tower not in options.freeze]
    if options.train == "adapters":
        _attach_adapters(model, towers, options.adapter_rank)
    chosen = {name: p for name, p in model.named_parameters() if _trains(name, towers, options.train)}
    for tower in towers:
        if not any(_tower_of(name) == tower for name in chosen):
            raise UsageError(f"model {spec.identity}: its {tower} tower has nothing to train in mode "
                             f"{options.train!r} (`train`); choose another mode, or `freeze` {tower}")
    for parameter in chosen.values():
        parameter.requires_grad_(True)
    return chosen


def train_mode(model: nn.Module) -> None:
    """Training mode, except for batch norms that do not train: their running statistics are
    weights too, and a frozen tower (or adapted base) must come out as it went in."""
    model.train()
    for module in model.modules():
        if isinstance(module, BATCH_NORMS) and not any(p.requires_grad for p in module.parameters()):
            module.eval()


def _attach_adapters(model: nn.Module, towers: list[str], rank: int) -> None:
    layers = [module for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and _tower_of(f"{name}.weight") in towers
              and not _is_projection(f"{name}.weight")]
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", LowRankDelta(layer.weight, rank))


def _trains(name: str, towers: list[str], mode: str) -> bool:
    if name == "logit_scale":
        return True
    if _tower_of(name) not in towers:
        return False
    if mode == "projections":
        return _is_projection(name)
    if mode == "adapters":
        return _is_adapter(name)
    return True


def _tower_of(name: str) -> str | None:
    """Which tower a parameter belongs to: open_clip keeps the image tower under `visual`."""
    if name in ("logit_scale", "logit_bias"):
        return None
    return "image" if name.startswith("visual.") else "text"


def _is_projection(name: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in PROJECTIONS)


def _is_adapter(name: str) -> bool:
    return ".parametrizations." in name and not name.endswith(".original")


def _parameter_groups(trainable: dict[str, nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: not on gains, biases, embeddings or the temperature
    (open_clip training's rule; decaying a token table pulls unused rows to zero for nothing)."""
    def exempt(name: str, parameter: nn.Parameter) -> bool:
        return parameter.ndim < 2 or any(part in name for part in NO_DECAY)

    groups = [{"params": [p for n, p in trainable.items() if not exempt(n, p)], "weight_decay": weight_decay},
              {"params": [p for n, p in trainable.items() if exempt(n, p)], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def _warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate factor at each step: linear warm-up, then a cosine down to 0 at `total`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


# -- batches ---------------------------------------------------------------------------------

def _flipped(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2: cheap augmentation that the rare
    caption saying "left" or "right" is the only one to mind."""
    flip = torch.rand(len(pixels), 1, 1, 1, generator=generator) < 0.5
    return torch.where(flip, pixels.flip(-1), pixels)


def _positives(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """Which pairs match: the same image or the same caption text (a symmetric 0/1 matrix)."""
    return ((images[:, None] == images[None, :]) | (texts[:, None] == texts[None, :])).float()


def _text_ids(captions: list[str]) -> list[int]:
    ids: dict[str, int] = {}
    return [ids.setdefault(caption, len(ids)) for caption in captions]


def _recall(ranks: np.ndarray) -> dict[str, float]:
    return {f"R@{k}": value for k, value in DirectionScores.from_ranks(ranks).recall.items()}


# -- the output folder -----------------------------------------------------------------------

def _claim_output(folder: Path) -> None:
    """A new run writes only into a new or empty folder, never over another run's checkpoint."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"output {folder} is a file; name a folder to save the model in")
    if folder.is_dir() and any(folder.iterdir()):
        raise UsageError(f"output folder {folder} is not empty; pass `resume` to continue the training "
                         "saved there, or choose a new or empty folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(f"output folder {folder}: {error.strerror}") from None


def _checkpoint_config(spec: ModelSpec, model: nn.Module) -> dict:
    """open_clip_config.json for the saved model: the architecture `spec` names, and the
    preprocessing open_clip resolved for it (a pretrained tag can set its own mean and std)."""
    name = spec.name if spec.name.startswith((LOCAL_DIR, HF_HUB)) else spec.name.replace("/", "-")
    try:
        model_cfg = open_clip.get_model_config(name)
    except Exception:  # a hub config, or a local one since removed, that cannot be read now
        model_cfg = None
    if not model_cfg:
        raise UsageError(f"cannot read the configuration of model {spec.identity}, which the saved "
                         "checkpoint needs; use a built-in model name or local-dir:FOLDER")
    return {"model_cfg": model_cfg, "preprocess_cfg": dict(open_clip.get_model_preprocess_cfg(model))}


def _plain_state(model: nn.Module, keys: list[str]) -> dict[str, torch.Tensor]:
    """The weights under open_clip's own names; an adapted layer's weight comes out merged
    (reading it through the parametrisation gives W + up @ down)."""
    state = {}
    with torch.no_grad():
        for key in keys:
            owner, _, attribute = key.rpartition(".")
            value = getattr(model.get_submodule(owner), attribute)
            # safetensors takes neither shared nor strided storage: each tensor its own copy.
            state[key] = value.detach().cpu().contiguous().clone()
    return state


def _fixed_options(options: TrainingOptions) -> dict:
    """The options a resumed run must share; `freeze` as a tuple, however the caller gave it."""
    return {key: tuple(value) if isinstance(value, list) else value
            for key, value in asdict(options).items() if key not in RESUME_MAY_CHANGE}


def _digest(data: CaptionedImages) -> str:
    """A fingerprint of the pairs, so a resumed run trains on the same ones."""
    digest = hashlib.sha256()
    for item in (*map(str, data.images), *data.captions):
        digest.update(item.encode("utf-8", "surrogatepass") + b"\0")
    digest.update(data.caption_image.astype(np.int64).tobytes())
    return digest.hexdigest()


def _read_state(folder: Path, spec: ModelSpec, options: TrainingOptions, digest: str) -> dict:
    """The state saved in `folder`, checked to belong to this model, these options and pairs."""
    path = folder / STATE_NAME
    if not path.is_file():
        raise UsageError(f"nothing to resume in {folder}: no {STATE_NAME} there; "
                         "train without `resume` into a new folder")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds for a cut or foreign file
        raise UsageError(f"cannot resume from {path}: unreadable ({str(error).splitlines()[0][:120]})"
                         ) from None
    mismatch = _mismatch(state, spec, options, digest)
    if mismatch:
        raise UsageError(f"cannot resume {folder}: {mismatch}; resume with what it was trained with, "
                         "or train into a new folder")
    if state["epoch"] >= options.epochs:
        raise UsageError(f"the run saved in {folder} has already trained epoch {state['epoch']}; ask for "
                         f"more than {state['epoch']} epochs to train on")
    if _checkpoint_epoch(folder / WEIGHTS_NAME) != state["epoch"]:
        raise UsageError(f"cannot resume {folder}: its {WEIGHTS_NAME} is missing or from another epoch "
                         f"than {STATE_NAME} (stopped while saving?); train again into a new folder")
    return state


def _mismatch(state: object, spec: ModelSpec, options: TrainingOptions, digest: str) -> str | None:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        return f"{STATE_NAME} is not a training state this version reads"
    if state["model"] != spec.identity:
        return f"it was trained from model {state['model']}, not {spec.identity}"
    if state["data"] != digest:
        return "it was trained on other image-caption pairs"
    now = _fixed_options(options)
    changed = [f"{key} was {value!r}, now {now.get(key)!r}"
               for key, value in state["options"].items() if now.get(key) != value]
    return ", ".join(changed) or None


def _checkpoint_epoch(path: Path) -> int | None:
    try:
        return int(read_metadata(path).get("epoch", -1))
    except Exception:  # missing, cut short or not ours: no epoch to match
        return None
