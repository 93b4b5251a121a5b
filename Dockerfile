# The genrec server image. CPU by default; `--build-arg BASE=cuda` for a CUDA base with faiss-gpu and onnxruntime-gpu.
#
#   docker build -t genrec .
#   docker build -t genrec:cuda --build-arg BASE=cuda --build-arg TORCH_INDEX_URL=<your CUDA 12.8 torch index> .
#   docker run --rm -p 50051:50051 -p 9090:9090 -v "$PWD/bundles:/bundles:ro" genrec
#
# Mount the folder that holds the bundle, not the bundle itself: a new bundle version replaces the directory by
# rename, which a bind mount of the old directory would never show (`docker kill -s HUP` then reloads it).
# Serving options replace CMD: `docker run [...] genrec serve --bundle /bundles/beauty --device cuda` (image, command).
# The bearer token comes from the environment (-e GENREC_AUTH_TOKEN=...), never from the command line. The
# HEALTHCHECK speaks plaintext to port 50051; replace it when serving TLS or another port.
ARG BASE=cpu

FROM python:3.11-slim AS base-cpu
ENV FAISS_PACKAGE=faiss-cpu \
    ORT_PACKAGE=onnxruntime
RUN python -m venv /opt/venv

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04 AS base-cuda
# The GPU twins replace faiss-cpu and onnxruntime; torch comes from the CUDA wheel index.
ENV FAISS_PACKAGE=faiss-gpu-cu12 \
    ORT_PACKAGE=onnxruntime-gpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

FROM base-${BASE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1
WORKDIR /app

# torch first and alone: the largest layer, rebuilt only when the pin or the base changes. TORCH_INDEX_URL picks the
# wheel index of the build you want (CPU-only or a CUDA version); empty uses pip's default index.
ARG TORCH_INDEX_URL=""
RUN pip install --upgrade pip \
    && pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0

COPY . .
# A regular (not editable) install: the wheel carries the genrec.v1 stubs, and nothing is written at run time.
RUN pip install . \
    && if [ "$FAISS_PACKAGE" != faiss-cpu ]; then pip uninstall -y faiss-cpu && pip install "$FAISS_PACKAGE"; fi \
    && if [ "$ORT_PACKAGE" != onnxruntime ]; then pip uninstall -y onnxruntime && pip install "$ORT_PACKAGE"; fi \
    && useradd --system --uid 10001 --no-create-home genrec

USER genrec
EXPOSE 50051 9090
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 CMD python -c "import grpc, sys; \
from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
s = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=4).status; \
sys.exit(0 if s == h.HealthCheckResponse.SERVING else 1)"
# Exec form: the server is PID 1 and receives SIGTERM (graceful drain) and SIGHUP (bundle reload) itself.
ENTRYPOINT ["genrec"]
CMD ["serve", "--bundle", "/bundles/demo", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9090"]
