"""Test doubles users may run too: ``hub_server`` is a local fake of the Hub's HTTP API
(``python -m densefusion_hf.testing.hub_server --root DIR``); ``crash_points`` kills real builds with SIGKILL
in every stage and checks that each rerun publishes an uninterrupted build's rows
(``python -m densefusion_hf.testing.crash_points RECIPE --kills N``)."""
