from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MigrationStatus(_message.Message):
    __slots__ = ("model", "version", "done", "left", "failed", "running")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    LEFT_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    done: int
    left: int
    failed: int
    running: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., done: _Optional[int] = ..., left: _Optional[int] = ..., failed: _Optional[int] = ..., running: _Optional[bool] = ...) -> None: ...

class CanaryRequest(_message.Message):
    __slots__ = ("model", "version", "percent", "tenants")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    percent: float
    tenants: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., percent: _Optional[float] = ..., tenants: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelVersionRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class ModelAdminResponse(_message.Message):
    __slots__ = ("model", "migration")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    migration: MigrationStatus
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., migration: _Optional[_Union[MigrationStatus, _Mapping]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("encoded", "tensor")
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    encoded: bytes
    tensor: RawTensor
    def __init__(self, encoded: _Optional[bytes] = ..., tensor: _Optional[_Union[RawTensor, _Mapping]] = ...) -> None: ...

class RawTensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class LabelledImage(_message.Message):
    __slots__ = ("image", "label")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    image: Image
    label: str
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ..., label: _Optional[str] = ...) -> None: ...

class AdaptSettings(_message.Message):
    __slots__ = ("inner_steps", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _struct_pb2.Value
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ...) -> None: ...
    INNER_STEPS_FIELD_NUMBER: _ClassVar[int]
    LAMBDA_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    inner_steps: int
    values: _containers.MessageMap[str, _struct_pb2.Value]
    def __init__(self, inner_steps: _Optional[int] = ..., values: _Optional[_Mapping[str, _struct_pb2.Value]] = ..., **kwargs) -> None: ...

class AdaptRequest(_message.Message):
    __slots__ = ("model", "method", "support", "settings", "ttl_seconds", "model_version", "report", "unlabeled")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    UNLABELED_FIELD_NUMBER: _ClassVar[int]
    model: str
    method: str
    support: _containers.RepeatedCompositeFieldContainer[LabelledImage]
    settings: AdaptSettings
    ttl_seconds: int
    model_version: str
    report: bool
    unlabeled: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, model: _Optional[str] = ..., method: _Optional[str] = ..., support: _Optional[_Iterable[_Union[LabelledImage, _Mapping]]] = ..., settings: _Optional[_Union[AdaptSettings, _Mapping]] = ..., ttl_seconds: _Optional[int] = ..., model_version: _Optional[str] = ..., report: _Optional[bool] = ..., unlabeled: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class AdaptChunk(_message.Message):
    __slots__ = ("model", "method", "settings", "ttl_seconds", "support", "model_version", "report", "unlabeled")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    UNLABELED_FIELD_NUMBER: _ClassVar[int]
    model: str
    method: str
    settings: AdaptSettings
    ttl_seconds: int
    support: _containers.RepeatedCompositeFieldContainer[LabelledImage]
    model_version: str
    report: bool
    unlabeled: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, model: _Optional[str] = ..., method: _Optional[str] = ..., settings: _Optional[_Union[AdaptSettings, _Mapping]] = ..., ttl_seconds: _Optional[int] = ..., support: _Optional[_Iterable[_Union[LabelledImage, _Mapping]]] = ..., model_version: _Optional[str] = ..., report: _Optional[bool] = ..., unlabeled: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class SupportReport(_message.Message):
    __slots__ = ("estimate", "low", "high", "scheme", "held_out", "extra_adaptations", "note", "confusions", "flags", "unlabeled", "unlabeled_confidence")
    ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    SCHEME_FIELD_NUMBER: _ClassVar[int]
    HELD_OUT_FIELD_NUMBER: _ClassVar[int]
    EXTRA_ADAPTATIONS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    CONFUSIONS_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    UNLABELED_FIELD_NUMBER: _ClassVar[int]
    UNLABELED_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    estimate: float
    low: float
    high: float
    scheme: str
    held_out: int
    extra_adaptations: int
    note: str
    confusions: _containers.RepeatedCompositeFieldContainer[ClassConfusion]
    flags: _containers.RepeatedCompositeFieldContainer[SupportFlag]
    unlabeled: int
    unlabeled_confidence: float
    def __init__(self, estimate: _Optional[float] = ..., low: _Optional[float] = ..., high: _Optional[float] = ..., scheme: _Optional[str] = ..., held_out: _Optional[int] = ..., extra_adaptations: _Optional[int] = ..., note: _Optional[str] = ..., confusions: _Optional[_Iterable[_Union[ClassConfusion, _Mapping]]] = ..., flags: _Optional[_Iterable[_Union[SupportFlag, _Mapping]]] = ..., unlabeled: _Optional[int] = ..., unlabeled_confidence: _Optional[float] = ...) -> None: ...

