# churnsignal worker image: slim, non-root, with a health check on the web port.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY churnsignal churnsignal
COPY schemas schemas
COPY stream stream
COPY sinks sinks
RUN pip install --no-cache-dir --prefix=/install -c constraints.txt '.[backtest]'

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --home-dir /var/lib/churnsignal --create-home churnsignal
USER churnsignal
WORKDIR /var/lib/churnsignal
ENV CHURNSIGNAL_STATE_DIR=/var/lib/churnsignal \
    CHURNSIGNAL_WEB_HOST=0.0.0.0 \
    CHURNSIGNAL_LOG_FORMAT=json
EXPOSE 6066
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:6066/healthz', timeout=2)" || exit 1
ENTRYPOINT ["churnsignal"]
CMD ["worker"]
