"""Released datasets as a recipe source (``source.release``): the official DenseFusion-1M layout of JSON Lines
plus zip shards of images, read from the Hub through huggingface_hub or from a local folder.

``repo`` finds and downloads the release's files, ``rows`` turns its JSON Lines into the metadata ingest
reads, ``zips`` checks the zip shards and reads their members one at a time (``salvage`` when a zip's
central directory is broken), ``images`` is what fetch asks
for the images of one of its shards, and ``report`` sums fetch's per-zip counts for the dataset card.
"""
