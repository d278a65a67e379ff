"""The build's stages, by name, in build order (see densefusion_hf.recipe.STAGE_ORDER)."""

from densefusion_hf.stages.caption import Caption
from densefusion_hf.stages.dedup import Dedup
from densefusion_hf.stages.embed import Embed
from densefusion_hf.stages.fetch import Fetch
from densefusion_hf.stages.ingest import Ingest
from densefusion_hf.stages.publish import Publish
from densefusion_hf.stages.select import Select
from densefusion_hf.stages.semdedup import SemDedup

STAGES = {stage.name: stage for stage in (Ingest(), Fetch(), Dedup(), Embed(), SemDedup(), Select(), Caption(),
                                          Publish())}
