# BrainLine image: one image for the gateway (`brainline serve`) and the compute
# workers (`brainline worker --queues compute[,gpu]`). Multi-stage: the build
# stage installs BrainLine and its dependencies into /opt/brainline (a venv);
# the runtime stage copies only that venv, runs as the non-root user 10001 and
# holds dcm2niix (PyPI wheel) and every model weight BrainLine uses (packaged
# baseline weights, deepbet weights from its wheel): nothing is downloaded at
# run time. The build fails if any of them is missing.
#
# Build: deploy/build-image.sh (podman or buildah; docker build works the same).
# Where registries are unreachable, pass --build-arg BASE=<local bookworm image
# with python3.11> (deploy/build-image.sh --local-base makes one with debootstrap).
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# Debian's own python3.11 (debootstrap base) needs python3-venv; python:3.11-slim has it.
RUN python3 -c "import ensurepip" 2>/dev/null \
 || (apt-get update && apt-get install -y --no-install-recommends python3-venv && rm -rf /var/lib/apt/lists/*)
RUN python3 -m venv /opt/brainline
WORKDIR /src
COPY pyproject.toml README.md ./
COPY brainline brainline
COPY service service
COPY pipelines pipelines
COPY models models
COPY config config
# torch as pinned in the Makefile (CPU wheel); a GPU image passes e.g.
# --build-arg TORCH_SPEC=torch==2.13.0 --build-arg PIP_EXTRA_ARGS="--index-url https://download.pytorch.org/whl/cu124 --extra-index-url https://pypi.org/simple"
ARG TORCH_SPEC=torch==2.13.0
ARG PIP_EXTRA_ARGS=""
RUN /opt/brainline/bin/pip install $PIP_EXTRA_ARGS "$TORCH_SPEC" \
 && /opt/brainline/bin/pip install $PIP_EXTRA_ARGS . \
 && /opt/brainline/bin/pip uninstall -y pip setuptools wheel
# Everything a stage needs is inside, or the build fails here.
# (run from / so that the source folder /src/brainline does not shadow the installed package)
RUN cd / && /opt/brainline/bin/dcm2niix -v >/dev/null; test $? -le 3 \
 && /opt/brainline/bin/python -c "import pathlib, deepbet.utils, brainline.models as m; \
d = pathlib.Path(deepbet.utils.DATA_PATH) / 'models'; \
assert (d / 'model.pt').is_file() and (d / 'bbox_model.pt').is_file(), 'deepbet weights missing'; \
w = sorted((pathlib.Path(m.__file__).parent / 'weights').glob('*/*.safetensors')); \
assert w, 'baseline weights missing'; print('weights ok:', len(w) + 2)" \
 && /opt/brainline/bin/brainline --version

FROM ${BASE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN (getent group 10001 || groupadd --system --gid 10001 brainline) \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/brainline --no-create-home \
      --shell /usr/sbin/nologin brainline \
 && mkdir -p /var/lib/brainline /var/lib/brainline-workspaces \
 && chown 10001:10001 /var/lib/brainline /var/lib/brainline-workspaces \
 && chmod 0700 /var/lib/brainline /var/lib/brainline-workspaces
COPY --from=build /opt/brainline /opt/brainline
ENV PATH=/opt/brainline/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    BRAINLINE_HOME=/var/lib/brainline \
    BRAINLINE_DICOM_PORT=11112 \
    BRAINLINE_HTTP_PORT=8080 \
    BRAINLINE_WORKER_HTTP_PORT=9808
USER 10001:10001
WORKDIR /var/lib/brainline
VOLUME ["/var/lib/brainline", "/var/lib/brainline-workspaces"]
EXPOSE 11112 8080 9808
# The gateway answers /healthz on BRAINLINE_HTTP_PORT; Kubernetes probes the
# workers on BRAINLINE_WORKER_HTTP_PORT (see helm/brainline).
HEALTHCHECK CMD python -c "import urllib.request,os;urllib.request.urlopen('http://127.0.0.1:%s/healthz'%os.environ['BRAINLINE_HTTP_PORT'])"
ENTRYPOINT ["brainline"]
CMD ["serve"]
