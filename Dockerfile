# gpucap agent image. Not built in this repository's CI (no container builder here): see docs/deploy.md.
#   docker build -t <registry>/gpucap:0.1.0 .
# NVML (libnvidia-ml.so) is NOT in the image: the NVIDIA container runtime mounts the node's driver
# library into the pod (NVIDIA_VISIBLE_DEVICES / NVIDIA_DRIVER_CAPABILITIES=utility, set by the chart).

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY collectors ./collectors
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /install /usr/local
# Non-root by default; the Helm chart runs it as uid 0 with every capability dropped only because the
# kubelet's pod-resources socket is usually root-only (docs/deploy.md, "Security").
USER 65532:65532
EXPOSE 9470
ENTRYPOINT ["gpucap"]
CMD ["run"]
