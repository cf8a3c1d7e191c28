# syntax=docker/dockerfile:1
# One image for every RingiFlow process; docker-compose.yml picks the process with `command`.

# --- build: install the project and its pinned dependencies into a self-contained venv
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# .dockerignore keeps tests, docs, VCS data and local secrets out of the context.
COPY . .
RUN pip install .

# --- runtime: the venv only, no sources, no build tooling
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Non-root; a writable home because Faust keeps its table state under the working directory.
RUN useradd --create-home --home-dir /home/ringiflow --uid 10001 --user-group ringiflow
COPY --from=build /opt/venv /opt/venv
USER ringiflow
WORKDIR /home/ringiflow
EXPOSE 8000 8001
CMD ["ringiflow", "run", "command-api"]
