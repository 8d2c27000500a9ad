# servelab on the official vLLM OpenAI serving image: vLLM, CUDA and torch come from the base.
FROM vllm/vllm-openai:v0.24.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY runner/ runner/
COPY dashboard/ dashboard/
RUN python3 -m pip install --no-cache-dir ".[eval]" \
    && mkdir -p /app/data

ENV SERVELAB_DATA=/app/data
VOLUME ["/app/data"]
EXPOSE 8501
# The base image's entrypoint is `vllm serve`; servelab starts vLLM itself.
ENTRYPOINT ["servelab"]
CMD ["dashboard", "--host", "0.0.0.0", "--port", "8501"]
