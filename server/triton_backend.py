"""Triton Inference Server as the feature backend of ``fewshot serve --feature-backend triton``.

Backbone features (metric models, Triton model ``<name>_backbone``) and adapted-network logits
(inner-loop models, ``<name>_network``, the task's weights sent as inputs) come from the model
repository that ``fewshot export --triton-repo`` writes; heads, inner loops and the task store stay in
the service.

Threading: one ``tritonclient.grpc.aio`` client lives on the server's event loop. The code that needs
features is synchronous and runs in the service's worker threads: the adapters (shared with
``fewshot eval`` and the Triton python-backend models) and the batcher's merged ``run(images)``. Those
threads hand the call to the loop with ``asyncio.run_coroutine_threadsafe`` and block on its result,
exactly as they would block inside ONNX Runtime. This keeps the adapters and the batcher unchanged and
all Triton I/O on the loop, where the start-up check and the concurrent parts of a split batch are
plain coroutines. (tritonclient's synchronous client, whose unary calls are thread-safe, would work
from the threads as well; the async one shares the server's event loop instead of blocking a channel
per thread.) Calling from the loop thread itself would deadlock and raises instead.

Failures (Triton stopped, unreachable, timed out, or a model unloaded) raise
:class:`~fewshot.server.errors.BackendUnavailable`, which the service answers with UNAVAILABLE. They
surface before anything is stored (Adapt writes its task only after adaptation succeeded; Classify
never writes), so no task changes; the gRPC channel reconnects on its own, with backoff capped at
:data:`MAX_RECONNECT_BACKOFF_MS`, and calls succeed again once Triton is back.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from fewshot.errors import FewShotError
from fewshot.models.family import Part
from fewshot.models.runtime import SessionEngines, Signature, part_model_name
from fewshot.server.errors import BackendUnavailable

#: Cap on the gRPC reconnect backoff, so the service notices a returning Triton within about a second.
MAX_RECONNECT_BACKOFF_MS = 1000
#: gRPC message limit towards Triton (a merged batch of 84x84 RGB images is ~21 MB per 256 images).
MAX_MESSAGE_BYTES = 2**31 - 1


class TritonNotReady(FewShotError, RuntimeError):
    """Start-up check failed: Triton is not live, or a model the bundles need is missing or differs."""


class TritonBackend:
    """The async Triton client of one server process; create it inside the running event loop.

    Args:
        url: Triton's gRPC endpoint, ``HOST:PORT``.
        timeout: seconds one inference call may take before it counts as unavailable.
    """

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        try:
            from tritonclient.grpc import aio
        except ImportError:
            raise TritonNotReady(
                "--feature-backend triton needs tritonclient: pip install 'tritonclient[grpc]' (or the package's `triton` extra)"
            ) from None
        self.url, self.timeout = url, timeout
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.max_batch: dict[str, int] = {}
        self.client = aio.InferenceServerClient(
            url,
            channel_args=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
            ],
        )

    async def close(self) -> None:
        await self.client.close()

    # -- start-up check -------------------------------------------------------------------------
    async def check(self, signatures: Iterable[Signature]) -> None:
        """Raise :class:`TritonNotReady` with every problem at once unless Triton is live and each
        model is ready with the expected inputs and outputs; records each model's max batch size."""
        from tritonclient.utils import InferenceServerException

        try:
            live = await self.client.is_server_live(client_timeout=self.timeout)
            reason = "it answered not live"
        except InferenceServerException as exc:
            live, reason = False, _reason(exc)
        if not live:
            raise TritonNotReady(f"Triton is not live at {self.url} ({reason}): start Triton on that address or point --triton-url at it")
        problems = []
        for sig in signatures:
            try:
                if not await self.client.is_model_ready(sig.model, client_timeout=self.timeout):
                    problems.append(f"model {sig.model!r} is not ready (not in the repository, not loaded, or failed to load)")
                    continue
                problems += sig.problems(await self.client.get_model_metadata(sig.model, as_json=True, client_timeout=self.timeout))
                config = await self.client.get_model_config(sig.model, as_json=True, client_timeout=self.timeout)
                self.max_batch[sig.model] = int(config["config"].get("max_batch_size", 0))
            except InferenceServerException as exc:
                problems.append(f"model {sig.model!r}: {_reason(exc)}")
        if problems:
            raise TritonNotReady(
                f"Triton at {self.url} cannot serve these bundles: "
                + "; ".join(problems)
                + ". Write the repository with `fewshot export --triton-repo DIR --model NAME` from the same bundles "
                "and load every model (with --model-control-mode=explicit: --load-model=NAME for each)"
            )

    # -- inference ------------------------------------------------------------------------------
    async def infer(self, model: str, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
        """One inference (split along the batch axis of ``images`` when it exceeds the model's max
        batch size; the parts run concurrently); Triton failures raise :class:`BackendUnavailable`."""
        limit = self.max_batch.get(model, 0)
        total = len(feeds["images"])
        if limit <= 0 or total <= limit:
            return await self._infer_once(model, feeds, output)
        parts = [{**feeds, "images": feeds["images"][i : i + limit]} for i in range(0, total, limit)]
        return np.concatenate(await asyncio.gather(*(self._infer_once(model, p, output) for p in parts)))

    async def _infer_once(self, model: str, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
        from tritonclient.grpc import InferInput, InferRequestedOutput
        from tritonclient.utils import InferenceServerException

        inputs = []
        for name, array in feeds.items():
            array = np.ascontiguousarray(array, dtype=np.float32)
            tensor = InferInput(name, list(array.shape), "FP32")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        try:
            result = await self.client.infer(model, inputs, outputs=[InferRequestedOutput(output)], client_timeout=self.timeout)
        except InferenceServerException as exc:
            raise BackendUnavailable(
                f"the inference backend (Triton at {self.url}, model {model}) failed: "
                f"{_reason(exc)}; nothing was changed, retry when Triton is back"
            ) from None
        out = result.as_numpy(output)
        if out is None or len(out) != len(feeds["images"]):
            raise BackendUnavailable(
                f"Triton model {model} returned no {output!r} for {len(feeds['images'])} images; "
                f"nothing was changed, retry when Triton is back"
            )
        return out

    def infer_blocking(self, model: str, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
        """:meth:`infer` from a worker thread (runs on the loop, blocks this thread until done)."""
        if threading.get_ident() == self._loop_thread:
            raise RuntimeError("TritonBackend.infer_blocking called on the event loop thread: await infer() there")
        return asyncio.run_coroutine_threadsafe(self.infer(model, feeds, output), self.loop).result()

    def engines(self, model_name: str, parts: Iterable[Part]) -> SessionEngines:
        """Engines running each of ``parts`` of ``model_name`` in its Triton model ``<name>_<part>``."""
        return SessionEngines({p.name: TritonSession(self, part_model_name(model_name, p.name), p.output) for p in parts})


@dataclass
class TritonSession:
    """A :class:`~fewshot.models.runtime.Session` (the ONNX Runtime ``run`` call) served by Triton model
    ``model``, whose one output is ``output``."""

    backend: TritonBackend
    model: str
    output: str

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [self.backend.infer_blocking(self.model, feeds, self.output)]


def _reason(exc: Exception) -> str:
    """tritonclient's exception as ``STATUS: message`` (its ``str`` repeats both)."""
    status = getattr(exc, "status", lambda: None)()
    message = getattr(exc, "message", lambda: str(exc))()
    return f"{status.removeprefix('StatusCode.')}: {message}" if status else str(message)
