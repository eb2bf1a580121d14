"""Captions written by open_clip CoCa models: loading, beam search and top-p sampling, and the
combined loss that fine-tunes them.

open_clip's own `CoCa.generate` needs transformers' `BeamSearchScorer`, which transformers 5
removed, so it fails for every generation type there. This module drives CoCa's image encoder
and text decoder itself instead. The searches take any function that gives next-token
log-probabilities, are batched over images, stop each row at the end token or `max_length`,
and can forbid repeated n-grams. The model's function decodes one token at a time over cached
keys and values (each image is encoded once, not once per beam as in open_clip's search).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import CoCaLoss
from PIL import Image
from torch import Tensor

from ..core.errors import ModelLoadError, UsageError
from .caption_spec import CaptionOptions, check_coca, not_coca_message, too_long_message
from .clip import ClipEncoder, load_encoder
from .spec import ModelSpec

# open_clip's CoCa training defaults (--coca-caption-loss-weight, --coca-contrastive-loss-weight).
CAPTION_LOSS_WEIGHT = 2.0
CONTRASTIVE_LOSS_WEIGHT = 1.0
NEVER = float("-inf")  # the log-probability of a token ruled out

# (the image of each row, the tokens of each row so far (R, T), the row of the previous call
# each row extends, None at the first call) -> next-token log-probabilities (R, vocabulary), on
# the CPU.
NextTokenLogProbs = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def load_captioner(spec: ModelSpec, options: CaptionOptions | None = None, device: str = "auto",
                   batch_size: int = 8) -> Captioner:
    """Load the CoCa model named by `spec`; a model that is no CoCa is refused before its weights
    are fetched wherever its configuration can be read without them."""
    check_coca(spec)
    encoder = load_encoder(spec, device, batch_size, parameter_prefix="caption_")
    return Captioner(encoder, options)


class Captioner:
    """Writes captions for images with a CoCa model (the model inside a ClipEncoder).

    Built from an encoder already loaded, an index whose own model is a CoCa captions with it
    without loading it twice.
    """

    def __init__(self, encoder: ClipEncoder, options: CaptionOptions | None = None) -> None:
        if not isinstance(encoder.model, open_clip.CoCa):
            raise ModelLoadError(not_coca_message(encoder.spec))
        self.encoder = encoder
        self.model: open_clip.CoCa = encoder.model
        self.options = options or CaptionOptions()
        # open_clip's tokenizers write the empty text as start, end, padding...
        start, end = encoder.tokenizer([""])[0, :2].tolist()
        self.start_token, self.end_token = int(start), int(end)
        longest = min(self.model.text.context_length, self.model.text_decoder.context_length) - 1
        if self.options.max_length > longest:
            raise UsageError(too_long_message(encoder.spec, longest, self.options.max_length))

    @property
    def identity(self) -> str:
        """The caption model's identity, to record beside every caption it writes."""
        return self.encoder.spec.identity

    @property
    def batch_size(self) -> int:
        return self.encoder.batch_size

    def preprocess_image(self, image: Image.Image) -> Tensor:
        """Resize, crop and normalise one RGB image into the model's input tensor."""
        return self.encoder.preprocess_image(image)

    def caption_images(self, images: Sequence[Image.Image]) -> list[str]:
        """One caption per RGB image, `batch_size` images at a time."""
        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            captions += self.caption_tensors(torch.stack([self.preprocess_image(image) for image in chunk]))
        return captions

    @torch.inference_mode()
    def caption_tensors(self, pixels: Tensor) -> list[str]:
        """One caption per preprocessed image in a batch (N, 3, H, W)."""
        if len(pixels) == 0:
            return []
        # The attentional pooler's tokens are what the decoder attends to; its pooled vector
        # (the contrastive embedding) is not needed here.
        _, image_tokens = self.model.visual(pixels.to(self.encoder.device))
        next_log_probs = caption_decoder(self.model, image_tokens)
        options = self.options
        if options.method == "beam":
            written = beam_search(next_log_probs, len(pixels), self.start_token, self.end_token,
                                  options.beam_width, options.max_length, options.length_penalty,
                                  options.no_repeat_ngram)
        else:
            generator = torch.Generator().manual_seed(options.seed)
            written = sample_top_p(next_log_probs, len(pixels), self.start_token, self.end_token,
                                   options.top_p, options.temperature, options.max_length,
                                   options.no_repeat_ngram, generator)
        return [self._text(tokens) for tokens in written]

    def _text(self, tokens: list[int]) -> str:
        tokenizer = self.encoder.tokenizer
        if hasattr(tokenizer, "decode"):  # open_clip's own BPE tokenizer
            text = tokenizer.decode(tokens)
        else:  # open_clip's wrapper of a Hugging Face tokenizer
            text = tokenizer.tokenizer.decode(tokens, skip_special_tokens=True)
        return " ".join(text.split())


