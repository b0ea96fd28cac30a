"""Decoding audio, reading user YAML, writing files whole."""
