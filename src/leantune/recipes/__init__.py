"""Recipes: short end-to-end scripts (train, evaluate, export) composed from the components."""
