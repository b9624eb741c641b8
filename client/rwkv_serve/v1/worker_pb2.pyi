from rwkv_serve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InputKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INPUT_KIND_UNSPECIFIED: _ClassVar[InputKind]
    INPUT_KIND_CHAT: _ClassVar[InputKind]
    INPUT_KIND_RAW: _ClassVar[InputKind]
INPUT_KIND_UNSPECIFIED: InputKind
INPUT_KIND_CHAT: InputKind
INPUT_KIND_RAW: InputKind

class RunTurnRequest(_message.Message):
    __slots__ = ("session_id", "model", "kind", "text", "token_ids", "sampling", "expected_state_version", "commit", "turn_id", "return_token_ids", "messages", "template", "n")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_STATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    TURN_ID_FIELD_NUMBER: _ClassVar[int]
    RETURN_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    kind: InputKind
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.Sampling
    expected_state_version: int
    commit: bool
    turn_id: str
    return_token_ids: bool
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    template: _common_pb2.ChatTemplate
    n: int
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., kind: _Optional[_Union[InputKind, str]] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.Sampling, _Mapping]] = ..., expected_state_version: _Optional[int] = ..., commit: _Optional[bool] = ..., turn_id: _Optional[str] = ..., return_token_ids: _Optional[bool] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., template: _Optional[_Union[_common_pb2.ChatTemplate, str]] = ..., n: _Optional[int] = ...) -> None: ...

class GetLoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LoadInfo(_message.Message):
    __slots__ = ("worker_id", "address", "model", "capacity", "active", "queued", "max_queued", "serving")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    model: _common_pb2.ModelInfo
    capacity: int
    active: int
    queued: int
    max_queued: int
    serving: bool
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., model: _Optional[_Union[_common_pb2.ModelInfo, _Mapping]] = ..., capacity: _Optional[int] = ..., active: _Optional[int] = ..., queued: _Optional[int] = ..., max_queued: _Optional[int] = ..., serving: _Optional[bool] = ...) -> None: ...

class PrepareStateRequest(_message.Message):
    __slots__ = ("model", "time_state_pth", "state_record")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIME_STATE_PTH_FIELD_NUMBER: _ClassVar[int]
    STATE_RECORD_FIELD_NUMBER: _ClassVar[int]
    model: str
    time_state_pth: bytes
    state_record: bytes
    def __init__(self, model: _Optional[str] = ..., time_state_pth: _Optional[bytes] = ..., state_record: _Optional[bytes] = ...) -> None: ...

class PrepareStateResponse(_message.Message):
    __slots__ = ("state_record", "fingerprint", "tokens")
    STATE_RECORD_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    state_record: bytes
    fingerprint: str
    tokens: int
    def __init__(self, state_record: _Optional[bytes] = ..., fingerprint: _Optional[str] = ..., tokens: _Optional[int] = ...) -> None: ...

class WorkerTokenizeRequest(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class WorkerTokenizeResponse(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...
