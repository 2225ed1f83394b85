"""Owner side: keys, the EtC cipher, image preparation and the owner-agent command.

Never imports ``orchestrator``: an owner's machine runs only this package and the neutral ones
(``protocol``, ``mlcore``, ``models``).
"""
__version__ = "0.1.0"
