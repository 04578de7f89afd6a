"""Crossfield: serving and training for multi-head MACE force fields."""
