"""Where the stages run: ``local`` runs them in this process, shard by shard.  ``manifest`` records each stage's
settings so a changed recipe is detected on resume; ``status`` and ``report`` read a work directory back."""
