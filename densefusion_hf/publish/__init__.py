"""Publishing a build: the shard plan, the card's statistics, ``build.json``, the card and its charts, and the Hub
push.  ``stages/publish.py`` is the stage that calls them."""
