"""Embedded default model: a tiny text-to-image LDM of a synthetic shapes world."""
