"""The build's stages, by name, in build order (see recipe.STAGE_ORDER)."""

from densefusion_hf.stages.fetch import Fetch
from densefusion_hf.stages.ingest import Ingest
from densefusion_hf.stages.publish import Publish

STAGES = {stage.name: stage for stage in (Ingest(), Fetch(), Publish())}
