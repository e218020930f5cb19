"""Stage recipes that train models, each runnable as `python -m fm.recipes.<name>` or under torchrun."""
