"""Request building, response parsing and the retry policy shared by the sync and async clients."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from fewshot_client.errors import FewShotError, from_rpc_error
from fewshot_client.images import ImageLike, to_image_proto
from fewshot_proto import fewshot_pb2

# An RPC's request: one message, or the chunks of a client stream.
Request = Message | Sequence[fewshot_pb2.AdaptChunk]

# A PEM certificate or key: its content (bytes), or the path of a file holding it (str or os.PathLike).
PemSource = bytes | str | os.PathLike[str]


@dataclass
class Prediction:
    """One query's result: the top-1 ``label`` and its ``score`` (probability), ``scores`` for every
    label of the task, and the ``ranked`` top-k ``(label, probability)`` pairs, best first. With
    ``reject_unknown``: ``unknown`` is True when the query fits none of the task's classes (the ranked
    labels are still there), by its ``open_set_score`` (``score_name``) against ``threshold``. With ``explain=k``:
    ``nearest`` holds the ``k`` support images nearest the query in the model's feature space, as
    ``(support index, label, cosine similarity)``, nearest first."""

    label: str
    score: float
    scores: dict[str, float]
    ranked: list[tuple[str, float]]
    unknown: bool = False
    open_set_score: float | None = None
    threshold: float | None = None
    score_name: str | None = None
    nearest: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class InputSpec:
    """What a model's backbone consumes: ``channels`` x ``size`` x ``size``, normalised by mean/std."""

    channels: int
    size: int
    mean: list[float]
    std: list[float]
    resize: str


@dataclass
class SettingInfo:
    """A per-request setting a model declares: ``kind`` "number", "integer" (``min``..``max``) or "choice"
    (one of ``choices``), and the ``methods`` that take it. Pass it to ``adapt(settings={name: value})``."""

    name: str
    kind: str
    min: float | None
    max: float | None
    choices: list[str]
    methods: list[str]


@dataclass
class ModelInfo:
    """A served model, its adaptation methods, the task shapes and the per-request settings it accepts."""

    name: str
    family: str
    methods: list[str]
    default_method: str
    input: InputSpec
    min_ways: int
    max_ways: int
    max_shots: int
    settings: list[SettingInfo] = field(default_factory=list)
    #: The loaded versions, oldest first (the fields above describe the default one).
    versions: list[ModelVersionInfo] = field(default_factory=list)

    @property
    def default_version(self) -> str:
        """The version an adapt that names none gets."""
        return next((v.version for v in self.versions if v.default), "")


@dataclass
class ModelVersionInfo:
    """One loaded version of a model: its name, the digest of its weights, whether adapts use it by default,
    and how many live tasks are pinned to it."""

    version: str
    digest: str
    default: bool
    live_tasks: int
    #: A canary: the share of adapts naming no version that come here (0..100), and the tenants whose all do.
    canary_percent: float = 0.0
    canary_tenants: list[str] = field(default_factory=list)


@dataclass
class TaskInfo:
    """The server's record of a task (GetTask)."""

    task_id: str
    model: str
    method: str
    labels: list[str]
    created_at: float
    expires_at: float
    support_size: int
    #: 1 when adapted, +1 per committed update.
    version: int = 1
    #: Support images per label (empty for tasks stored before updates existed).
    shots: dict[str, int] = field(default_factory=dict)
    #: The model version the task was adapted with (and the digest of its weights); whether the server loads it
    #: (if not, classify and update raise FailedPrecondition).
    model_version: str = ""
    model_digest: str = ""
    model_version_loaded: bool = True
    #: The stored support-set report (a task adapted with ``report=True``), else ``None``.
    report: SupportReport | None = None


@dataclass
class SupportFlag:
    """A support image worth a look: ``kind`` is ``mislabel`` (the support set fits itself better with the image
    under ``looks_like``), ``duplicate`` / ``near_duplicate`` (of support image ``other``) or ``outlier`` (far from
    its class); ``index`` is its place in the support set, ``label`` the label it was given."""

    index: int
    kind: str
    score: float
    label: str
    other: int | None = None
    looks_like: str = ""


@dataclass
class SupportReport:
    """How well a task is expected to work (Adapt with ``report=True``): ``estimate`` is the expected accuracy
    (percent) on new queries, with its 95% interval ``low``..``high`` (``None`` when no image could be held out:
    ``note`` says why); ``confusions`` the most confused label pairs ``(a, b, percent)``; ``flags`` the support
    images worth a look. ``scheme``: how images were held out; ``extra_adaptations``: what that took.
    ``unlabeled``: the unlabeled images the report read (Adapt's ``unlabeled``), and ``unlabeled_confidence`` the
    task's mean highest probability on them (percent; ``None`` without them)."""

    estimate: float | None
    low: float | None
    high: float | None
    scheme: str
    held_out: int
    extra_adaptations: int
    note: str
    confusions: list[tuple[str, str, float]]
    flags: list[SupportFlag]
    unlabeled: int = 0
    unlabeled_confidence: float | None = None


