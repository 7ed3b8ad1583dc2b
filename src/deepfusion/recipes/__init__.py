"""The protocols as recipes: each reads top to bottom and takes the engine's send function (engines move bytes)."""
