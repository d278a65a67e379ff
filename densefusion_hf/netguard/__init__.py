"""Guards for downloads of untrusted URLs: which addresses may be connected to, and how big a body may be.

``addresses`` classifies IP addresses and host spellings (pure functions); ``opener`` is a urllib opener
that checks every address it connects to, after DNS and on every redirect hop, and bounds the body;
``img2dataset_hook`` installs that opener in img2dataset's download processes.
"""
