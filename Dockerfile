# One image for the gateway and the node agent; docker-compose.yml picks the command.
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends build-essential && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# Portable CPU build of llama.cpp; build with --build-arg CMAKE_ARGS="-DGGML_CUDA=on" on a CUDA base for GPUs.
ARG CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
COPY requirements/ requirements/
RUN CMAKE_ARGS="$CMAKE_ARGS" pip install --no-cache-dir -r requirements/base.txt
COPY . .
RUN python -m node_agent.default_model --dest /models

ENV PYTHONUNBUFFERED=1 OPTIMAGPT_DATA_DIR=/data
EXPOSE 8000
CMD ["python", "-m", "optimagpt.server", "-b", "0.0.0.0", "-p", "8000"]
