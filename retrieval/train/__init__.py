"""Training and measuring: fine-tuning CLIP, the audio tower, the fusion gate and the temporal encoder."""
