"""Duplicate detection: exact (sha256), perceptual (image hashes) and semantic (embeddings)."""
