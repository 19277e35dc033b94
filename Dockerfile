# syntax=docker/dockerfile:1
# armt-serve: the HTTP service with the default model inside.
#   docker build -t armt-serve:cpu .                                # CPU image (torch's CPU wheels, ~1 GB smaller)
#   docker build --build-arg VARIANT=cuda -t armt-serve:cuda .      # CUDA image (PyPI's torch, CUDA libraries
#                                                                   # bundled; the host's driver comes in through
#                                                                   # the NVIDIA container toolkit: --gpus all)
#   docker build --build-arg VARIANT=cuda --build-arg EXTRAS=deploy -t armt-serve:ray .
#                                                                   # + Ray Serve (deploy/ray/ RayService, GPU)
# Settings are ARMT_* variables (README "Settings"); only what a container needs differently is set here.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------- build: a virtualenv in /opt/venv
FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cpu
ARG EXTRAS=""
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model ./model
COPY service ./service
# Every version pin lives in pyproject.toml (hence DL3013). For the CPU variant torch's CPU index is added: its
# "+cpu" build of the pinned torch wins over PyPI's CUDA build of the same version.
# hadolint ignore=DL3013
RUN set --; \
    case "$VARIANT" in \
      cpu) set -- --extra-index-url "$TORCH_CPU_INDEX" ;; \
      cuda) ;; \
      *) echo "VARIANT must be cpu or cuda, got $VARIANT" >&2; exit 1 ;; \
    esac; \
    pip install "$@" ".${EXTRAS:+[$EXTRAS]}" \
    && python -P -c "from model import default_model_path; print('default model:', default_model_path())"
# (-P: without it `python -c` in /src would import the copied source instead of the installed package)

# ---------------------------------------------------------------------------- runtime: no compilers, not root
FROM ${PYTHON_IMAGE} AS runtime
# hadolint ignore=SC2016
RUN groupadd --system --gid 10001 armt \
    && useradd --system --uid 10001 --gid armt --create-home --home-dir /home/armt armt \
    && mkdir -p /data && chown armt:armt /data \
    && echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/armt-venv.sh
# (that line for login shells, which reset PATH from /etc/profile: KubeRay starts its containers with `bash -lc`)
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    ARMT_HOST=0.0.0.0 \
    ARMT_DATA_DIR=/data
USER 10001:10001
WORKDIR /home/armt
VOLUME ["/data"]
EXPOSE 8000
# /health is 200 once the model is loaded and the engine runs (503 while loading: the start period covers it).
# urlopen raises on any status but 2xx: the exit code is 1 then.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", \
        "import os,urllib.request as r;r.urlopen('http://127.0.0.1:%s/health'%os.getenv('ARMT_PORT','8000'),timeout=4)"]
ENTRYPOINT ["armt"]
CMD ["serve"]
