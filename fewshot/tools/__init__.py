"""Development tools, kept out of the serving package: ``demo`` (``fewshot demo``), ``bench`` (``fewshot
bench``: in process, ``--target`` a running server), ``compare`` (``fewshot bench --compare``), ``results``
(``make results``) and ``launch`` (a ``fewshot serve`` child process, as the demo and the compare bench
start it). The test fixtures (PostgreSQL, ``tritonserver``, memory probes) live in ``tests/fixtures/``."""
