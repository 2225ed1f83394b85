from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetTaskRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Task(_message.Message):
    __slots__ = ("run_name", "classes", "image_size", "block_size", "scheme", "format", "quality", "chroma", "owner_id", "key_mode")
    RUN_NAME_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    CHROMA_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_MODE_FIELD_NUMBER: _ClassVar[int]
    run_name: str
    classes: _containers.RepeatedScalarFieldContainer[str]
    image_size: int
    block_size: int
    scheme: str
    format: str
    quality: int
    chroma: str
    owner_id: str
    key_mode: str
    def __init__(self, run_name: _Optional[str] = ..., classes: _Optional[_Iterable[str]] = ..., image_size: _Optional[int] = ..., block_size: _Optional[int] = ..., scheme: _Optional[str] = ..., format: _Optional[str] = ..., quality: _Optional[int] = ..., chroma: _Optional[str] = ..., owner_id: _Optional[str] = ..., key_mode: _Optional[str] = ...) -> None: ...

class OpenDatasetRequest(_message.Message):
    __slots__ = ("manifest_json", "new_key_domain")
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    NEW_KEY_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    manifest_json: bytes
    new_key_domain: bool
    def __init__(self, manifest_json: _Optional[bytes] = ..., new_key_domain: bool = ...) -> None: ...

class ShardProgress(_message.Message):
    __slots__ = ("name", "sha256", "size", "received", "stored")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    size: int
    received: int
    stored: bool
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ..., received: _Optional[int] = ..., stored: bool = ...) -> None: ...

class DatasetState(_message.Message):
    __slots__ = ("dataset_id", "owner_id", "split", "key_id", "shards", "committed", "images")
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    owner_id: str
    split: str
    key_id: str
    shards: _containers.RepeatedCompositeFieldContainer[ShardProgress]
    committed: bool
    images: int
    def __init__(self, dataset_id: _Optional[str] = ..., owner_id: _Optional[str] = ..., split: _Optional[str] = ..., key_id: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[ShardProgress, _Mapping]]] = ..., committed: bool = ..., images: _Optional[int] = ...) -> None: ...

class ShardHeader(_message.Message):
    __slots__ = ("dataset_id", "shard_sha256", "offset")
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    SHARD_SHA256_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    shard_sha256: str
    offset: int
    def __init__(self, dataset_id: _Optional[str] = ..., shard_sha256: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class ShardChunk(_message.Message):
    __slots__ = ("header", "data", "data_crc32")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DATA_CRC32_FIELD_NUMBER: _ClassVar[int]
    header: ShardHeader
    data: bytes
    data_crc32: int
    def __init__(self, header: _Optional[_Union[ShardHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., data_crc32: _Optional[int] = ...) -> None: ...

class ShardState(_message.Message):
    __slots__ = ("progress",)
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    progress: ShardProgress
    def __init__(self, progress: _Optional[_Union[ShardProgress, _Mapping]] = ...) -> None: ...

class CommitDatasetRequest(_message.Message):
    __slots__ = ("dataset_id",)
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    dataset_id: str
    def __init__(self, dataset_id: _Optional[str] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("task", "model", "strategy", "key_ids", "owner_id", "max_images_per_request", "max_request_bytes")
    TASK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    task: Task
    model: str
    strategy: str
    key_ids: _containers.RepeatedScalarFieldContainer[str]
    owner_id: str
    max_images_per_request: int
    max_request_bytes: int
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ..., model: _Optional[str] = ..., strategy: _Optional[str] = ..., key_ids: _Optional[_Iterable[str]] = ..., owner_id: _Optional[str] = ..., max_images_per_request: _Optional[int] = ..., max_request_bytes: _Optional[int] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("images", "key_id")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    key_id: str
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., key_id: _Optional[str] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("probabilities", "label")
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    label: int
    def __init__(self, probabilities: _Optional[_Iterable[float]] = ..., label: _Optional[int] = ...) -> None: ...

class PredictReply(_message.Message):
    __slots__ = ("predictions",)
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ...) -> None: ...
