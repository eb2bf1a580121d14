"""The layer every other one stands on: errors, shared names and types, paths, files."""
