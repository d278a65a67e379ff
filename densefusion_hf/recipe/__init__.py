"""Recipes: one YAML file per dataset, validated when loaded.

``sections`` holds one dataclass per recipe section and the loader; ``schema`` is the small engine that
turns YAML into those dataclasses and names the field, what was found and what is allowed when it cannot.
"""

from densefusion_hf.recipe.sections import (STAGE_ORDER, AltText, Boxes, Caption, Category, Dedup, Detector, Embed,
                                            Experts, Fetch, Generation, MetadataFilters, Ocr, OpenSetDetector,
                                            Publish, Recipe, Release, ReleaseLayout, Resize, Runner, Select, SemDedup, Server, ServerImage,
                                            Source, SourceColumns, Subset, Tagger, Workers, load_recipe, model_sections,
                                            recipe_fields)

__all__ = ["STAGE_ORDER", "AltText", "Boxes", "Caption", "Category", "Dedup", "Detector", "Embed", "Experts", "Fetch",
           "Generation", "MetadataFilters", "Ocr", "OpenSetDetector", "Publish", "Recipe", "Release", "ReleaseLayout", "Resize", "Runner", "Select",
           "SemDedup", "Server", "ServerImage", "Source", "SourceColumns", "Subset", "Tagger", "Workers", "load_recipe",
           "model_sections", "recipe_fields"]
