"""Cloud side: ingest of encrypted shards, store, Ray training, prediction, launch.

Never imports the owner's key material code (owners.keys, owners.cipher, owners.prepare).
"""
__version__ = "0.1.0"
