"""Reproducible recipes for the models the package ships."""
