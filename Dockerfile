FROM python:3.11-slim

# A non-root user owns nothing but its data directory.
RUN useradd --system --uid 10001 --home-dir /var/lib/jwtlet --create-home jwtlet

WORKDIR /src
COPY . /src
RUN pip install --no-cache-dir . \
    && python -c "from twisted.plugin import IPlugin, getPlugins; import jwtlet.plugins; list(getPlugins(IPlugin)); list(getPlugins(IPlugin, jwtlet.plugins))" \
    && rm -rf /src

WORKDIR /var/lib/jwtlet
USER 10001
EXPOSE 8080 8081
CMD ["twistd", "-n", "--pidfile=", "jwtlet", "--config", "/etc/jwtlet/jwtlet.yaml"]
