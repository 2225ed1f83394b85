"""Cloud side: ingest of encrypted shards, store, Ray training, prediction, launch, federation.

Never imports ``owners`` (so never the owner's key code); shares only ``protocol``, ``mlcore``
and ``models`` with it (``tests/test_architecture.py`` checks this).
"""
__version__ = "0.1.0"
