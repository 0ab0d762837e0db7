# churnsignal image: slim, non-root. One image for every command: the worker (CMD, web port
# 6066), the gateway (`gateway`, port 8000), notify, and the one-shot commands. The health
# check probes /healthz on whichever port the running command serves (healthy while a
# one-shot command such as `migrate` runs): churnsignal/tools/healthcheck.py.
FROM python:3.11-slim AS build
# The per-event core is compiled by mypyc (setup.py): a C compiler here, and the
# dependencies and mypy installed where the build can see their types.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md constraints.txt ./
COPY churnsignal churnsignal
COPY schemas schemas
COPY stream stream
COPY sinks sinks
RUN pip install --no-cache-dir -c constraints.txt '.[backtest]' mypy 'setuptools>=77' wheel \
    && CHURNSIGNAL_COMPILE=1 pip wheel --no-cache-dir --no-build-isolation --no-deps -w /wheels . \
    && pip install --no-cache-dir --ignore-installed --prefix=/install -c constraints.txt \
       "$(ls /wheels/churnsignal-*.whl)[backtest]"

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
