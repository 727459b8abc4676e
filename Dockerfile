# BrainLine service image (single process: DICOM listener, workers, REST API).
FROM python:3.11-slim-bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends dcmtk \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/brainline
COPY pyproject.toml README.md ./
COPY brainline brainline
COPY service service
COPY pipelines pipelines
COPY models models
COPY config config
# torch is pinned like in the Makefile; use your CPU-only wheel index for a smaller image.
RUN pip install --no-cache-dir torch==2.13.0 \
 && pip install --no-cache-dir .
ENV BRAINLINE_HOME=/var/lib/brainline \
    BRAINLINE_DICOM_PORT=11112 \
    BRAINLINE_HTTP_PORT=8080
RUN useradd --system --uid 10001 brainline && mkdir -p /var/lib/brainline \
 && chown brainline /var/lib/brainline
USER brainline
VOLUME /var/lib/brainline
EXPOSE 11112 8080
HEALTHCHECK CMD python -c "import urllib.request,os;urllib.request.urlopen('http://127.0.0.1:%s/healthz'%os.environ['BRAINLINE_HTTP_PORT'])"
ENTRYPOINT ["brainline"]
CMD ["serve"]
