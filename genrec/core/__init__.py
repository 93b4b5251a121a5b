"""The bottom layer: typed config and presets, datasets, atomic writes, metrics and the bundle's files (no model
code; the models a bundle holds are built in genrec.models.loading)."""
