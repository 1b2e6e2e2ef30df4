"""Constants the tests share (imported by name; conftest.py holds only fixtures)."""

from __future__ import annotations

from fewshot.models.zoo import shipped_models

#: Test servers share 2 cores with pytest.
SMALL = ("--threads", "1", "--workers", "2", "--warmup-tasks", "0")  # the session server below warms up
#: Every shipped model, by name.
SHIPPED = shipped_models()
