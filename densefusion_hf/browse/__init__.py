"""``df-hf browse``: a local page over a work directory, a published dataset folder or a Hub dataset repo.

    source.py     what PATH is, and reading its rows a row group at a time (local files or ranged reads
                  through huggingface_hub's HfFileSystem)
    index.py      the SQLite FTS5 index of the rows (filters, full-text search, dropped rows), built once
                  per dataset version and cached; again when a work directory's build moves on
    images.py     thumbnails made on demand and cached, decoding checks
    app.py        the Starlette application: pages, images, the card's assets
    server.py     uvicorn on 127.0.0.1, the address printed, a clean stop on Ctrl-C
    templates/    Jinja pages; static/ the page's only script and style sheet (no CDN)

The server only reads the data; everything it writes goes to its cache folder (``WORKDIR/browse-cache``
for a work directory, a folder under the user's cache otherwise).
"""
