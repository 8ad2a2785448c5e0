FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY common ./common
COPY services ./services
# CPU torch from the PyTorch index keeps the image small; the cuda extra adds cupy for the GPU backend.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir .
EXPOSE 8000
ENTRYPOINT []
CMD ["moeinf", "serve", "--host", "0.0.0.0"]
