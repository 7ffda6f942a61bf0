"""Prompt data, tokenizers and the bundled tiny task."""