def support_report(message: fewshot_pb2.SupportReport) -> SupportReport:
    """The SupportReport dataclass of its message."""
    has = message.HasField
    return SupportReport(
        message.estimate if has("estimate") else None,
        message.low if has("low") else None,
        message.high if has("high") else None,
        message.scheme,
        message.held_out,
        message.extra_adaptations,
        message.note,
        [(c.label_a, c.label_b, c.percent) for c in message.confusions],
        [SupportFlag(f.index, f.kind, f.score, f.label, f.other if f.HasField("other") else None, f.looks_like) for f in message.flags],
        message.unlabeled,
        message.unlabeled_confidence if has("unlabeled_confidence") else None,
    )


def report_of(response: Any) -> SupportReport | None:
    """The report a response carries (AdaptResponse, TaskInfo, UpdateTaskResponse), or ``None``."""
    return support_report(response.report) if response.HasField("report") else None


@dataclass
class TaskSummary:
    """One task of ListTasks: what it is and what it weighs, without its state."""

    task_id: str
    model: str
    model_version: str
    method: str
    ways: int
    support_size: int
    created_at: float
    updated_at: float
    expires_at: float
    size_bytes: int
    version: int


@dataclass
class TaskPage:
    """A page of ListTasks; ``next_page_token`` is empty on the last page."""

    tasks: list[TaskSummary]
    next_page_token: str


def task_page(response: fewshot_pb2.ListTasksResponse) -> TaskPage:
    """A TaskPage from its message."""
    return TaskPage(
        [
            TaskSummary(
                t.task_id,
                t.model,
                t.model_version.version,
                t.method,
                t.ways,
                t.support_size,
                t.created_at,
                t.updated_at,
                t.expires_at,
                t.size_bytes,
                t.version,
            )
            for t in response.tasks
        ],
        response.next_page_token,
    )


@dataclass
class TaskFields:
    """The data part of a task handle; ``support_accuracy`` and ``adapt_seconds`` are only known to
    the handle that Adapt returned, not to one looked up by id."""

    id: str
    labels: list[str]
    model: str
    method: str
    expires_at: float
    support_accuracy: float | None = None
    adapt_seconds: float | None = None
    version: int = 1
    #: The model version the task is pinned to.
    model_version: str = ""
    #: The support-set report (adapted with ``report=True``; updated by :meth:`update`), else ``None``.
    report: SupportReport | None = None


#: A per-request setting's value: a number, or the name of one of its choices.
SettingValue = int | float | str


def merge_settings(
    settings: Mapping[str, SettingValue] | None, inner_steps: int | None = None, lam: float | None = None
) -> dict[str, SettingValue]:
    """``settings`` with the two keyword shortcuts ``inner_steps`` and ``lam`` (the setting ``lambda``) added."""
    out = dict(settings or {})
    for name, value in (("inner_steps", inner_steps), ("lambda", lam)):
        if value is not None:
            if name in out and out[name] != value:
                raise ValueError(f"{name} given twice with different values ({out[name]!r} and {value!r})")
            out[name] = value
    return out


def settings_message(settings: Mapping[str, SettingValue]) -> fewshot_pb2.AdaptSettings:
    """Settings by name as the wire's ``AdaptSettings.values`` (which ones a model takes: ``models()``)."""
    message = fewshot_pb2.AdaptSettings()
    for name, value in settings.items():
        if isinstance(value, str):
            message.values[name].string_value = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            message.values[name].number_value = float(value)
        else:
            raise TypeError(f"setting {name!r} must be a number or a string, got {type(value).__name__}")
    return message


