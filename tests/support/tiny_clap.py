"""Test support: a tiny random CLAP (transformers' ClapModel) saved offline in
save_pretrained form, since no real CLAP weights can be downloaded here."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer

SAMPLE_RATE = 16000  # not LAION's 48 kHz, so a hard-coded rate would show


def tiny_processor(fused: bool) -> ClapProcessor:
    """A byte-level BPE tokenizer with no merges, and a 1 s, 16-mel feature extractor."""
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    vocab = {token: number for number, token in enumerate(specials + sorted(ByteLevel.alphabet()))}
    tokenizer = RobertaTokenizer(vocab=vocab, merges=[], model_max_length=32)
    extractor = ClapFeatureExtractor(
        feature_size=16, sampling_rate=SAMPLE_RATE, hop_length=160, fft_window_size=512, max_length_s=1,
        frequency_max=8000, truncation="fusion" if fused else "rand_trunc")
    return ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer)


def tiny_config(vocab_size: int, fused: bool) -> ClapConfig:
    """Two text layers of width 32; a two-stage HTSAT on a 64x64 spectrogram image (101 frames
    x 16 mels, folded by spec_size // num_mel_bins = 4), 4x4 windows; 16-d shared space."""
    text = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=34)
    audio = dict(spec_size=64, num_mel_bins=16, window_size=4, patch_embeds_hidden_size=8,
                 hidden_size=16, depths=[1, 1], num_attention_heads=[1, 2], enable_fusion=fused,
                 fusion_type="aff_2d" if fused else None)
    return ClapConfig(text_config=text, audio_config=audio, projection_dim=16)


def save_tiny_clap(folder: Path, fused: bool = False) -> Path:
    processor = tiny_processor(fused)
    torch.manual_seed(0)
    ClapModel(tiny_config(len(processor.tokenizer), fused)).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