class ClassConfusion(_message.Message):
    __slots__ = ("label_a", "label_b", "percent")
    LABEL_A_FIELD_NUMBER: _ClassVar[int]
    LABEL_B_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    label_a: str
    label_b: str
    percent: float
    def __init__(self, label_a: _Optional[str] = ..., label_b: _Optional[str] = ..., percent: _Optional[float] = ...) -> None: ...

class SupportFlag(_message.Message):
    __slots__ = ("index", "kind", "score", "other", "label", "looks_like")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    OTHER_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    LOOKS_LIKE_FIELD_NUMBER: _ClassVar[int]
    index: int
    kind: str
    score: float
    other: int
    label: str
    looks_like: str
    def __init__(self, index: _Optional[int] = ..., kind: _Optional[str] = ..., score: _Optional[float] = ..., other: _Optional[int] = ..., label: _Optional[str] = ..., looks_like: _Optional[str] = ...) -> None: ...

class AdaptResponse(_message.Message):
    __slots__ = ("task_id", "labels", "support_accuracy", "adapt_seconds", "expires_at", "model", "method", "model_version", "report")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ADAPT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    support_accuracy: float
    adapt_seconds: float
    expires_at: float
    model: str
    method: str
    model_version: ModelVersion
    report: SupportReport
    def __init__(self, task_id: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., support_accuracy: _Optional[float] = ..., adapt_seconds: _Optional[float] = ..., expires_at: _Optional[float] = ..., model: _Optional[str] = ..., method: _Optional[str] = ..., model_version: _Optional[_Union[ModelVersion, _Mapping]] = ..., report: _Optional[_Union[SupportReport, _Mapping]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("task_id", "queries", "top_k", "reject_unknown", "threshold", "target_recall", "explain")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REJECT_UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TARGET_RECALL_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    queries: _containers.RepeatedCompositeFieldContainer[Image]
    top_k: int
    reject_unknown: bool
    threshold: float
    target_recall: float
    explain: int
    def __init__(self, task_id: _Optional[str] = ..., queries: _Optional[_Iterable[_Union[Image, _Mapping]]] = ..., top_k: _Optional[int] = ..., reject_unknown: _Optional[bool] = ..., threshold: _Optional[float] = ..., target_recall: _Optional[float] = ..., explain: _Optional[int] = ...) -> None: ...

class SupportMatch(_message.Message):
    __slots__ = ("index", "label", "similarity")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    similarity: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., similarity: _Optional[float] = ...) -> None: ...

class LabelScore(_message.Message):
    __slots__ = ("label", "probability")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    label: str
    probability: float
    def __init__(self, label: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("ranked", "probabilities", "unknown", "score", "threshold", "score_name", "nearest")
    RANKED_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    SCORE_NAME_FIELD_NUMBER: _ClassVar[int]
    NEAREST_FIELD_NUMBER: _ClassVar[int]
    ranked: _containers.RepeatedCompositeFieldContainer[LabelScore]
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    unknown: bool
    score: float
    threshold: float
    score_name: str
    nearest: _containers.RepeatedCompositeFieldContainer[SupportMatch]
    def __init__(self, ranked: _Optional[_Iterable[_Union[LabelScore, _Mapping]]] = ..., probabilities: _Optional[_Iterable[float]] = ..., unknown: _Optional[bool] = ..., score: _Optional[float] = ..., threshold: _Optional[float] = ..., score_name: _Optional[str] = ..., nearest: _Optional[_Iterable[_Union[SupportMatch, _Mapping]]] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("predictions", "labels")
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    labels: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., labels: _Optional[_Iterable[str]] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class TaskInfo(_message.Message):
    __slots__ = ("task_id", "model", "method", "labels", "created_at", "expires_at", "support_size", "version", "shots", "model_version", "model_version_loaded", "report")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_SIZE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHOTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_LOADED_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    model: str
    method: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    created_at: float
    expires_at: float
    support_size: int
    version: int
    shots: _containers.RepeatedScalarFieldContainer[int]
    model_version: ModelVersion
    model_version_loaded: bool
    report: SupportReport
    def __init__(self, task_id: _Optional[str] = ..., model: _Optional[str] = ..., method: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., created_at: _Optional[float] = ..., expires_at: _Optional[float] = ..., support_size: _Optional[int] = ..., version: _Optional[int] = ..., shots: _Optional[_Iterable[int]] = ..., model_version: _Optional[_Union[ModelVersion, _Mapping]] = ..., model_version_loaded: _Optional[bool] = ..., report: _Optional[_Union[SupportReport, _Mapping]] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("version", "digest")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    version: str
    digest: str
    def __init__(self, version: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class ModelVersionInfo(_message.Message):
    __slots__ = ("version", "digest", "default", "live_tasks", "canary_percent", "canary_tenants")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_FIELD_NUMBER: _ClassVar[int]
    LIVE_TASKS_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    CANARY_TENANTS_FIELD_NUMBER: _ClassVar[int]
    version: str
    digest: str
    default: bool
    live_tasks: int
    canary_percent: float
    canary_tenants: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[str] = ..., digest: _Optional[str] = ..., default: _Optional[bool] = ..., live_tasks: _Optional[int] = ..., canary_percent: _Optional[float] = ..., canary_tenants: _Optional[_Iterable[str]] = ...) -> None: ...

class UpdateTaskRequest(_message.Message):
    __slots__ = ("task_id", "add", "remove_labels", "expected_version")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ADD_FIELD_NUMBER: _ClassVar[int]
    REMOVE_LABELS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    add: _containers.RepeatedCompositeFieldContainer[LabelledImage]
    remove_labels: _containers.RepeatedScalarFieldContainer[str]
    expected_version: int
    def __init__(self, task_id: _Optional[str] = ..., add: _Optional[_Iterable[_Union[LabelledImage, _Mapping]]] = ..., remove_labels: _Optional[_Iterable[str]] = ..., expected_version: _Optional[int] = ...) -> None: ...

class UpdateTaskResponse(_message.Message):
    __slots__ = ("task_id", "version", "labels", "shots", "support_accuracy", "adapt_seconds", "report")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    SHOTS_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    ADAPT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    version: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    shots: _containers.RepeatedScalarFieldContainer[int]
    support_accuracy: float
    adapt_seconds: float
    report: SupportReport
    def __init__(self, task_id: _Optional[str] = ..., version: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., shots: _Optional[_Iterable[int]] = ..., support_accuracy: _Optional[float] = ..., adapt_seconds: _Optional[float] = ..., report: _Optional[_Union[SupportReport, _Mapping]] = ...) -> None: ...

class DeleteTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class DeleteTaskResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class TaskSummary(_message.Message):
    __slots__ = ("task_id", "model", "model_version", "method", "ways", "support_size", "created_at", "updated_at", "expires_at", "size_bytes", "version")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    WAYS_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_SIZE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    model: str
    model_version: ModelVersion
    method: str
    ways: int
    support_size: int
    created_at: float
    updated_at: float
    expires_at: float
    size_bytes: int
    version: int
    def __init__(self, task_id: _Optional[str] = ..., model: _Optional[str] = ..., model_version: _Optional[_Union[ModelVersion, _Mapping]] = ..., method: _Optional[str] = ..., ways: _Optional[int] = ..., support_size: _Optional[int] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., expires_at: _Optional[float] = ..., size_bytes: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks", "next_page_token")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskSummary]
    next_page_token: str
    def __init__(self, tasks: _Optional[_Iterable[_Union[TaskSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ExportTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class ExportTaskResponse(_message.Message):
    __slots__ = ("blob",)
    BLOB_FIELD_NUMBER: _ClassVar[int]
    blob: bytes
    def __init__(self, blob: _Optional[bytes] = ...) -> None: ...

class ImportTaskRequest(_message.Message):
    __slots__ = ("blob", "ttl_seconds")
    BLOB_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    blob: bytes
    ttl_seconds: int
    def __init__(self, blob: _Optional[bytes] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InputSpec(_message.Message):
    __slots__ = ("channels", "size", "mean", "std", "resize")
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    channels: int
    size: int
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    resize: str
    def __init__(self, channels: _Optional[int] = ..., size: _Optional[int] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., resize: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "family", "methods", "default_method", "input", "min_ways", "max_ways", "max_shots", "settings", "versions")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FAMILY_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_METHOD_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    MIN_WAYS_FIELD_NUMBER: _ClassVar[int]
    MAX_WAYS_FIELD_NUMBER: _ClassVar[int]
    MAX_SHOTS_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    family: str
    methods: _containers.RepeatedScalarFieldContainer[str]
    default_method: str
    input: InputSpec
    min_ways: int
    max_ways: int
    max_shots: int
    settings: _containers.RepeatedCompositeFieldContainer[SettingInfo]
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersionInfo]
    def __init__(self, name: _Optional[str] = ..., family: _Optional[str] = ..., methods: _Optional[_Iterable[str]] = ..., default_method: _Optional[str] = ..., input: _Optional[_Union[InputSpec, _Mapping]] = ..., min_ways: _Optional[int] = ..., max_ways: _Optional[int] = ..., max_shots: _Optional[int] = ..., settings: _Optional[_Iterable[_Union[SettingInfo, _Mapping]]] = ..., versions: _Optional[_Iterable[_Union[ModelVersionInfo, _Mapping]]] = ...) -> None: ...

class SettingInfo(_message.Message):
    __slots__ = ("name", "kind", "min", "max", "choices", "methods")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    min: float
    max: float
    choices: _containers.RepeatedScalarFieldContainer[str]
    methods: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., min: _Optional[float] = ..., max: _Optional[float] = ..., choices: _Optional[_Iterable[str]] = ..., methods: _Optional[_Iterable[str]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...
