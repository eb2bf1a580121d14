"""Answering queries: parsing them, turning terms into vectors, searching, entries and fusion."""
