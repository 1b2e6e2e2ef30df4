"""Development tools, kept out of the serving package: ``demo`` (``fewshot demo``), ``bench`` (``fewshot
bench --target``), ``process`` (a ``fewshot serve`` child process, as the demo, bench, soak script and tests
start it) and ``tritonserver`` (a real ``tritonserver`` child process for the tests)."""
