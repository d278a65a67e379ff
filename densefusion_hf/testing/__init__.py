"""Test doubles users may run too: ``hub_server`` is a local fake of the Hub's HTTP API
(``python -m densefusion_hf.testing.hub_server --root DIR``)."""
