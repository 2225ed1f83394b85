"""Why the cloud refuses a request, as types. The gRPC layer maps each type to one status code
(``orchestrator/rpc.py``); nothing anywhere chooses a status by reading a message."""
from __future__ import annotations


class Refused(Exception):
    """A request the cloud will not carry out; the message says why and what to do."""


class NotFound(Refused):
    """The named dataset, shard or object does not exist for this caller."""


class WrongState(Refused):
    """The request does not fit the current state (task, key domain, resume offset, commit)."""


class InvalidRequest(Refused):
    """The request itself is malformed or over a limit; sending it again will not help."""


class DataCorrupted(Refused):
    """Bytes arrived damaged (CRC-32 or sha256 mismatch); nothing was stored from them."""


class Busy(Refused):
    """Another stream holds the resource; retry later."""


class StorageUnavailable(Refused):
    """The server could not write (disk full, I/O error); what was verified before is kept."""


class StorageFull(StorageUnavailable):
    """The server's disk (or its quota on the disk) is full: nothing more can be written until the
    operator frees space; what was verified before is kept. Retrying soon will not help."""


class QuotaExceeded(Refused):
    """The owner's stored and partially uploaded bytes would pass its quota; nothing was stored."""


class TooManyStreams(Busy):
    """The owner already holds as many upload streams as it may; retry when one of them ends."""


class NotYourKey(Refused):
    """The caller asked about a key id it never uploaded under: another owner's key is not its to use."""


class ModelNotTrainedForKey(WrongState):
    """The model has no knowledge of the query's key id: its answers would be noise."""


class RunFailed(Exception):
    """A launch, training or federation could not finish; the message names the step and its log."""


class UploadsMissing(RunFailed, TimeoutError):
    """The owners named in ``training.start_when`` did not commit their uploads in time."""
