# tuneadvisor REST service (`advisor serve`), slim and non-root.
#   docker build -t tuneadvisor .                            # advice only: no torch
#   docker build --build-arg EXTRAS=train -t tuneadvisor:train .   # + torch, transformers, peft, bitsandbytes
#   docker run -p 8000:8000 -e ADVISOR_API_KEYS=... -v advisor-data:/data tuneadvisor
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG EXTRAS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY advisor ./advisor
COPY calibration ./calibration
# a non-editable install: the runtime image gets the venv, not the sources. DL3013 (pin versions)
# does not apply: this installs the project itself, whose dependencies pyproject.toml bounds.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"

FROM python:${PYTHON_VERSION}-slim AS runtime
RUN groupadd --system --gid 10001 advisor \
    && useradd --system --uid 10001 --gid advisor --create-home --home-dir /home/advisor advisor \
    && mkdir /data \
    && chown advisor:advisor /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ADVISOR_HOST=0.0.0.0 \
    ADVISOR_PORT=8000 \
    ADVISOR_DATA_DIR=/data
# numeric, so Kubernetes' runAsNonRoot can verify it
USER 10001:10001
WORKDIR /home/advisor
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 CMD ["python", "-m", "advisor.api.healthcheck"]
ENTRYPOINT ["advisor", "serve"]
