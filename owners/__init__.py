"""Owner side: keys, the EtC cipher, image preparation and the owner-agent command."""
__version__ = "0.1.0"