def adapt_request(
    images: Sequence[ImageLike],
    labels: Sequence[str],
    model: str,
    method: str | None,
    settings: Mapping[str, SettingValue],
    ttl_seconds: int | None,
    model_version: str | None = None,
    report: bool = False,
    unlabeled: Sequence[ImageLike] = (),
) -> fewshot_pb2.AdaptRequest:
    """An AdaptRequest; raises ValueError/TypeError for mismatched or non-string labels, or unlabeled images
    without ``report``."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(unlabeled) and not report:
        raise ValueError("unlabeled images only feed the support-set report: pass report=True, or leave them out")
    for label in labels:
        if not isinstance(label, str):
            raise TypeError(f"labels must be strings, got {type(label).__name__} {label!r}")
    return fewshot_pb2.AdaptRequest(
        model=model,
        model_version=model_version or "",
        method=method or "",
        ttl_seconds=ttl_seconds or 0,
        report=report,
        settings=settings_message(settings),
        support=[fewshot_pb2.LabelledImage(image=to_image_proto(x), label=y) for x, y in zip(images, labels)],
        unlabeled=[to_image_proto(x) for x in unlabeled],
    )


def adapt_chunks(request: fewshot_pb2.AdaptRequest, chunk_bytes: int) -> list[fewshot_pb2.AdaptChunk]:
    """``request`` as AdaptStream chunks of at most about ``chunk_bytes`` each (one image per chunk at
    least); the first chunk carries the model, method, settings and ttl."""
    chunks = [
        fewshot_pb2.AdaptChunk(
            model=request.model,
            model_version=request.model_version,
            method=request.method,
            settings=request.settings,
            ttl_seconds=request.ttl_seconds,
            report=request.report,
        )
    ]
    size = chunks[0].ByteSize()
    for item in request.support:
        item_bytes = item.ByteSize() + 8  # field tag and length prefix
        if size + item_bytes > chunk_bytes and len(chunks[-1].support):
            chunks.append(fewshot_pb2.AdaptChunk())
            size = 0
        chunks[-1].support.append(item)
        size += item_bytes
    for image in request.unlabeled:
        item_bytes = image.ByteSize() + 8
        if size + item_bytes > chunk_bytes and (len(chunks[-1].support) or len(chunks[-1].unlabeled)):
            chunks.append(fewshot_pb2.AdaptChunk())
            size = 0
        chunks[-1].unlabeled.append(image)
        size += item_bytes
    return chunks


def adapt_call(
    stub: Any,
    max_bytes: int,
    stream: bool | None,
    images: Sequence[ImageLike],
    labels: Sequence[str],
    model: str,
    method: str | None,
    settings: Mapping[str, SettingValue],
    ttl_seconds: int | None,
    model_version: str | None = None,
    report: bool = False,
    unlabeled: Sequence[ImageLike] = (),
) -> tuple[Any, Request]:
    """The stub method (Adapt or AdaptStream) and request to send: the stream is used when asked
    (``stream=True``) or, unless ``stream=False``, when the request exceeds half of ``max_bytes``."""
    request = adapt_request(images, labels, model, method, settings, ttl_seconds, model_version, report, unlabeled)
    if stream is None:
        stream = request.ByteSize() > max_bytes // 2
    if stream:
        return stub.AdaptStream, adapt_chunks(request, max_bytes // 4)
    return stub.Adapt, request


def classify_request(
    task_id: str,
    images: Sequence[ImageLike],
    top_k: int,
    reject_unknown: bool = False,
    threshold: float | None = None,
    target_recall: float | None = None,
    explain: int = 0,
) -> fewshot_pb2.ClassifyRequest:
    """A ClassifyRequest for ``images`` (with the open-set option when ``reject_unknown``; ``explain`` nearest
    support images per query)."""
    optional = {k: v for k, v in (("threshold", threshold), ("target_recall", target_recall)) if v is not None}
    return fewshot_pb2.ClassifyRequest(
        task_id=task_id,
        top_k=top_k,
        reject_unknown=reject_unknown,
        explain=explain,
        **optional,
        queries=[to_image_proto(x) for x in images],
    )


def predictions(response: fewshot_pb2.ClassifyResponse) -> list[Prediction]:
    """The predictions of a ClassifyResponse, one per query."""
    labels = list(response.labels)
    result = []
    for p in response.predictions:  # a protobuf float field reads as a Python float: no conversion needed
        scores = dict(zip(labels, p.probabilities))
        ranked = [(s.label, s.probability) for s in p.ranked]
        label, score = ranked[0] if ranked else max(scores.items(), key=lambda kv: kv[1])
        prediction = Prediction(label, score, scores, ranked, p.unknown)
        if p.score_name:
            prediction.open_set_score, prediction.threshold, prediction.score_name = p.score, p.threshold, p.score_name
        if p.nearest:
            prediction.nearest = [(m.index, m.label, m.similarity) for m in p.nearest]
        result.append(prediction)
    return result


def adapted_fields(response: fewshot_pb2.AdaptResponse) -> TaskFields:
    """The task fields of an AdaptResponse."""
    return TaskFields(
        id=response.task_id,
        labels=list(response.labels),
        model=response.model,
        method=response.method,
        expires_at=response.expires_at,
        support_accuracy=float(response.support_accuracy),
        adapt_seconds=response.adapt_seconds,
        model_version=response.model_version.version,
        report=report_of(response),
    )


def task_info(response: fewshot_pb2.TaskInfo) -> TaskInfo:
    """A TaskInfo dataclass from its message."""
    return TaskInfo(
        task_id=response.task_id,
        model=response.model,
        method=response.method,
        labels=list(response.labels),
        created_at=response.created_at,
        expires_at=response.expires_at,
        support_size=response.support_size,
        version=response.version or 1,
        shots=dict(zip(response.labels, response.shots)),
        model_version=response.model_version.version,
        model_digest=response.model_version.digest,
        model_version_loaded=response.model_version_loaded,
        report=report_of(response),
    )


def looked_up_fields(info: TaskInfo) -> TaskFields:
    """The task fields known from GetTask."""
    return TaskFields(
        id=info.task_id,
        labels=info.labels,
        model=info.model,
        method=info.method,
        expires_at=info.expires_at,
        version=info.version,
        model_version=info.model_version,
        report=info.report,
    )


def update_request(
    task_id: str, images: Sequence[ImageLike], labels: Sequence[str], remove: Sequence[str], expected_version: int | None
) -> fewshot_pb2.UpdateTaskRequest:
    """An UpdateTaskRequest; raises ValueError/TypeError for mismatched or non-string labels."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    for label in [*labels, *remove]:
        if not isinstance(label, str):
            raise TypeError(f"labels must be strings, got {type(label).__name__} {label!r}")
    optional = {} if expected_version is None else {"expected_version": expected_version}
    return fewshot_pb2.UpdateTaskRequest(
        task_id=task_id,
        remove_labels=list(remove),
        **optional,
        add=[fewshot_pb2.LabelledImage(image=to_image_proto(x), label=y) for x, y in zip(images, labels)],
    )


