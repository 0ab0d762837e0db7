# churnsignal image: slim, non-root. One image for every command: the worker (CMD, web port
# 6066), the gateway (`gateway`, port 8000), notify, and the one-shot commands. The health
# check probes /healthz on whichever port the running command serves (healthy while a
# one-shot command such as `migrate` runs): churnsignal/tools/healthcheck.py.
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
    CHURNSIGNAL_GATEWAY__HOST=0.0.0.0 \
    CHURNSIGNAL_LOG_FORMAT=json
# 6066: the worker's (and notify's) web port; 8000: the gateway (`docker run IMAGE gateway`).
EXPOSE 6066 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s \
  CMD ["python", "-m", "churnsignal.tools.healthcheck"]
ENTRYPOINT ["churnsignal"]
CMD ["worker"]
