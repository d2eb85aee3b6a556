"""The transformer (``transformer``) and its size grid, parameter counts and FLOPs (``sizes``)."""