def caption_decoder(model: open_clip.CoCa, image_tokens: Tensor,
                    cached: bool = True) -> NextTokenLogProbs:
    """Next-token log-probabilities of captions for images, from the tokens `model.visual` gave.

    With `cached`, where the model's blocks are open_clip's plain ones (every CoCa it ships but
    the one with a RoBERTa text tower), each new token runs alone through the text tower and
    decoder over every layer's cached keys and values, and the image tokens' keys and values
    are computed once per image. Otherwise every step runs the whole prefix through the model's
    own forward. Both give the same numbers; the cached way is several times faster.
    """
    if cached and can_decode_stepwise(model):
        return _StepwiseDecoder(model, image_tokens)

    def next_log_probs(rows: Tensor, tokens: Tensor, parents: Tensor | None) -> Tensor:
        device = image_tokens.device
        _, text_tokens = model.text(tokens.to(device))
        logits = model.text_decoder(image_tokens[rows.to(device)], text_tokens)[:, -1]
        return logits.float().log_softmax(dim=-1).cpu()

    return next_log_probs


def can_decode_stepwise(model: open_clip.CoCa) -> bool:
    """Whether `model`'s text tower and decoder are built of the blocks `caption_decoder` caches."""
    from open_clip.transformer import MultimodalTransformer, ResidualAttentionBlock, TextTransformer

    text, decoder = model.text, model.text_decoder
    if type(text) is not TextTransformer or type(decoder) is not MultimodalTransformer:
        return False  # e.g. a Hugging Face text tower
    blocks = [*text.transformer.resblocks, *decoder.resblocks, *decoder.cross_attn]
    return (text.attn_mask is not None and not getattr(text, "use_pad_mask", False) and decoder.batch_first
            and decoder.text_projection is not None
            and all(type(block) is ResidualAttentionBlock and block.attn.batch_first
                    and block.attn.in_proj_weight is not None and block.attn.bias_k is None
                    and not block.attn.add_zero_attn for block in blocks))


class _StepwiseDecoder:
    """CoCa's text tower and multimodal decoder, one token at a time over cached keys and values.

    The same arithmetic as open_clip's ResidualAttentionBlock and nn.MultiheadAttention: the
    text tower's outputs at earlier positions cannot change (causal attention, and the class
    token CoCa appends comes after them), so only the newest position is computed.
    """

    def __init__(self, model: open_clip.CoCa, image_tokens: Tensor) -> None:
        self.model = model
        self.device = image_tokens.device
        decoder = model.text_decoder
        self.image_keys_values = [_keys_values(block, block.ln_1_kv(image_tokens))
                                  for block in decoder.cross_attn]
        self.self_blocks = [*model.text.transformer.resblocks, *decoder.resblocks]
        self.cache: list[tuple[Tensor, Tensor]] = []  # per self-attention block

    def __call__(self, rows: Tensor, tokens: Tensor, parents: Tensor | None) -> Tensor:
        rows, text = rows.to(self.device), self.model.text
        if parents is None:
            self.cache = []
        else:
            parents = parents.to(self.device)
            self.cache = [(keys[parents], values[parents]) for keys, values in self.cache]
        position = tokens.shape[1] - 1
        if self.cache and self.cache[0][0].shape[2] != position:
            raise ValueError("stepwise decoding needs every call to add one token to the last call's rows")
        x = text.token_embedding(tokens[:, -1:].to(self.device)).to(text.transformer.get_cast_dtype())
        x = x + text.positional_embedding[position].to(x.dtype)
        # Rows come in runs of one image each (its beams); with runs of one length, a run's
        # queries attend to its image's keys and values as one, without copying them per row.
        images, runs = rows.unique_consecutive(return_counts=True)
        run = int(runs[0]) if bool((runs == runs[0]).all()) else 1
        if run == 1:
            images = rows
        whole = len(images) == len(self.image_keys_values[0][0]) and bool(
            (images == torch.arange(len(images), device=self.device)).all())
        cache = []
        decoder_blocks = len(text.transformer.resblocks)
        for number, block in enumerate(self.self_blocks):
            x, keys_values = _attend_step(block, x, self.cache[number] if self.cache else None)
            cache.append(keys_values)
            if number >= decoder_blocks:  # each decoder layer attends to the image after itself
                cross = self.model.text_decoder.cross_attn[number - decoder_blocks]
                keys, values = self.image_keys_values[number - decoder_blocks]
                if not whole:
                    keys, values = keys[images], values[images]
                x = _attend_step(cross, x, (keys, values), queries_per_image=run)[0]
        self.cache = cache
        decoder = self.model.text_decoder
        logits = decoder.ln_final(x[:, -1]) @ decoder.text_projection
        return logits.float().log_softmax(dim=-1).cpu()


