# peft-gateway on CPU. Build:  docker build -t peft-gateway .
# Run:    docker run -p 8000:8000 -v hf-cache:/data/hf -v ./config.toml:/config/config.toml:ro peft-gateway
# (or `docker compose up`, see compose.yaml). For CUDA, start from a CUDA image or install the CUDA
# torch wheel instead of the CPU one below.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/hf

# A C compiler for the gateway's CPU kernels (engines/forward/gemm.c, built at first use; without one
# torch's slower kernels serve).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# torch first, from the CPU-only index (the default PyPI wheel pulls in gigabytes of CUDA libraries);
# the package's own "torch>=2.4,<3" is then already satisfied.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"

WORKDIR /src
COPY pyproject.toml README* ./
COPY engines ./engines
COPY gateway ./gateway
# EXTRAS="[ray]" adds Ray Serve (compose.yaml's "ray" profile builds it that way).
ARG EXTRAS=""
RUN pip install .${EXTRAS} && rm -rf /src

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin gateway \
    && mkdir -p /data/hf /config \
    && chown -R gateway:gateway /data
USER gateway
WORKDIR /home/gateway
# Build the CPU kernels now, not on the first request (a CPU without AVX2 keeps torch's kernels).
RUN python -c "from engines.forward.kernels import NativeKernels; NativeKernels.load()"
VOLUME ["/data/hf"]

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["peft-gateway"]
CMD ["serve", "--config", "/config/config.toml", "--host", "0.0.0.0"]
