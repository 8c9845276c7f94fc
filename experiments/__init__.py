"""Experiments that test the claims of the seed material with numbers (see experiments/README.md)."""
