# The one jetreduce image: services (`jetreduce service <name>`) and agents (`jetreduce worker`).
#   docker build -t jetreduce:dev .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed numeric uid/gid so `runAsNonRoot` can verify it without a passwd lookup; the
# manifests use the same (10001).
RUN groupadd --system --gid 10001 jetreduce \
 && useradd --system --uid 10001 --gid 10001 --home-dir /work --create-home \
      --shell /usr/sbin/nologin jetreduce

WORKDIR /src
COPY pyproject.toml README.md ./
COPY services ./services
RUN pip install '.[otlp]' && rm -rf /src

# Agents run workflow steps here (an emptyDir in the Job's pods; readOnlyRootFilesystem).
WORKDIR /work
USER 10001:10001
ENTRYPOINT ["jetreduce"]
CMD ["--help"]
