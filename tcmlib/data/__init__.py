"""Data: the offline glyph benchmark, handwritten digits, CUB / Cars-196 / SOP / iNaturalist loaders, samplers."""