def model_infos(response: fewshot_pb2.ListModelsResponse) -> list[ModelInfo]:
    """The ModelInfo dataclasses of a ListModelsResponse."""
    return [
        ModelInfo(
            name=m.name,
            family=m.family,
            methods=list(m.methods),
            default_method=m.default_method,
            input=InputSpec(
                channels=m.input.channels, size=m.input.size, mean=list(m.input.mean), std=list(m.input.std), resize=m.input.resize
            ),
            min_ways=m.min_ways,
            max_ways=m.max_ways,
            max_shots=m.max_shots,
            settings=[
                SettingInfo(
                    name=s.name,
                    kind=s.kind,
                    min=None if s.kind == "choice" else s.min,
                    max=None if s.kind == "choice" else s.max,
                    choices=list(s.choices),
                    methods=list(s.methods),
                )
                for s in m.settings
            ],
            versions=[
                ModelVersionInfo(v.version, v.digest, v.default, v.live_tasks, v.canary_percent, list(v.canary_tenants)) for v in m.versions
            ],
        )
        for m in response.models
    ]


def sendable(request: Request) -> Message | Iterator[fewshot_pb2.AdaptChunk]:
    """What to pass to the stub for one attempt: the message, or a fresh iterator over the chunks."""
    return request if isinstance(request, Message) else iter(request)


@dataclass(frozen=True)
class RetryPolicy:
    """Retries UNAVAILABLE ``retries`` times, waiting ``backoff * 2**attempt`` seconds; nothing else."""

    retries: int
    backoff: float

    def delay_after(self, err: grpc.RpcError, attempt: int) -> float:
        """Seconds to wait before retrying after ``err`` failed attempt ``attempt`` (0-based).

        Raises:
            FewShotError: the typed error, when ``err`` is not retryable or no retry is left.
        """
        error: FewShotError = from_rpc_error(err)
        if error.code != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
            raise error from None
        return self.backoff * 2**attempt


@dataclass(frozen=True)
class ClientConfig:
    """What both clients derive from their constructor arguments."""

    max_bytes: int
    call_options: dict[str, Any]
    retry: RetryPolicy

    @classmethod
    def of(cls, token: str | None, timeout: float, retries: int, backoff: float, max_message_mb: float) -> ClientConfig:
        """The config of a client; ``token`` is sent as a bearer token with every call."""
        metadata = (("authorization", f"Bearer {token}"),) if token else None
        return cls(
            max_bytes=int(max_message_mb * 1024 * 1024),
            call_options={"timeout": timeout, "metadata": metadata},
            retry=RetryPolicy(retries, backoff),
        )

    def channel_options(self) -> list[tuple[str, int]]:
        """gRPC channel options setting both message size limits to ``max_bytes``."""
        return [("grpc.max_send_message_length", self.max_bytes), ("grpc.max_receive_message_length", self.max_bytes)]


