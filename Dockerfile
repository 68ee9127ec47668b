# litefspy in a container, like LiteFS's image:
#
#   docker build -t litefspy .
#   docker run --device /dev/fuse --cap-add SYS_ADMIN \
#     -v "$PWD/fuse.yml:/etc/fuse.yml:ro" -v litefspy-data:/var/lib/litefs litefspy
#
# The entrypoint is `litefspy mount`: arguments go to it (`-config FILE`,
# `-- CMD ARGS...`). To ship an application, build FROM this image, add the
# app and start it with `exec:` in fuse.yml (see examples/fly).

ARG PYTHON_VERSION=3.11

# Build stage: wheels of litefspy and of every dependency (pyfuse3 compiles
# against libfuse3 here, so the final image needs no compiler).
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libfuse3-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY litefspy ./litefspy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Runtime: Debian slim, fuse3 (fusermount3 and libfuse3) and the wheels.
FROM python:${PYTHON_VERSION}-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends fuse3 \
 && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels litefspy
# fuse.yml is searched in /etc (after ./ and ~/); the data directory the
# examples use is a volume so it outlives the container.
VOLUME /var/lib/litefs
ENTRYPOINT ["litefspy", "mount"]
