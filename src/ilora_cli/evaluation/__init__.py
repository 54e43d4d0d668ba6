"""Evaluating trained runs (score, generate, full-catalogue rerank) and recommending for users."""
