"""Data: source formats → one prepared, on-disk dataset that every later command reads."""
