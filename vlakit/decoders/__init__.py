"""Transformer decoders: the language-model half of every VLA."""
