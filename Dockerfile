# The base image is pinned by digest: a tag can be moved to other content, a digest cannot.
# This is the multi-platform index of python:3.11-slim (Python 3.11.15, Debian trixie) as
# published by Docker Official Images and recorded in docker-library/repo-info
# (repos/python/remote/3.11-slim.md). To move to a newer build, read the index digest with
# `docker buildx imagetools inspect python:3.11-slim` (or let Renovate/Dependabot propose it)
# and replace the digest below; keep the tag, it documents what the digest is.
FROM python:3.11-slim@sha256:90744cff8f32887f075c47d747a173ff333e9e98801667af93c357fa9f5e28ff

# A non-root user owns nothing but its data directory.
RUN groupadd --system --gid 10001 jwtlet \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/jwtlet --create-home jwtlet

WORKDIR /src
COPY . /src
# The plugin cache is written here, at build time: the container's root filesystem is read-only.
RUN pip install --no-cache-dir . \
    && python -c "from twisted.plugin import IPlugin, getPlugins; import jwtlet.plugins; list(getPlugins(IPlugin)); list(getPlugins(IPlugin, jwtlet.plugins))" \
    && rm -rf /src

WORKDIR /var/lib/jwtlet
USER 10001:10001
EXPOSE 8080 8081
CMD ["twistd", "-n", "--pidfile=", "jwtlet", "--config", "/etc/jwtlet/jwtlet.yaml"]
