# One image for all three services: compose.yaml runs `moeinf memd`, `moeinf worker` and `moeinf gateway` from it,
# and `docker run IMAGE` alone runs `moeinf serve` (the demo model without --model). docs/deploy.md explains it.
# BASE_IMAGE: any Debian-based image with python3.11 + pip first on PATH (others: CC_PACKAGES="" below). Where no
# registry is reachable, tests/deploy/base_image.sh builds one from Debian's packages (docs/deploy.md).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# torch first, from the PyTorch index, so that `pip install .` finds it installed and never pulls a CUDA build from
# PyPI. The defaults are the CPU build that `make install` pins; compose.gpu.yaml passes a CUDA index and [cuda].
ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG EXTRAS=""

# Nothing is downloaded at run time: the tokenizer and the weights come from the mounted checkpoint.
ENV PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    MOEINF_STATE_DIR=/state \
    MOEINF_DEMO_DIR=/state/demo-model

# A C compiler: the worker builds its kernels (matrix-vector products, norms, routers, dequantization) on first use,
# for the CPU it runs on (services/worker/dequant_kernel.py). apt-get needs a Debian-based BASE_IMAGE;
# CC_PACKAGES="" leaves the compiler out (any base image then; every kernel falls back to torch: bf16 decode ~1.6x
# slower, quantized experts dequantized with torch's ops, 2-3x slower).
ARG CC_PACKAGES="gcc libc6-dev"
RUN if [ -n "${CC_PACKAGES}" ]; then apt-get update && apt-get install -y --no-install-recommends ${CC_PACKAGES} \
    && rm -rf /var/lib/apt/lists/*; fi

WORKDIR /app
RUN pip install --no-cache-dir "${TORCH}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY common ./common
COPY services ./services
RUN pip install --no-cache-dir ".${EXTRAS}"

# A non-root user; /state is created here so that a fresh named volume mounted on it inherits the ownership.
RUN useradd --create-home --uid 1000 moeinf && mkdir -p /state && chown moeinf:moeinf /state
USER moeinf
EXPOSE 8000
CMD ["moeinf", "serve", "--host", "0.0.0.0"]
