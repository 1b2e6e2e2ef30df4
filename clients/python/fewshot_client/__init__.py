"""Client SDK of the few-shot adaptation service (fewshot.v1.FewShot)."""

from fewshot_client import errors
from fewshot_client.aio import AsyncFewShotClient, AsyncTask
from fewshot_client.client import FewShotClient, Task
from fewshot_client.errors import (
    Aborted,
    DeadlineExceeded,
    FailedPrecondition,
    FewShotError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
)
from fewshot_client.images import to_image_proto
from fewshot_client.messages import (
    InputSpec,
    ModelInfo,
    ModelVersionInfo,
    Prediction,
    SettingInfo,
    SupportFlag,
    SupportReport,
    TaskInfo,
    TaskPage,
    TaskSummary,
)

__all__ = [
    "Aborted",
    "AsyncFewShotClient",
    "AsyncTask",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FewShotClient",
    "FewShotError",
    "InputSpec",
    "InvalidArgument",
    "ModelInfo",
    "ModelVersionInfo",
    "NotFound",
    "PermissionDenied",
    "Prediction",
    "ResourceExhausted",
    "ServiceError",
    "SettingInfo",
    "SupportFlag",
    "SupportReport",
    "Task",
    "TaskInfo",
    "TaskPage",
    "TaskSummary",
    "Unauthenticated",
    "Unavailable",
    "errors",
    "to_image_proto",
]