def channel_target(target: str | Sequence[str]) -> tuple[str, list[tuple[str, str]]]:
    """The gRPC target and load-balancing options for one server or several replicas.

    ``target`` is ``HOST:PORT``; a list of ``IP:PORT`` replicas (an ``ipv4:``/``ipv6:`` address list);
    or a ``dns:///NAME:PORT`` name whose every address is a replica. Several replicas are balanced
    per call (gRPC's ``round_robin``): each call goes to the next ready one, and a retried UNAVAILABLE
    goes to another.

    Raises:
        ValueError: an empty list, or a list entry that is not an IP literal with a port (use a DNS name).
    """
    if isinstance(target, str):
        return target, ([("grpc.lb_policy_name", "round_robin")] if target.startswith("dns:") else [])
    targets = list(target)
    if not targets:
        raise ValueError("no target: give HOST:PORT, a list of IP:PORT replicas or dns:///NAME:PORT")
    if len(targets) == 1:
        return channel_target(targets[0])
    v6 = [t.startswith("[") for t in targets]
    for t in targets:
        host, _, port = t.rpartition(":")
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            raise ValueError(
                f"replica {t!r} is not IP:PORT: list IP addresses, or give one dns:///NAME:PORT whose addresses are the replicas"
            ) from None
        if not port.isdigit():
            raise ValueError(f"replica {t!r} has no port")
    if any(v6) and not all(v6):
        raise ValueError("mix of IPv4 and IPv6 replicas: list one family (or use a DNS name)")
    return f"{'ipv6' if v6[0] else 'ipv4'}:{','.join(targets)}", [("grpc.lb_policy_name", "round_robin")]


def read_pem(source: PemSource | None, what: str) -> bytes | None:
    """The PEM bytes of ``source`` (None stays None): bytes are the content itself, a str or path names
    a file to read.

    Raises:
        OSError: the file cannot be read (the message names ``what`` and the path).
        ValueError: the content is not PEM, or a str holds PEM content instead of a path.
        TypeError: ``source`` is of another type.
    """
    if source is None:
        return None
    if isinstance(source, (bytes, bytearray)):
        data, origin = bytes(source), f"the {what}"
    elif isinstance(source, (str, os.PathLike)):
        if isinstance(source, str) and "-----BEGIN" in source:
            raise ValueError(
                f"the {what} is given as a str holding PEM content; a str is a file path, pass the content as bytes (.encode())"
            )
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as err:
            message = f"cannot read the {what} file {path}: {err.strerror or err}"
            raise (OSError(err.errno, message) if err.errno is not None else OSError(message)) from err
        origin = f"the {what} file {path}"
    else:
        raise TypeError(f"the {what} must be bytes (PEM content) or a file path, got {type(source).__name__}")
    if b"-----BEGIN" not in data:
        raise ValueError(f"{origin} is not PEM (no '-----BEGIN' line)")
    return data


def channel_credentials(
    tls: bool = False,
    root_certificates: PemSource | None = None,
    client_certificate: PemSource | None = None,
    client_key: PemSource | None = None,
) -> grpc.ChannelCredentials | None:
    """The TLS credentials of a channel, or None for a plaintext (insecure) one.

    TLS is used when ``tls`` is true or any certificate or key is given. ``root_certificates`` are
    the CAs that the server's certificate must chain to (None: the system's roots);
    ``client_certificate`` (its chain) and ``client_key`` identify the client to a server that
    requires mutual TLS, and go together. Each is PEM content (bytes) or the path of a PEM file
    (str or os.PathLike).

    Raises:
        ValueError: a client certificate without a key or the reverse; content that is not PEM.
        OSError: a file that cannot be read.
    """
    if (client_certificate is None) != (client_key is None):
        given, missing = ("client_certificate", "client_key") if client_key is None else ("client_key", "client_certificate")
        raise ValueError(f"mutual TLS needs both a client certificate and its key: {given} was given without {missing}")
    if not (tls or root_certificates is not None or client_certificate is not None):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(root_certificates, "CA certificate"),
        private_key=read_pem(client_key, "client key"),
        certificate_chain=read_pem(client_certificate, "client certificate"),
    )


def admin_options(options: Mapping[str, Any], admin_token: str) -> dict[str, Any]:
    """Call options of an admin call: ``options`` with the admin token as the bearer token instead of the tenant's."""
    if not admin_token:
        raise ValueError("admin calls need the admin token (fewshot serve --admin-token-file)")
    return {**options, "metadata": (("authorization", f"Bearer {admin_token}"),)}
