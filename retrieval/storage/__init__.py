"""What an index folder keeps: SQLite metadata, the manifest and FAISS vector sets."""
