# Serving image (the deployment issue makes this the GPU/Triton image; this one runs anywhere).
FROM python:3.11-slim
RUN useradd --create-home --uid 1000 fewshot
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fewshot ./fewshot
COPY models ./models
COPY export ./export
COPY server ./server
COPY protos ./protos
RUN pip install --no-cache-dir '.[cpu]'
USER fewshot
ENTRYPOINT ["fewshot"]
CMD ["--help"]
