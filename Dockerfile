# comfy-cancel: one image for every process (api, worker, runner, beat, migrate, sim-comfyui);
# docker-compose.yml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY . .
RUN pip install . \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/comfy-cancel \
        --create-home --shell /usr/sbin/nologin comfy \
    && rm -rf /src

# Never root: the processes need no privilege, and the beat volume mounts here owned by it.
USER comfy
WORKDIR /var/lib/comfy-cancel

EXPOSE 8000 8188
CMD ["comfy-cancel", "--help"]