def _keys_values(block: torch.nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """An attention block's keys and values of `x` (N, L, D), split into heads (N, H, L, D / H)."""
    attn = block.attn
    weights = attn.in_proj_weight[attn.embed_dim:]
    bias = attn.in_proj_bias[attn.embed_dim:] if attn.in_proj_bias is not None else None
    keys, values = F.linear(x, weights, bias).chunk(2, dim=-1)
    return _heads(keys, attn.num_heads), _heads(values, attn.num_heads)


def _heads(x: Tensor, heads: int) -> Tensor:
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _attend_step(block: torch.nn.Module, x: Tensor, keys_values: tuple[Tensor, Tensor] | None,
                 queries_per_image: int | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One ResidualAttentionBlock on the newest position `x` (R, 1, D).

    Self-attention (`queries_per_image` None) appends the position's keys and values to
    `keys_values`, the earlier positions', and returns them. Cross-attention attends to the
    image keys and values in `keys_values` as they are, one image per `queries_per_image` rows.
    """
    attn = block.attn
    h = block.ln_1(x)
    bias = attn.in_proj_bias
    cross_attention = queries_per_image is not None
    if cross_attention:
        query = F.linear(h, attn.in_proj_weight[:attn.embed_dim],
                         None if bias is None else bias[:attn.embed_dim])
        keys, values = keys_values
    else:
        query, key, value = F.linear(h, attn.in_proj_weight, bias).chunk(3, dim=-1)
        keys, values = _heads(key, attn.num_heads), _heads(value, attn.num_heads)
        if keys_values is not None:
            keys = torch.cat([keys_values[0], keys], dim=2)
            values = torch.cat([keys_values[1], values], dim=2)
    query = _heads(query, attn.num_heads)                                # (R, H, 1, D / H)
    if cross_attention:  # an image's rows become positions of one query: (images, H, rows, D / H)
        query = query[:, :, 0].unflatten(0, (-1, queries_per_image)).transpose(1, 2)
    attended = F.scaled_dot_product_attention(query, keys, values)
    if cross_attention:
        attended = attended.transpose(1, 2).flatten(0, 1)[:, :, None]
    x = x + block.ls_1(attn.out_proj(attended.transpose(1, 2).flatten(2)))
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, (keys, values)


class CocaLoss(NamedTuple):
    """CoCa's training objective for one batch: `total` to back-propagate, and its two parts."""

    total: Tensor
    contrastive: Tensor
    caption: Tensor


class CocaOutputs(NamedTuple):
    """What CoCa's objective reads of one batch: the normalised image and text embeddings,
    and the decoder's next-token logits with the tokens they predict."""

    image_features: Tensor
    text_features: Tensor
    logits: Tensor
    labels: Tensor


def coca_outputs(model: open_clip.CoCa, images: Tensor, tokens: Tensor) -> CocaOutputs:
    """CoCa's forward pass on preprocessed images and their tokenized captions, for its loss.

    The same as `model(images, tokens)`, but the decoder runs only up to the batch's longest
    caption: a causal decoder's outputs there do not depend on the padding after it, which the
    caption loss ignores anyway, and the vocabulary-wide logits over all context positions are
    most of the memory of a step.
    """
    image_latent, image_tokens = model.visual(images)
    text_latent, text_tokens = model.text(tokens)
    written = int(tokens.ne(model.pad_id).any(dim=0).nonzero().max()) + 1
    logits = model.text_decoder(image_tokens, text_tokens[:, :written - 1])
    return CocaOutputs(F.normalize(image_latent, dim=-1), F.normalize(text_latent, dim=-1), logits,
                       tokens[:, 1:written])


def coca_loss(model: open_clip.CoCa, images: Tensor, tokens: Tensor,
              caption_weight: float = CAPTION_LOSS_WEIGHT,
              contrastive_weight: float = CONTRASTIVE_LOSS_WEIGHT) -> CocaLoss:
    """open_clip's CoCaLoss on a batch of preprocessed images and their tokenized captions.

    Pair i (image i, caption i) is the only positive of row i in the contrastive part, as in
    open_clip's training.
    """
    outputs = coca_outputs(model, images, tokens)
    objective = CoCaLoss(caption_loss_weight=caption_weight, clip_loss_weight=contrastive_weight,
                         pad_id=model.pad_id)
    contrastive, caption = objective(*outputs[:2], *outputs[2:], model.logit_scale.exp())
    return CocaLoss(contrastive + caption, contrastive, caption)


def caption_loss(model: open_clip.CoCa, outputs: CocaOutputs, weight: float = CAPTION_LOSS_WEIGHT) -> Tensor:
    """CoCa's captioning part alone (open_clip's, weighted), for a trainer with a contrastive
    loss of its own."""
    objective = CoCaLoss(caption_loss_weight=weight, clip_loss_weight=0, pad_id=model.pad_id)
    return objective(*outputs[:2], *outputs[2:], model.logit_scale.exp())[1]


# -- searches ---------------------------------------------------------------------------------

def beam_search(next_log_probs: NextTokenLogProbs, images: int, start_token: int, end_token: int,
                beam_width: int = 3, max_length: int = 20, length_penalty: float = 1.0,
                no_repeat_ngram: int = 0) -> list[list[int]]:
    """The most likely token sequence for each of `images` images, without start and end tokens.

    `next_log_probs` gets, for every live beam, its image's number and its tokens so far, and
    gives log-probabilities on the CPU. A finished hypothesis scores its summed log-probability
    divided by its length (with the end token) to the power `length_penalty`. An image stops
    searching once it holds `beam_width` finished hypotheses and its best live beam, scored at
    its current length, cannot beat the worst of them (the heuristic of Hugging Face's search).
    """
    width = beam_width
    active = torch.arange(images)                      # the images still searching
    tokens = torch.full((images * width, 1), start_token, dtype=torch.long)
    # Only the first beam of each image is live at the start, so beams do not start as copies.
    scores = torch.full((images, width), NEVER)
    scores[:, 0] = 0
    scores = scores.flatten()
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(images)]
    parents = None
    for step in range(max_length + 1):
        log_probs = next_log_probs(active.repeat_interleave(width), tokens, parents)
        _forbid(log_probs, tokens, step, start_token, end_token, max_length, no_repeat_ngram)
        vocabulary = log_probs.shape[-1]
        candidates = (scores[:, None] + log_probs).view(len(active), width * vocabulary)
        # At most `width` candidates end (one per beam), so 2 * width leave `width` to go on.
        top_scores, top_indices = candidates.topk(min(2 * width, width * vocabulary), dim=1)
        kept: list[tuple[int, int, float]] = []       # (row, token, score) of the next beams
        going_on = []
        for slot, image in enumerate(active.tolist()):
            beams: list[tuple[int, int, float]] = []
            for rank, (score, index) in enumerate(zip(top_scores[slot].tolist(),
                                                      top_indices[slot].tolist())):
                row, token = slot * width + index // vocabulary, index % vocabulary
                if score == NEVER or len(beams) == width:
                    break
                if token != end_token:
                    beams.append((row, token, score))
                elif rank < width:  # as in Hugging Face: an end counts among the best `width` only
                    _keep_best(finished[image], score / (step + 1) ** length_penalty,
                               tokens[row, 1:].tolist(), width)
            if beams and not _search_done(finished[image], beams[0][2] / (step + 1) ** length_penalty,
                                          width):
                # A tiny vocabulary can leave fewer than `width`: dead copies fill the rest.
                kept += beams + [(beams[0][0], beams[0][1], NEVER)] * (width - len(beams))
                going_on.append(slot)
        if not going_on:
            break
        rows, next_tokens, next_scores = zip(*kept)
        parents = torch.tensor(rows)
        tokens = torch.cat([tokens[parents], torch.tensor(next_tokens)[:, None]], dim=1)
        scores = torch.tensor(next_scores)
        active = active[going_on]
    return [hypotheses[0][1] if hypotheses else [] for hypotheses in finished]  # best first


def sample_top_p(next_log_probs: NextTokenLogProbs, images: int, start_token: int, end_token: int,
                 top_p: float = 0.9, temperature: float = 1.0, max_length: int = 20,
                 no_repeat_ngram: int = 0, generator: torch.Generator | None = None) -> list[list[int]]:
    """One sampled token sequence per image, without start and end tokens: each token is drawn
    from the smallest set of most likely tokens whose probabilities sum to at least `top_p`.

    `next_log_probs` is called as in `beam_search`; `generator` (a CPU one) makes draws repeatable.
    """
    written: list[list[int]] = [[] for _ in range(images)]
    live = torch.arange(images)
    tokens = torch.full((images, 1), start_token, dtype=torch.long)
    parents = None
    for step in range(max_length + 1):
        log_probs = next_log_probs(live, tokens, parents)
        _forbid(log_probs, tokens, step, start_token, end_token, max_length, no_repeat_ngram)
        ordered, order = (log_probs / temperature).softmax(dim=-1).sort(dim=-1, descending=True)
        # A token stays while the more likely ones before it sum to less than top_p, so the
        # most likely always stays.
        ordered[ordered.cumsum(dim=-1) - ordered >= top_p] = 0
        next_tokens = order.gather(1, torch.multinomial(ordered, 1, generator=generator))
        tokens = torch.cat([tokens, next_tokens], dim=1)
        ended = next_tokens[:, 0] == end_token
        for row in ended.nonzero()[:, 0].tolist():
            written[live[row]] = tokens[row, 1:-1].tolist()
        parents = (~ended).nonzero()[:, 0]
        live, tokens = live[parents], tokens[parents]
        if len(live) == 0:
            break
    return written


def _forbid(log_probs: Tensor, tokens: Tensor, step: int, start_token: int,
            end_token: int, max_length: int, no_repeat_ngram: int) -> None:
    """Rule out, in place, the next tokens no caption may take."""
    if step == max_length:  # only the end is left
        end = log_probs[:, end_token].clone()
        log_probs[:] = NEVER
        log_probs[:, end_token] = end
        return
    log_probs[:, start_token] = NEVER
    if step == 0:
        log_probs[:, end_token] = NEVER  # an empty caption says nothing
    n, written = no_repeat_ngram, tokens[:, 1:]
    if n and written.shape[1] >= n:
        # Each n-gram written so far whose first n - 1 tokens are the last n - 1 written would
        # be repeated by its last token.
        grams = written.unfold(1, n, 1)                                   # (rows, grams, n)
        last = written[:, written.shape[1] - n + 1:]                     # (rows, n - 1)
        repeats = (grams[:, :, :-1] == last[:, None, :]).all(dim=-1)      # (rows, grams)
        row, gram = repeats.nonzero(as_tuple=True)
        log_probs[row, grams[row, gram, -1]] = NEVER


def _keep_best(hypotheses: list[tuple[float, list[int]]], score: float, tokens: list[int],
               width: int) -> None:
    hypotheses.append((score, tokens))
    hypotheses.sort(key=lambda hypothesis: hypothesis[0], reverse=True)
    del hypotheses[width:]


def _search_done(hypotheses: list[tuple[float, list[int]]], best_live: float, width: int) -> bool:
    return len(hypotheses) == width and best_live <= hypotheses[-1][0]


# -- model checks -----------------------------------------------------------------------------
