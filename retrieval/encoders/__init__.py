"""What turns content into vectors: model identity, CLIP, the numpy text tower, audio towers, CLAP."""
