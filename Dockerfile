# The image the Helm chart runs (helm/raymoe, values image.repository): Ray 2.60 with raymoe installed.
#   CPU (the tiny example):  docker build -t raymoe/raymoe:0.1.0 \
#                              --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu .
#   GPU (CUDA; H100/H200):   docker build -t raymoe/raymoe:0.1.0 --build-arg BASE=rayproject/ray:2.60.0-py311-gpu .
# The base's Ray must be the version raymoe pins (ray[serve,train]==2.60.0) and the chart's rayVersion.
ARG BASE=rayproject/ray:2.60.0-py311
FROM ${BASE}
# Read by pip: where torch comes from (PyPI's default build is the CUDA one).
ARG PIP_EXTRA_INDEX_URL=""
WORKDIR /home/ray/raymoe
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users src ./src
COPY --chown=ray:users platform ./platform
COPY --chown=ray:users deployments ./deployments
COPY --chown=ray:users finetune ./finetune
RUN pip install --no-cache-dir . && python -c "import raymoe.deployments.app, raymoe.finetune.config"
WORKDIR /home/ray
# The image's user stays the base's `ray` (uid 1000, group users 100): the chart runs every pod as non-root.
USER ray
