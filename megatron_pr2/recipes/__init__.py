"""Recipes: trainer configs with launch-only sections, their loader and ``pr2 check-recipe``."""
